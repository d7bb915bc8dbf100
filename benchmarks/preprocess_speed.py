"""Seconds per preprocessing stage (frames .. init) with the cpu preset, and how they scale with
the number of frames.

    python benchmarks/preprocess_speed.py VIDEO_OR_FOLDER --work DIR [--set stage.param=value ...] [--json OUT]
    python benchmarks/preprocess_speed.py --scaling --work DIR [--frames 25,50,100,200] [--json OUT]

Each stage runs through ``mono4d run --until STAGE`` in turn (so its upstream is cached) and is
timed in wall seconds and in CPU seconds (user + system of this process and its children, every
thread); ``masks_refine`` (upstream of init) is timed on its own, so the init row is init alone.
On a machine shared with other work the CPU seconds are the steadier figure; wall seconds are
what a user waits only when the machine is otherwise idle. The table ends with the total of
frames .. init; ``--json`` also writes the figures to a file.

Targets (2 cores, cpu preset, frames .. init): teddy.mp4 (141 frames, 368x480) <= 4 min, a
65-frame 854x480 clip <= 3 min, scaling exponent <= 1.1. The 854x480 clip of the README figures
is the first 65 frames of ``../shared/data/videos/kitten.mp4`` (568x320, 29.6 fps) resized with
OpenCV (``cv2.resize(frame, (854, 480), interpolation=cv2.INTER_CUBIC)``, written by
``cv2.VideoWriter`` with the ``mp4v`` codec at the source fps) into a file outside the repository.

``--scaling`` renders the ``bench`` synthetic scene once with the most frames asked for (at
``--size``, 240x180 by default, and ``--supersample`` 1 ray per pixel side, so that 200 frames
render in minutes; the bench preset's own 480x360 takes ~4x longer), runs the stages on its
first T frames for each T (``frames.end``: every T sees the same per-frame motion) and prints
the exponent b of ``seconds ~ T^b`` fitted by least squares in log-log, for the total and per
stage (1 = linear).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("frames", "flow", "masks", "cameras", "depth", "align", "masks_refine", "tracks", "init")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_stages(source: Path, work: Path, overrides: list[str], stages: tuple[str, ...] = STAGES) -> dict[str, dict]:
    """Run ``stages`` one after the other on ``source`` in ``work`` (cpu preset); returns per stage
    ``{"wall_s", "cpu_s", "action"}`` (``action``: "ran" or "cached")."""
    from mono4d.pipeline.runner import run_pipeline

    timings = {}
    for stage in stages:
        wall, cpu = time.perf_counter(), cpu_seconds()
        summary = run_pipeline(work, source, until=stage, preset="cpu", overrides=overrides)
        outcome = {o.stage: o for o in summary.outcomes}[stage]
        timings[stage] = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu, "action": outcome.action}
        print(f"  {stage:<12} {outcome.action:<7} wall {timings[stage]['wall_s']:7.1f} s   "
              f"cpu {timings[stage]['cpu_s']:7.1f} s", flush=True)
    return timings


def print_total(timings: dict[str, dict]) -> dict[str, float]:
    """Print and return the wall and CPU seconds summed over the stages."""
    total = {key: sum(t[key] for t in timings.values()) for key in ("wall_s", "cpu_s")}
    print(f"  {'total':<12} {'':<7} wall {total['wall_s']:7.1f} s   cpu {total['cpu_s']:7.1f} s "
          f"({total['wall_s'] / 60:.1f} min wall)", flush=True)
    return total


def fitted_exponent(counts: list[int], seconds: list[float]) -> float:
    """b of ``seconds ~ a * counts^b`` (least squares in log-log)."""
    slope, _ = np.polyfit(np.log(counts), np.log(np.maximum(seconds, 1e-3)), 1)
    return float(slope)


def render_bench(work: Path, num_frames: int, size: tuple[int, int], supersample: int) -> Path:
    """Folder of the bench scene with ``num_frames`` frames of ``size`` (width, height), rendered once."""
    from mono4d.data import synthetic

    scene_dir = work / f"bench_{num_frames}_{size[0]}x{size[1]}_ss{supersample}"
    if not (scene_dir / "scene.json").is_file():
        print(f"rendering the bench scene with {num_frames} frames into {scene_dir}", flush=True)
        synthetic.generate(scene_dir, preset="bench", seed=0, num_frames=num_frames, width=size[0], height=size[1],
                           supersample=supersample)
    return scene_dir


def scaling(work: Path, counts: list[int], size: tuple[int, int], supersample: int, overrides: list[str]) -> dict:
    """Time the stages on the first T frames of one rendered bench scene for each T in ``counts``."""
    scene_dir = render_bench(work, max(counts), size, supersample)
    fps = float(json.loads((scene_dir / "scene.json").read_text())["config"]["fps"])
    results = {}
    for count in counts:
        print(f"T = {count}", flush=True)
        end = (count - 1 + 0.5) / fps  # the first `count` frames of the folder
        results[count] = time_stages(scene_dir / "images", work / f"T{count}",
                                     [f"frames.folder_fps={fps}", f"frames.end={end:.6f}", *overrides])
        print_total(results[count])
    print("fitted exponent b of seconds ~ T^b over T = " + ", ".join(map(str, counts)))
    exponents = {}
    for key in ("wall_s", "cpu_s"):
        totals = [sum(t[key] for t in results[count].values()) for count in counts]
        per_stage = {stage: fitted_exponent(counts, [results[c][stage][key] for c in counts]) for stage in STAGES}
        exponents[key] = {"total": fitted_exponent(counts, totals), **per_stage}
        print(f"  {key[:-2]:<5} total b = {exponents[key]['total']:.2f}   "
              + "  ".join(f"{stage} {b:.2f}" for stage, b in per_stage.items()))
    return {"timings": {str(count): results[count] for count in counts}, "exponents": exponents}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", nargs="?", help="video file or image folder (not with --scaling)")
    parser.add_argument("--work", required=True, type=Path, help="workspace (with --scaling: a folder of them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE")
    parser.add_argument("--scaling", action="store_true", help="time T frames of the bench synthetic scene")
    parser.add_argument("--frames", default="25,50,100,200", help="frame counts T for --scaling")
    parser.add_argument("--size", default="240x180", help="WIDTHxHEIGHT of the rendered scene for --scaling")
    parser.add_argument("--supersample", type=int, default=1, help="rays per pixel side of the rendered scene")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from mono4d.pipeline.cli import configure_logging

    configure_logging(False)
    if args.scaling:
        counts = sorted({int(value) for value in args.frames.split(",")})
        if len(counts) < 2 or counts[0] < 2:
            parser.error("--frames needs at least two counts of 2 frames or more")
        width, _, height = args.size.partition("x")
        figures = scaling(args.work, counts, (int(width), int(height)), args.supersample, args.overrides)
    elif not args.input:
        parser.error("give INPUT or --scaling")
    else:
        print(f"{args.input} (cpu preset{', ' + ' '.join(args.overrides) if args.overrides else ''})", flush=True)
        timings = time_stages(Path(args.input), args.work, args.overrides)
        figures = {"input": str(args.input), "overrides": args.overrides, "timings": timings,
                   "total": print_total(timings)}
    if args.json:
        from mono4d.pipeline.workspace import write_json_atomic

        write_json_atomic(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
