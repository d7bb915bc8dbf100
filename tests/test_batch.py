"""`mono4d batch`: many videos in one Luigi build against a real luigid, failures isolated."""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import shutil
import sys
from pathlib import Path

import luigi
import pytest

from mono4d.data.errors import ParameterError
from mono4d.pipeline.batch import run_batch, workspace_names
from mono4d.pipeline.tasks import StageTask
from mono4d.pipeline.workspace import Workspace
from tests.test_pipeline import run_cli, start_luigid, stop_luigid


def record_task_starts(path: Path) -> None:
    """Make every stage task append its task id to ``path`` when it starts, in whichever worker
    process runs it (Luigi forks one per task with --workers 2)."""

    def record(task: StageTask) -> None:
        with open(path, "a") as handle:
            handle.write(f"{task.task_family} {Path(task.work).name}\n")

    StageTask.event_handler(luigi.Event.START)(record)


def batch_in_fresh_process(args: list, starts: Path, out: Path, timeout_s: float = 300.0) -> int:
    """Run ``mono4d batch ARGS`` in a freshly spawned interpreter, as a user's shell would.

    The test process has run stages (OpenMP / thread pools) before; Luigi's worker processes are
    forked, and a fork of such a process can deadlock on a lock inherited from one of its threads.
    A spawned process starts clean. Returns the exit code; stdout goes to ``out``.
    """
    process = multiprocessing.get_context("spawn").Process(
        target=_batch_child, args=([str(arg) for arg in args], str(starts), str(out)))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        pytest.fail(f"mono4d batch did not finish within {timeout_s:.0f} s")
    return process.exitcode


def _batch_child(args: list[str], starts: str, out: str) -> None:
    multiprocessing.set_start_method("fork", force=True)  # a spawned child inherits "spawn"; Luigi forks its workers
    record_task_starts(Path(starts))
    with open(out, "w") as handle, contextlib.redirect_stdout(handle):
        code = run_cli("batch", *args)
    sys.exit(code)


def test_batch_over_luigid_runs_each_video_once_and_reports_the_broken_ones(tmp_path):
    task_starts = tmp_path / "starts.txt"
    task_starts.touch()
    log = tmp_path / "batch_out.txt"
    inputs = []
    for name, seed in (("alpha", 1), ("beta", 2)):
        assert run_cli("synth", tmp_path / name, "--preset", "tiny", "--seed", seed, "--set", "num_frames=6") == 0
        inputs.append(shutil.copy(tmp_path / name / "video.mp4", tmp_path / f"{name}.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_text("this is not a video\n")
    root = tmp_path / "runs"
    luigid, port = start_luigid(tmp_path / "luigid")
    try:
        code = batch_in_fresh_process([*inputs, broken, tmp_path / "missing.mp4", "--work", root, "--until", "flow",
                                       "--preset", "cpu", "--workers", "2", "--scheduler-host", "127.0.0.1",
                                       "--scheduler-port", port], task_starts, log)
    finally:
        stop_luigid(luigid)
    out = log.read_text()
    assert code == 2, out  # the failures are input errors
    lines = {line.split()[0]: line for line in out.splitlines()}
    for name in ("alpha", "beta"):
        assert "done" in lines[name] and "ran frames, flow" in lines[name], out
        workspace = Workspace(root / name)
        run_id = workspace.read_config()["run_id"]
        for stage in ("frames", "flow"):
            assert workspace.read_manifest(stage)["run_id"] == run_id
        assert workspace.read_manifest("flow")["figures"]["num_frames"] == 6
        assert workspace.read_manifest("frames")["inputs"]["source"]["path"] == str((tmp_path / f"{name}.mp4").resolve())
    assert "FAILED" in lines["broken"] and "video" in lines["broken"]
    assert not (root / "broken" / "frames").exists()
    assert "FAILED" in lines["missing"] and "not found" in lines["missing"]
    assert "2 of 4 inputs done, 2 failed" in out
    started = collections.Counter(task_starts.read_text().splitlines())
    assert started == {f"{family} {name}": 1 for family in ("Frames", "Flow") for name in ("alpha", "beta")} | {
        "Frames broken": 1}, started  # every task of the good videos exactly once; the broken one stops at frames

    assert batch_in_fresh_process([*inputs, "--work", root, "--until", "flow", "--preset", "cpu"], task_starts, log) == 0
    out = log.read_text()  # all cached
    assert "ran -; cached frames, flow" in out and "2 of 2 inputs done" in out
    assert sum(1 for _ in open(task_starts)) == 5  # nothing started again


def test_batch_refuses_inputs_that_would_share_a_workspace(tmp_path):
    assert workspace_names(["a/clip.mp4", "b/other.mp4", "frames_dir"]) == ["clip", "other", "frames_dir"]
    with pytest.raises(ParameterError, match="would share the workspace 'clip'"):
        run_batch([tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mov"], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
