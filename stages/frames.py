"""Frames stage: pick frames from a video or image folder and write them as numbered images.

Selection, in this order (timestamps are seconds from the source's first frame):

1. the window ``start <= t <= end`` (``end`` 0 = until the end of the source);
2. with ``fps`` > 0, the frame nearest to each point of the regular grid ``t0, t0 + 1/fps, ...``
   (``t0`` = first frame in the window), duplicates dropped: follows real timestamps, so
   variable-frame-rate phone videos are resampled evenly; an ``fps`` at or above the source
   rate keeps every frame;
3. every ``stride``-th of those;
4. with ``max_frames`` > 0 and more frames left, ``max_frames`` of them evenly spaced over the
   whole selection (first and last kept), so the clip's full motion and baseline stay covered.

Outputs: ``images/000000.png ...`` (RGB; ``.jpg`` with ``format="jpg"``), resized so the longer
side is at most ``max_side``, and ``frames.json`` with ``source``, ``source_type``
("video"|"images"|"dataset"), ``source_fps``, ``fps`` (mean rate of the written frames),
``width``, ``height``, ``num_frames``, ``source_indices``, ``timestamps`` (seconds in the source)
and ``files`` (relative to the stage folder).

A D-NeRF folder as the source (:func:`mono4d.data.dnerf.is_dnerf_folder`) gives every image of its
:data:`~mono4d.data.dnerf.PIPELINE_SPLITS` in that order (the selection steps above do not apply),
composited over :data:`~mono4d.data.dnerf.BACKGROUND`, and also ``alpha/000000.png ...`` (the images'
alpha, 8-bit, resized alike); its ``frames.json`` adds ``times`` (the dataset's normalised
times), ``holdout_frames`` (the frames of the last split, the test split) and ``dataset``
(``{"format": "dnerf", "splits": {split: count}}``); timestamps are ``i / folder_fps``.

A Panoptic folder or its ``train_meta.json`` (:func:`mono4d.data.panoptic.is_panoptic_input`) gives
every camera of its ``train_meta.json`` then ``test_meta.json`` at each of the first ``timesteps``
timesteps, timestep by timestep (resized like a video's frames); its ``frames.json`` adds
``times`` (``t / (T_file - 1)``), ``holdout_frames`` (the test cameras' frames), ``views``
(``{"camera": [camera id per frame], "timestep": [timestep per frame]}``), ``source_files`` (each
frame's image relative to the dataset's ``ims/``, which its ``seg/`` mirrors) and ``dataset``
(``{"format": "panoptic", "train_cameras", "test_cameras", "timesteps"}``).
"""
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data import video
from mono4d.data.errors import InputError, ParameterError
from mono4d.data.images import read_gray, read_rgb, write_gray, write_rgb
from mono4d.stages.flow import DIS_MIN_SIDE, RAFT_MIN_SIDE

logger = logging.getLogger(__name__)

FORMATS = ("png", "jpg")
META_FILE = "frames.json"
IMAGES_DIR = "images"
ALPHA_DIR = "alpha"
MIN_FRAMES = 2
_MIN_MAX_SIDE = 32
# Timestamps closer than this (seconds) to the start/end of the window count as inside it.
_TIME_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Params:
    """Parameters of the frames stage.

    fps: target frame rate in frames per second; frames are picked by timestamp (nearest to a
        regular grid), 0 keeps the source rate.
    stride: keep every ``stride``-th frame after the fps selection (>= 1).
    max_frames: at most this many frames, evenly spaced over the selection (first and last
        kept); 0 = no limit.
    start: first time to use, seconds from the beginning of the source.
    end: last time to use in seconds; 0 = until the end of the source.
    max_side: resize (INTER_AREA, aspect kept, never enlarged) so the longer image side is at
        most this many pixels; 0 keeps the source size.
    format: image format written, "png" (lossless) or "jpg".
    jpeg_quality: JPEG quality 1..100 (used with format "jpg").
    folder_fps: frame rate assumed for an image folder (its frames have no timestamps).
    timesteps: a multi-view dataset (a Panoptic folder): its first this many timesteps, every
        camera of each (0 = all timesteps).
    train_cameras: a multi-view dataset: comma-separated ids of the training cameras to keep
        (e.g. "1" trains on one camera: the monocular stress test); "" keeps them all. The
        held-out cameras are always kept.
    """

    fps: float = 0.0
    stride: int = 1
    max_frames: int = 0
    start: float = 0.0
    end: float = 0.0
    max_side: int = 960
    format: str = "png"
    jpeg_quality: int = 95
    folder_fps: float = 30.0
    timesteps: int = 0
    train_cameras: str = ""

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot make sense."""
        for name in ("stride", "max_frames", "max_side", "jpeg_quality", "timesteps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ParameterError(f"frames.{name} must be a whole number, got {value!r}",
                                     f"write frames.{name} without a decimal point, e.g. {Params.__dataclass_fields__[name].default}")
        if not math.isfinite(self.fps) or self.fps < 0:
            raise ParameterError(f"frames.fps must be >= 0, got {self.fps}",
                                 "use a target frame rate such as 10, or 0 to keep the source rate")
        if self.stride < 1:
            raise ParameterError(f"frames.stride must be >= 1, got {self.stride}",
                                 "use 1 to keep every selected frame, 2 for every other one, ...")
        if self.max_frames < 0 or self.max_frames == 1:
            raise ParameterError(f"frames.max_frames must be 0 (no limit) or >= {MIN_FRAMES}, got {self.max_frames}",
                                 f"a reconstruction needs at least {MIN_FRAMES} frames; use e.g. 100, or 0 for all")
        if not math.isfinite(self.start) or self.start < 0:
            raise ParameterError(f"frames.start must be >= 0 seconds, got {self.start}",
                                 "give the time in seconds from the beginning of the clip, e.g. 0 or 1.5")
        if not math.isfinite(self.end) or self.end < 0:
            raise ParameterError(f"frames.end must be >= 0 seconds, got {self.end}",
                                 "give the end time in seconds, or 0 to use the clip until its end")
        if self.end > 0 and self.end <= self.start:
            raise ParameterError(f"frames.end ({self.end} s) must be after frames.start ({self.start} s)",
                                 "raise frames.end above frames.start, or set it to 0 to use the clip until its end")
        if self.max_side != 0 and self.max_side < _MIN_MAX_SIDE:
            raise ParameterError(f"frames.max_side must be 0 (keep size) or >= {_MIN_MAX_SIDE} pixels, got {self.max_side}",
                                 "use e.g. 960 (or 0 to keep the source resolution)")
        if self.format not in FORMATS:
            raise ParameterError(f"frames.format must be one of {', '.join(FORMATS)}, got {self.format!r}",
                                 'use "png" (lossless, default) or "jpg" (smaller files)')
        if not 1 <= self.jpeg_quality <= 100:
            raise ParameterError(f"frames.jpeg_quality must be within 1..100, got {self.jpeg_quality}",
                                 "use e.g. 95")
        if self.timesteps < 0:
            raise ParameterError(f"frames.timesteps must be >= 0, got {self.timesteps}",
                                 "use e.g. 5 for the first five timesteps, or 0 for all of them")
        if self.train_cameras and any(not part.strip().isdigit() for part in self.train_cameras.split(",")):
            raise ParameterError(f"frames.train_cameras must be comma-separated camera ids, got {self.train_cameras!r}",
                                 "write e.g. frames.train_cameras=1 or 1,4,7 (\"\" keeps every camera)")
        if not math.isfinite(self.folder_fps) or self.folder_fps <= 0:
            raise ParameterError(f"frames.folder_fps must be > 0, got {self.folder_fps}",
                                 "set the rate the images were taken at, e.g. 30")


def select_frames(timestamps: Sequence[float] | np.ndarray, fps: float = 0.0, stride: int = 1,
                  max_frames: int = 0, start: float = 0.0, end: float = 0.0) -> np.ndarray:
    """Indices into ``timestamps`` ``(N,)`` (seconds, increasing) of the frames to keep.

    Applies the window, fps, stride and max_frames steps described in the module docstring;
    returns a strictly increasing int64 array (possibly empty).
    """
    times = np.asarray(timestamps, dtype=np.float64)
    inside = times >= start - _TIME_TOLERANCE
    if end > 0:
        inside &= times <= end + _TIME_TOLERANCE
    chosen = np.flatnonzero(inside)
    if fps > 0 and chosen.size > 1:
        window_times = times[chosen]
        grid_count = int(math.floor((window_times[-1] - window_times[0]) * fps + 1e-6)) + 1
        grid = window_times[0] + np.arange(grid_count) / fps
        right = np.clip(np.searchsorted(window_times, grid), 1, window_times.size - 1)
        left = right - 1
        nearest = np.where(grid - window_times[left] <= window_times[right] - grid, left, right)
        chosen = chosen[np.unique(nearest)]
    chosen = chosen[::stride]
    if 0 < max_frames < chosen.size:
        chosen = chosen[np.round(np.linspace(0, chosen.size - 1, max_frames)).astype(np.int64)]
    return chosen.astype(np.int64)


def resize_to_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink ``(H, W, C)`` so that ``max(H, W) <= max_side`` (INTER_AREA, aspect kept,
    sides rounded); returned unchanged when already small enough or ``max_side`` is 0."""
    height, width = image.shape[:2]
    if max_side <= 0 or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def check_frame_size(width: int, height: int, source_size: tuple[int, int], params: Params, source: Path) -> None:
    """Raise :class:`InputError` when frames of ``width`` x ``height`` pixels (after the resize
    of ``params.max_side``; ``source_size`` (width, height) before it) are smaller than the flow
    stage's backends accept: :data:`~mono4d.stages.flow.DIS_MIN_SIDE` pixels on each side."""
    if min(width, height) >= DIS_MIN_SIDE:
        return
    resized = (width, height) != tuple(source_size)
    what = (f"{source_size[0]}x{source_size[1]} pixels, {width}x{height} after frames.max_side={params.max_side}"
            if resized else f"{width}x{height} pixels")
    raise InputError(
        f"the frames of {source} are {what}: optical flow needs at least {DIS_MIN_SIDE} pixels on each side "
        f"(OpenCV DIS; RAFT needs {RAFT_MIN_SIDE})",
        "raise frames.max_side (0 keeps the source size)" if resized and min(source_size) >= DIS_MIN_SIDE else
        f"give a video or images of at least {DIS_MIN_SIDE}x{DIS_MIN_SIDE} pixels (a few hundred per side for a "
        "useful reconstruction)")


def _selection_error(source: video.FrameSource, params: Params, selected: int) -> InputError:
    """The error for a selection of fewer than :data:`MIN_FRAMES` frames."""
    length = (f"the clip is {source.duration_s:.2f} s long" if source.complete
              else f"the clip is longer than {source.duration_s:.2f} s")
    length += f" ({source.num_frames} frames at {source.fps:.3g} fps)" if source.complete else ""
    window = f"start={params.start:g} s" + (f", end={params.end:g} s" if params.end > 0 else "")
    if selected == 0:
        return InputError(f"no frame of {source.path} lies in the requested time range ({window}): {length}",
                          "lower frames.start (and raise frames.end, or set it to 0 for the whole clip)")
    return InputError(
        f"only {selected} frame was selected from {source.path} ({window}, fps={params.fps:g}, "
        f"stride={params.stride}, max_frames={params.max_frames}; {length}): a reconstruction needs "
        f"at least {MIN_FRAMES} frames",
        "lower frames.stride, raise frames.fps or frames.max_frames, or widen frames.start/frames.end"
        if source.num_frames >= MIN_FRAMES else "give a video or image folder with at least 2 frames",
    )


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Select, resize and write frames of ``inputs["source"]`` (video file or image folder).

    Writes ``out_dir/images/NNNNNN.<format>`` and, last, ``out_dir/frames.json``. Returns
    ``{"num_frames", "width", "height", "fps", "source_fps", "duration_s"}`` (``duration_s``:
    time from the first to the last written frame) plus ``"notes"`` when there are warnings.
    """
    from mono4d.data.dnerf import is_dnerf_folder
    from mono4d.data.panoptic import panoptic_root

    params.validate()
    source_path = Path(inputs["source"])
    if source_path.is_dir() and is_dnerf_folder(source_path):
        return write_dataset_frames(source_path, params, Path(out_dir))
    panoptic = panoptic_root(source_path)
    if panoptic is not None:
        return write_panoptic_frames(panoptic, params, Path(out_dir))
    source = video.open_source(source_path, folder_fps=params.folder_fps,
                               until_s=params.end if params.end > 0 else None)
    selected = select_frames(source.timestamps, fps=params.fps, stride=params.stride,
                             max_frames=params.max_frames, start=params.start, end=params.end)
    if selected.size < MIN_FRAMES:
        raise _selection_error(source, params, int(selected.size))
    notes = list(source.notes)
    if params.fps > 0 and params.fps >= source.fps:
        notes.append(f"target fps {params.fps:g} is not below the source's {source.fps:.3g} fps: "
                     "every frame in the time range was kept")

    images_dir = Path(out_dir) / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    size: tuple[int, int] = (0, 0)
    decoded = video.iter_frames(source, selected)
    for number, (_, _, frame) in enumerate(tqdm(decoded, total=int(selected.size), desc="frames", unit="frame")):
        source_size = (frame.shape[1], frame.shape[0])
        frame = resize_to_max_side(frame, params.max_side)
        size = (frame.shape[1], frame.shape[0])
        if number == 0:
            check_frame_size(*size, source_size, params, source_path)
        relative = f"{IMAGES_DIR}/{number:06d}.{params.format}"
        write_rgb(Path(out_dir) / relative, frame, jpeg_quality=params.jpeg_quality)
        files.append(relative)

    timestamps = source.timestamps[selected]
    span = float(timestamps[-1] - timestamps[0])
    meta = {
        "source": str(source_path.resolve()),
        "source_type": source.kind,
        "source_fps": round(source.fps, 6),
        "fps": round((selected.size - 1) / span, 6),
        "width": int(size[0]),
        "height": int(size[1]),
        "num_frames": int(selected.size),
        "source_indices": [int(index) for index in selected],
        "timestamps": [round(float(stamp), 6) for stamp in timestamps],
        "files": files,
    }
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=1))
    logger.info("wrote %d frames of %dx%d at %.3g fps from %s", meta["num_frames"], meta["width"],
                meta["height"], meta["fps"], source_path)
    figures = {key: meta[key] for key in ("num_frames", "width", "height", "fps", "source_fps")}
    figures["duration_s"] = round(span, 6)
    if notes:
        figures["notes"] = notes
    return figures


def selection_notes(params: Params, what: str) -> list[str]:
    """A note naming the video selection parameters (fps, stride, max_frames, start, end) set
    away from their defaults, which a dataset's frames (``what``) do not use."""
    selection = {"fps": 0.0, "stride": 1, "max_frames": 0, "start": 0.0, "end": 0.0}
    changed = [f"frames.{name}" for name, default in selection.items() if getattr(params, name) != default]
    return [f"{', '.join(changed)} not applied: a dataset's frames are all its {what}"] if changed else []


def write_panoptic_frames(root: Path, params: Params, out_dir: Path) -> dict:
    """Write the frames of the Panoptic folder ``root`` (see the module docstring) to ``out_dir``;
    returns :func:`run`'s figures plus ``num_holdout``, ``num_cameras`` and ``num_timesteps``."""
    from mono4d.data.panoptic import read_panoptic_dataset

    train, test = read_panoptic_dataset(root, params.timesteps)
    kept = train.camera_ids
    if params.train_cameras:
        kept = [int(part) for part in params.train_cameras.split(",")]
        unknown = sorted(set(kept) - set(train.camera_ids))
        if unknown:
            raise InputError(f"frames.train_cameras names cameras {unknown} that {root}'s train_meta.json does not hold",
                             f"use some of its camera ids: {train.camera_ids}")
    groups = [train] + ([test] if test is not None else [])
    num_timesteps = len(train.times)
    notes = selection_notes(params, "cameras at the first frames.timesteps timesteps")
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    files, cameras, steps, sources, holdout, times = [], [], [], [], [], []
    size = (0, 0)
    ims = root / "ims"
    total = num_timesteps * (len(kept) + (len(test.camera_ids) if test is not None else 0))
    progress = tqdm(total=total, desc="frames", unit="frame")
    for t in range(num_timesteps):
        for group in groups:
            for slot, camera in enumerate(group.camera_ids):
                if group is train and camera not in kept:
                    continue
                path = group.image_paths[t][slot]
                image = read_rgb(path)
                source_size = (image.shape[1], image.shape[0])
                if source_size != (train.width, train.height):
                    raise InputError(f"image {path} is {source_size[0]}x{source_size[1]}, not the meta file's "
                                     f"{train.width}x{train.height}", "check the dataset's ims/ folder")
                image = resize_to_max_side(image, params.max_side)
                if not files:
                    size = (image.shape[1], image.shape[0])
                    check_frame_size(*size, source_size, params, root)
                if group is test:
                    holdout.append(len(files))
                files.append(f"{IMAGES_DIR}/{len(files):06d}.{params.format}")
                write_rgb(out_dir / files[-1], image, jpeg_quality=params.jpeg_quality)
                cameras.append(int(camera))
                steps.append(t)
                sources.append(path.relative_to(ims).as_posix())
                times.append(float(train.times[t]))
                progress.update()
    progress.close()
    num_frames = len(files)
    meta = {
        "source": str(root.resolve()), "source_type": "dataset", "source_fps": params.folder_fps,
        "fps": params.folder_fps, "width": int(size[0]), "height": int(size[1]), "num_frames": num_frames,
        "source_indices": list(range(num_frames)),
        "timestamps": [round(step / params.folder_fps, 6) for step in steps], "files": files, "times": times,
        "holdout_frames": holdout, "views": {"camera": cameras, "timestep": steps}, "source_files": sources,
        "dataset": {"format": "panoptic", "train_cameras": list(kept),
                    "test_cameras": list(test.camera_ids) if test is not None else [], "timesteps": num_timesteps},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    logger.info("wrote %d frames of %dx%d from the Panoptic folder %s (%d timesteps, %d training and %d held-out "
                "cameras)", num_frames, size[0], size[1], root, num_timesteps, len(kept),
                len(meta["dataset"]["test_cameras"]))
    figures = {key: meta[key] for key in ("num_frames", "width", "height", "fps", "source_fps")}
    figures.update(duration_s=meta["timestamps"][-1], num_holdout=len(holdout),
                   num_cameras=len(set(cameras)), num_timesteps=num_timesteps)
    if notes:
        figures["notes"] = notes
    return figures


def write_dataset_frames(root: Path, params: Params, out_dir: Path) -> dict:
    """Write the frames of the D-NeRF folder ``root`` (see the module docstring) to ``out_dir``;
    returns :func:`run`'s figures plus ``num_holdout``."""
    from mono4d.data.dnerf import BACKGROUND, PIPELINE_SPLITS, composite, read_dnerf, read_rgba

    splits = {split: read_dnerf(root, split) for split in PIPELINE_SPLITS}
    paths = [path for dataset in splits.values() for path in dataset.image_paths]
    times = np.concatenate([dataset.times for dataset in splits.values()])
    notes = selection_notes(params, f"{' and '.join(PIPELINE_SPLITS)} views")
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / ALPHA_DIR).mkdir(parents=True, exist_ok=True)
    files, alpha_files = [], []
    size = (0, 0)
    for number, path in enumerate(tqdm(paths, desc="frames", unit="frame")):
        rgba = read_rgba(path)
        source_size = (rgba.shape[1], rgba.shape[0])
        rgba = resize_to_max_side(rgba, params.max_side)
        if number == 0:
            size = (rgba.shape[1], rgba.shape[0])
            check_frame_size(*size, source_size, params, root)
        elif (rgba.shape[1], rgba.shape[0]) != size:
            raise InputError(f"image {path} is {source_size[0]}x{source_size[1]}, unlike the dataset's first image",
                             "every image of a D-NeRF folder must have the same size")
        files.append(f"{IMAGES_DIR}/{number:06d}.{params.format}")
        alpha_files.append(f"{ALPHA_DIR}/{number:06d}.png")
        write_rgb(out_dir / files[-1], composite(rgba, BACKGROUND), jpeg_quality=params.jpeg_quality)
        write_gray(out_dir / alpha_files[-1], rgba[..., 3])
    counts = {split: dataset.num_frames for split, dataset in splits.items()}
    num_frames = len(files)
    holdout = list(range(num_frames - counts[PIPELINE_SPLITS[-1]], num_frames))
    meta = {
        "source": str(root.resolve()), "source_type": "dataset", "source_fps": params.folder_fps,
        "fps": params.folder_fps, "width": int(size[0]), "height": int(size[1]), "num_frames": num_frames,
        "source_indices": list(range(num_frames)),
        "timestamps": [round(i / params.folder_fps, 6) for i in range(num_frames)], "files": files,
        "alpha_files": alpha_files, "times": [float(t) for t in times], "holdout_frames": holdout,
        "dataset": {"format": "dnerf", "splits": counts},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    logger.info("wrote %d frames of %dx%d from the D-NeRF folder %s (%s)", num_frames, size[0], size[1], root,
                ", ".join(f"{count} {split}" for split, count in counts.items()))
    figures = {key: meta[key] for key in ("num_frames", "width", "height", "fps", "source_fps")}
    figures.update(duration_s=meta["timestamps"][-1], num_holdout=len(holdout))
    if notes:
        figures["notes"] = notes
    return figures


_REQUIRED_META_KEYS = ("source", "source_type", "source_fps", "fps", "width", "height", "num_frames",
                       "source_indices", "timestamps", "files")


def read_frames_meta(frames_dir: str | Path) -> dict:
    """The ``frames.json`` of a frames stage output. Raises :class:`InputError` when it is
    missing, not JSON, or lacks keys."""
    path = Path(frames_dir) / META_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: {frames_dir} is not a finished frames stage output",
                         "run the frames stage first (mono4d run INPUT --work DIR) and point to its frames/ folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error})",
                         "delete the frames folder and run the frames stage again") from error
    missing = [key for key in _REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}",
                         "delete the frames folder and run the frames stage again")
    return meta


def frame_paths(frames_dir: str | Path) -> list[Path]:
    """Absolute paths of the frame images, in frame order."""
    return [Path(frames_dir) / name for name in read_frames_meta(frames_dir)["files"]]


def load_frames(frames_dir: str | Path, indices: Sequence[int] | None = None) -> np.ndarray:
    """Frames as ``(T, H, W, 3) uint8`` RGB; ``indices`` (frame numbers 0..num_frames-1) picks
    a subset in the given order, None loads all."""
    meta = read_frames_meta(frames_dir)
    paths = [Path(frames_dir) / name for name in meta["files"]]
    picked = range(len(paths)) if indices is None else [int(index) for index in indices]
    for index in picked:
        if not 0 <= index < len(paths):
            raise IndexError(f"frame {index} out of range 0..{len(paths) - 1}")
    images = [read_rgb(paths[index]) for index in tqdm(picked, desc="loading frames", unit="frame", leave=False)]
    if not images:
        return np.empty((0, meta["height"], meta["width"], 3), dtype=np.uint8)
    return np.stack(images)


def load_alpha(frames_dir: str | Path) -> np.ndarray:
    """The frames' alpha ``(T, H, W)`` uint8 (255 = opaque) that the frames stage wrote for a
    dataset of RGBA images (a D-NeRF folder); :class:`InputError` for frames without one."""
    meta = read_frames_meta(frames_dir)
    if "alpha_files" not in meta:
        raise InputError(f"the frames in {frames_dir} have no alpha channel (source {meta['source']})",
                         "the silhouette initialisation (init.mode=silhouette) needs a dataset of RGBA images, "
                         "e.g. a D-NeRF folder as the input; use init.mode=flow for videos")
    return np.stack([read_gray(Path(frames_dir) / name) for name in meta["alpha_files"]])
