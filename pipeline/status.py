"""`mono4d status DIR`: every stage of the workspace as done / stale (why) / missing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mono4d.pipeline import dag
from mono4d.pipeline.config import load_config
from mono4d.pipeline.state import RunState, StageState
from mono4d.pipeline.workspace import Workspace


def workspace_states(work: str | Path, preset: str | None = None, overrides: Sequence[str] = (),
                     config_files: Sequence[str | Path] = ()) -> list[StageState]:
    """States of all stages under the workspace's recorded configuration, or under a new one
    when a preset, overrides or config files are given (what a run with them would redo)."""
    workspace = Workspace(work)
    run_config = dict(workspace.read_config())
    if preset or overrides or config_files:
        recorded_preset = run_config["config"]["preset"]
        run_config["config"] = load_config(preset or recorded_preset, overrides, config_files,
                                           run_config["input"]).to_json()
    run_config["force"] = []
    state = RunState(workspace, run_config)
    return [state.state(name) for name in dag.closure(dag.final_stage(), state.config)]


def format_figures(figures: dict[str, Any], limit: int = 4) -> str:
    shown = []
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(shown[:limit])


def format_status(states: list[StageState]) -> str:
    """A plain-text table: stage, state, wall time, key figures, and why a stage is stale."""
    rows = [("stage", "state", "time", "figures", "why")]
    for st in states:
        manifest = st.manifest or {}
        time_s = manifest.get("wall_time_s")
        rows.append((st.stage, st.status, f"{time_s:.1f}s" if time_s is not None else "-",
                     format_figures(manifest.get("figures", {})) or "-", "; ".join(st.reasons) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(line.rstrip() for line in lines)
