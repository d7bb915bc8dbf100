"""`mono4d batch`: many videos' DAGs in one Luigi build, each video in its own workspace.

Every input gets the workspace ``ROOT/<stem>`` (``clip.mp4`` -> ``ROOT/clip``; an image folder
by its name) and the same configuration. All workspaces are locked and prepared first, then one
``luigi.build`` schedules every video's target task together, on the in-process scheduler or a
central ``luigid`` (``--scheduler-host``), so ``--workers N`` processes (on this and other
machines sharing ``ROOT``) share the work of all videos and GPU stages share the ``gpu``
resource. A video that fails (bad input, a stage error) does not stop the others: its error is
reported with the results at the end.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mono4d.data.errors import Mono4dError, ParameterError
from mono4d.pipeline import dag
from mono4d.pipeline.config import load_config
from mono4d.pipeline.runner import RunSummary, build, check_stage_name, prepare_run, resolve_input, summarize_run
from mono4d.pipeline.tasks import task_class
from mono4d.pipeline.workspace import Workspace


@dataclass
class VideoResult:
    """The outcome of one input of a batch: a run summary, or the error that stopped it."""

    input: Path
    workspace: Path
    summary: RunSummary | None = None
    error: Mono4dError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def workspace_names(inputs: Sequence[str | Path]) -> list[str]:
    """``ROOT/<name>`` of each input: its file stem (or folder name); two inputs may not share one."""
    names = [Path(text).expanduser().stem or Path(text).expanduser().resolve().name for text in inputs]
    seen: dict[str, str] = {}
    for text, name in zip(inputs, names):
        if name in seen:
            raise ParameterError(f"inputs {seen[name]} and {text} would share the workspace {name!r}",
                                 "rename one of them, or run them in separate batches with different --work roots")
        seen[name] = str(text)
    return names


def run_batch(inputs: Sequence[str | Path], root: str | Path, until: str | None = None, preset: str | None = None,
              overrides: Sequence[str] = (), config_files: Sequence[str | Path] = (), workers: int = 1,
              scheduler_host: str | None = None, scheduler_port: int = 8082) -> list[VideoResult]:
    """Run the pipeline up to ``until`` (default: the last stage) over every input, one workspace
    each under ``root``, in one Luigi build. Returns one result per input, in input order;
    configuration errors (they concern every input) are raised before anything runs."""
    if not inputs:
        raise ParameterError("no INPUT given", "give one or more video files or image folders")
    if workers < 1:
        raise ParameterError(f"--workers must be at least 1, got {workers}", "use --workers 1 for a single process")
    config = load_config(preset, overrides, config_files)
    target = check_stage_name(until, "--until") if until else dag.final_stage()
    root = Path(root).expanduser().resolve()
    results = [VideoResult(Path(text), root / name) for text, name in zip(inputs, workspace_names(inputs))]
    prepared: list[tuple[VideoResult, Workspace, dict, list[str], list[str]]] = []
    with contextlib.ExitStack() as locks:
        for result in results:
            workspace = Workspace(result.workspace)
            try:
                workspace.check_usable()
                source = resolve_input(workspace, result.input)
                input_config = load_config(preset, overrides, config_files, source)  # what this input needs
                locks.enter_context(workspace.lock())
                run_config, stages, todo = prepare_run(workspace, source, input_config, target, [])
            except Mono4dError as error:
                result.error = error
                continue
            prepared.append((result, workspace, run_config, stages, todo))
        tasks = [task_class(target)(work=str(workspace.root)) for _, workspace, _, _, todo in prepared if todo]
        if tasks:
            build(tasks, workers, scheduler_host, scheduler_port, config_files)
    for result, workspace, run_config, stages, todo in prepared:
        try:
            result.summary = summarize_run(workspace, run_config, stages, todo)
        except Mono4dError as error:
            result.error = error
    return results


def format_results(results: Sequence[VideoResult]) -> str:
    """One line per input: its workspace and what ran, or why it failed."""
    width = max(len(r.workspace.name) for r in results)
    lines = []
    for result in results:
        if result.summary is not None:
            ran, cached = result.summary.ran, [o.stage for o in result.summary.outcomes if o.action == "cached"]
            detail = f"ran {', '.join(ran) or '-'}; cached {', '.join(cached) or '-'}"
            lines.append(f"{result.workspace.name:<{width}}  done    {detail}  ({result.workspace})")
        else:
            hint = f" (hint: {result.error.hint})" if result.error.hint else ""
            lines.append(f"{result.workspace.name:<{width}}  FAILED  {result.input}: {result.error.message}{hint}")
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} inputs done" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)
