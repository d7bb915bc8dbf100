"""How long does `mono4d run` take when nothing changed? (target: under 1 s)

Either runs the pipeline once on a video (default: ../shared/data/videos/teddy.mp4) up to a
stage, or takes an existing, completed workspace (``--work DIR``: its recorded input, preset,
``--set`` values and target are repeated, so the rerun is the same command). Then it times N
no-op reruns in fresh processes (what a user waits for) and prints the figures as JSON.

    python benchmarks/noop_rerun.py [--video PATH] [--until STAGE] [--set stage.param=value] [--repeats 5]
    python benchmarks/noop_rerun.py --work DIR [--repeats 5]

A completed teddy workspace of all nine stages costs a few minutes on CPU with a small budget:
``mono4d run teddy.mp4 --work DIR --preset cpu --set train.iterations=20 --set frames.max_frames=20``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def recorded_command(work: Path) -> list[str]:
    """The `mono4d run` arguments that repeat a workspace's recorded configuration."""
    config = json.loads((work / "config.json").read_text())
    arguments = ["--work", str(work), "--preset", config["config"]["preset"], "--until", config["target"]]
    stages = config["config"]["stages"]
    for key, source in sorted(config["config"].get("sources", {}).items()):
        if source == "--set":
            stage, param = key.split(".", 1)
            value = stages[stage][param]
            arguments += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return arguments


def time_reruns(command: list[str], repeats: int) -> list[float]:
    """Wall times of ``repeats`` runs of ``command``; fails when one recomputes a stage."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if " ran " in result.stdout:
            raise SystemExit(f"a no-op rerun recomputed something:\n{result.stdout}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default=str(REPO_ROOT.parent / "shared" / "data" / "videos" / "teddy.mp4"))
    parser.add_argument("--until", default="frames")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=None, help="an existing completed workspace (no first run)")
    args = parser.parse_args()
    base = [sys.executable, "-m", "mono4d.pipeline.cli", "run"]
    if args.work:
        work = Path(args.work).resolve()
        command = base + recorded_command(work)
        stages = sorted(p.parent.name for p in work.glob("*/manifest.json"))
        times = time_reruns(command, args.repeats)
        figures = {"workspace": str(work), "stages": stages, "num_stages": len(stages)}
    else:
        with tempfile.TemporaryDirectory() as work:
            command = base + [args.video, "--work", work, "--until", args.until]
            for text in args.overrides:
                command += ["--set", text]
            start = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True)
            first = time.perf_counter() - start
            times = time_reruns(command, args.repeats)
        figures = {"video": args.video, "until": args.until, "first_run_s": round(first, 2),
                   "noop_over_first_ratio": round(statistics.median(times) / first, 4)}
    figures.update(noop_rerun_median_s=round(statistics.median(times), 3), noop_rerun_max_s=round(max(times), 3),
                   noop_rerun_min_s=round(min(times), 3))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
