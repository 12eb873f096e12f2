"""Bad input gets a clear error naming the file and the problem."""

import gzip

import nibabel as nb
import numpy as np
import pytest

from lesionpipe.imageio import ScanError, atomic_write_text, like_image, load_scan


def _save(tmp_path, data, affine=None, name="scan.nii.gz"):
    path = tmp_path / name
    nb.save(nb.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture
def good():
    return np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)


def test_good_scan_loads_as_float32(tmp_path, good):
    img = load_scan(_save(tmp_path, (good * 1000).astype(np.int16)))
    assert img.get_data_dtype() == np.float32 and img.shape == (12, 10, 8)


def test_singleton_fourth_dimension_is_squeezed(tmp_path, good):
    img = load_scan(_save(tmp_path, good[..., None]))
    assert img.shape == (12, 10, 8)


@pytest.mark.parametrize("case, message", [
    ("4d", "is 4-D (12, 10, 8, 2); expected one 3-D volume"),
    ("2d", "is 2-D"),
    ("nan", "every voxel is NaN"),
    ("constant", "image is constant"),
    ("degenerate", "degenerate affine"),
    ("truncated", "probably truncated"),
    ("empty", "file is empty"),
    ("text", "not a readable NIfTI"),
    ("missing", "file not found"),
])
def test_bad_scans_raise_with_file_name(tmp_path, good, case, message):
    name = "sub-01_ses-w04_ce-gadolinium_T1w.nii.gz"
    path = tmp_path / name
    if case == "4d":
        _save(tmp_path, np.stack([good, good], -1), name=name)
    elif case == "2d":
        _save(tmp_path, good[..., 0], name=name)
    elif case == "nan":
        _save(tmp_path, np.full_like(good, np.nan), name=name)
    elif case == "constant":
        _save(tmp_path, np.full_like(good, 7.0), name=name)
    elif case == "degenerate":
        hdr = nb.Nifti1Header()
        hdr.set_data_shape(good.shape)
        hdr.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
        hdr["qform_code"] = 0
        nb.save(nb.Nifti1Image(good, None, hdr), path)
    elif case == "truncated":
        full = tmp_path / "full.nii.gz"
        _save(tmp_path, good, name="full.nii.gz")
        raw = gzip.decompress(full.read_bytes())
        path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("not an image")
    with pytest.raises(ScanError) as err:
        load_scan(path)
    assert name in str(err.value)
    assert message in str(err.value)


def test_nan_voxels_are_zeroed(tmp_path, good):
    good[0, 0, 0] = np.nan
    img = load_scan(_save(tmp_path, good))
    assert np.isfinite(img.get_fdata()).all()


def test_like_image_keeps_grid(tmp_path):
    aff = np.array([[-0.9, 0, 0.1, 90], [0, 0.9, 0, -120], [0.05, 0, 3.0, -60], [0, 0, 0, 1]])
    ref = nb.Nifti1Image(np.zeros((5, 6, 7), np.float32), aff)
    ref.set_qform(aff, 1)
    ref.set_sform(aff, 2)
    out = like_image(np.ones((5, 6, 7), np.uint8), ref)
    nb.save(out, tmp_path / "m.nii.gz")
    back = nb.load(tmp_path / "m.nii.gz")
    assert np.allclose(back.affine, ref.affine, atol=1e-5)
    assert int(back.header["sform_code"]) == 2 and back.get_data_dtype() == np.uint8


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.tsv", "x\n")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.tsv"]
