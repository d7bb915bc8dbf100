"""Luigi tasks: thin wrappers that run a stage function in a temp folder and commit it atomically.

Every task has one Luigi parameter, the workspace folder; the run configuration (input,
parameters, forced stages) is read from ``DIR/config.json``, written by the CLI before the
build. ``requires()`` follows :mod:`mono4d.pipeline.dag`, ``complete()`` follows :mod:`mono4d.pipeline.state`.
One task class per stage of :data:`mono4d.pipeline.registry.STAGES` is derived from its declaration
(:func:`task_class`). A stage whose chosen backend runs on CUDA holds a ``gpu`` resource unit,
so a luigid-scheduled machine never runs more CUDA tasks than ``[resources] gpu`` allows.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import luigi

from mono4d.pipeline.registry import STAGES, Stage
from mono4d.pipeline.state import RunState
from mono4d.pipeline.workspace import Workspace, library_versions

logger = logging.getLogger("mono4d")


class StageTask(luigi.Task):
    """Base task: one pipeline stage over one workspace."""

    work = luigi.Parameter(description="workspace folder")
    stage: str = ""

    @property
    def resources(self) -> dict[str, int]:
        """A ``gpu`` unit when the stage's chosen backend runs on CUDA, so luigid never
        oversubscribes a GPU (CPU backends, e.g. motion masks, never hold it)."""
        if STAGES[self.stage].uses_cuda(self.run_state().config.params[self.stage]):
            return {"gpu": 1}
        return {}

    def run_state(self) -> RunState:
        workspace = Workspace(self.work)
        return RunState(workspace, workspace.read_config())

    def requires(self) -> list["StageTask"]:
        return [task_class(name)(work=self.work) for name in self.run_state().upstream(self.stage)]

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
                figures = STAGES[self.stage].run(state.stage_inputs(self.stage), params, temp_dir) or {}
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


#: Stage name -> its task class (created on first use; rebuilt when the declaration is replaced).
_TASK_CLASSES: dict[str, tuple[Stage, type[StageTask]]] = {}


def task_class(stage: str) -> type[StageTask]:
    """The Luigi task class of a registered stage: ``depth`` -> ``Depth`` (its Luigi task family),
    with the declaration's description as docstring."""
    declared = STAGES[stage]
    known = _TASK_CLASSES.get(stage)
    if known is None or known[0] is not declared:
        name = "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", stage) if part)
        cls = type(name, (StageTask,), {"stage": stage, "__doc__": declared.description, "__module__": __name__})
        known = _TASK_CLASSES[stage] = (declared, cls)
    return known[1]

