"""Accuracy of the depth and align stages on the synthetic scene (ground truth known).

For each depth source that can run here, the depth stage and then the align stage are run with
the scene's true cameras and SfM-like points (static pixels, true depth, a share of them given a
wrong depth as outliers), and AbsRel (mean |d - d*| / d*) over the pixels that have depth is
printed on static pixels, on moving-object pixels, and for the raw depth where it is already in
scene units, with the share of static / moving pixels that have depth at all (coverage; 0 =
unknown) and the share of pixels near true depth edges more than 10 % off (edge bad):

- ``corrupted``: true inverse depth under an unknown per-frame affine map plus 2 % noise,
  written as a ``relative_inverse`` depth folder (what an affine-invariant model gives at best);
- ``file``: the true depth read by the file backend (metric);
- ``sfm``: the weights-free plane-sweep backend driven by the true cameras and points;
- ``transformers``: a tiny randomly initialised Depth Anything (the pipeline runs end to end; its
  numbers mean nothing about real models).

Usage: ``python benchmarks/depth_accuracy.py [--preset ci|tiny|bench] [--seed 0]
[--outliers 0.1] [--json OUT.json] [--skip-transformers]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mono4d.data import artifacts, synthetic  # noqa: E402
from mono4d.stages import align, depth, frames  # noqa: E402
from tests.test_align import (abs_rel, corrupted_inverse_depth, sample_static_points,  # noqa: E402
                              write_cameras_dir, write_masks_dir)
from tests.test_depth import build_tiny_depth_anything, depth_edge_band  # noqa: E402


def run_stage(module, inputs: dict, params, out: Path) -> tuple[dict, float]:
    out.mkdir(parents=True)
    started = time.perf_counter()
    figures = module.run(inputs, params, out)
    return figures, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ci")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outliers", type=float, default=0.1, help="share of SfM points given a wrong depth")
    parser.add_argument("--points", type=int, default=150, help="SfM points per frame")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mono4d_depth_bench_") as tmp:
        root = Path(tmp)
        scene = synthetic.generate(root / "scene", preset=args.preset, seed=args.seed)
        run_stage(frames, {"source": scene.root / "images"}, frames.Params(), root / "frames")
        points = sample_static_points(scene, per_frame=args.points, outlier_fraction=args.outliers, seed=args.seed)
        cameras = write_cameras_dir(root / "cameras", scene, points)
        clean_cameras = write_cameras_dir(root / "cameras_clean", scene,
                                          sample_static_points(scene, per_frame=args.points, outlier_fraction=0.0,
                                                               seed=args.seed))
        masks = write_masks_dir(root / "masks", scene.masks)
        static, moving = scene.masks == 0, scene.masks > 0
        np.save(root / "truth.npy", scene.depth)

        sources: dict[str, tuple[Path, float | None]] = {}
        corrupted = root / "depth_corrupted"
        corrupted.mkdir()
        artifacts.write_depth(corrupted, corrupted_inverse_depth(scene, seed=args.seed), "relative_inverse",
                                 backend="corrupted ground truth")
        sources["corrupted"] = (corrupted, None)
        _, seconds = run_stage(depth, {"frames": root / "frames"},
                               depth.Params(backend="file", file_path=str(root / "truth.npy"), file_kind="metric"),
                               root / "depth_file")
        sources["file"] = (root / "depth_file", seconds)
        # The sfm backend gets outlier-free points: COLMAP's points pass its own reprojection checks.
        _, seconds = run_stage(depth, {"frames": root / "frames", "cameras": clean_cameras},
                               depth.Params(backend="sfm"), root / "depth_sfm")
        sources["sfm"] = (root / "depth_sfm", seconds)
        if not args.skip_transformers:
            model = build_tiny_depth_anything(root / "tiny_model")
            _, seconds = run_stage(depth, {"frames": root / "frames"},
                                   depth.Params(backend="transformers", model=str(model)), root / "depth_tiny")
            sources["transformers (tiny, random)"] = (root / "depth_tiny", seconds)

        results = {"preset": args.preset, "seed": args.seed, "outlier_fraction": args.outliers,
                   "frames": scene.num_frames, "width": scene.width, "height": scene.height, "sources": {}}
        print(f"synthetic scene {args.preset}: {scene.num_frames} frames {scene.width}x{scene.height}, "
              f"{args.points} SfM points/frame, {args.outliers:.0%} outliers; AbsRel over pixels with depth "
              "(lower is better), coverage = share of pixels with depth")
        print(f"{'source':28s} {'raw static':>10s} {'aligned static':>14s} {'aligned moving':>14s} "
              f"{'cov static':>10s} {'cov moving':>10s} {'edge bad':>8s} {'depth s':>8s} {'align s':>8s}")
        band = depth_edge_band(scene.depth)
        for name, (folder, depth_seconds) in sources.items():
            raw, kind = artifacts.read_depth(folder)
            raw_static = abs_rel(raw, scene.depth, static & (raw > 0)) if kind != "relative_inverse" else None
            out = root / f"align_{name.split()[0]}"
            figures, align_seconds = run_stage(align, {"depth": folder, "cameras": cameras, "masks": masks},
                                               align.Params(), out)
            aligned = artifacts.read_aligned_depth(out)
            near_edges = band & (aligned > 0)
            edge_error = np.abs(aligned[near_edges] - scene.depth[near_edges]) / scene.depth[near_edges]
            row = {"kind": kind, "raw_static_abs_rel": raw_static,
                   "aligned_static_abs_rel": abs_rel(aligned, scene.depth, static & (aligned > 0)),
                   "aligned_moving_abs_rel": (abs_rel(aligned, scene.depth, moving & (aligned > 0))
                                              if (moving & (aligned > 0)).any() else None),
                   "coverage_static": float((aligned[static] > 0).mean()),
                   "coverage_moving": float((aligned[moving] > 0).mean()),
                   "edge_bad_fraction": float((edge_error > 0.1).mean()) if edge_error.size else None,
                   "depth_seconds": depth_seconds, "align_seconds": align_seconds,
                   "median_residual": figures["median_residual"]}
            results["sources"][name] = row

            def cell(value, width: int, digits: int = 4) -> str:
                return f"{'-' if value is None else f'{value:.{digits}f}':>{width}s}"

            print(f"{name:28s} {cell(raw_static, 10)} {cell(row['aligned_static_abs_rel'], 14)} "
                  f"{cell(row['aligned_moving_abs_rel'], 14)} {cell(row['coverage_static'], 10, 3)} "
                  f"{cell(row['coverage_moving'], 10, 3)} {cell(row['edge_bad_fraction'], 8, 3)} "
                  f"{cell(depth_seconds, 8, 1)} {align_seconds:8.1f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
