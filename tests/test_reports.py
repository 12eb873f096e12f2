"""Tests of the per-visit HTML QA report (lesionpipe.reports)."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionpipe.reports.demo import lesion_table_from_labels, make_affine, synthetic_visit
from lesionpipe.reports.render import outline_segments, plane_slice, radiological_slice, ras_grid
from lesionpipe.reports.visit import filter_facts, write_visit_report

PNG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _report(tmp_path, v, *, pre=True, enh=True, facts=None, name="r.html", **kw):
    return write_visit_report(
        tmp_path / name, post_img=v["post"], labels_img=v["labels"], brain_mask_img=v["mask"],
        lesion_table=v["table"], pre_img=v["pre"] if pre else None,
        enhancement_img=v["enhancement"] if enh else None, title="sub-01 ses-w04",
        facts=facts, **kw)


def _pngs(text):
    out = []
    for b64 in PNG_RE.findall(text):
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        im = Image.open(io.BytesIO(raw))
        im.verify()
        out.append(im.size)
    return out


def _assert_offline(text):
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert not re.search(r"<link\b", text, re.I)
    assert not re.search(r'src="(?!data:image/png;base64,)', text)
    assert "url(" not in text


def _gallery_ids(text):
    return [int(m) for m in re.findall(r'<figure class="lesion" id="lesion-(\d+)"', text)]


LESIONS_3 = [(-12.0, 10.0, 5.0, 6.0), (14.0, -20.0, -5.0, 5.0), (0.0, 25.0, 12.0, 4.5)]


@pytest.fixture(scope="module")
def visit_ras():
    return synthetic_visit((40, 48, 30), (4.0, 4.0, 5.0), "RAS", lesions=LESIONS_3, seed=3)


@pytest.fixture(scope="module")
def visit_las_thick():
    return synthetic_visit((40, 48, 30), (3.0, 3.5, 6.0), "LAS", lesions=LESIONS_3[:1], seed=4)


def test_several_lesions_report(tmp_path, visit_ras):
    v = visit_ras
    assert len(v["table"]) == 3
    facts = {"registration_ncc": 0.934, "settings": {"min_size_mm3": 10, "connectivity": 3},
             "versions": {"lesionpipe": "0.1.0"}, "warnings": ["bias field was strong"]}
    out = _report(tmp_path, v, facts=facts)
    text = out.read_text(encoding="utf-8")
    _assert_offline(text)
    assert re.search(r'id="gel-count">3<', text)
    total = v["table"].volume_mm3.sum()
    assert f'id="gel-volume">{total:.1f}<' in text
    assert _gallery_ids(text) == [1, 2, 3]
    for lid in (1, 2, 3):
        assert f"<strong>Lesion {lid}</strong>" in text
    # gallery (3) + overview + registration + brain mask
    sizes = _pngs(text)
    assert len(sizes) == 6 and all(w > 50 and h > 50 for w, h in sizes)
    assert "0.934" in text and "bias field was strong" in text and "min_size_mm3" in text
    assert "radiological convention" in text
    assert "post-only" not in text.lower()


def test_zero_lesions(tmp_path, visit_ras):
    v = dict(visit_ras)
    v["labels"] = nb.Nifti1Image(np.zeros(v["labels"].shape, np.int16), v["labels"].affine)
    v["table"] = v["table"].iloc[0:0]
    text = _report(tmp_path, v).read_text()
    _assert_offline(text)
    assert 'id="gel-count">0<' in text
    assert "No enhancing lesions detected" in text
    assert _gallery_ids(text) == []
    assert len(_pngs(text)) == 3  # overview, registration, brain mask


def test_one_lesion_post_only_las_thick(tmp_path, visit_las_thick):
    v = visit_las_thick
    assert "".join(nb.aff2axcodes(v["post"].affine)) == "LAS"
    text = _report(tmp_path, v, pre=False, enh=False).read_text()
    _assert_offline(text)
    assert 'id="gel-count">1<' in text and 'class="unit">enhancing lesion<' in text
    assert _gallery_ids(text) == [1]
    assert "Post-only visit" in text and "no registration to check" in text
    assert len(_pngs(text)) == 3  # gallery, overview, brain mask: no registration figure
    assert "LAS" in text


def test_many_lesions_are_capped(tmp_path):
    v = synthetic_visit((48, 56, 36), (3.0, 3.0, 3.0), "LPS", n_random=45, seed=7)
    n = len(v["table"])
    assert n > 30
    text = _report(tmp_path, v, max_gallery=12).read_text()
    assert f'id="gel-count">{n}<' in text
    assert _gallery_ids(text) == list(range(1, 13))
    assert f"{n - 12} more lesions" in text
    # every lesion is still in the table
    assert len(re.findall(r'<a href="#lesion-\d+">', text)) == n


def test_edge_lesion_nan_and_oblique(tmp_path):
    v = synthetic_visit((36, 40, 24), (4.0, 4.0, 5.0), "RAS", oblique_deg=17.0, seed=5,
                        lesions=[(-70.0, 0.0, 0.0, 6.0)])  # reaches the left edge of the grid
    lab = np.asanyarray(v["labels"].dataobj)
    assert lab.any() and lab[0].any()
    post = np.asanyarray(v["post"].dataobj).copy()
    post[5:9, 5:9, :] = np.nan
    v = dict(v, post=nb.Nifti1Image(post, v["post"].affine))
    text = _report(tmp_path, v).read_text()
    _assert_offline(text)
    assert _gallery_ids(text) == [1]
    assert "shown on the nearest anatomical axes" in text
    assert len(_pngs(text)) == 4


def test_count_mismatch_between_facts_and_table_is_flagged(tmp_path, visit_ras):
    text = _report(tmp_path, visit_ras, facts={"gel_count": 5}).read_text()
    assert "The facts give gel_count = 5 but the lesion table has 3 rows." in text
    text = _report(tmp_path, visit_ras, facts={"gel_count": 3}, name="ok.html").read_text()
    assert "The facts give" not in text


def test_table_label_mismatch_is_reported(tmp_path, visit_ras):
    v = dict(visit_ras)
    t = v["table"].copy()
    t.loc[len(t)] = dict(t.iloc[0], lesion_id=9)
    v["table"] = t
    text = _report(tmp_path, v).read_text()
    assert "Lesion(s) 9 of the table have no voxel in the label image" in text
    assert _gallery_ids(text) == [1, 2, 3, 9]


def test_grid_mismatch_raises(tmp_path, visit_ras):
    v = dict(visit_ras)
    shifted = v["mask"].affine.copy()
    shifted[0, 3] += 2.0
    v["mask"] = nb.Nifti1Image(np.asanyarray(v["mask"].dataobj), shifted)
    with pytest.raises(ValueError, match="brain_mask_img affine differs"):
        _report(tmp_path, v)
    v = dict(visit_ras, pre=nb.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)))
    with pytest.raises(ValueError, match=r"pre_img shape \(10, 10, 10\) differs"):
        _report(tmp_path, v)
    v = dict(visit_ras, table=visit_ras["table"].drop(columns="volume_mm3"))
    with pytest.raises(ValueError, match="lacks column"):
        _report(tmp_path, v)


def test_blinding_and_identifiers_are_not_shown(tmp_path, visit_ras, caplog):
    facts = {"treatment_arm": "ARM-SECRET", "randomisation group": "GRP-SECRET",
             "PatientName": "DOE^JANE", "patient_name": "NAME-SECRET", "acquisition_date": "20240102",
             "settings": {"dose": "DOSE-SECRET", "threshold_pct": 20}, "has_pre": True}
    text = _report(tmp_path, visit_ras, facts=facts).read_text()
    for secret in ("ARM-SECRET", "GRP-SECRET", "NAME-SECRET", "20240102", "DOSE-SECRET"):
        assert secret not in text
    assert "threshold_pct" in text
    assert "treatment_arm" in caplog.text  # the key is logged, never its value
    assert "ARM-SECRET" not in caplog.text
    kept, dropped = filter_facts({"percentage": 1, "image_quality": 2, "age": 3})
    assert kept == {"percentage": 1, "image_quality": 2} and dropped == ["age"]


def test_title_is_escaped(tmp_path, visit_ras):
    v = visit_ras
    out = write_visit_report(tmp_path / "t.html", post_img=v["post"], labels_img=v["labels"],
                             brain_mask_img=v["mask"], lesion_table=v["table"],
                             title="<b>sub-01</b>")
    text = out.read_text()
    assert "&lt;b&gt;sub-01&lt;/b&gt;" in text and "<b>sub-01</b>" not in text


# --- orientation -----------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["RAS", "LAS", "LPS", "PIR"])
def test_left_hemisphere_is_on_image_right(code):
    shape, zooms = (30, 34, 26), (2.0, 2.0, 3.0)
    aff = make_affine(shape, zooms, code)
    ijk = np.indices(shape).reshape(3, -1)
    xyz = (aff[:3, :3] @ ijk + aff[:3, 3:4]).reshape((3, *shape))
    # marker: patient's left (world x < 0), anterior (y > 0), near z = 0
    marker = (np.abs(xyz[0] + 15) < 2) & (np.abs(xyz[1] - 12) < 2) & (np.abs(xyz[2]) < 2)
    img = nb.Nifti1Image(marker.astype(np.float32), aff)
    assert "".join(nb.aff2axcodes(aff)) == code
    sl, aspect = radiological_slice(img, plane="axial", world=(0.0, 0.0, 0.0))
    rows, cols = np.nonzero(sl)
    assert len(cols)
    assert cols.min() > sl.shape[1] / 2     # patient's left on the image's right
    assert rows.max() < sl.shape[0] / 2     # anterior at the top
    cor, _ = radiological_slice(img, plane="coronal", world=(0.0, 12.0, 0.0))
    assert np.nonzero(cor)[1].min() > cor.shape[1] / 2
    sag, _ = radiological_slice(img, plane="sagittal", world=(-15.0, 0.0, 0.0))
    assert np.nonzero(sag)[1].max() < sag.shape[1] / 2  # anterior on the left of a sagittal view


def test_aspect_follows_voxel_size():
    img = nb.Nifti1Image(np.zeros((20, 22, 8), np.float32), make_affine((20, 22, 8), (1, 1, 3),
                                                                        "LAS"))
    assert radiological_slice(img, plane="axial")[1] == pytest.approx(1.0)
    cor, aspect = radiological_slice(img, plane="coronal")
    assert cor.shape == (8, 20) and aspect == pytest.approx(3.0)
    # a grid stored slice-first (PIR): the 3 mm axis is the first stored axis
    img = nb.Nifti1Image(np.zeros((8, 20, 22), np.float32), make_affine((8, 20, 22), (3, 1, 1),
                                                                        "PIR"))
    g = ras_grid(img)
    assert g.shape == (22, 8, 20) and g.zooms.tolist() == pytest.approx([1, 3, 1])
    assert radiological_slice(img, plane="axial")[1] == pytest.approx(3.0)


def test_report_lesion_centroid_lands_on_left_for_left_lesion():
    # the gallery/overview use the same path: table centroid (stored voxels) -> RAS display pixel
    for code in ("RAS", "LAS"):
        v = synthetic_visit((40, 48, 30), (4.0, 4.0, 5.0), code, lesions=[(-30.0, 0.0, 0.0, 6.0)],
                            seed=2)
        t = v["table"].iloc[0]
        g = ras_grid(v["post"])
        c = g.to_ras_index([t.centroid_i, t.centroid_j, t.centroid_k])[0]
        lab = nb.orientations.apply_orientation(np.asanyarray(v["labels"].dataobj), g.ornt)
        sl, _ = plane_slice(lab, g.zooms, "axial", int(round(c[2])))
        cols = np.nonzero(sl == 1)[1]
        assert cols.min() > sl.shape[1] / 2, code
        assert abs((sl.shape[1] - 1 - c[0]) - cols.mean()) < 1.0


def test_outline_segments_cover_boundary():
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True            # 2 x 3 rectangle: perimeter 10 edges
    assert len(outline_segments(m)) == 10
    lab = np.zeros((3, 4), int)
    lab[1, 1], lab[1, 2] = 1, 2   # two touching lesions keep the edge between them
    assert len(outline_segments(lab)) == 7
    assert len(outline_segments(np.zeros((3, 3)))) == 0


def test_lesion_table_helper_matches_contract():
    v = synthetic_visit((40, 48, 30), (4.0, 4.0, 5.0), "LAS", lesions=LESIONS_3, seed=0)
    t = v["table"]
    assert list(t.lesion_id) == [1, 2, 3]
    lab = np.asanyarray(v["labels"].dataobj)
    assert t.n_voxels.tolist() == [int((lab == k).sum()) for k in (1, 2, 3)]
    # world centroid of lesion 1 is near where it was placed
    assert np.allclose(t.loc[0, ["centroid_x", "centroid_y", "centroid_z"]].astype(float),
                       LESIONS_3[0][:3], atol=3.0)
    assert isinstance(lesion_table_from_labels(lab, np.zeros(lab.shape), v["affine"]),
                      pd.DataFrame)


@pytest.mark.parametrize("nz", [1, 2])
def test_few_slice_grid(tmp_path, nz):
    v = synthetic_visit((40, 48, nz), (1.0, 1.0, 6.0), "LAS", lesions=[(-5.0, 3.0, 0.0, 4.0)],
                        seed=1)
    text = _report(tmp_path, v).read_text()
    _assert_offline(text)
    assert _gallery_ids(text) == [1]
    assert "Coronal and sagittal views omitted" in text
    # no sliver figures: every embedded image stays a sensible shape
    assert all(w / h < 8 for w, h in _pngs(text))


def test_nan_everywhere_and_empty_mask(tmp_path, visit_ras):
    v = dict(visit_ras)
    v["mask"] = nb.Nifti1Image(np.zeros(v["mask"].shape, np.uint8), v["mask"].affine)
    v["post"] = nb.Nifti1Image(np.full(v["post"].shape, np.nan, np.float32), v["post"].affine)
    text = _report(tmp_path, v).read_text()
    assert "The brain mask is empty" in text
    assert _gallery_ids(text) == [1, 2, 3] and len(_pngs(text)) == 6


def test_duplicate_lesion_ids_raise(tmp_path, visit_ras):
    t = pd.concat([visit_ras["table"], visit_ras["table"].iloc[:1]])
    with pytest.raises(ValueError, match="repeats lesion_id 1"):
        _report(tmp_path, dict(visit_ras, table=t))


def test_no_pyplot_and_no_backend_change(tmp_path):
    """Drawing a report must not import pyplot nor switch matplotlib's global backend."""
    code = (
        "import sys, matplotlib\n"
        "before = matplotlib.rcParams._get_backend_or_none()\n"
        "from lesionpipe.reports.demo import synthetic_visit\n"
        "from lesionpipe.reports import write_visit_report\n"
        "v = synthetic_visit((24, 28, 20), (4, 4, 5), 'LAS', lesions=[(5, 5, 0, 5)])\n"
        f"write_visit_report({str(tmp_path / 'x.html')!r}, post_img=v['post'], "
        "labels_img=v['labels'], brain_mask_img=v['mask'], lesion_table=v['table'])\n"
        "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'no-pyplot',\n"
        "      matplotlib.rcParams._get_backend_or_none() == before)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root,
                                                                   os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.split() == ["no-pyplot", "True"]


def _yellow_xy(png_b64):
    im = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")).astype(int)
    r, g, b = im[..., 0], im[..., 1], im[..., 2]
    ys, xs = np.nonzero((r > 200) & (g > 170) & (g < 235) & (b < 90))
    return im.shape, xs, ys


@pytest.mark.parametrize("code", ["RAS", "LAS", "LPS"])
def test_rendered_overview_shows_left_lesion_on_image_right(tmp_path, code):
    """End to end: the yellow outline of a left-hemisphere lesion lands on the right of the PNG."""
    v = synthetic_visit((40, 48, 30), (4.0, 4.0, 5.0), code, lesions=[(-25.0, 10.0, 0.0, 7.0)],
                        seed=6)
    text = write_visit_report(tmp_path / "o.html", post_img=v["post"], labels_img=v["labels"],
                              brain_mask_img=v["mask"], lesion_table=v["table"],
                              overview_slices=1).read_text()
    overview = re.search(r'alt="Overview of axial slices" src="data:image/png;base64,([^"]+)"',
                         text).group(1)
    (height, width, _), xs, ys = _yellow_xy(overview)
    assert len(xs) > 10
    assert xs.min() > width / 2        # patient's left on the image's right
    assert np.median(ys) < height / 2  # anterior (y = +10 mm) in the upper half


def test_gallery_outline_is_centred(tmp_path, visit_ras):
    text = _report(tmp_path, visit_ras, pre=False, enh=False).read_text()
    entry = re.search(r'id="lesion-2".*?base64,([^"]+)"', text).group(1)
    (height, width, _), xs, ys = _yellow_xy(entry)
    assert len(xs) > 10
    assert abs(np.median(xs) - width / 2) < 0.12 * width


def test_demo_command(tmp_path, capsys):
    from lesionpipe.reports.demo import main

    out = tmp_path / "demo.html"
    assert main([str(out), "--shape", "32", "36", "20", "--zooms", "4", "4", "6",
                 "--lesions", "2", "--post-only"]) == 0
    assert out.exists() and "2 lesions" in capsys.readouterr().out
    assert "Post-only visit" in out.read_text()
