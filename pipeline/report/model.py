"""What the report reads: runs (a workspace's configuration and stage states), the stage page
being drawn (paths, links, generated assets), and its titled views."""
from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from markupsafe import Markup

from mono4d.pipeline.registry import STAGES
from mono4d.pipeline.report.markup import ui
from mono4d.pipeline.state import StageState
from mono4d.pipeline.status import workspace_states
from mono4d.pipeline.workspace import MANIFEST, Workspace, read_json

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One workspace as the report sees it: its recorded configuration and stage states."""

    key: str  # asset subfolder and HTML id prefix: "a" (the run), "b" (the compared run)
    label: str
    workspace: Workspace
    config: dict[str, Any]
    states: dict[str, StageState]

    @property
    def root(self) -> Path:
        return self.workspace.root

    def stage_dir(self, stage: str) -> Path:
        return self.workspace.stage_dir(stage)

    def manifest(self, stage: str) -> dict[str, Any]:
        state = self.states.get(stage)
        return (state.manifest if state and state.manifest else None) or {}

    def params(self, stage: str) -> tuple[dict[str, Any], bool]:
        """The parameters the stage ran with, or (second value False) those the run
        configuration gives it when it has not run."""
        manifest = self.manifest(stage)
        if "params" in manifest:
            return dict(manifest["params"]), True
        return dict(self.config.get("config", {}).get("stages", {}).get(stage, {})), False

    def param_source(self, stage: str, name: str) -> str:
        """Where the run configuration took a parameter from ("luigi.cfg", "--set", "preset cpu",
        "default"); empty for a stage the configuration does not know."""
        config = self.config.get("config", {})
        if stage not in config.get("stages", {}):
            return ""
        return config.get("sources", {}).get(f"{stage}.{name}", "default")


def load_run(work: Path, key: str, label: str, report_dir: Path) -> Run:
    """Read a workspace's configuration and evaluate its stages (ParameterError when ``work`` is
    not a workspace). Stage folders with a manifest that the pipeline does not know (yet) are
    included as "unchecked"."""
    workspace = Workspace(work)
    config = workspace.read_config()
    states: dict[str, StageState] = {}
    problem = None
    try:
        states = {state.stage: state for state in workspace_states(workspace.root)}
    except Exception as error:  # a report must still show what exists when states cannot be evaluated
        logger.warning("cannot evaluate the stage states of %s", workspace.root, exc_info=True)
        problem = f"the stage state could not be evaluated: {type(error).__name__}: {error}"
    for child in sorted(workspace.root.iterdir()):
        if (child.is_dir() and not child.name.startswith(".") and child.name not in states
                and child.resolve() != report_dir and (child / MANIFEST).is_file()):
            reason = problem or "not a stage of this version of the pipeline (pipeline/config.py); shown as found"
            states[child.name] = StageState(child.name, "unchecked", [reason], read_json(child / MANIFEST))
    return Run(key, label, workspace, config, states)


def stage_rank(stage: str) -> tuple[int, str]:
    """Sort key of stage folders: the registry's pipeline order, then unknown folders by name."""
    order = list(STAGES)
    return (order.index(stage), "") if stage in order else (len(order), stage)


def state_of(run: Run, stage: str) -> StageState:
    return run.states.get(stage) or StageState(stage, "missing", ["no such stage in this workspace"])


@dataclass
class View:
    """One titled block of a stage page (pictures, charts, facts) for one run; ``body`` is
    rendered HTML (Markup)."""

    title: str
    body: Markup


def relative_url(path: Path, start: Path) -> str:
    """URL of ``path`` relative to the folder ``start`` (a file:// URI when there is no relative path)."""
    try:
        relative = os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:  # another drive
        return Path(path).resolve().as_uri()
    return urllib.parse.quote(Path(relative).as_posix())


@dataclass
class StagePage:
    """What a view needs to draw one stage of one run: paths, links and generated assets.
    ``shown`` collects the (resolved) files the views displayed, so the last view can list the rest."""

    run: Run
    stage: str
    report_dir: Path
    shown: set[Path] = field(default_factory=set)
    charts: int = 0  # charts written so far (numbers their asset files)

    @property
    def directory(self) -> Path:
        return self.run.stage_dir(self.stage)

    def url(self, path: Path) -> str:
        return relative_url(path, self.report_dir)

    def asset(self, name: str) -> Path:
        """Path of a generated file ``assets/<run>/<stage>/<name>`` (its folder created)."""
        path = self.report_dir / "assets" / self.run.key / self.stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, picture: Path, caption: str = "", link: Path | None = None, css: str | None = None) -> Markup:
        """An ``<img>`` of ``picture`` with a plain-text caption, optionally linking to ``link``."""
        self.shown.update({picture.resolve()} | ({link.resolve()} if link else set()))
        return ui().figure(self.url(picture), caption, caption or picture.name,
                           self.url(link) if link is not None else None, css)


def spaced(count: int, samples: int) -> list[int]:
    """Up to ``samples`` evenly spaced indices in ``0..count-1``, first and last included."""
    if count <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, min(samples, count))})


def pick(items: Sequence[Any], samples: int) -> list[Any]:
    return [items[index] for index in spaced(len(items), samples)]
