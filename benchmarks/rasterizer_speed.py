"""Speed of the Gaussian rasterizer backends side by side: milliseconds per forward render and per
training step (forward with autograd + L1 loss + backward), for 10k and 100k Gaussians at 128x96
and 480x270, and each backend's speed-up over the pure-torch reference (on the same device; numba
over torch on the CPU) measured in the same run.

The scene fills the image the way a fitted scene does: Gaussians spread over the camera frustum at
depth 2..4, sized so that their projected standard deviation is about the mean spacing between
their centres (every pixel is covered by tens of them), random rotations, mild anisotropy,
opacities 0.1..0.9, RGB colours. The torch and numba backends run on CPU; when CUDA is available
the torch backend and gsplat (when its CUDA extension loads) also run on the GPU.

Times are wall-clock medians; ``--threads`` sets torch's CPU threads, which the numba backend
follows. On a shared, busy machine compare the ratios, which are measured in one run.

Usage: ``python benchmarks/rasterizer_speed.py [--repeats 3] [--threads N] [--sizes 10000,100000]
[--resolutions 128x96,480x270] [--backends torch,numba] [--json OUT.json]``. Prints one JSON
document, then a table. ``--breakdown 100000x480x270`` instead times the numba backend's stages
(projection, spherical harmonics, tile binning, compositing; forward and forward+backward; wall and
CPU time) and the whole step, and prints them as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from mono4d.models.rasterizer import gsplat_cuda_status, rasterization


def make_scene(n: int, width: int, height: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """N Gaussians filling the view of an identity camera with focal length = width (pixels)."""
    generator = torch.Generator().manual_seed(seed)
    focal = float(width)
    depth = 2.0 + 2.0 * torch.rand(n, generator=generator)
    x = (torch.rand(n, generator=generator) - 0.5) * depth * width / focal
    y = (torch.rand(n, generator=generator) - 0.5) * depth * height / focal
    spacing_px = math.sqrt(width * height / n)
    base_scale = spacing_px * depth / focal  # world size of one pixel spacing at that depth
    anisotropy = torch.exp(0.4 * torch.randn(n, 3, generator=generator))
    scene = {
        "means": torch.stack([x, y, depth], -1),
        "quats": torch.randn(n, 4, generator=generator),
        "scales": base_scale[:, None] * anisotropy,
        "opacities": 0.1 + 0.8 * torch.rand(n, generator=generator),
        "colors": torch.rand(n, 3, generator=generator),
        "viewmats": torch.eye(4)[None],
        "Ks": torch.tensor([[[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]]),
    }
    return {name: value.to(device) for name, value in scene.items()}


def time_ms(function, repeats: int, device: str) -> float:
    """Median wall time of ``function()`` in milliseconds after one warm-up call."""
    return time_wall_cpu_ms(function, repeats, device)[0]


def time_wall_cpu_ms(function, repeats: int, device: str = "cpu") -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``function()`` in
    milliseconds, after one warm-up call. On a busy machine CPU time is the steadier figure."""
    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    function()
    synchronize()
    walls, cpus = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        function()
        synchronize()
        walls.append(1000.0 * (time.perf_counter() - started))
        cpus.append(1000.0 * (time.process_time() - started_cpu))
    return statistics.median(walls), statistics.median(cpus)


def measure(backend: str, device: str, n: int, width: int, height: int, repeats: int) -> dict:
    """Forward (no autograd) and forward+backward times of one render of ``n`` Gaussians by ``backend``
    on ``device``, median of ``repeats`` after a warm-up (which also compiles the numba kernels)."""
    scene = make_scene(n, width, height, device)
    target = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1)).to(device)
    leaves = {name: scene[name].clone().requires_grad_(True)
              for name in ("means", "quats", "scales", "opacities", "colors")}

    def forward() -> None:
        with torch.no_grad():
            rasterization(**scene, width=width, height=height, render_mode="RGB+ED", backend=backend)

    def step() -> None:
        colors, _, info = rasterization(**{**scene, **leaves}, width=width, height=height, render_mode="RGB+ED",
                                        backend=backend)
        (colors[..., :3] - target).abs().mean().backward()
        for leaf in leaves.values():
            leaf.grad = None

    with torch.no_grad():
        _, alphas, info = rasterization(**scene, width=width, height=height, backend=backend)
    return {
        "backend": backend, "device": device, "gaussians": n, "width": width, "height": height,
        "visible_gaussians": int((info["radii"] > 0).all(-1).sum()),
        "mean_alpha": round(float(alphas.mean()), 4),
        "forward_ms": round(time_ms(forward, repeats, device), 2),
        "forward_backward_ms": round(time_ms(step, repeats, device), 2),
    }


def breakdown(n: int, width: int, height: int, repeats: int) -> list[dict]:
    """Wall and CPU milliseconds of the numba backend's stages on the benchmark scene: projection,
    spherical harmonics (degree 3, on the visible entries), tile binning, compositing (its forward
    includes the binning), each forward (building the autograd graph) and forward+backward, and the
    whole training step (RGB colours, as :func:`measure`), whose remainder is torch glue (gathers,
    concatenations, conversions, the loss)."""
    from mono4d.models import projection_numba, rasterizer_numba

    scene = make_scene(n, width, height, "cpu")
    names = ("means", "quats", "scales", "opacities")
    leaves = {name: scene[name].clone().requires_grad_(True) for name in names}
    args = (scene["viewmats"], scene["Ks"], width, height, 0.01, 1e10, 0.3, 0.0, False)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        projection = projection_numba.project(*(scene[name] for name in names), *args)
    cams, gaussians = projection.visible_cameras, projection.visible_gaussians
    projected = (projection.means2d, projection.depths, projection.conics, projection.opacities)
    projection_grads = [torch.randn(value.shape, generator=generator) for value in projected]
    coefficients = (0.3 * torch.randn(n, 16, 3, generator=generator)).requires_grad_(True)
    centres = torch.linalg.inv(scene["viewmats"])[:, :3, 3]
    composited = dataclasses.replace(projection, **{name: getattr(projection, name).detach().requires_grad_(True)
                                                    for name in ("means2d", "depths", "conics", "opacities")})
    features = scene["colors"][gaussians].requires_grad_(True)
    tile_size = rasterizer_numba.DEFAULT_TILE_SIZE
    tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
    boxes64, cams64 = projection.boxes.contiguous().numpy(), cams.contiguous().numpy()
    pixel_grads = [torch.randn(1, height, width, 4, generator=generator), torch.randn(1, height, width, 1,
                                                                                       generator=generator)]

    def projection_forward() -> tuple:
        return projection_numba.project(*leaves.values(), *args)

    def projection_step() -> None:
        result = projection_forward()
        torch.autograd.backward([result.means2d, result.depths, result.conics, result.opacities], projection_grads)

    def sh_forward() -> torch.Tensor:
        return projection_numba.shade(3, leaves["means"], coefficients, centres, cams, gaussians)

    def sh_step() -> None:
        sh_forward().sum().backward()

    def binning() -> None:
        rasterizer_numba._bin_tiles(boxes64, cams64, 1, tiles_x, tiles_y, tile_size)

    def composite_forward() -> tuple:
        return rasterizer_numba.composite(composited, features, True, 1, width, height)

    def composite_step() -> None:
        torch.autograd.backward(list(composite_forward()), pixel_grads)

    stages = [("projection", projection_forward, projection_step), ("spherical harmonics (degree 3)", sh_forward,
              sh_step), ("tile binning", binning, None), ("compositing", composite_forward, composite_step)]
    rows = []
    for name, forward, step in stages:
        wall, cpu = time_wall_cpu_ms(forward, repeats)
        row = {"stage": name, "forward_ms": round(wall, 1), "forward_cpu_ms": round(cpu, 1)}
        if step is not None:
            wall, cpu = time_wall_cpu_ms(step, repeats)
            row.update(forward_backward_ms=round(wall, 1), forward_backward_cpu_ms=round(cpu, 1))
        rows.append(row)
    whole = measure("numba", "cpu", n, width, height, repeats)
    rows.append({"stage": "whole training step (RGB+ED)", "forward_ms": whole["forward_ms"],
                 "forward_backward_ms": whole["forward_backward_ms"]})
    return rows


def speedups(results: list[dict]) -> None:
    """Add to each result its speed-up over the torch backend for the same case: on the same device
    for CUDA backends, over the torch backend on the CPU for CPU backends."""
    reference = {(r["device"], r["gaussians"], r["width"], r["height"]): r for r in results if r["backend"] == "torch"}
    for result in results:
        base = reference.get((result["device"], result["gaussians"], result["width"], result["height"]))
        if base is not None:
            for key in ("forward_ms", "forward_backward_ms"):
                result[key.replace("_ms", "_speedup_vs_torch")] = round(base[key] / result[key], 2)


def table(results: list[dict]) -> str:
    """The results as an aligned text table."""
    header = ("backend", "device", "gaussians", "size", "fwd ms", "fwd+bwd ms", "fwd x torch", "fwd+bwd x torch")
    rows = [header] + [(r["backend"], r["device"], str(r["gaussians"]), f"{r['width']}x{r['height']}",
                        f"{r['forward_ms']:.1f}", f"{r['forward_backward_ms']:.1f}",
                        f"{r.get('forward_speedup_vs_torch', float('nan')):.1f}",
                        f"{r.get('forward_backward_speedup_vs_torch', float('nan')):.1f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated Gaussian counts")
    parser.add_argument("--resolutions", default="128x96,480x270", help="comma-separated WIDTHxHEIGHT")
    parser.add_argument("--backends", default="torch,numba",
                        help="comma-separated CPU backends (torch, numba); CUDA runs are added when available")
    parser.add_argument("--threads", type=int, default=0, help="torch (and numba) CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--breakdown", default="", metavar="NxWxH",
                        help="instead, time the numba backend's stages for N Gaussians at WxH, e.g. 100000x480x270")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        n, width, height = (int(value) for value in args.breakdown.split("x"))
        rows = breakdown(n, width, height, args.repeats)
        print(json.dumps({"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "gaussians": n,
                          "width": width, "height": height, "stages": rows}, indent=2))
        return
    sizes = [int(value) for value in args.sizes.split(",")]
    resolutions = [tuple(int(v) for v in value.split("x")) for value in args.resolutions.split(",")]

    runs = [(backend, "cpu") for backend in args.backends.split(",")]
    gsplat_available, gsplat_reason = gsplat_cuda_status()
    if torch.cuda.is_available():
        runs.append(("torch", "cuda"))
        if gsplat_available:
            runs.append(("gsplat", "cuda"))
    results = [measure(backend, device, n, width, height, args.repeats)
               for width, height in resolutions for n in sizes for backend, device in runs]
    speedups(results)
    report = {
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gsplat_cuda": gsplat_reason, "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(table(results))
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
