"""Accuracy of the motion masks on the synthetic scenes (ground truth known), both passes.

For each preset (default ``ci`` and ``walker``: a plain back wall and an articulated figure
walking nearly along the camera's motion) the frames and flow stages run on the scene's
lossless images, then the first ``masks`` pass (``motion`` backend, no cameras) and the
``masks_refine`` pass with the scene's true cameras and its true z-depth times ``1 + noise *
N(0, 1)`` per pixel (what a good aligned monocular depth gives). Printed per pass: mean IoU
over frames with the ground-truth dynamic masks, the share of static pixels marked dynamic
(false positives) and the stage's wall time. tests/test_masks.py asserts these figures with a
margin.

Usage: ``python benchmarks/masks_accuracy.py [--presets ci,walker] [--seed 0]
[--depth-noise 0.02] [--json OUT.json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mono4d.data import artifacts, synthetic  # noqa: E402
from mono4d.stages import flow, frames, masks, masks_refine  # noqa: E402
from tests.test_masks import false_positive_share, ground_truth_geometry, mean_iou  # noqa: E402


def timed_stage(module, inputs: dict, params, out: Path) -> float:
    """Run one stage into the new folder ``out``; its wall time in seconds."""
    out.mkdir(parents=True)
    started = time.perf_counter()
    module.run(inputs, params, out)
    return time.perf_counter() - started


def measure(preset: str, seed: int, depth_noise: float, root: Path) -> dict:
    """IoU, false-positive share and seconds of both mask passes on one synthetic preset."""
    scene = synthetic.generate(root / "scene", preset=preset, seed=seed)
    timed_stage(frames, {"source": scene.root / "images"}, frames.Params(), root / "frames")
    timed_stage(flow, {"frames": root / "frames"}, flow.Params(), root / "flow")
    truth = scene.masks > 0
    results = {}
    first_seconds = timed_stage(masks, {"frames": root / "frames", "flow": root / "flow"}, masks.Params(),
                                root / "masks")
    cameras_dir, align_dir = ground_truth_geometry(scene, root, depth_noise)
    refine_inputs = {"frames": root / "frames", "flow": root / "flow", "masks": root / "masks",
                     "cameras": cameras_dir, "align": align_dir}
    refine_seconds = timed_stage(masks_refine, refine_inputs, masks_refine.Params(), root / "masks_refine")
    for name, seconds in (("masks", first_seconds), ("masks_refine", refine_seconds)):
        predicted = artifacts.read_masks(root / name) > 0
        results[name] = {"iou": round(mean_iou(predicted, truth), 4),
                         "false_positive_share": round(false_positive_share(predicted, truth), 5),
                         "seconds": round(seconds, 2)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="ci,walker", help="comma-separated synthetic presets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth-noise", type=float, default=0.02, help="relative depth noise of the refined pass")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {}
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory(prefix="mono4d_masks_bench_") as tmp:
            results[preset] = measure(preset, args.seed, args.depth_noise, Path(tmp))
        for name, figures in results[preset].items():
            print(f"{preset:8s} {name:13s} IoU {figures['iou']:.3f}  false positives "
                  f"{100 * figures['false_positive_share']:.2f} % of static pixels  {figures['seconds']:.1f} s",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
