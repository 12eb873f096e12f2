"""Command-line usage: exit code 2 with a clear message for bad usage."""

import json

import pytest

from lesionpipe import __version__
from lesionpipe.cli import main


def _bids(tmp_path):
    root = tmp_path / "bids"
    anat = root / "sub-01" / "ses-w04" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_ses-w04_ce-gadolinium_T1w.nii.gz").write_bytes(b"")
    return root


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--nprocs", "0"], "--nprocs must be >= 1"),
    (["--plugin-args", "{not json"], "--plugin-args is not valid JSON"),
    (["--plugin-args", "[1]"], "must be a JSON object"),
    (["--participant-label", "sub-07"], "sub-07"),
    (["--settings", "/nonexistent.toml"], "cannot read settings file"),
])
def test_bad_usage_exits_2(tmp_path, capsys, extra, message):
    code = main(["run", str(_bids(tmp_path)), str(tmp_path / "out")] + extra)
    assert code == 2
    assert message in capsys.readouterr().err


def test_output_inside_input_is_refused(tmp_path, capsys):
    bids = _bids(tmp_path)
    assert main(["run", str(bids), str(bids / "derivatives" / "gel")]) == 2
    assert "inside the input dataset" in capsys.readouterr().err
    assert main(["run", str(bids), str(tmp_path / "out"), "-w", str(bids / "work")]) == 2


def test_unknown_setting_is_refused(tmp_path, capsys):
    toml = tmp_path / "s.toml"
    toml.write_text("min_voxels = 3\nthreshold_typo = 2\n")
    assert main(["run", str(_bids(tmp_path)), str(tmp_path / "out"), "--settings", str(toml)]) == 2
    assert "unknown setting 'threshold_typo'" in capsys.readouterr().err


def test_no_visits_is_bad_usage(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no visits" in capsys.readouterr().err
