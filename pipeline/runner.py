"""Running the DAG: write the run configuration, hand the target task to Luigi, report the outcome."""
from __future__ import annotations

import logging
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from mono4d.data.errors import InputError, ModelUnavailableError, Mono4dError, ParameterError, StageFailure
from mono4d.pipeline import dag
from mono4d.pipeline.config import DEFAULT_CONFIG_FILE, Config, load_config
from mono4d.pipeline.registry import STAGES
from mono4d.pipeline.state import RunState
from mono4d.pipeline.workspace import WRITE_FAILURE_HINT, Workspace

if TYPE_CHECKING:  # Luigi is imported only when something runs: a no-op rerun skips it (~0.15 s)
    import luigi

logger = logging.getLogger("mono4d")


@dataclass
class StageOutcome:
    stage: str
    action: str  # "ran" | "cached" | "failed" | "not run"
    wall_time_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    workspace: Path
    target: str
    outcomes: list[StageOutcome]

    @property
    def ran(self) -> list[str]:
        return [o.stage for o in self.outcomes if o.action == "ran"]


def check_stage_name(name: str, option: str) -> str:
    if name not in STAGES:
        raise ParameterError(f"{option}: unknown stage {name!r}", f"stages are: {', '.join(STAGES)}")
    return name


def resolve_input(workspace: Workspace, input_path: str | Path | None) -> Path:
    """The input given on the command line, or the one recorded in an existing workspace."""
    if input_path is None:
        if not workspace.config_path.exists():
            raise ParameterError("no INPUT given and the workspace has none recorded",
                                 "run `mono4d run VIDEO_OR_IMAGE_FOLDER --work DIR`")
        input_path = workspace.read_config()["input"]
    path = Path(input_path).expanduser()
    if not path.exists():
        raise InputError(f"input not found: {path}", "give the path of a video file or a folder of images")
    return path.resolve()


def configure_luigi(config_files: Sequence[str | Path], rpc_retry_attempts: int | None = None) -> None:
    """Let Luigi read the same config files ([core], [resources], ...) and leave logging to us."""
    import luigi

    luigi_config = luigi.configuration.get_config()
    for path in [DEFAULT_CONFIG_FILE, *config_files]:
        luigi_config.add_config_path(str(path))
    luigi_config.set("core", "no_configure_logging", "true")
    # Luigi warns about [core] keys its interface class does not consume (the RPC retry settings are
    # read by the remote scheduler client instead); those warnings are noise for users.
    warnings.filterwarnings("ignore", category=luigi.parameter.UnconsumedParameterWarning)
    if rpc_retry_attempts is not None and not luigi_config.has_option("core", "rpc-retry-attempts"):
        luigi_config.set("core", "rpc-retry-attempts", str(rpc_retry_attempts))
        luigi_config.set("core", "rpc-retry-wait", "1")


def run_pipeline(work: str | Path, input_path: str | Path | None = None, until: str | None = None,
                 preset: str | None = None, overrides: Sequence[str] = (), rerun: Sequence[str] = (),
                 config_files: Sequence[str | Path] = (), workers: int = 1,
                 scheduler_host: str | None = None, scheduler_port: int = 8082) -> RunSummary:
    """Run the pipeline up to ``until`` (default: the last stage) over ``work``.

    Raises the failing stage's :class:`Mono4dError` (or a StageFailure wrapping an unexpected
    exception) when a stage fails; everything completed before it stays cached.
    """
    workspace = Workspace(work)
    workspace.check_usable()
    source = resolve_input(workspace, input_path)
    config = load_config(preset, overrides, config_files, source)
    target = check_stage_name(until, "--until") if until else dag.final_stage()
    forced = [check_stage_name(name, "--rerun") for name in rerun]
    if workers < 1:
        raise ParameterError(f"--workers must be at least 1, got {workers}", "use --workers 1 for a single process")

    with workspace.lock():
        run_config, stages, todo = prepare_run(workspace, source, config, target, forced)
        if todo:
            from mono4d.pipeline.tasks import task_class

            build([task_class(target)(work=str(workspace.root))], workers, scheduler_host, scheduler_port,
                  config_files)
    return summarize_run(workspace, run_config, stages, todo)


def prepare_run(workspace: Workspace, source: Path, config: Config, target: str,
                forced: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Under the workspace lock: drop what an earlier run left, record this run's configuration
    (``DIR/config.json``) and find what to do. Returns the run configuration, the stages the
    target needs (pipeline order) and those of them not done."""
    workspace.clean_temp()
    workspace.clear_errors()
    run_config: dict[str, Any] = {
        "input": str(source),
        "config": config.to_json(),
        "run_id": uuid.uuid4().hex,
        "force": list(forced),
        "target": target,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        workspace.write_config(run_config)
    except OSError as error:
        raise ParameterError(f"cannot write in the workspace {workspace.root}: {error.strerror or error}",
                             WRITE_FAILURE_HINT) from None
    state = RunState(workspace, run_config)
    stages = dag.closure(target, config)
    todo = [name for name in stages if state.state(name).status != "done"]
    if todo:
        logger.info("%s: stages to run: %s", workspace.root.name, ", ".join(todo))
    else:
        logger.info("%s: everything up to %s is up to date", workspace.root.name, target)
    return run_config, stages, todo


def build(tasks: Sequence[luigi.Task], workers: int, scheduler_host: str | None, scheduler_port: int,
          config_files: Sequence[str | Path]) -> None:
    """One Luigi build of ``tasks`` (and what they require) with ``workers`` worker processes, on
    the in-process scheduler or a central ``luigid``; a failing task does not stop the others."""
    import luigi
    import luigi.rpc

    scheduler = {"local_scheduler": True} if not scheduler_host else {
        "scheduler_host": scheduler_host, "scheduler_port": scheduler_port}
    configure_luigi(config_files, rpc_retry_attempts=1 if scheduler_host else None)
    try:
        luigi.build(list(tasks), workers=workers, **scheduler)
    except luigi.rpc.RPCError:
        raise ParameterError(f"cannot reach the Luigi scheduler at {scheduler_host}:{scheduler_port}",
                             "start it with `luigid --port PORT` on that host, or drop --scheduler-host "
                             "to use the local scheduler") from None


def summarize_run(workspace: Workspace, run_config: dict[str, Any], stages: list[str], todo: list[str]) -> RunSummary:
    """What became of each stage after the build; raises the first failed stage's error."""
    outcomes = []
    failure = None
    for name in stages:
        manifest = workspace.read_manifest(name)
        error = workspace.read_error(name)
        if error is not None:
            outcomes.append(StageOutcome(name, "failed"))
            failure = failure or (name, error)
        elif manifest is not None and manifest.get("run_id") == run_config["run_id"]:
            outcomes.append(StageOutcome(name, "ran", manifest.get("wall_time_s"), manifest.get("figures", {})))
        elif name not in todo and manifest is not None:
            outcomes.append(StageOutcome(name, "cached", manifest.get("wall_time_s"), manifest.get("figures", {})))
        else:
            outcomes.append(StageOutcome(name, "not run"))
    summary = RunSummary(workspace.root, run_config["target"], outcomes)
    if failure is not None:
        raise error_from_record(workspace, *failure)
    not_run = [o.stage for o in outcomes if o.action == "not run"]
    if not_run:
        # A stage that could not even record its error: most likely the workspace refused writes.
        problem = workspace.probe_write()
        if problem is not None:
            raise StageFailure(f"stage {not_run[0]} could not finish: the workspace {workspace.root} cannot be "
                               f"written: {problem.strerror or problem}", WRITE_FAILURE_HINT)
        raise StageFailure(f"stages did not run: {', '.join(not_run)}",
                           "run again with --verbose to see the scheduler's log")
    return summary


def error_from_record(workspace: Workspace, stage: str, record: dict[str, Any]) -> Mono4dError:
    """Rebuild the user-facing error a stage recorded (stages may run in worker processes)."""
    classes = {cls.__name__: cls for cls in (InputError, ParameterError, ModelUnavailableError, StageFailure, Mono4dError)}
    cls = classes.get(record["type"])
    if cls is not None:
        return cls(f"stage {stage}: {record['message']}", record.get("hint"))
    return StageFailure(f"stage {stage} failed unexpectedly: {record['type']}: {record['message']}",
                        f"the traceback is in {workspace.error_path(stage)}; please report it with the "
                        "workspace's config.json")
