"""Visit discovery: post/pre pairing, labels, weeks, errors."""

import pytest

from lesionpipe.bids import BidsError, find_visits


def _touch(root, rel):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


@pytest.fixture
def dataset(tmp_path):
    _touch(tmp_path, "sub-01/ses-w04/anat/sub-01_ses-w04_ce-gadolinium_T1w.nii.gz")
    _touch(tmp_path, "sub-01/ses-w04/anat/sub-01_ses-w04_T1w.nii.gz")
    _touch(tmp_path, "sub-01/ses-w04/anat/sub-01_ses-w04_FLAIR.nii.gz")
    _touch(tmp_path, "sub-01/ses-w00/anat/sub-01_ses-w00_ce-gadolinium_T1w.nii")
    _touch(tmp_path, "sub-02/ses-w12/anat/sub-02_ses-w12_acq-2d_ce-gadolinium_T1w.nii.gz")
    _touch(tmp_path, "sub-02/ses-w12/anat/sub-02_ses-w12_acq-2d_T1w.nii.gz")
    _touch(tmp_path, "sub-02/ses-w12/anat/sub-02_ses-w12_acq-3d_T1w.nii.gz")
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tweek\nses-w00\t0\nses-w04\t4\n")
    _touch(tmp_path, "derivatives/truth/sub-01/ses-w04/anat/sub-01_ses-w04_ce-gadolinium_T1w.nii.gz")
    return tmp_path


def test_pairs_pre_and_post_and_reads_weeks(dataset):
    visits = find_visits(dataset)
    assert [(v.participant_id, v.session_id, v.week) for v in visits] == [
        ("sub-01", "ses-w00", 0.0), ("sub-01", "ses-w04", 4.0), ("sub-02", "ses-w12", None)]
    assert visits[0].pre is None                                    # post-only visit
    assert visits[1].pre.name == "sub-01_ses-w04_T1w.nii.gz"
    assert visits[2].pre.name == "sub-02_ses-w12_acq-2d_T1w.nii.gz"  # same acq entity
    assert visits[2].prefix == "sub-02_ses-w12_acq-2d"


def test_labels_with_or_without_prefix(dataset):
    assert [v.session for v in find_visits(dataset, participants=["sub-01"],
                                           sessions=["w04"])] == ["w04"]
    assert len(find_visits(dataset, participants=["02"])) == 1


def test_unknown_participant_is_an_error(dataset):
    with pytest.raises(BidsError, match="sub-99"):
        find_visits(dataset, participants=["99"])


def test_bad_week_is_an_error(dataset):
    (dataset / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tweek\nses-w04\tfour\n")
    with pytest.raises(BidsError, match="'four' is not a number"):
        find_visits(dataset)


def test_two_pre_scans_without_entities_is_ambiguous(tmp_path):
    _touch(tmp_path, "sub-01/ses-a/anat/sub-01_ses-a_ce-gadolinium_T1w.nii.gz")
    _touch(tmp_path, "sub-01/ses-a/anat/sub-01_ses-a_run-1_T1w.nii.gz")
    _touch(tmp_path, "sub-01/ses-a/anat/sub-01_ses-a_run-2_T1w.nii.gz")
    with pytest.raises(BidsError, match="several pre-contrast"):
        find_visits(tmp_path)


def test_paths_are_absolute_even_from_a_relative_root(dataset, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    visits = find_visits(dataset.name)
    assert all(v.post.is_absolute() and (v.pre is None or v.pre.is_absolute()) for v in visits)
