"""Depth stage: one depth map per frame.

Backends (``Params.backend``):

- ``auto`` — ``transformers`` when its model can be had here (a local folder, the local Hugging
  Face cache, or a hub that answers within seconds; never tried with ``HF_HUB_OFFLINE``), else
  ``sfm``. Resolved once, when the run's configuration is built: ``Params(backend="auto")``
  holds the chosen backend and ``auto_chosen=True``, so the DAG (``needs_cameras``), the
  fingerprint and ``config.json`` all see the backend that runs; a fallback is logged and noted
  in the manifest.
- ``transformers`` — a Hugging Face depth-estimation model (hub id or local folder; Depth
  Anything V2 Small by default). Its output kind comes from the model config (Depth Anything's
  ``depth_estimation_type``: relative models predict relative inverse depth, metric ones metres)
  unless ``output_kind`` overrides it.
- ``file`` — the user's own depth maps (``.npy``, 16-bit PNG, float TIFF; or one stacked
  ``(T, H, W)`` ``.npy``), matched to the frames in sorted order; value x ``file_scale``.
- ``sfm`` — weights-free plane-sweep stereo from the cameras stage's registered cameras and
  sparse points (see :mod:`mono4d.stages.depth_backends` for the method and its limits on moving
  objects); z-depth in the cameras' units.

Outputs in ``out_dir``: ``depth/000000.npy`` float32 ``(H, W)`` per frame and ``depth.json`` =
{"kind": "relative_inverse" | "metric" | "sfm", "invalid": "0", "backend" (the one that ran),
"auto_chosen", "model", "num_frames", "width", "height", "files"} (see
:func:`mono4d.data.artifacts.write_depth`), and ``vis/000000.png`` colourised (near = warm, invalid =
black; one colour range for the whole clip for z-depth kinds). Values <= 0 are
invalid. For ``relative_inverse`` larger means nearer, up to an unknown scale and shift; the
align stage turns every kind into z-depth in the cameras' units.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm import tqdm

from mono4d.data.artifacts import DEPTH_KINDS, read_cameras, read_points, write_depth
from mono4d.data.errors import InputError, ParameterError, StageFailure
from mono4d.data.images import write_rgb
from mono4d.data.visualize import colorize, colorize_depth

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "file", "sfm")
AUTO = "auto"


@dataclass(frozen=True)
class Params:
    """Parameters of the depth stage.

    backend: "transformers" (learned, needs weights), "file" (user depth maps), "sfm"
        (weights-free stereo from the cameras stage) or "auto" (transformers when ``model`` can be
        had here, else sfm; replaced by the chosen backend when the Params are built).
    auto_chosen: True when ``backend`` was chosen by ``backend=auto`` (set on construction; do
        not set by hand).
    model: Hugging Face hub id or local folder of a depth-estimation model (transformers).
    batch_size: frames per forward pass (transformers).
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N" (transformers).
    fp16: half precision on CUDA (ignored on CPU) (transformers).
    input_size: resize target of the model's processor in pixels; 0 = the model's own (transformers).
    output_kind: "auto" (from the model config) | "relative_inverse" | "metric" (transformers).
    file_path: folder of depth maps (or its parent with depth_gt/ or depth/), or a stacked .npy (file).
    file_scale: depth = stored value x file_scale, e.g. 0.001 for millimetre PNGs (file).
    file_kind: what the files hold: "metric" | "relative_inverse" | "sfm" (file).
    sfm_neighbors: neighbouring frames matched per frame (sfm).
    sfm_num_planes: depth planes of the sweep, uniform in inverse depth (sfm).
    sfm_window: ZNCC patch size in pixels, odd (sfm).
    sfm_max_side: stereo resolution, pixels on the longer side (sfm).
    sfm_min_score: lowest aggregated ZNCC score kept as a stereo measurement (sfm).
    sfm_consistency: relative z tolerance of the multi-view consistency check; 0 = off (sfm).
    sfm_min_consistent: neighbours whose own depth must agree for a stereo depth to be kept (sfm).
    sfm_max_gap: farthest neighbour in frames (sfm).
    sfm_baseline: preferred neighbour baseline as a fraction of the scene depth (sfm).
    sfm_fuse_window: frames on each side whose stereo depths are reprojected into a frame and
        fused where they agree (temporal consistency); 0 = off (sfm).
    sfm_fill_sigma: spatial reach of the edge-aware fill as a fraction of the longer image side (sfm).
    sfm_fill_color: colour difference (summed over RGB in [0, 1]) over which the fill stops
        spreading; smaller = stricter edges (sfm).
    sfm_min_support: a pixel gets no depth (0) when less than this share of the measurement weight
        that would reach it ignoring edges reaches it along the image (sfm).
    sfm_median: median filter size applied to the filled inverse depth: 0 (off), 3 or 5 (sfm).
    """

    backend: str = "transformers"
    auto_chosen: bool = False
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    batch_size: int = 4
    device: str = "auto"
    fp16: bool = True
    input_size: int = 0
    output_kind: str = "auto"
    file_path: str = ""
    file_scale: float = 1.0
    file_kind: str = "metric"
    sfm_neighbors: int = 4
    sfm_num_planes: int = 64
    sfm_window: int = 7
    sfm_max_side: int = 320
    sfm_min_score: float = 0.5
    sfm_consistency: float = 0.02
    sfm_min_consistent: int = 2
    sfm_max_gap: int = 10
    sfm_baseline: float = 0.08
    sfm_fuse_window: int = 3
    sfm_fill_sigma: float = 0.1
    sfm_fill_color: float = 0.1
    sfm_min_support: float = 0.1
    sfm_median: int = 0

    def __post_init__(self) -> None:
        if self.backend == AUTO:
            from mono4d.stages.depth_backends import transformers_model_availability

            available, where = transformers_model_availability(self.model)
            if available:
                logger.info("depth.backend=auto: using transformers, depth model %s from %s", self.model, where)
            else:
                logger.warning("depth.backend=auto: depth model %s is not available (%s); using the weights-free "
                               "sfm backend", self.model, where)
            object.__setattr__(self, "backend", "transformers" if available else "sfm")
            object.__setattr__(self, "auto_chosen", True)

    def needs_cameras(self) -> bool:
        """Whether ``run`` reads the cameras stage output (the DAG edge depth <- cameras)."""
        return self.backend == "sfm"

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot work."""
        checks = [
            (self.backend in BACKENDS,
             f"depth.backend must be one of {', '.join(BACKENDS + (AUTO,))}, not '{self.backend}'"),
            (self.batch_size >= 1, f"depth.batch_size must be >= 1, not {self.batch_size}"),
            (self.device == "auto" or self.device == "cpu" or self.device == "mps" or self.device.startswith("cuda"),
             f"depth.device must be auto, cpu, cuda, cuda:N or mps, not '{self.device}'"),
            (self.input_size == 0 or 14 <= self.input_size <= 4096,
             f"depth.input_size must be 0 (model default) or 14..4096, not {self.input_size}"),
            (self.output_kind in ("auto", "relative_inverse", "metric"),
             f"depth.output_kind must be auto, relative_inverse or metric, not '{self.output_kind}'"),
            (self.file_scale > 0, f"depth.file_scale must be > 0, not {self.file_scale}"),
            (self.file_kind in DEPTH_KINDS,
             f"depth.file_kind must be one of {', '.join(DEPTH_KINDS)}, not '{self.file_kind}'"),
            (not (self.backend == "file" and not self.file_path),
             "depth.backend=file needs depth.file_path (the folder of depth maps)"),
            (1 <= self.sfm_neighbors <= 16, f"depth.sfm_neighbors must be in 1..16, not {self.sfm_neighbors}"),
            (8 <= self.sfm_num_planes <= 512, f"depth.sfm_num_planes must be in 8..512, not {self.sfm_num_planes}"),
            (self.sfm_window >= 3 and self.sfm_window % 2 == 1,
             f"depth.sfm_window must be an odd number >= 3, not {self.sfm_window}"),
            (32 <= self.sfm_max_side <= 4096, f"depth.sfm_max_side must be in 32..4096, not {self.sfm_max_side}"),
            (-1.0 <= self.sfm_min_score < 1.0, f"depth.sfm_min_score must be in [-1, 1), not {self.sfm_min_score}"),
            (0.0 <= self.sfm_consistency < 1.0, f"depth.sfm_consistency must be in [0, 1), not {self.sfm_consistency}"),
            (self.sfm_min_consistent >= 1, f"depth.sfm_min_consistent must be >= 1, not {self.sfm_min_consistent}"),
            (self.sfm_max_gap >= 1, f"depth.sfm_max_gap must be >= 1, not {self.sfm_max_gap}"),
            (0.0 < self.sfm_baseline < 1.0, f"depth.sfm_baseline must be in (0, 1), not {self.sfm_baseline}"),
            (0 <= self.sfm_fuse_window <= 16, f"depth.sfm_fuse_window must be in 0..16, not {self.sfm_fuse_window}"),
            (0.0 < self.sfm_fill_sigma <= 1.0, f"depth.sfm_fill_sigma must be in (0, 1], not {self.sfm_fill_sigma}"),
            (self.sfm_fill_color > 0, f"depth.sfm_fill_color must be > 0, not {self.sfm_fill_color}"),
            (0.0 <= self.sfm_min_support < 1.0, f"depth.sfm_min_support must be in [0, 1), not {self.sfm_min_support}"),
            (self.sfm_median in (0, 3, 5), f"depth.sfm_median must be 0, 3 or 5, not {self.sfm_median}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParameterError(message, "fix the value in luigi.cfg [depth] or with --set depth.NAME=VALUE")


def _progress(description: str, unit: str):
    return lambda iterable: tqdm(iterable, desc=description, unit=unit, leave=False)


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Estimate depth for every frame of ``inputs["frames"]`` (and ``inputs["cameras"]`` for the
    sfm backend) and write ``depth/``, ``vis/`` and ``depth.json`` into ``out_dir``."""
    from mono4d.stages.frames import load_frames, read_frames_meta

    params.validate()
    meta = read_frames_meta(inputs["frames"])
    num_frames, size = int(meta["num_frames"]), (int(meta["height"]), int(meta["width"]))
    notes: list[str] = []
    figures: dict = {}
    model_name = ""
    if params.backend == "transformers":
        from mono4d.stages.depth_backends import depth_kind_from_config, estimate_transformers_depth

        depth, config = estimate_transformers_depth(
            lambda indices: load_frames(inputs["frames"], indices), num_frames, size, params.model,
            batch_size=params.batch_size, device=params.device, fp16=params.fp16, input_size=params.input_size,
            progress=_progress("depth model", "batch"))
        model_name = params.model
        kind = params.output_kind if params.output_kind != "auto" else depth_kind_from_config(config)
        if kind is None:
            raise ParameterError(f"cannot tell from the config of '{params.model}' whether it predicts metric or "
                                 "relative inverse depth",
                                 "set it: --set depth.output_kind=relative_inverse (disparity-like, larger = "
                                 "nearer) or --set depth.output_kind=metric")
    elif params.backend == "file":
        from mono4d.stages.depth_backends import read_depth_files

        depth = read_depth_files(Path(params.file_path).expanduser(), num_frames, size, params.file_scale)
        kind = params.file_kind
    else:
        from mono4d.stages.depth_backends import estimate_sfm_depth, transformers_model_availability

        if params.auto_chosen:
            notes.append(f"depth.backend=auto used the weights-free sfm backend: depth model '{params.model}' is "
                         f"not available here ({transformers_model_availability(params.model)[1]}); fill the "
                         "Hugging Face cache or give depth.model=FOLDER for learned depth")
        if "cameras" not in inputs:
            raise InputError("the sfm depth backend needs the cameras stage output",
                             "run the cameras stage first (the pipeline does this for depth.backend=sfm)")
        K, w2c, registered = read_cameras(inputs["cameras"])
        if len(K) != num_frames:
            raise InputError(f"cameras stage has {len(K)} cameras but there are {num_frames} frames",
                             "rerun the cameras stage on the current frames")
        depth, stats = estimate_sfm_depth(
            load_frames(inputs["frames"]), K, w2c, registered, read_points(inputs["cameras"]),
            num_neighbors=params.sfm_neighbors, num_planes=params.sfm_num_planes, window=params.sfm_window,
            max_side=params.sfm_max_side, min_score=params.sfm_min_score, consistency=params.sfm_consistency,
            min_consistent=params.sfm_min_consistent, max_gap=params.sfm_max_gap,
            target_baseline=params.sfm_baseline, fuse_window=params.sfm_fuse_window, fill_sigma=params.sfm_fill_sigma,
            fill_color=params.sfm_fill_color, min_support=params.sfm_min_support, median=params.sfm_median,
            progress=_progress("plane sweep", "frame"))
        kind = "sfm"
        figures.update({name: round(stats[name], 4) for name in ("stereo_fraction", "fused_fraction",
                                                                  "unknown_fraction")})
        if stats["frames_without_neighbors"]:
            notes.append(f"{stats['frames_without_neighbors']} frames had no usable stereo neighbour; their depth "
                         "is interpolated from sparse SfM points only")
        if not registered.all():
            notes.append(f"{int((~registered).sum())} frames were not registered by SfM; their depth relies on "
                         "interpolated poses (none where they have no pose)")

    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
    valid_fraction = float((depth > 0).mean())
    if valid_fraction == 0.0:
        raise StageFailure(f"the {params.backend} depth backend produced no valid depth at all",
                           "check the inputs (frames, cameras, depth files) or try another depth.backend")
    write_depth_vis(out_dir, depth, kind)
    write_depth(out_dir, depth, kind, backend=params.backend, model=model_name, auto_chosen=params.auto_chosen)
    if valid_fraction < 0.5:
        notes.append(f"only {valid_fraction:.0%} of pixels have depth")
    figures.update({"num_frames": num_frames, "backend": params.backend, "auto_chosen": params.auto_chosen,
                    "kind": kind, "valid_fraction": round(valid_fraction, 4)})
    if notes:
        figures["notes"] = notes
    return figures


def depth_vis(depth: np.ndarray, kind: str, inverse_range: tuple[float, float] | None = None) -> np.ndarray:
    """Colour picture ``(H, W, 3)`` uint8 of one depth map of the given kind (near = warm, invalid
    black). ``inverse_range``: the ``(low, high)`` of 1/z mapped to the colour scale for z-depth
    kinds (one range for a whole clip keeps colours comparable across frames); None = this map's
    2nd..98th percentiles. Relative inverse depth is scaled per frame (its scale is unknown)."""
    if kind == "relative_inverse":
        return colorize(depth, depth > 0)
    if inverse_range is None:
        return colorize_depth(depth)
    valid = depth > 0
    return colorize(np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0), valid, *inverse_range)


def clip_inverse_range(depth: np.ndarray, max_samples: int = 1_000_000) -> tuple[float, float] | None:
    """2nd and 98th percentiles of 1/z over the valid pixels of a clip's z-depth ``(T, H, W)``
    (a regular subsample of at most ``max_samples`` pixels), or None when nothing is valid."""
    values = depth.ravel()[:: max(1, depth.size // max_samples)]
    values = values[values > 0]
    if not values.size:
        return None
    low, high = np.percentile(1.0 / values, [2, 98])
    return float(low), float(high)


def write_depth_vis(out_dir: Path, depth: np.ndarray, kind: str) -> None:
    """Write ``vis/{t:06d}.png``, the colour pictures (:func:`depth_vis`) of ``depth (T, H, W)``."""
    (out_dir / "vis").mkdir(parents=True, exist_ok=True)
    inverse_range = None if kind == "relative_inverse" else clip_inverse_range(depth)
    for index, frame_depth in enumerate(depth):
        write_rgb(out_dir / "vis" / f"{index:06d}.png", depth_vis(frame_depth, kind, inverse_range))
