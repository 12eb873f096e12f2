"""Workflow graphs are built for every option combination without reading any image."""

import itertools
from pathlib import Path

import pytest

from lesionpipe.bids import Visit
from lesionpipe.settings import Settings
from lesionpipe.workflows.base import init_lesionpipe_wf, init_visit_wf, workflow_name


@pytest.mark.parametrize("has_pre, reports", list(itertools.product([True, False], [True, False])))
def test_visit_graph(tmp_path, has_pre, reports):
    wf = init_visit_wf(post_file="/nonexistent/post.nii.gz",
                       pre_file="/nonexistent/pre.nii.gz" if has_pre else None,
                       subject="01", session="w04", prefix="sub-01_ses-w04", week=4.0,
                       output_dir=str(tmp_path), settings_toml=Settings().to_toml_string(),
                       reports=reports)
    names = set(wf.list_node_names())
    assert {"inputnode", "ds_visit", "preproc_wf.prep_post", "preproc_wf.brain_masks",
            "preproc_wf.norm_post", "gel_wf.detect"} <= names
    assert ("preproc_wf.register" in names) == has_pre
    assert ("preproc_wf.prep_pre" in names) == has_pre
    assert ("report" in names) == reports
    # node names equal variable names: the detect node is a DetectGEL
    assert type(wf.get_node("gel_wf.detect").interface).__name__ == "DetectGEL"
    wf._create_flat_graph()  # connections are valid


def test_top_workflow_is_version_stamped_and_holds_every_visit(tmp_path):
    visits = [Visit("01", "w00", Path("/x/a.nii.gz"), None, 0.0),
              Visit("01", "w04", Path("/x/b.nii.gz"), Path("/x/c.nii.gz"), 4.0),
              Visit("02", "w04", Path("/x/d.nii.gz"), None, None, "_acq-2d")]
    wf = init_lesionpipe_wf(visits=visits, output_dir=str(tmp_path / "out"),
                            work_dir=str(tmp_path / "work"), settings=Settings())
    assert wf.name == workflow_name() and wf.name.startswith("lesionpipe_0_")
    subs = {n.split(".")[0] for n in wf.list_node_names()}
    assert subs == {"visit_01_w00_wf", "visit_01_w04_wf", "visit_02_w04_acq_2d_wf"}
    assert not (tmp_path / "work").exists()  # building the graph writes nothing


def test_a_setting_change_changes_the_node_hash(tmp_path):
    def detect_hash(settings):
        wf = init_visit_wf(post_file=__file__, pre_file=None, subject="01", session="a",
                           prefix="sub-01_ses-a", week=None, output_dir=str(tmp_path),
                           settings_toml=settings.to_toml_string(), reports=False)
        return wf.get_node("gel_wf.detect").interface.inputs.get_hashval()[1]

    assert detect_hash(Settings()) != detect_hash(Settings(min_volume_mm3=20.0))
