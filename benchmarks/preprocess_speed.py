"""Seconds per preprocessing stage (frames .. init) with the cpu preset, and how they scale with
the number of frames.

    python benchmarks/preprocess_speed.py VIDEO_OR_FOLDER --work DIR [--set stage.param=value ...]
    python benchmarks/preprocess_speed.py --scaling --work DIR [--frames 25,50,100,200]

Each stage runs through ``mono4d run --until STAGE`` in turn (so its upstream is cached) and is
timed in wall seconds and in CPU seconds (user + system of this process and its children, every
thread). On a machine shared with other work the CPU seconds are the steadier figure; wall
seconds are what a user waits on an otherwise idle machine only when the machine is idle.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("frames", "flow", "masks", "cameras", "depth", "align", "tracks", "init")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_stages(source: Path, work: Path, overrides: list[str], stages: tuple[str, ...] = STAGES) -> dict[str, dict]:
    """Run ``stages`` one after the other on ``source`` in ``work`` (cpu preset); returns per stage
    ``{"wall_s", "cpu_s", "action"}`` (``action``: "ran" or "cached")."""
    from pipeline.runner import run_pipeline

    timings = {}
    for stage in stages:
        wall, cpu = time.perf_counter(), cpu_seconds()
        summary = run_pipeline(work, source, until=stage, preset="cpu", overrides=overrides)
        outcome = {o.stage: o for o in summary.outcomes}[stage]
        timings[stage] = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu, "action": outcome.action}
        print(f"  {stage:<8} {outcome.action:<7} wall {timings[stage]['wall_s']:7.1f} s   cpu {timings[stage]['cpu_s']:7.1f} s",
              flush=True)
    return timings


def print_table(timings: dict[str, dict]) -> None:
    wall = sum(t["wall_s"] for t in timings.values())
    cpu = sum(t["cpu_s"] for t in timings.values())
    print(f"  {'total':<8} {'':<7} wall {wall:7.1f} s   cpu {cpu:7.1f} s")


def fitted_exponent(counts: list[int], seconds: list[float]) -> float:
    """b of ``seconds ~ a * counts^b`` (least squares in log-log)."""
    slope, _ = np.polyfit(np.log(counts), np.log(np.maximum(seconds, 1e-3)), 1)
    return float(slope)


def render_bench(work: Path, num_frames: int, size: tuple[int, int], supersample: int) -> Path:
    """Folder of the bench scene with ``num_frames`` frames of ``size`` (width, height), rendered once."""
    from data import synthetic

    scene_dir = work / f"bench_{num_frames}_{size[0]}x{size[1]}_ss{supersample}"
    if not (scene_dir / "scene.json").is_file():
        print(f"rendering the bench scene with {num_frames} frames into {scene_dir}", flush=True)
        synthetic.generate(scene_dir, preset="bench", seed=0, num_frames=num_frames, width=size[0], height=size[1],
                           supersample=supersample)
    return scene_dir


def scaling(work: Path, counts: list[int], size: tuple[int, int], supersample: int, overrides: list[str]) -> dict:
    """Time the stages on the first T frames of one rendered bench scene for each T in ``counts``."""
    scene_dir = render_bench(work, max(counts), size, supersample)
    fps = float(json.loads((scene_dir / "scene.json").read_text())["fps"])
    results = {}
    for count in counts:
        print(f"T = {count}", flush=True)
        end = (count - 1 + 0.5) / fps  # the first `count` frames of the folder
        results[count] = time_stages(scene_dir / "images", work / f"T{count}",
                                     [f"frames.folder_fps={fps}", f"frames.end={end:.6f}", *overrides])
        print_table(results[count])
    print("fitted exponent b of seconds ~ T^b over T = " + ", ".join(map(str, counts)))
    for key in ("wall_s", "cpu_s"):
        totals = [sum(t[key] for t in results[count].values()) for count in counts]
        per_stage = {stage: fitted_exponent(counts, [results[c][stage][key] for c in counts]) for stage in STAGES}
        print(f"  {key[:-2]:<5} total b = {fitted_exponent(counts, totals):.2f}   "
              + "  ".join(f"{stage} {b:.2f}" for stage, b in per_stage.items()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", nargs="?", help="video file or image folder (not with --scaling)")
    parser.add_argument("--work", required=True, type=Path, help="workspace (with --scaling: a folder of them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE")
    parser.add_argument("--scaling", action="store_true", help="time T frames of the bench synthetic scene")
    parser.add_argument("--frames", default="25,50,100,200", help="frame counts T for --scaling")
    parser.add_argument("--size", default="240x180", help="WIDTHxHEIGHT of the rendered scene for --scaling")
    parser.add_argument("--supersample", type=int, default=1, help="rays per pixel side of the rendered scene")
    args = parser.parse_args(argv)
    from pipeline.cli import configure_logging

    configure_logging(False)
    if args.scaling:
        counts = sorted({int(value) for value in args.frames.split(",")})
        if len(counts) < 2 or counts[0] < 2:
            parser.error("--frames needs at least two counts of 2 frames or more")
        width, _, height = args.size.partition("x")
        scaling(args.work, counts, (int(width), int(height)), args.supersample, args.overrides)
        return 0
    if not args.input:
        parser.error("give INPUT or --scaling")
    print(f"{args.input} (cpu preset{', ' + ' '.join(args.overrides) if args.overrides else ''})", flush=True)
    print_table(time_stages(Path(args.input), args.work, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
