"""The ``mono4d`` command line.

    mono4d run INPUT --work DIR [--until STAGE] [--set stage.param=value ...] [--rerun STAGE]
    mono4d batch INPUT... --work ROOT [--workers N] [--scheduler-host HOST]
    mono4d status DIR [--set stage.param=value ...]
    mono4d inspect DIR [--compare OTHER_DIR]
    mono4d export DIR --format ply,colmap,nerfstudio,tracks,depth,video [--layer static|hand|object_1]
    mono4d edit DIR --remove LAYER | --duplicate LAYER --offset x,y,z [--out NEWDIR]
    mono4d view DIR [--port 8080]
    mono4d synth OUT [--preset ci] [--seed 0]

User errors (bad input, bad parameters, unavailable models) print a message and a hint and
exit with code 2 (3 when a stage could not produce a result); they never show a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mono4d.data.errors import Mono4dError, ParameterError
from mono4d.pipeline.config import PRESETS
from mono4d.pipeline.registry import STAGES

logger = logging.getLogger("mono4d")


class StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted
    (test runners and notebooks swap it; a handler bound to an old, closed stream would fail)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def configure_logging(verbose: bool) -> None:
    """mono4d messages at INFO (DEBUG with --verbose); Luigi's own chatter only with --verbose."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s" if verbose else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # A stage's log file on a full or read-only disk must not print logging's own tracebacks; the
    # stage reports the failed write itself.
    logging.raiseExceptions = verbose
    for name in ("luigi", "luigi-interface", "luigi.scheduler"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    for name in ("PIL", "matplotlib", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                        help="override a stage parameter (repeatable), e.g. --set frames.max_side=480")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="backend preset: cpu (weights-free, runs anywhere) or gpu (learned models, gsplat); "
                             "default: gpu when CUDA is available, else cpu")
    parser.add_argument("--config", dest="config_files", action="append", default=[], metavar="FILE",
                        help="extra luigi.cfg-style file with stage sections (repeatable; later files win)")


def build_parser() -> argparse.ArgumentParser:
    """The ``mono4d`` argument parser with one subcommand per entry of :data:`COMMANDS`."""
    from mono4d.data.synthetic import describe_presets

    parser = argparse.ArgumentParser(prog="mono4d", description="Dynamic 3D Gaussian reconstruction of casual videos, "
                                     "as a DAG of cached, inspectable stages.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, including Luigi's scheduler")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (only what is missing or stale)")
    run.add_argument("input", nargs="?", help="video file or folder of images (default: the workspace's recorded input)")
    run.add_argument("--work", required=True, metavar="DIR", help="workspace folder (created if missing)")
    run.add_argument("--until", choices=list(STAGES), metavar="STAGE",
                     help=f"stop after this stage (one of: {', '.join(STAGES)})")
    run.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                     help="recompute this stage and everything downstream even if cached (repeatable)")
    run.add_argument("--workers", type=int, default=1, help="Luigi worker processes (default 1)")
    run.add_argument("--scheduler-host", default=None,
                     help="use a central Luigi scheduler (luigid) at this host instead of the local one")
    run.add_argument("--scheduler-port", type=int, default=8082, help="port of the central scheduler")
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_config_options(run)

    batch = commands.add_parser("batch", help="run many inputs in one Luigi build, each in ROOT/<stem>")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="video files or folders of images")
    batch.add_argument("--work", required=True, metavar="ROOT", help="folder of the workspaces (ROOT/<stem>)")
    batch.add_argument("--until", choices=list(STAGES), metavar="STAGE", help="stop after this stage")
    batch.add_argument("--workers", type=int, default=1, help="Luigi worker processes (default 1)")
    batch.add_argument("--scheduler-host", default=None, help="central Luigi scheduler (luigid) host")
    batch.add_argument("--scheduler-port", type=int, default=8082, help="port of the central scheduler")
    batch.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_config_options(batch)

    status = commands.add_parser("status", help="show each stage: done / stale (why) / missing")
    status.add_argument("work", metavar="DIR", help="workspace folder")
    status.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_config_options(status)

    inspect = commands.add_parser("inspect", help="write an HTML report of every stage (DIR/report/index.html)")
    inspect.add_argument("work", metavar="DIR", help="workspace folder")
    inspect.add_argument("--compare", metavar="OTHER_DIR", default=None,
                         help="a second workspace to show side by side, stage by stage")
    inspect.add_argument("--out", metavar="PATH", default=None, help="report folder (default: DIR/report)")
    inspect.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    export = commands.add_parser("export", help="export results in standard formats (DIR/export/<format>/)")
    export.add_argument("work", metavar="DIR", help="workspace folder")
    export.add_argument("--format", dest="formats", required=True, metavar="FORMATS",
                        help="comma-separated: ply (per-frame 3DGS PLY), colmap, nerfstudio (camera trajectory), "
                             "tracks (npz + CSV), depth (16-bit PNG + scale), video (orbit and time-sweep MP4)")
    export.add_argument("--out", metavar="PATH", default=None, help="output folder (default: DIR/export)")
    export.add_argument("--frames", default="all", help="frames for ply: all, 0,5,10 or start:stop:step")
    export.add_argument("--backend", default="auto", choices=("auto", "numba", "torch", "gsplat"),
                        help="rasterizer for the video export")
    export.add_argument("--layer", default=None, metavar="LAYER",
                        help="ply/video of one scene layer only (static, hand, object_1, a label name or id), "
                             "written to <format>_<layer>/")
    export.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    edit = commands.add_parser("edit", help="a new workspace with scene layers removed or duplicated")
    edit.add_argument("work", metavar="DIR", help="workspace folder with a trained model")
    edit.add_argument("--remove", action="append", default=[], metavar="LAYER",
                      help="remove a layer (static, hand, object_1, a label name or id; repeatable)")
    edit.add_argument("--duplicate", action="append", default=[], metavar="LAYER",
                      help="add a copy of a layer moved by --offset (repeatable)")
    edit.add_argument("--offset", action="append", default=[], metavar="X,Y,Z",
                      help="world offset of each --duplicate (one per --duplicate, or one for all)")
    edit.add_argument("--out", metavar="NEWDIR", default=None,
                      help="the new workspace (default: next to DIR, named after the edits)")
    edit.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    view = commands.add_parser("view", help="interactive 4D viewer of the trained scene (web page, viser)")
    view.add_argument("work", metavar="DIR", help="workspace folder")
    view.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    view.add_argument("--port", type=int, default=8080, help="port (the next free one if taken)")
    view.add_argument("--max-side", type=int, default=256, help="render resolution (longer side, pixels)")
    view.add_argument("--backend", default="auto", choices=("auto", "numba", "torch", "gsplat"), help="rasterizer")
    view.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    synth = commands.add_parser("synth", help="write a synthetic dynamic scene with ground truth")
    synth.add_argument("out", metavar="OUT", help="output folder")
    synth.add_argument("--preset", default="ci", help=f"scene preset: {describe_presets()} (default ci)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a preset field, e.g. --set num_frames=32")
    synth.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def command_run(args: argparse.Namespace) -> int:
    from mono4d.pipeline.runner import run_pipeline
    from mono4d.pipeline.status import format_figures

    summary = run_pipeline(args.work, args.input, until=args.until, preset=args.preset, overrides=args.overrides,
                           rerun=args.rerun, config_files=args.config_files, workers=args.workers,
                           scheduler_host=args.scheduler_host, scheduler_port=args.scheduler_port)
    for outcome in summary.outcomes:
        time_s = f"{outcome.wall_time_s:.1f}s" if outcome.wall_time_s is not None else ""
        print(f"{outcome.stage:<8} {outcome.action:<7} {time_s:>7}  {format_figures(outcome.figures, limit=6)}")
        if outcome.stage == "train" and outcome.figures and "psnr_heldout" in outcome.figures:
            print(format_heldout(outcome.figures))
    print(f"workspace: {summary.workspace}")
    return 0


def format_heldout(figures: dict) -> str:
    """The train stage's held-out scores in a line, with one line per held-out camera of a
    multi-view input: PSNR (dB) and SSIM over all pixels, PSNR on the foreground masks where the
    camera has them."""
    lines = [f"held-out PSNR {figures['psnr_heldout']:.2f} dB, SSIM {figures['ssim_heldout']:.4f}"]
    for camera, scores in figures.get("heldout_cameras", {}).items():
        masked = f", masked PSNR {scores['psnr_dynamic']:.2f} dB" if "psnr_dynamic" in scores else ""
        lines.append(f"  camera {camera}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}{masked}")
    return "\n".join(lines)


def command_batch(args: argparse.Namespace) -> int:
    """Exit code 0 when every input is done, else the highest exit code of the failures."""
    from mono4d.pipeline.batch import format_results, run_batch

    results = run_batch(args.inputs, args.work, until=args.until, preset=args.preset, overrides=args.overrides,
                        config_files=args.config_files, workers=args.workers, scheduler_host=args.scheduler_host,
                        scheduler_port=args.scheduler_port)
    print(format_results(results))
    return max([r.error.exit_code for r in results if r.error is not None], default=0)


def command_status(args: argparse.Namespace) -> int:
    from mono4d.pipeline.status import format_status, workspace_states

    print(format_status(workspace_states(args.work, args.preset, args.overrides, args.config_files)))
    return 0


def command_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mono4d.pipeline.report import write_report

    index = write_report(Path(args.work), Path(args.compare) if args.compare else None,
                         Path(args.out) if args.out else None)
    print(f"report: {index}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mono4d.pipeline.export import export_workspace

    written = export_workspace(Path(args.work), args.formats, Path(args.out) if args.out else None,
                               frames=args.frames, backend=args.backend, layer=args.layer)
    for fmt, paths in written.items():
        print(f"{fmt:<10} {len(paths)} file(s) in {paths[0].parent if paths else '-'}")
    return 0


def command_edit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mono4d.pipeline.edit import edit_workspace

    out = edit_workspace(Path(args.work), args.remove, args.duplicate, args.offset, Path(args.out) if args.out else None)
    print(f"edited workspace: {out}")
    return 0


def command_view(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mono4d.pipeline.viewer import run_viewer

    run_viewer(Path(args.work), host=args.host, port=args.port, max_side=args.max_side, backend=args.backend)
    return 0


def command_synth(args: argparse.Namespace) -> int:
    from mono4d.data import synthetic

    overrides = {}
    for text in args.overrides:
        key, sep, value = text.partition("=")
        if not sep:
            raise ParameterError(f"cannot parse {text!r}", "write it as --set field=value, e.g. --set num_frames=32")
        overrides[key.strip()] = value.strip()
    scene = synthetic.generate(args.out, preset=args.preset, seed=args.seed, **overrides)
    print(f"wrote {scene.num_frames} frames of {scene.width}x{scene.height} with ground truth to {scene.root}")
    return 0


COMMANDS = {"run": command_run, "batch": command_batch, "status": command_status, "inspect": command_inspect,
            "export": command_export, "edit": command_edit, "view": command_view, "synth": command_synth}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except Mono4dError as error:
        print(f"mono4d: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"  hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("mono4d: interrupted; completed stages stay cached, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
