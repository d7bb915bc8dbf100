"""The files stages hand to each other: one ``write_X``/``read_X`` pair per artifact.

Every stage output another stage, the report, the exporters, the viewer or a test reads is
written and read here, so its layout is stated once. Placement: ``data/`` holds the readers and
writers of formats and imports neither ``stages/`` nor ``pipeline/``, so every layer can use
this module without an import cycle. The writers put files into the folder they are given
(a stage's temporary ``out_dir``, renamed into place by :meth:`mono4d.pipeline.workspace.Workspace.commit`;
that rename is what makes a stage output appear atomically). Readers raise
:class:`~mono4d.data.errors.InputError` naming the file and the stage to rerun when a file is missing
or unreadable.

Conventions (see DESIGN.md): cameras are OpenCV (x right, y down, z forward), ``w2c`` a 4x4
world-to-camera matrix, ``K`` 3x3 pixel intrinsics; pixel (row r, column c) has its centre at
image coordinates (c + 0.5, r + 0.5); frames are indexed 0..T-1.

Layouts (file names relative to the stage folder):

- cameras: ``cameras.json`` ``{"width", "height", "model", "units", "mode", "frames": [{"index",
  "file", "K" (3x3 list), "w2c" (4x4 list or null without a pose), "registered",
  "interpolated", "camera" and "timestep" (multi-view input only)}], "colmap_cameras" (optional)}``; ``points.npz`` sparse points (see
  :func:`read_points`).
- masks: ``masks/{t:06d}.png`` uint8 label maps (0 = static), ``labels.json`` ``{"labels":
  {"0": "background", "1": name, ...}, "backend", "num_frames"}``.
- depth: ``depth/{t:06d}.npy`` float32 ``(H, W)``, ``depth.json`` ``{"kind", "invalid": "0",
  "backend", "auto_chosen", "model", "num_frames", "width", "height", "files"}``.
- aligned depth: ``depth/{t:06d}.npy`` float32 z-depth in the cameras' units, ``alignment.json``
  (the align stage's record; ``depth_kind`` names the depth stage's kind).
- flow: ``pairs.json`` ``{"pairs": [[i, j], ...], ...}``, ``pairs/{i:06d}_{j:06d}.npz``.
- tracks: ``tracks.npz``; 3D flow pairs ``pairs3d.npz`` and ``pairs3d.json``.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mono4d.data.errors import InputError
from mono4d.data.images import read_gray, write_gray

CAMERAS_FILE = "cameras.json"
POINTS_FILE = "points.npz"
MASKS_DIR = "masks"
LABELS_FILE = "labels.json"
DEPTH_DIR = "depth"
DEPTH_FILE = "depth.json"
ALIGNMENT_FILE = "alignment.json"
FLOW_PAIRS_FILE = "pairs.json"
FLOW_PAIRS_DIR = "pairs"
TRACKS_FILE = "tracks.npz"
PAIRS3D_FILE = "pairs3d.npz"
PAIRS3D_COUNTS_FILE = "pairs3d.json"
#: What a depth stage's maps hold: relative inverse depth (larger = nearer, unknown scale and
#: shift), metres, or z-depth in the SfM cameras' units.
DEPTH_KINDS = ("relative_inverse", "metric", "sfm")
#: The arrays of ``points.npz``: name -> (shape after the point/observation axis, dtype).
POINTS_ARRAYS = {"xyz": ((3,), np.float32), "rgb": ((3,), np.uint8), "error": ((), np.float32),
                 "obs_frame": ((), np.int32), "obs_point": ((), np.int32), "obs_xy": ((2,), np.float32)}
#: The arrays of ``pairs3d.npz``: name -> (shape after the pair axis, dtype).
PAIRS3D_ARRAYS = {"src_xyz": ((3,), np.float32), "dst_xyz": ((3,), np.float32), "src_frame": ((), np.int32),
                  "dst_frame": ((), np.int32), "src_xy": ((2,), np.float32), "dst_xy": ((2,), np.float32)}


# ----------------------------------------------------------------------------------------------
# Shared reading with actionable errors


def _require(path: Path, stage: str, hint: str | None = None) -> Path:
    """``path`` when it is a file; else :class:`InputError` saying which stage output is incomplete."""
    if not path.is_file():
        raise InputError(f"{path} is missing: {path.parent} is not a finished {stage} stage output",
                         hint or f"run the {stage} stage first (mono4d run INPUT --work DIR)")
    return path


def _unreadable(path: Path, stage: str, error: Exception) -> InputError:
    return InputError(f"{path} is unreadable ({type(error).__name__}: {error})",
                      f"delete {path.parent} and rerun the {stage} stage")


def _read_json(path: Path, stage: str) -> Any:
    """Parsed JSON of a stage file (missing or malformed: :class:`InputError`)."""
    _require(path, stage)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(path, stage, error) from error


def _read_npz(path: Path, stage: str, hint: str | None = None) -> dict[str, np.ndarray]:
    """Every array of a stage's ``.npz`` (missing or corrupt: :class:`InputError`)."""
    _require(path, stage, hint)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _unreadable(path, stage, error) from error


def _read_npy(path: Path, stage: str) -> np.ndarray:
    """One ``.npy`` array of a stage (missing or corrupt: :class:`InputError`)."""
    _require(path, stage)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _unreadable(path, stage, error) from error


def _fields(content: Any, path: Path, stage: str, *keys: str) -> list[Any]:
    """``content[key]`` for each key; :class:`InputError` when ``content`` lacks one."""
    if not isinstance(content, dict) or any(key not in content for key in keys):
        raise InputError(f"{path} lacks {', '.join(keys)}: it was not written by the {stage} stage of this version",
                         f"delete {path.parent} and rerun the {stage} stage")
    return [content[key] for key in keys]


# ----------------------------------------------------------------------------------------------
# Cameras


def write_cameras(out_dir: Path, K: np.ndarray, w2c: np.ndarray, registered: np.ndarray, files: Sequence[str],
                  width: int, height: int, *, interpolated: np.ndarray | None = None, model: str = "PINHOLE",
                  units: str = "sfm", mode: str = "known", colmap_cameras: list[dict] | None = None,
                  views: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Write ``cameras.json``.

    ``K (T, 3, 3)`` pixel intrinsics of ``width`` x ``height`` images, ``w2c (T, 4, 4)`` OpenCV
    world-to-camera (a frame with a non-finite entry has no pose: ``null``), ``registered (T,)``
    bool (posed by SfM or by the mode), ``interpolated (T,)`` bool (pose filled between
    registered neighbours; default none), ``files`` the T frame files (relative to the frames
    stage folder), ``model`` the COLMAP camera model, ``units`` of the world ("sfm", "metric",
    "dataset"), ``mode`` the cameras mode that produced them. ``views``: for multi-view input,
    ``(camera (T,), timestep (T,))`` int, the dataset camera id and timestep index of each frame
    (frames of one timestep show the scene at the same instant).
    """
    K, w2c = np.asarray(K, np.float64), np.asarray(w2c, np.float64)
    interpolated = np.zeros(len(K), bool) if interpolated is None else np.asarray(interpolated, bool)
    posed = np.isfinite(w2c).all(axis=(1, 2))
    frames = [{"index": index, "file": str(files[index]), "K": K[index].tolist(),
               "w2c": w2c[index].tolist() if posed[index] else None,
               "registered": bool(registered[index]), "interpolated": bool(interpolated[index])}
              for index in range(len(K))]
    if views is not None:
        for frame, camera, timestep in zip(frames, *views):
            frame.update(camera=int(camera), timestep=int(timestep))
    content = {"width": int(width), "height": int(height), "model": model, "units": units, "mode": mode,
               "frames": frames}
    if colmap_cameras:
        content["colmap_cameras"] = colmap_cameras
    (Path(out_dir) / CAMERAS_FILE).write_text(json.dumps(content, indent=1))


def read_cameras_meta(cameras_dir: str | Path) -> dict:
    """The parsed ``cameras.json`` (all fields of :func:`write_cameras`)."""
    return _read_json(Path(cameras_dir) / CAMERAS_FILE, "cameras")


def read_cameras(cameras_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``K (T, 3, 3)`` float64, ``w2c (T, 4, 4)`` float64 OpenCV world-to-camera (NaN for frames
    without a pose) and ``registered (T,)`` bool of ``cameras.json``. Interpolated frames have
    ``registered`` False and a finite ``w2c`` (see :func:`read_cameras_meta` for the flag)."""
    path = Path(cameras_dir) / CAMERAS_FILE
    content = read_cameras_meta(cameras_dir)
    (frames,) = _fields(content, path, "cameras", "frames")
    try:
        K = np.array([frame["K"] for frame in frames], dtype=np.float64).reshape(-1, 3, 3)
        w2c = np.array([np.full((4, 4), np.nan) if frame["w2c"] is None else frame["w2c"] for frame in frames],
                       dtype=np.float64).reshape(-1, 4, 4)
        registered = np.array([bool(frame["registered"]) for frame in frames], dtype=bool)
    except (KeyError, TypeError, ValueError) as error:
        raise _unreadable(path, "cameras", error) from error
    return K, w2c, registered


def read_camera_views(cameras_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(camera (T,), timestep (T,))`` int64 of a multi-view input's ``cameras.json`` (the
    dataset camera id and timestep index of every frame); None for a single moving camera."""
    path = Path(cameras_dir) / CAMERAS_FILE
    (frames,) = _fields(read_cameras_meta(cameras_dir), path, "cameras", "frames")
    if not frames or "camera" not in frames[0]:
        return None
    try:
        return (np.array([frame["camera"] for frame in frames], dtype=np.int64),
                np.array([frame["timestep"] for frame in frames], dtype=np.int64))
    except (KeyError, TypeError, ValueError) as error:
        raise _unreadable(path, "cameras", error) from error


def empty_points() -> dict[str, np.ndarray]:
    """The ``points.npz`` arrays with no points."""
    return {name: np.zeros((0, *shape), dtype) for name, (shape, dtype) in POINTS_ARRAYS.items()}


def write_points(out_dir: Path, points: Mapping[str, np.ndarray]) -> None:
    """Write ``points.npz`` (compressed): the arrays of :func:`read_points`, as given."""
    np.savez_compressed(Path(out_dir) / POINTS_FILE, **points)


def read_points(cameras_dir: str | Path) -> dict[str, np.ndarray]:
    """Sparse points: ``xyz (P, 3) float32`` world, ``rgb (P, 3) uint8``, ``error (P,) float32``
    (reprojection error, px), and observations ``obs_frame (M,) int32``, ``obs_point (M,) int32``
    (row of ``xyz``), ``obs_xy (M, 2) float32`` (pixels). Empty arrays when there are no points."""
    return _read_npz(Path(cameras_dir) / POINTS_FILE, "cameras")


# ----------------------------------------------------------------------------------------------
# Masks


def write_masks(out_dir: Path, masks: np.ndarray, names: Mapping[int, str], backend: str) -> None:
    """Write ``masks/{t:06d}.png`` for ``masks (T, H, W) uint8`` (0 = static, k > 0 = label k)
    and, last, ``labels.json`` with ``names`` (label id -> name; 0 is always "background")."""
    folder = Path(out_dir) / MASKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for t, mask in enumerate(masks):
        write_gray(folder / f"{t:06d}.png", mask)
    labels = {"0": "background"}
    labels.update({str(label): name for label, name in sorted(names.items())})
    (Path(out_dir) / LABELS_FILE).write_text(json.dumps({"labels": labels, "backend": backend,
                                                         "num_frames": int(len(masks))}, indent=1))


def read_masks(masks_dir: str | Path) -> np.ndarray:
    """The label maps as ``(T, H, W) uint8`` (0 = static, k > 0 = label k)."""
    folder = Path(masks_dir) / MASKS_DIR
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        raise InputError(f"{folder} holds no mask PNGs: {masks_dir} is not a finished masks stage output",
                         "run the masks stage first (mono4d run INPUT --work DIR)")
    try:
        return np.stack([read_gray(path).astype(np.uint8) for path in files])
    except ValueError as error:  # maps of different sizes
        raise _unreadable(folder, "masks", error) from error


def read_masks_meta(masks_dir: str | Path) -> dict:
    """The parsed ``labels.json`` (``labels``, ``backend``, ``num_frames``)."""
    return _read_json(Path(masks_dir) / LABELS_FILE, "masks")


def read_labels(masks_dir: str | Path) -> dict[int, str]:
    """Label id -> name from ``labels.json`` (0 is "background")."""
    path = Path(masks_dir) / LABELS_FILE
    (labels,) = _fields(read_masks_meta(masks_dir), path, "masks", "labels")
    return {int(key): str(name) for key, name in labels.items()}


# ----------------------------------------------------------------------------------------------
# Depth


def write_depth(out_dir: Path, depth: np.ndarray, kind: str, backend: str, model: str = "",
                auto_chosen: bool = False) -> None:
    """Write a depth stage's ``depth/{t:06d}.npy`` (float32 ``(H, W)``, <= 0 = invalid) for
    ``depth (T, H, W)`` and, last, ``depth.json``. ``kind`` is one of :data:`DEPTH_KINDS`;
    ``auto_chosen``: the backend was picked by ``depth.backend=auto``."""
    if kind not in DEPTH_KINDS:
        raise ValueError(f"unknown depth kind {kind}")
    folder = Path(out_dir) / DEPTH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, frame_depth in enumerate(depth):
        name = f"{index:06d}"
        np.save(folder / f"{name}.npy", np.asarray(frame_depth).astype(np.float32))
        files.append(f"{DEPTH_DIR}/{name}.npy")
    meta = {"kind": kind, "invalid": "0", "backend": backend, "auto_chosen": bool(auto_chosen), "model": model,
            "num_frames": int(len(depth)), "width": int(depth.shape[2]), "height": int(depth.shape[1]),
            "files": files}
    (Path(out_dir) / DEPTH_FILE).write_text(json.dumps(meta, indent=2))


def read_depth(depth_dir: str | Path) -> tuple[np.ndarray, str]:
    """A depth stage's maps ``(T, H, W)`` float32 (<= 0 = invalid) and their kind."""
    depth_dir = Path(depth_dir)
    path = depth_dir / DEPTH_FILE
    files, kind = _fields(_read_json(path, "depth"), path, "depth", "files", "kind")
    try:
        depth = np.stack([_read_npy(depth_dir / name, "depth") for name in files]).astype(np.float32)
    except ValueError as error:  # no files, or maps of different sizes
        raise _unreadable(path, "depth", error) from error
    return depth, kind


def write_aligned_depth(out_dir: Path, depth: np.ndarray, record: Mapping[str, Any]) -> None:
    """Write the align stage's ``depth/{t:06d}.npy`` (float32 z-depth ``(H, W)`` in the cameras'
    units, 0 = invalid) for ``depth (T, H, W)`` and ``alignment.json`` = ``record`` (its
    ``depth_kind`` names the kind of the depth stage's maps)."""
    folder = Path(out_dir) / DEPTH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame_depth in enumerate(depth):
        np.save(folder / f"{t:06d}.npy", np.asarray(frame_depth, np.float32))
    (Path(out_dir) / ALIGNMENT_FILE).write_text(json.dumps(dict(record), indent=2))


def read_aligned_depth(align_dir: str | Path) -> np.ndarray:
    """The align stage's ``(T, H, W)`` float32 z-depth in the cameras' units, 0 = invalid."""
    folder = Path(align_dir) / DEPTH_DIR
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise InputError(f"no aligned depth maps in {folder}",
                         "rerun the align stage (delete the folder or change an align parameter)")
    try:
        return np.stack([_read_npy(path, "align") for path in files]).astype(np.float32)
    except ValueError as error:  # maps of different sizes
        raise _unreadable(folder, "align", error) from error


def read_aligned_kind(align_dir: str | Path) -> str | None:
    """The depth stage's kind ("relative_inverse", "metric", "sfm") recorded in ``alignment.json``;
    None when the file is absent (e.g. aligned depth written by other tools)."""
    path = Path(align_dir) / ALIGNMENT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("depth_kind")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise InputError(f"{path} is not a valid alignment record ({error})",
                         "rerun the align stage (delete the folder or change an align parameter)") from None


# ----------------------------------------------------------------------------------------------
# Flow


def flow_pair_name(i: int, j: int) -> str:
    """File stem of flow pair ``(i, j)``: ``"000003_000004"``."""
    return f"{i:06d}_{j:06d}"


def write_flow_pair(out_dir: Path, i: int, j: int, forward: np.ndarray, backward: np.ndarray,
                    valid_forward: np.ndarray, valid_backward: np.ndarray) -> None:
    """Write ``pairs/{i:06d}_{j:06d}.npz``: ``forward`` (i -> j) and
    ``backward`` (j -> i) ``(H, W, 2)`` pixels (dx, dy) as float16, stored uncompressed (deflate
    saves a fifth of their size for as much CPU time as DIS itself); ``valid_forward``/
    ``valid_backward`` ``(H, W)`` bool forward-backward consistency, deflated."""
    arrays = {"forward": forward.astype(np.float16), "backward": backward.astype(np.float16),
              "valid_forward": valid_forward, "valid_backward": valid_backward}
    folder = Path(out_dir) / FLOW_PAIRS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{flow_pair_name(i, j)}.npz", "w") as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy")
            member.compress_type = zipfile.ZIP_DEFLATED if array.dtype == bool else zipfile.ZIP_STORED
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def read_flow_pair(flow_dir: str | Path, i: int, j: int) -> dict[str, np.ndarray]:
    """Flow between frames ``i`` and ``j``: ``forward`` (i->j) and ``backward`` (j->i) as
    ``(H, W, 2)`` float32 pixels, ``valid_forward``/``valid_backward`` ``(H, W)`` bool.

    Asking for ``(j, i)`` of a stored ``(i, j)`` returns it with the directions swapped.
    """
    folder = Path(flow_dir) / FLOW_PAIRS_DIR
    path = folder / f"{flow_pair_name(i, j)}.npz"
    swapped = not path.is_file()
    if swapped:
        path = folder / f"{flow_pair_name(j, i)}.npz"
        if not path.is_file():
            raise InputError(f"flow pair ({i}, {j}) is not stored in {flow_dir}",
                             "list the stored pairs with mono4d.data.artifacts.list_flow_pairs, or rerun the flow stage")
    data = _read_npz(path, "flow")
    forward, backward, valid_forward, valid_backward = _fields(data, path, "flow", "forward", "backward",
                                                               "valid_forward", "valid_backward")
    pair = {"forward": forward.astype(np.float32), "backward": backward.astype(np.float32),
            "valid_forward": valid_forward.astype(bool), "valid_backward": valid_backward.astype(bool)}
    if swapped:
        pair = {"forward": pair["backward"], "backward": pair["forward"],
                "valid_forward": pair["valid_backward"], "valid_backward": pair["valid_forward"]}
    return pair


def write_flow_meta(out_dir: Path, meta: Mapping[str, Any]) -> None:
    """Write ``pairs.json``: ``meta`` holds ``pairs`` (``[[i, j], ...]``, ``i < j``) and the flow
    stage's description (``backend``, ``num_frames``, ``width``, ``height``, thresholds, ...)."""
    (Path(out_dir) / FLOW_PAIRS_FILE).write_text(json.dumps(dict(meta)))


def read_flow_meta(flow_dir: str | Path) -> dict:
    """The parsed ``pairs.json`` of a flow stage output."""
    return _read_json(Path(flow_dir) / FLOW_PAIRS_FILE, "flow")


def list_flow_pairs(flow_dir: str | Path) -> list[tuple[int, int]]:
    """The stored pairs ``(i, j)`` (``i < j``), in the order of ``pairs.json``."""
    path = Path(flow_dir) / FLOW_PAIRS_FILE
    (pairs,) = _fields(read_flow_meta(flow_dir), path, "flow", "pairs")
    return [(int(i), int(j)) for i, j in pairs]


# ----------------------------------------------------------------------------------------------
# Tracks and 3D flow pairs


def write_tracks(out_dir: Path, xy: np.ndarray, visible: np.ndarray, query_frame: np.ndarray) -> None:
    """Write ``tracks.npz`` (compressed): ``xy (N, T, 2)`` float32 image coordinates (NaN where a
    track has no estimate), ``visible (N, T)`` bool, ``query_frame (N,)`` int32 (the frame each
    track was seeded on)."""
    np.savez_compressed(Path(out_dir) / TRACKS_FILE, xy=xy, visible=visible, query_frame=query_frame)


def read_tracks(tracks_dir: str | Path) -> dict[str, np.ndarray]:
    """``xy (N, T, 2)`` float32, ``visible (N, T)`` bool, ``query_frame (N,)`` int32 of ``tracks.npz``."""
    path = Path(tracks_dir) / TRACKS_FILE
    xy, visible, query_frame = _fields(_read_npz(path, "tracks"), path, "tracks", "xy", "visible", "query_frame")
    return {"xy": xy, "visible": visible.astype(bool), "query_frame": query_frame}


def write_pairs3d(out_dir: Path, arrays: Mapping[str, np.ndarray], counts: Mapping[str, Sequence[int]]) -> None:
    """Write ``pairs3d.npz`` (compressed; the arrays of :data:`PAIRS3D_ARRAYS`, M rows each) and
    ``pairs3d.json`` ``{"counts": {flow pair name: [forward, backward]}, "total": M}``."""
    np.savez_compressed(Path(out_dir) / PAIRS3D_FILE, **arrays)
    total = int(len(arrays["src_xyz"]))
    (Path(out_dir) / PAIRS3D_COUNTS_FILE).write_text(json.dumps({"counts": dict(counts), "total": total}))


def read_pairs3d(tracks_dir: str | Path) -> dict[str, np.ndarray]:
    """The 3D flow pairs: ``src_xyz``, ``dst_xyz`` ``(M, 3)`` float32 world points, ``src_frame``,
    ``dst_frame`` ``(M,)`` int32, ``src_xy``, ``dst_xy`` ``(M, 2)`` float32 pixels.
    :class:`InputError` when the tracks stage ran without aligned depth and cameras."""
    return _read_npz(Path(tracks_dir) / PAIRS3D_FILE, "tracks",
                     "run the pipeline with the align and cameras stages before tracks")


def read_pairs3d_counts(tracks_dir: str | Path) -> dict:
    """The parsed ``pairs3d.json`` (``counts`` per flow pair name and direction, ``total``)."""
    return _read_json(Path(tracks_dir) / PAIRS3D_COUNTS_FILE, "tracks")
