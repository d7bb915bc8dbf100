"""The pages of the report (templates ``index.html.j2`` and ``stage.html.j2``) and the entry
point :func:`write_report`."""
from __future__ import annotations

import logging
import re
import shutil
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from markupsafe import Markup

from mono4d.data.errors import Mono4dError, ParameterError
from mono4d.pipeline.report.markup import format_value, render, ui
from mono4d.pipeline.report.model import Run, StagePage, View, load_run, relative_url, stage_rank, state_of
from mono4d.pipeline.report.outputs import (curves_views, layers_views, other_files_views, render_views, video_views)
from mono4d.pipeline.report.views import (alignment_views, cameras_views, depth_views, flow_views, frames_views,
                                          masks_views, tracks_views)
from mono4d.pipeline.status import format_figures
from mono4d.pipeline.workspace import read_json, write_json_atomic

logger = logging.getLogger(__name__)

MARKER_FILE = ".mono4d-report.json"
#: Files of ``static/`` copied to ``assets/`` next to the pages.
STATIC_FILES = ("style.css", "report.js")
LOG_LINES = 80

#: View builders in page order; the list of other files comes last (it shows what the others did not).
VIEW_BUILDERS: tuple[tuple[str, Callable[[StagePage], list[View]]], ...] = (
    ("Frame strip", frames_views), ("Depth", depth_views), ("Alignment", alignment_views),
    ("Optical flow", flow_views), ("Masks", masks_views), ("Cameras", cameras_views), ("Tracks", tracks_views),
    ("Curves", curves_views), ("Renders vs ground truth", render_views), ("Scene layers", layers_views),
    ("Videos", video_views),
    ("Other pictures and videos", other_files_views))

ABSENT = object()


def build_views(page: StagePage) -> list[View]:
    """All views of a stage folder; a view whose files cannot be read shows the error instead."""
    if not page.directory.is_dir():
        return []
    views = []
    for title, builder in VIEW_BUILDERS:
        try:
            views += builder(page)
        except Exception as error:  # one unreadable output must not cost the whole report
            logger.warning("report: %s view of %s failed", title, page.directory, exc_info=True)
            message = error.message if isinstance(error, Mono4dError) else f"{type(error).__name__}: {error}"
            views.append(View(title, ui().error_banner(f"could not draw this view: {message}")))
    return views


def format_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes < 60 else f"{int(minutes // 60)} h {int(minutes % 60)} min"


def stage_file(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", stage) + ".html"


STATE_EXPLANATIONS = {
    "done": "",
    "stale": "Out of date: the outputs below are from an earlier configuration; `mono4d run` recomputes them.",
    "missing": "This stage has not run in this workspace.",
    "unchecked": "The pipeline does not evaluate this stage; its folder is shown as found.",
}


def state_block(run: Run, stage: str) -> Markup:
    """The stage's state with reasons, its last failure and when it ran."""
    state = state_of(run, stage)
    manifest = state.manifest or {}
    facts = [(key, format_value(value)) for key, value in (
        ("wall time", format_seconds(manifest.get("wall_time_s"))), ("started", manifest.get("started_at")),
        ("finished", manifest.get("finished_at")), ("run id", manifest.get("run_id")))] if manifest else []
    return Markup(render("state.html.j2", status=state.status, reasons=state.reasons,
                         explanation=STATE_EXPLANATIONS.get(state.status, ""),
                         failure=run.workspace.read_error(stage), facts=facts))


def change(first: Any, second: Any) -> str:
    """``second - first`` (and relative) for two numbers, else empty."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (first, second))
    if not numbers or first == second:
        return ""
    delta = second - first
    relative = f" ({delta / abs(first):+.1%})" if first else ""
    return f"{delta:+.4g}{relative}"


def key_value_table(values: Sequence[Mapping[str, Any]], runs: Sequence[Run], key_header: str = "",
                    sources: Sequence[Callable[[str], str]] | None = None, show_change: bool = False) -> Markup:
    """One row per key, one value column per run; with two runs, differing rows are highlighted
    (and counted in the caption) and numeric changes shown when ``show_change``."""
    keys = list(dict.fromkeys(key for mapping in values for key in mapping))
    compare = len(values) > 1
    rows, differing = [], 0
    for key in keys:
        cells_values = [mapping.get(key, ABSENT) for mapping in values]
        differs = compare and any(value != cells_values[0] for value in cells_values[1:])
        differing += differs
        cells = [{"text": "(absent)" if value is ABSENT else format_value(value),
                  "source": sources[number](key) if sources and value is not ABSENT else "",
                  "numeric": isinstance(value, (int, float)) and not isinstance(value, bool)}
                 for number, value in enumerate(cells_values)]
        rows.append({"key": key, "differs": differs, "cells": cells,
                     "change": change(cells_values[0], cells_values[1]) if compare and show_change else ""})
    labels = [run.label for run in runs][:len(values)]
    return ui().key_value_table(key_header, labels, rows, show_change, differing)


def provenance(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs, upstream manifests and code the stage's fingerprint covers, as short hashes."""
    facts: dict[str, Any] = {}
    for name, entry in (manifest.get("inputs") or {}).items():
        entry = entry or {}
        facts[f"input {name}"] = f"{entry.get('path')} (sha256 {str(entry.get('sha256'))[:12]})"
    for name, digest in (manifest.get("upstream") or {}).items():
        facts[f"upstream {name}"] = f"manifest {str(digest)[:12]}"
    if manifest.get("code"):
        facts["stage code"] = str(manifest["code"])[:12]
    return facts


def log_tail(run: Run, stage: str, report_dir: Path, lines: int = LOG_LINES) -> Markup:
    """A link to the stage's ``log.txt`` and its last ``lines`` lines."""
    path = run.stage_dir(stage) / "log.txt"
    if not path.is_file():
        return ui().log_tail(None, 0, [])
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return ui().log_tail(relative_url(path, report_dir), len(text), text[-lines:])


def page_context(title: str, stages: Sequence[str], runs: Sequence[Run], current: str | None) -> dict[str, Any]:
    """What ``base.html.j2`` needs: title, navigation (first run's states) and the time of writing."""
    nav = [{"stage": stage, "file": stage_file(stage), "status": state_of(runs[0], stage).status} for stage in stages]
    return {"title": title, "nav": nav, "current": current,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def stage_page(stage: str, runs: Sequence[Run], stages: Sequence[str], report_dir: Path) -> str:
    """The page of one stage: state, figures, notes, views (pictures first), parameters, provenance, log."""
    manifests = [run.manifest(stage) for run in runs]
    figures = [manifest.get("figures") or {} for manifest in manifests]
    notes = [manifest.get("notes") or [] for manifest in manifests]
    all_views = [build_views(StagePage(run, stage, report_dir)) for run in runs]
    views = []
    for title in dict.fromkeys(view.title for run_views in all_views for view in run_views):
        views.append((title, [Markup("").join(view.body for view in run_views if view.title == title)
                              or ui().muted("not in this run") for run_views in all_views]))
    params = [run.params(stage) for run in runs]
    parameters = key_value_table([values for values, _ in params], runs, "parameter",
                                 sources=[lambda key, run=run: run.param_source(stage, key) for run in runs])
    return render("stage.html.j2", **page_context(f"mono4d · {stage}", stages, runs, stage), stage=stage,
                  labels=[run.label for run in runs], states=[state_block(run, stage) for run in runs],
                  figures=key_value_table(figures, runs, "figure", show_change=True) if any(figures) else None,
                  notes=[ui().reasons_list(note) or ui().muted("none") for note in notes] if any(notes) else None,
                  views=views, not_run=[run.label for run, (_, ran) in zip(runs, params) if not ran],
                  parameters=parameters,
                  provenance=(key_value_table([provenance(m) for m in manifests], runs, "fingerprint part")
                              if any(manifests) else None),
                  versions=key_value_table([m.get("versions") or {} for m in manifests], runs, "library"),
                  logs=[log_tail(run, stage, report_dir) for run in runs])


def run_facts(run: Run) -> dict[str, Any]:
    """What identifies a run: workspace, input, preset, target, settings given on the command line."""
    config = run.config.get("config", {})
    sources = config.get("sources", {})
    stages = config.get("stages", {})
    chosen = [f"{key}={format_value(stages.get(key.split('.', 1)[0], {}).get(key.split('.', 1)[1]))} ({source})"
              for key, source in sources.items() if source == "--set" or source.startswith("preset")]
    return {"workspace": str(run.root), "input": run.config.get("input"), "preset": config.get("preset"),
            "target stage": run.config.get("target"), "started": run.config.get("started_at"),
            "run id": run.config.get("run_id"), "settings from --set and the preset": ", ".join(chosen) or "none"}


def differences(stage: str, first: Run, second: Run) -> str:
    """How many figures and parameters of ``stage`` differ between two runs."""
    counts = []
    for name, a, b in (("figures", first.manifest(stage).get("figures") or {},
                        second.manifest(stage).get("figures") or {}),
                       ("parameters", first.params(stage)[0], second.params(stage)[0])):
        differing = sum(a.get(key, ABSENT) != b.get(key, ABSENT) for key in set(a) | set(b))
        if differing:
            counts.append(f"{differing} {name if differing > 1 else name[:-1]}")
    return ", ".join(counts) or "none"


def index_page(runs: Sequence[Run], stages: Sequence[str]) -> str:
    """The overview: the run(s) and one row per stage."""
    compare = len(runs) > 1
    title = "mono4d report: " + " vs ".join(run.label for run in runs)
    rows = []
    for stage in stages:
        cells = []
        for run in runs:
            state = state_of(run, stage)
            manifest = state.manifest or {}
            reasons = state.reasons if len(state.reasons) <= 4 else [
                *state.reasons[:3], f"and {len(state.reasons) - 3} more (see the stage's page)"]
            cells.append({"status": state.status, "failed": bool(run.workspace.read_error(stage)), "reasons": reasons,
                          "time": format_seconds(manifest.get("wall_time_s")),
                          "figures": format_figures(manifest.get("figures") or {}) or "—"})
        rows.append({"stage": stage, "file": stage_file(stage), "cells": cells,
                     "differences": differences(stage, runs[0], runs[1]) if compare else ""})
    return render("index.html.j2", **page_context(title, stages, runs, None), compare=compare,
                  labels=[run.label for run in runs], rows=rows,
                  run_table=key_value_table([run_facts(run) for run in runs], runs, ""))


def prepare_out_dir(report_dir: Path) -> None:
    """Create ``report_dir`` and remove what the previous report wrote there (listed in its marker);
    refuse a folder whose ``assets/`` another tool wrote."""
    report_dir.mkdir(parents=True, exist_ok=True)
    previous = read_json(report_dir / MARKER_FILE)
    assets = report_dir / "assets"
    if previous is None:
        if assets.exists():
            raise ParameterError(f"{report_dir} already holds an assets/ folder that mono4d inspect did not write",
                                 "choose another --out folder, or empty that one")
        return
    for name in previous.get("pages", []):
        if "/" not in name and name.endswith(".html"):
            (report_dir / name).unlink(missing_ok=True)
    shutil.rmtree(assets, ignore_errors=True)


def run_labels(works: Sequence[Path]) -> list[str]:
    """Short names of the workspaces: their folder names, with the parent when those coincide."""
    if len(works) == 1:
        return [works[0].name]
    names = [work.name for work in works]
    if len(set(names)) < len(names):
        names = [f"{work.parent.name}/{work.name}" for work in works]
    return [f"{letter}: {name}" for letter, name in zip("AB", names)]


def write_report(work: Path, compare: Path | None = None, out_dir: Path | None = None) -> Path:
    """Write the HTML report of workspace ``work`` (side by side with workspace ``compare`` when
    given) into ``out_dir`` (default ``work/report``) and return the path of its ``index.html``.

    Raises :class:`ParameterError` when ``work`` or ``compare`` is not a workspace (no
    ``config.json``) or when ``out_dir`` holds an ``assets/`` folder another tool wrote.
    """
    works = [Path(work).resolve()] + ([Path(compare).resolve()] if compare is not None else [])
    report_dir = Path(out_dir).resolve() if out_dir is not None else works[0] / "report"
    runs = [load_run(path, key, label, report_dir) for path, key, label in zip(works, "ab", run_labels(works))]
    stages = sorted({stage for run in runs for stage in run.states}, key=stage_rank)
    prepare_out_dir(report_dir)
    (report_dir / "assets").mkdir()
    static = resources.files("mono4d.pipeline.report") / "static"
    for name in STATIC_FILES:
        (report_dir / "assets" / name).write_bytes((static / name).read_bytes())
    pages = []
    for stage in stages:
        (report_dir / stage_file(stage)).write_text(stage_page(stage, runs, stages, report_dir), encoding="utf-8")
        pages.append(stage_file(stage))
    index = report_dir / "index.html"
    index.write_text(index_page(runs, stages), encoding="utf-8")
    write_json_atomic(report_dir / MARKER_FILE, {"pages": pages + ["index.html"],
                                                 "workspaces": [str(path) for path in works]})
    logger.info("report written to %s", index)
    return index
