"""How long does `mono4d run` take when nothing changed? (target: under 2 s)

Runs the pipeline once on a video (default: ../shared/data/videos/teddy.mp4) up to a stage,
then times N no-op reruns of the same command in fresh processes (what a user waits for),
and prints the figures as JSON.

    python benchmarks/noop_rerun.py [--video PATH] [--until STAGE] [--repeats 5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default=str(REPO_ROOT.parent / "shared" / "data" / "videos" / "teddy.mp4"))
    parser.add_argument("--until", default="frames")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "pipeline.cli", "run", args.video, "--work", work, "--until", args.until]
        for text in args.overrides:
            command += ["--set", text]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if " ran " in result.stdout:
                raise SystemExit(f"a no-op rerun recomputed something:\n{result.stdout}")
    figures = {"video": args.video, "until": args.until, "first_run_s": round(first, 2),
               "noop_rerun_median_s": round(statistics.median(times), 3), "noop_rerun_max_s": round(max(times), 3),
               "noop_over_first_ratio": round(statistics.median(times) / first, 4)}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
