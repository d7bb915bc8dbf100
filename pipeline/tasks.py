"""Luigi tasks: thin wrappers that run a stage function in a temp folder and commit it atomically.

Every task has one Luigi parameter, the workspace folder; the run configuration (input,
parameters, forced stages) is read from ``DIR/config.json``, written by the CLI before the
build. ``requires()`` follows :mod:`pipeline.dag`, ``complete()`` follows :mod:`pipeline.state`.
GPU stages declare a ``gpu`` resource so a luigid-scheduled machine never runs more GPU tasks
than ``[resources] gpu`` allows.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import luigi

from pipeline import config as config_module
from pipeline.state import RunState
from pipeline.workspace import Workspace, library_versions

logger = logging.getLogger("mono4d")


class StageTask(luigi.Task):
    """Base task: one pipeline stage over one workspace."""

    work = luigi.Parameter(description="workspace folder")
    stage: str = ""
    uses_gpu: bool = False  # runs learned models on CUDA under the gpu preset

    @property
    def resources(self) -> dict[str, int]:
        """A ``gpu`` unit for GPU stages under the gpu preset, so luigid never oversubscribes a GPU."""
        if self.uses_gpu and self.run_state().config.preset == "gpu":
            return {"gpu": 1}
        return {}

    def run_state(self) -> RunState:
        workspace = Workspace(self.work)
        return RunState(workspace, workspace.read_config())

    def requires(self) -> list["StageTask"]:
        return [TASKS[name](work=self.work) for name in self.run_state().upstream(self.stage)]

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(Workspace(self.work).manifest_path(self.stage)))

    def complete(self) -> bool:
        try:
            return self.run_state().state(self.stage).status == "done"
        except Exception:  # an unreadable workspace means "not complete"; run() reports the cause
            logger.debug("completeness check of %s failed", self.stage, exc_info=True)
            return False

    def run(self) -> None:
        state = self.run_state()
        workspace = state.workspace
        params = state.config.params[self.stage]
        parts = state.fingerprint_parts(self.stage)
        temp_dir = workspace.new_temp_dir(self.stage)
        started = datetime.now(timezone.utc)
        clock = time.perf_counter()
        logger.info("%s: running", self.stage)
        try:
            with stage_log(temp_dir / "log.txt"):
                figures = config_module.stage_module(self.stage).run(state.stage_inputs(self.stage), params, temp_dir) or {}
        except BaseException as error:
            workspace.record_error(self.stage, error)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        wall_time = time.perf_counter() - clock
        notes = figures.pop("notes", [])
        manifest: dict[str, Any] = {
            "stage": self.stage,
            "run_id": state.run_id,
            "fingerprint": state.fingerprint(parts),
            **parts,  # params, inputs, upstream, code
            "versions": library_versions(),
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall_time, 3),
            "figures": figures,
            "notes": list(notes),
        }
        workspace.commit(self.stage, temp_dir, manifest)
        logger.info("%s: done in %.1f s %s", self.stage, wall_time, _format_figures(figures))


@contextlib.contextmanager
def stage_log(path: Path) -> Iterator[None]:
    """Copy every log record emitted while the stage runs into the stage's own ``log.txt``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _format_figures(figures: dict[str, Any]) -> str:
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
             if isinstance(v, (int, float, str, bool))]
    return "(" + ", ".join(shown) + ")" if shown else ""


class Frames(StageTask):
    """Decode the input video or image folder into frames (stages/frames.py)."""

    stage = "frames"


class Flow(StageTask):
    """Forward/backward optical flow over consecutive and longer-range pairs (stages/flow.py)."""

    stage = "flow"
    uses_gpu = True


class Masks(StageTask):
    """Dynamic-object / hand masks (stages/masks.py)."""

    stage = "masks"
    uses_gpu = True


class Cameras(StageTask):
    """Intrinsics and world-to-camera poses: COLMAP, static or known cameras (stages/cameras.py)."""

    stage = "cameras"


class Depth(StageTask):
    """Per-frame monocular or multi-view depth (stages/depth.py)."""

    stage = "depth"
    uses_gpu = True


class Align(StageTask):
    """Depth scale/shift aligned to the SfM points, per frame (stages/align.py)."""

    stage = "align"


class Tracks(StageTask):
    """Long-term 2D tracks and 3D flow pairs (stages/tracks.py)."""

    stage = "tracks"


class Init(StageTask):
    """Stage 1 of the optimizer: deformation fitted to the 3D flow pairs, canonical Gaussians (stages/init.py)."""

    stage = "init"
    uses_gpu = True


class Train(StageTask):
    """Stage 2: photometric + ordinal depth + priors optimisation, renders, exports (stages/train.py)."""

    stage = "train"
    uses_gpu = True


#: Stage name -> task class, in pipeline order.
TASKS: dict[str, type[StageTask]] = {task.stage: task for task in (Frames, Flow, Masks, Cameras, Depth, Align, Tracks,
                                                                    Init, Train)}
