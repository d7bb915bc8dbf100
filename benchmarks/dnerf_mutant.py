"""D-NeRF "mutant": train on the train split, score the test split at 400x400 on a white background
(the standard protocol), and print PSNR / SSIM next to published numbers; also prints training
iterations per second on CPU (and on CUDA when available). Runs through the pipeline
(``mono4d run FOLDER``: frames, known cameras, silhouette init, train) in one workspace, so the
speed runs and the full run share frames, cameras and init.

Usage::

    python benchmarks/dnerf_mutant.py [--root ../shared/data/dnerf/mutant] [--iterations 3000]
        [--resolution 400] [--points 20000] [--device auto] [--speed-steps 30] [--out DIR] [--json out.json]

Published numbers (test split, mutant scene):

- Deformable 3D Gaussians (Yang et al., CVPR 2024, arXiv:2309.13101), per-scene table of the
  D-NeRF synthetic dataset: PSNR 42.63, SSIM 0.9951, LPIPS 0.0052.
- 4D Gaussian Splatting (Wu et al., CVPR 2024, arXiv:2310.08528), per-scene table of the
  synthetic dataset (supplementary): PSNR 37.59, SSIM 0.988, LPIPS 0.0167.

Caveat on provenance: both repositories show these tables only as images
(ingra14m/Deformable-3D-Gaussians ``assets/results/D-NeRF/Quantitative.jpg``; 4DGaussians'
paper), which the offline search tool used while writing this script could not read; the values
above are quoted from the papers' tables from memory and should be checked against the PDFs
before being published. Both methods train 20k-40k steps on a GPU with ~100k Gaussians; this
script's default budget is a CPU-sized run, so expect a large gap unless ``--iterations`` and
``--points`` are raised on a CUDA machine. LPIPS is not computed here (no offline weights).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PUBLISHED = {
    "Deformable-3DGS (arXiv:2309.13101)": {"psnr": 42.63, "ssim": 0.9951},
    "4DGS (arXiv:2310.08528)": {"psnr": 37.59, "ssim": 0.988},
}


def train_figures(root: Path, work: Path, settings: list[str]) -> dict:
    """The train stage's figures of ``mono4d run root --work work --set ...settings``."""
    from mono4d.pipeline.runner import run_pipeline

    summary = run_pipeline(work, root, overrides=settings)
    return summary.outcomes[-1].figures


def measure_speed(root: Path, work: Path, device: str, steps: int, common: list[str]) -> float:
    """Iterations per second of ``steps`` training steps (no densification) on ``device``."""
    settings = [*common, f"train.iterations={steps}", "train.densify=false", "train.eval_fraction=0.0",
                f"train.device={device}"]
    return float(train_figures(root, work, settings)["iterations_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "dnerf" / "mutant")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--resolution", type=int, default=400)
    parser.add_argument("--points", type=int, default=20000, help="initial Gaussians")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--speed-steps", type=int, default=30, help="steps of the it/s measurement per device (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="workspace (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    if not (args.root / "transforms_train.json").is_file():
        sys.exit(f"no D-NeRF scene at {args.root} (expected transforms_train.json)")
    work = args.out or Path(tempfile.mkdtemp(prefix="dnerf_mutant_"))
    common = [f"frames.max_side={args.resolution}", f"init.max_dynamic={args.points}", "train.make_videos=false",
              "train.export_ply=false"]
    results: dict = {"scene": str(args.root), "resolution": args.resolution, "iterations": args.iterations,
                     "initial_points": args.points, "torch_threads": torch.get_num_threads()}
    if args.speed_steps:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            speed = measure_speed(args.root, work, device, args.speed_steps, common)
            results[f"iterations_per_second_{device}"] = speed
            print(f"training speed on {device}: {speed:.2f} it/s ({args.points} Gaussians, {args.resolution}px)")
        if "cuda" not in devices:
            print("training speed on cuda: not measured (CUDA is not available here)")

    settings = [*common, f"train.iterations={args.iterations}",
                f"train.refine_start_fraction={min(500 / args.iterations, 1 / 6)}", f"train.eval_fraction={1 / 6}",
                f"train.device={args.device}"]
    started = time.perf_counter()
    figures = train_figures(args.root, work, settings)
    results.update({"psnr": figures["psnr_heldout"], "ssim": figures["ssim_heldout"],
                    "num_gaussians": figures["num_gaussians"], "iterations_per_second": figures["iterations_per_second"],
                    "wall_seconds": round(time.perf_counter() - started, 1), "workspace": str(work)})

    print(f"\nD-NeRF mutant, test split, {args.resolution}x{args.resolution}, white background")
    print(f"{'method':40s} {'PSNR':>8s} {'SSIM':>8s}")
    print(f"{'mono4d (this run, ' + str(args.iterations) + ' steps)':40s} {results['psnr']:8.2f} {results['ssim']:8.4f}")
    for name, numbers in PUBLISHED.items():
        print(f"{name:40s} {numbers['psnr']:8.2f} {numbers['ssim']:8.4f}")
    print(f"\n{results['num_gaussians']} Gaussians, {results['iterations_per_second']:.2f} it/s, "
          f"{results['wall_seconds']} s in all; renders and metrics in {work / 'train'}")
    if args.json:
        args.json.write_text(json.dumps({**results, "published": PUBLISHED}, indent=1))


if __name__ == "__main__":
    main()
