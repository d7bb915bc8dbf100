"""CPU (or CUDA) speed of the depth stage's transformers backend with the real Depth Anything V2
Small architecture, without downloading it.

The model is built from the Small configuration (DINOv2 ViT-S/14 backbone: hidden size 384, 12
layers, 6 heads, features from layers 3/6/9/12; DPT head with neck sizes 48/96/192/384, fusion
64), randomly initialised (~24.8 M parameters, like the released weights), saved to a temporary
folder with its image processor (input 518 on the shorter side, multiple of 14, aspect kept) and
run through :func:`mono4d.stages.depth_backends.estimate_transformers_depth` exactly as the stage runs
it, on frames of a real clip. The depth values mean nothing; the time per frame is that of the
released model, which has the same shapes and operations.

Usage: ``python benchmarks/depth_speed.py [--video PATH] [--frames 8] [--batch-sizes 1,4]
[--input-size 518] [--device cpu] [--threads 0]``. Prints wall and CPU seconds per frame per
batch size.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mono4d.stages.depth_backends import estimate_transformers_depth

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "cat.mp4"


def build_depth_anything_v2_small(folder: Path, input_size: int = 518, seed: int = 0) -> int:
    """Save a randomly initialised Depth Anything V2 Small (real shapes) and its image processor
    into ``folder``; returns the parameter count."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                            patch_size=14, image_size=518, layerscale_value=1.0,
                            out_features=["stage3", "stage6", "stage9", "stage12"], reshape_hidden_states=False,
                            apply_layernorm=True)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                                 reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[48, 96, 192, 384],
                                 fusion_hidden_size=64, head_hidden_size=32, head_in_index=-1,
                                 depth_estimation_type="relative")
    model = DepthAnythingForDepthEstimation(config)
    model.save_pretrained(folder)
    DPTImageProcessorPil(do_resize=True, size={"height": input_size, "width": input_size}, keep_aspect_ratio=True,
                         ensure_multiple_of=14, resample=3, do_rescale=True, do_normalize=True,
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def read_frames(video: Path, count: int) -> np.ndarray:
    """``(count, H, W, 3)`` uint8 RGB: the first frames of ``video`` (random noise frames of
    854x480 when the file is absent)."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < count:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    if not frames:
        print(f"{video} not readable: timing on random 854x480 frames")
        return np.random.default_rng(0).integers(0, 256, (count, 480, 854, 3), dtype=np.uint8)
    while len(frames) < count:
        frames.append(frames[len(frames) % len(frames)])
    return np.stack(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--input-size", type=int, default=518)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    frames = read_frames(args.video, args.frames)
    height, width = frames.shape[1:3]
    with tempfile.TemporaryDirectory(prefix="mono4d_depth_speed_") as tmp:
        count = build_depth_anything_v2_small(Path(tmp), args.input_size)
        print(f"Depth Anything V2 Small architecture, random weights: {count / 1e6:.1f} M parameters; "
              f"{args.frames} frames {width}x{height} from {args.video.name}, input {args.input_size}, "
              f"device {args.device}, {torch.get_num_threads()} torch threads")
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            # A first short pass warms up the allocator and kernels; the timed pass runs all frames.
            estimate_transformers_depth(lambda i: frames[list(i)], min(batch_size, args.frames), (height, width),
                                        tmp, batch_size=batch_size, device=args.device)
            started, cpu_started = time.perf_counter(), time.process_time()
            depth, _ = estimate_transformers_depth(lambda i: frames[list(i)], args.frames, (height, width), tmp,
                                                   batch_size=batch_size, device=args.device)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            assert depth.shape == (args.frames, height, width) and np.isfinite(depth).all()
            # CPU seconds are less sensitive than wall time to other processes on a shared machine.
            print(f"batch {batch_size}: {seconds / args.frames:.3f} s/frame wall ({args.frames / seconds:.2f} "
                  f"frames/s), {cpu_seconds / args.frames:.3f} CPU-s/frame")


if __name__ == "__main__":
    main()
