"""``mono4d edit`` retrains nothing but re-renders the edited model against the workspace's data:
it must read the same inputs as the train stage, the refined masks above all."""
from __future__ import annotations

from pathlib import Path

from mono4d.pipeline.edit import training_inputs
from mono4d.data.artifacts import MASKS_DIR


def make_workspace(root: Path, stages: tuple[str, ...]) -> Path:
    for stage in stages:
        (root / stage / MASKS_DIR if stage.startswith("masks") else root / stage).mkdir(parents=True)
    return root


def test_edit_reads_the_refined_masks_and_falls_back_to_the_first_pass(tmp_path):
    common = ("init", "frames", "cameras", "align", "tracks")
    work = make_workspace(tmp_path / "refined", common + ("masks", "masks_refine"))
    inputs = training_inputs(work)
    assert inputs["masks"] == work / "masks_refine"
    assert set(inputs) == {"init", "frames", "cameras", "align", "tracks", "masks"}
    assert all(inputs[name] == work / name for name in common)

    work = make_workspace(tmp_path / "first_only", common + ("masks",))
    assert training_inputs(work)["masks"] == work / "masks"

    work = make_workspace(tmp_path / "no_masks", ("init", "frames"))
    (work / "masks_refine").mkdir()  # a folder without masks/ (an interrupted stage) is not used
    assert training_inputs(work) == {"init": work / "init", "frames": work / "frames"}
