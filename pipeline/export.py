"""``mono4d export``: the results of a workspace in formats other tools read.

Formats (each written to ``OUT/<format>/``, default ``OUT = DIR/export``):

- ``ply``: ``ply/{i:06d}.ply``, the trained Gaussians deformed to frame i's time, as standard
  3DGS PLY files (:mod:`mono4d.data.ply`) that common splat viewers open. Needs the train stage.
- ``colmap``: the cameras stage's trajectory and sparse points as a COLMAP model, binary in
  ``colmap/sparse/0/`` and text in ``colmap/text/``, with ``colmap/images`` a relative symlink to
  the frames (the layout COLMAP-based trainers expect). Frames without a pose are left out.
- ``nerfstudio``: ``nerfstudio/transforms.json`` (OpenGL camera-to-world, converted by
  :func:`mono4d.data.nerfstudio.write_nerfstudio_transforms`) with image paths relative to it and the
  normalised time ``i / (T - 1)`` of every frame.
- ``tracks``: copies of ``tracks.npz`` / ``pairs3d.npz`` and CSV tables ``tracks.csv``
  (``track_id,frame,x,y,visible``, pixels, rows where the track has an estimate) and
  ``pairs3d.csv`` (frames, pixel and world end points of each 3D flow pair), when the tracks
  stage ran; and the trained Gaussians' 6-DOF tracks, when the train stage wrote them: a copy of
  its ``trajectories.npz`` as ``gaussian_trajectories.npz`` and ``gaussian_trajectories.csv``
  (``track_id,time,x,y,z,qw,qx,qy,qz``: world position and unit wxyz rotation at each normalised
  time; a multi-view workspace trained online, which has no tracks stage, exports only these).
- ``depth``: ``depth/{i:06d}.png`` 16-bit depth (aligned z-depth in the cameras' units; the
  depth stage's maps when there is no align stage) and ``depth/scale.json``: ``depth = value *
  scale``, one scale for all frames chosen from the largest depth, value 0 = invalid.
- ``video``: ``video/orbit.mp4`` (the camera swings around the scene centre, at a few times) and
  ``video/time_sweep.mp4`` (a fixed input camera, time 0 -> 1), rendered from the trained model.

``frames`` (``"all"``, ``"0,5,10"``, ``"0:20:2"``, or a comma-separated mix) selects the frames of
the per-frame formats (``ply``, ``depth``). ``layer`` (``static``, ``hand``, ``object_1``, a label
name or id; :mod:`mono4d.models.layers`) restricts the formats rendered from the trained model (``ply``,
``video``) to that layer's Gaussians; they are then written to ``OUT/<format>_<layer>/`` so the
full scene's export stays. Every format is built in a temporary folder next to
its destination and renamed into place, so a failed export never leaves a partial folder behind.

Cameras follow OpenCV (x right, y down, z forward); ``w2c`` is 4x4 world-to-camera and ``K`` 3x3
pixel intrinsics; time is normalised, ``t = i / (T - 1)``. Heavy libraries (torch, pycolmap)
are imported inside the functions.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.artifacts import (CAMERAS_FILE, DEPTH_FILE, PAIRS3D_FILE, POINTS_FILE, TRACKS_FILE, read_aligned_depth,
                                   read_cameras, read_cameras_meta, read_depth, read_pairs3d, read_points, read_tracks)
from mono4d.data.errors import InputError, ParameterError

logger = logging.getLogger(__name__)

FORMATS = ("ply", "colmap", "nerfstudio", "tracks", "depth", "video")
#: The train stage's Gaussian tracks (:mod:`mono4d.stages.train_outputs`).
TRAJECTORIES_FILE = "trajectories.npz"
#: Formats rendered from the trained model, which ``layer`` restricts to one scene layer.
LAYER_FORMATS = ("ply", "video")
#: Video exports: longest image side (pixels), frames per orbit, the orbit's swing (degrees
#: either side of the middle input camera: a casual video sees one side of the scene, so a full
#: turn would mostly show unobserved surfaces), the times of the orbits, and the frame rate.
VIDEO_MAX_SIDE = 480
ORBIT_FRAMES = 36
ORBIT_DEGREES = 25.0
ORBIT_TIMES = (0.0, 0.5, 1.0)
VIDEO_FPS = 12.0
#: Largest value of a 16-bit depth PNG.
DEPTH_PNG_MAX = 65535


# ----------------------------------------------------------------------------------------------
# Workspace inputs


def stage_output(work: Path, stage: str, required: str) -> Path:
    """The completed output folder ``work/stage`` that holds ``required`` (a file or folder
    name); :class:`InputError` naming the stage to run when it is missing."""
    folder = Path(work) / stage
    if not (folder / required).exists():
        raise InputError(f"{folder / required} is missing: the {stage} stage has not run in {work}",
                         f"run `mono4d run --work {work} --until {stage}` first")
    return folder


def depth_source(work: Path) -> tuple[Path, str]:
    """The folder of the depth to export and which stage wrote it: ``align`` when it ran, else
    ``depth``; :class:`InputError` when neither has."""
    if (Path(work) / "align" / "depth").is_dir():
        return Path(work) / "align", "align"
    try:
        return stage_output(work, "depth", DEPTH_FILE), "depth"
    except InputError:
        raise InputError(f"neither the align nor the depth stage has run in {work}",
                         f"run `mono4d run --work {work} --until align` first") from None


def check_prerequisites(work: Path, formats: list[str]) -> None:
    """Raise :class:`InputError` (naming the stage to run) for the first format whose inputs
    are missing, before anything is written."""
    needs = {"ply": [("train", "model.pt")], "video": [("train", "model.pt"), ("cameras", CAMERAS_FILE)],
             "colmap": [("frames", "frames.json"), ("cameras", CAMERAS_FILE), ("cameras", POINTS_FILE)],
             "nerfstudio": [("frames", "frames.json"), ("cameras", CAMERAS_FILE)],
             "tracks": [] if (Path(work) / "train" / TRAJECTORIES_FILE).is_file() else [("tracks", TRACKS_FILE)],
             "depth": []}
    for name in formats:
        for stage, required in needs[name]:
            stage_output(work, stage, required)
        if name == "depth":
            depth_source(work)


def check_frame_selection(work: Path, formats: list[str], frames: str) -> None:
    """Validate ``frames`` against the workspace's frame count (frames stage) before anything is
    written, when a per-frame format is requested."""
    if {"ply", "depth"} & set(formats) and (Path(work) / "frames" / "frames.json").is_file():
        from mono4d.stages.frames import read_frames_meta

        parse_frame_selection(frames, int(read_frames_meta(Path(work) / "frames")["num_frames"]))


def parse_frame_selection(spec: str, num_frames: int) -> list[int]:
    """Sorted frame indices of ``spec``: ``"all"``, indices ``"0,5,10"``, ranges
    ``"start:stop:step"`` (Python slices: ``stop`` excluded, each part optional), or a
    comma-separated mix. :class:`ParameterError` for malformed specs or indices outside
    ``0..num_frames-1``."""
    hint = 'use "all", indices like "0,5,10" or a range "start:stop:step" (stop excluded), e.g. "0:20:2"'
    text = spec.strip().lower()
    if text in ("", "all"):
        return list(range(num_frames))
    chosen: set[int] = set()
    for part in text.split(","):
        pieces = [piece.strip() for piece in part.split(":")]
        try:
            values = [int(piece) if piece else None for piece in pieces]
        except ValueError:
            raise ParameterError(f"frame selection {spec!r}: {part.strip()!r} is not a frame index or range",
                                 hint) from None
        if len(values) > 3 or any(value is not None and value < 0 for value in values):
            raise ParameterError(f"frame selection {spec!r}: {part.strip()!r} is not a frame index or range", hint)
        if len(values) == 1:
            if values[0] is None or values[0] >= num_frames:
                raise ParameterError(f"frame selection {spec!r}: frame {part.strip()!r} is not in 0..{num_frames - 1}",
                                     hint)
            chosen.add(values[0])
            continue
        start, stop, step = (values + [None])[:3]
        if step == 0:
            raise ParameterError(f"frame selection {spec!r}: the step of {part.strip()!r} is 0", hint)
        picked = range(num_frames)[slice(start, stop, step)]
        if len(picked) == 0:
            raise ParameterError(f"frame selection {spec!r}: {part.strip()!r} selects no frame of 0..{num_frames - 1}",
                                 hint)
        chosen.update(picked)
    return sorted(chosen)


def image_name(file: str) -> str:
    """Name of a frame file relative to the frames' ``images/`` folder (``images/000000.png`` ->
    ``000000.png``), as COLMAP models refer to images."""
    path = PurePosixPath(file)
    return str(path.relative_to("images")) if path.parts[:1] == ("images",) else path.name


def posed_cameras(work: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """The cameras stage folder, ``K (T, 3, 3)``, ``w2c (T, 4, 4)`` and the indices of the frames
    with a finite pose; :class:`InputError` when no frame has one."""
    cameras_dir = stage_output(work, "cameras", CAMERAS_FILE)
    K, w2c, _ = read_cameras(cameras_dir)
    posed = np.flatnonzero(np.isfinite(w2c).all(axis=(1, 2)))
    if len(posed) == 0:
        raise InputError(f"the cameras stage in {cameras_dir} posed no frame: there is nothing to export",
                         f"rerun the cameras stage (see {cameras_dir / 'vis'})")
    return cameras_dir, K, w2c, posed


# ----------------------------------------------------------------------------------------------
# Rendering the trained model (shared with the viewer)


def model_device(backend: str) -> str:
    """Device to load the model on for a rasterizer backend: CPU for ``torch`` and ``numba``, else
    CUDA when available."""
    from mono4d.stages.init import resolve_device

    return "cpu" if backend in ("torch", "numba") else resolve_device("auto")


def model_background(model) -> tuple[float, float, float]:
    """RGB background in [0, 1] the model was evaluated on: white when trained with a white
    background, else black."""
    background = model.meta.get("train_params", {}).get("background", "black")
    return (1.0, 1.0, 1.0) if background == "white" else (0.0, 0.0, 0.0)


def render_rgb(model, time: float, K: np.ndarray, w2c: np.ndarray, width: int, height: int,
               backend: str = "auto") -> np.ndarray:
    """``(height, width, 3)`` uint8 RGB of the model (:class:`mono4d.models.gaussians.SceneModel`) at
    normalised ``time`` through the camera ``K (3, 3)``, ``w2c (4, 4)`` (OpenCV, pixels), over
    :func:`model_background`."""
    import torch

    from mono4d.models.gaussians import render

    device = model.params["means"].device
    with torch.no_grad():
        out = render(model.params, model.variables, model.field, float(time),
                     torch.as_tensor(np.asarray(K), dtype=torch.float32, device=device),
                     torch.as_tensor(np.asarray(w2c), dtype=torch.float32, device=device), int(width), int(height),
                     model.sh_degree, torch.tensor(model_background(model), device=device), backend,
                     near_plane=model.near_plane)
    return (out["rgb"].clamp(0.0, 1.0) * 255.0 + 0.5).byte().cpu().numpy()


def scene_up(w2c: np.ndarray) -> np.ndarray:
    """``(3,)`` unit world vector pointing up for the cameras ``w2c (P, 4, 4)`` (posed only):
    the mean of their -y axes (OpenCV cameras have y down)."""
    down = w2c[:, 1, :3].mean(axis=0)  # row 1 of R is the camera's y axis in world coordinates
    return -down / max(float(np.linalg.norm(down)), 1e-12)


def look_at_centre(model, K: np.ndarray, w2c: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(3,)`` world point the camera ``K``, ``w2c`` looks at: on its optical axis at the median
    depth of the (canonical) Gaussian centres it sees, or at the model's ``scene_scale`` when it
    sees none."""
    from mono4d.data.geometry import camera_centers, project_points

    means = model.params["means"].detach().cpu().numpy()
    uv, depth = project_points(K, w2c, means)
    with np.errstate(invalid="ignore"):
        seen = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    distance = float(np.median(depth[seen])) if seen.any() else float(model.meta.get("scene_scale", 1.0))
    return camera_centers(w2c) + w2c[2, :3] * distance


def orbit_pose(w2c: np.ndarray, centre: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """``(4, 4)`` world-to-camera of the camera ``w2c`` turned by ``degrees`` about the line
    through ``centre (3,)`` along the unit ``axis (3,)`` (the camera keeps looking the same way
    relative to the centre)."""
    rotation, _ = cv2.Rodrigues(np.asarray(axis, np.float64).reshape(3, 1) * np.radians(degrees))
    turn = np.eye(4)
    turn[:3, :3] = rotation
    turn[:3, 3] = centre - rotation @ centre
    return w2c @ np.linalg.inv(turn)


def video_size(width: int, height: int, max_side: int = VIDEO_MAX_SIDE) -> tuple[int, int]:
    """Even video size at most ``max_side`` on the longer side, keeping the aspect ratio."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def label(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` drawn in its top-left corner (white on a dark outline)."""
    image = image.copy()
    scale = max(0.3, image.shape[0] / 400)
    origin = (4, int(14 * scale + 4))
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


# ----------------------------------------------------------------------------------------------
# Exporters: each writes into an empty folder and returns the files it wrote


def load_model_layer(work: Path, device: str, layer: str | None):
    """The workspace's trained model on ``device``, restricted to ``layer`` unless it is None
    (:class:`ParameterError` naming the layers when it matches none)."""
    from mono4d.models.layers import layer_model
    from mono4d.stages.train import load_trained

    model = load_trained(stage_output(work, "train", "model.pt"), device)
    return model if layer is None else layer_model(model, layer)


def export_ply(work: Path, out: Path, frames: str, layer: str | None = None) -> list[Path]:
    """``{i:06d}.ply`` of the trained Gaussians (of ``layer`` only, unless None) at each
    selected frame's time (see the module docstring)."""
    import torch

    from mono4d.data.ply import write_ply
    from mono4d.models.gaussians import gaussians_at

    model = load_model_layer(work, "cpu", layer)
    times = np.asarray(model.meta["times"], np.float64)
    written = []
    with torch.no_grad():
        sh0 = model.params["sh0"].cpu().numpy()
        sh_rest = model.params["shN"].cpu().numpy()
        opacity_logits = model.params["opacities"].cpu().numpy()
        for frame in tqdm(parse_frame_selection(frames, len(times)), desc="PLY export", unit="frame", leave=False):
            state = gaussians_at(model.params, model.variables, model.field, float(times[frame]))
            path = out / f"{frame:06d}.ply"
            write_ply(path, state["means"].cpu().numpy(), state["quats"].cpu().numpy(),
                      torch.log(state["scales"]).cpu().numpy(), opacity_logits, sh0, sh_rest)
            written.append(path)
    return written


def export_colmap(work: Path, out: Path, final: Path) -> list[Path]:
    """COLMAP model of the posed frames and sparse points (see the module docstring); ``final``
    is where ``out`` will be renamed to (the images symlink is relative to it)."""
    from mono4d.data.colmap import write_colmap_model
    cameras_dir, K, w2c, posed = posed_cameras(work)
    frames_dir = stage_output(work, "frames", "frames.json")
    content = read_cameras_meta(cameras_dir)
    if len(posed) < len(w2c):
        logger.warning("COLMAP export: %d frames without a pose are left out", len(w2c) - len(posed))
    points = read_points(cameras_dir)
    position = np.full(len(w2c), -1, np.int64)
    position[posed] = np.arange(len(posed))
    kept = position[points["obs_frame"]] >= 0 if len(points["obs_frame"]) else np.zeros(0, bool)
    points = {**points, "obs_frame": position[points["obs_frame"][kept]].astype(np.int32),
              "obs_point": points["obs_point"][kept], "obs_xy": points["obs_xy"][kept]}
    names = [image_name(content["frames"][i]["file"]) for i in posed]
    binary_dir, text_dir = out / "sparse" / "0", out / "text"
    reconstruction = write_colmap_model(binary_dir, K[posed], w2c[posed], content["width"], content["height"], names,
                                        points)
    text_dir.mkdir(parents=True)
    reconstruction.write_text(str(text_dir))
    try:
        os.symlink(os.path.relpath(frames_dir / "images", final), out / "images", target_is_directory=True)
    except OSError as error:
        logger.warning("COLMAP export: could not link the frames as %s (%s)", out / "images", error)
    return sorted(path for folder in (binary_dir, text_dir) for path in folder.iterdir())


def export_nerfstudio(work: Path, out: Path, final: Path) -> list[Path]:
    """``transforms.json`` of the posed frames with image paths relative to ``final`` (where
    ``out`` will be renamed to) and normalised times."""
    from mono4d.data.nerfstudio import write_nerfstudio_transforms
    from mono4d.stages.frames import frame_paths

    cameras_dir, K, w2c, posed = posed_cameras(work)
    content = read_cameras_meta(cameras_dir)
    images = frame_paths(stage_output(work, "frames", "frames.json"))
    files = [Path(os.path.relpath(images[i], final)).as_posix() for i in posed]
    times = posed / max(len(w2c) - 1, 1)
    path = out / "transforms.json"
    write_nerfstudio_transforms(path, K[posed], w2c[posed], content["width"], content["height"], files, times)
    return [path]


def export_tracks(work: Path, out: Path) -> list[Path]:
    """Copies of ``tracks.npz`` (and ``pairs3d.npz`` when it exists) with CSV tables, and of the
    train stage's Gaussian trajectories (see the module docstring)."""
    written = []
    trajectories = Path(work) / "train" / TRAJECTORIES_FILE
    if trajectories.is_file():
        shutil.copyfile(trajectories, out / "gaussian_trajectories.npz")
        with np.load(trajectories) as data:
            xyz, quats, times = data["xyz"], data["quats"], data["times"]
        track_ids, steps = np.meshgrid(np.arange(len(xyz)), np.arange(len(times)), indexing="ij")
        table = np.column_stack([track_ids.ravel(), times[steps.ravel()], xyz.reshape(-1, 3), quats.reshape(-1, 4)])
        np.savetxt(out / "gaussian_trajectories.csv", table, fmt=["%d", "%.6f"] + ["%.6g"] * 7, delimiter=",",
                   header="track_id,time,x,y,z,qw,qx,qy,qz", comments="")
        written += [out / "gaussian_trajectories.npz", out / "gaussian_trajectories.csv"]
        if not (Path(work) / "tracks" / TRACKS_FILE).is_file():
            return written
    tracks_dir = stage_output(work, "tracks", TRACKS_FILE)
    tracks = read_tracks(tracks_dir)
    shutil.copyfile(tracks_dir / TRACKS_FILE, out / TRACKS_FILE)
    xy = tracks["xy"]
    track_ids, frames = np.nonzero(np.isfinite(xy).all(axis=2))
    table = np.column_stack([track_ids, frames, xy[track_ids, frames], tracks["visible"][track_ids, frames]])
    np.savetxt(out / "tracks.csv", table, fmt=["%d", "%d", "%.4f", "%.4f", "%d"], delimiter=",",
               header="track_id,frame,x,y,visible", comments="")
    written += [out / TRACKS_FILE, out / "tracks.csv"]
    if not (tracks_dir / PAIRS3D_FILE).is_file():
        logger.info("tracks export: %s has no 3D flow pairs (no align/cameras stage); pairs3d.csv skipped", tracks_dir)
        return written
    pairs = read_pairs3d(tracks_dir)
    shutil.copyfile(tracks_dir / PAIRS3D_FILE, out / PAIRS3D_FILE)
    table = np.column_stack([pairs["src_frame"], pairs["dst_frame"], pairs["src_xy"], pairs["dst_xy"],
                             pairs["src_xyz"], pairs["dst_xyz"]])
    np.savetxt(out / "pairs3d.csv", table, fmt=["%d", "%d"] + ["%.4f"] * 4 + ["%.6g"] * 6, delimiter=",",
               header="src_frame,dst_frame,src_x,src_y,dst_x,dst_y,src_world_x,src_world_y,src_world_z,"
                      "dst_world_x,dst_world_y,dst_world_z", comments="")
    return written + [out / PAIRS3D_FILE, out / "pairs3d.csv"]


def depth_to_png_values(depth: np.ndarray, scale: float) -> np.ndarray:
    """uint16 values ``round(depth / scale)`` of depth maps (any shape); invalid depth (<= 0 or
    not finite) -> 0, valid depth at least 1 (so it stays valid)."""
    valid = np.isfinite(depth) & (depth > 0)
    values = np.clip(np.rint(np.where(valid, depth, 0.0) / scale), 1, DEPTH_PNG_MAX)
    return np.where(valid, values, 0).astype(np.uint16)


def export_depth(work: Path, out: Path, frames: str) -> list[Path]:
    """``{i:06d}.png`` 16-bit depth of the selected frames and ``scale.json`` (see the module
    docstring)."""
    from mono4d.data.images import write_gray

    folder, source = depth_source(work)
    if source == "align":
        depth, kind = read_aligned_depth(folder), "z_depth"
        has_cameras = (work / "cameras" / CAMERAS_FILE).is_file()
        units = read_cameras_meta(work / "cameras").get("units", "sfm") if has_cameras else "sfm"
    else:
        depth, kind = read_depth(folder)
        units = "relative" if kind.startswith("relative") else kind
    selected = parse_frame_selection(frames, len(depth))
    chosen = depth[selected]
    valid = np.isfinite(chosen) & (chosen > 0)
    largest = float(chosen[valid].max()) if valid.any() else 1.0
    scale = largest / DEPTH_PNG_MAX
    written = []
    for frame, values in zip(selected, depth_to_png_values(chosen, scale)):
        path = out / f"{frame:06d}.png"
        write_gray(path, values)
        written.append(path)
    meta = {"scale": scale, "formula": "depth = value * scale", "invalid": 0, "source": source, "kind": kind,
            "units": units, "frames": selected, "files": [path.name for path in written]}
    (out / "scale.json").write_text(json.dumps(meta, indent=1))
    return written + [out / "scale.json"]


def export_video(work: Path, out: Path, backend: str, layer: str | None = None) -> list[Path]:
    """``orbit.mp4`` and ``time_sweep.mp4`` rendered from the trained model (of ``layer`` only,
    unless None; see the module docstring)."""
    from mono4d.data.geometry import scale_intrinsics
    from mono4d.data.video import write_video

    model = load_model_layer(work, model_device(backend), layer)
    _, K, w2c, posed = posed_cameras(work)
    width, height = int(model.meta["width"]), int(model.meta["height"])
    video_width, video_height = video_size(width, height)
    middle = int(posed[len(posed) // 2])
    K_video = scale_intrinsics(K[middle], video_width / width, video_height / height)
    centre = look_at_centre(model, K[middle], w2c[middle], width, height)
    up = scene_up(w2c[posed])
    orbit = []
    for time in ORBIT_TIMES:
        for k in tqdm(range(ORBIT_FRAMES), desc=f"orbit video t={time:.2f}", unit="frame", leave=False):
            pose = orbit_pose(w2c[middle], centre, up, ORBIT_DEGREES * np.sin(2.0 * np.pi * k / ORBIT_FRAMES))
            orbit.append(label(render_rgb(model, time, K_video, pose, video_width, video_height, backend),
                               f"t = {time:.2f}"))
    sweep = []
    for time in tqdm(np.linspace(0.0, 1.0, max(len(w2c), 24)), desc="time sweep video", unit="frame", leave=False):
        sweep.append(label(render_rgb(model, time, K_video, w2c[middle], video_width, video_height, backend),
                           f"t = {time:.2f}"))
    write_video(out / "orbit.mp4", orbit, VIDEO_FPS)
    write_video(out / "time_sweep.mp4", sweep, VIDEO_FPS)
    return [out / "orbit.mp4", out / "time_sweep.mp4"]


# ----------------------------------------------------------------------------------------------
# Entry point


def write_atomically(final: Path, build: Callable[[Path], list[Path]]) -> list[Path]:
    """Run ``build(temp_dir)`` in an empty folder next to ``final``, then swap it in as
    ``final`` (replacing an earlier export). Returns the built files at their final paths."""
    temporary = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    temporary.mkdir(parents=True)
    try:
        files = build(temporary)
        previous = None
        if final.exists() or final.is_symlink():
            previous = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(final, previous)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return [final / path.relative_to(temporary) for path in files]


def export_workspace(work: Path, formats: list[str] | str, out_dir: Path | None = None, frames: str = "all",
                     backend: str = "auto", layer: str | None = None) -> dict[str, list[Path]]:
    """Export the results of the workspace ``work`` in ``formats`` (names of :data:`FORMATS`, as a
    list or a comma-separated string) to ``out_dir/<format>/`` (default ``work/export``); ``frames`` selects the frames of the
    ``ply`` and ``depth`` exports (see :func:`parse_frame_selection`); ``backend`` is the
    rasterizer of the ``video`` export ("auto", "numba", "torch", "gsplat"); ``layer`` restricts
    the ``ply`` and ``video`` exports to one scene layer, written to ``<format>_<layer>/``.

    Returns, per format, the files written. Raises :class:`ParameterError` for unknown formats or
    bad frame selections and :class:`InputError` naming the stage to run when a format's inputs
    are missing (checked for every format before anything is written).
    """
    work = Path(work)
    if isinstance(formats, str):
        formats = [name.strip() for name in formats.split(",") if name.strip()]
    if not work.is_dir():
        raise InputError(f"workspace {work} does not exist", "run `mono4d run INPUT --work DIR` first")
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ParameterError(f"unknown export format(s) {', '.join(unknown) or '(none given)'}",
                             f"use a comma-separated list of {', '.join(FORMATS)}")
    if backend not in ("auto", "numba", "torch", "gsplat"):
        raise ParameterError(f"unknown rasterizer backend {backend!r}", "use auto, numba, torch or gsplat")
    formats = list(dict.fromkeys(formats))
    check_prerequisites(work, formats)
    check_frame_selection(work, formats, frames)
    folders = {name: name for name in formats}
    if layer is not None:
        layer_formats = [name for name in formats if name in LAYER_FORMATS]
        if not layer_formats:
            raise ParameterError(f"--layer selects the Gaussians of the {' and '.join(LAYER_FORMATS)} exports, "
                                 f"not of {', '.join(formats)}", "add ply or video to --format, or leave --layer out")
        from mono4d.models.layers import resolve_layer
        from mono4d.stages.train import load_trained

        layer_label, _ = resolve_layer(load_trained(stage_output(work, "train", "model.pt"), "cpu"), layer)
        folders.update({name: f"{name}_{layer_label}" for name in layer_formats})
    out_dir = Path(out_dir) if out_dir is not None else work / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[Path, Path], list[Path]]] = {
        "ply": lambda temporary, final: export_ply(work, temporary, frames, layer),
        "colmap": lambda temporary, final: export_colmap(work, temporary, final),
        "nerfstudio": lambda temporary, final: export_nerfstudio(work, temporary, final),
        "tracks": lambda temporary, final: export_tracks(work, temporary),
        "depth": lambda temporary, final: export_depth(work, temporary, frames),
        "video": lambda temporary, final: export_video(work, temporary, backend, layer),
    }
    written: dict[str, list[Path]] = {}
    for name in formats:
        final = out_dir / folders[name]
        written[name] = write_atomically(final, lambda temporary: builders[name](temporary, final))
        logger.info("export %s: %d files in %s", name, len(written[name]), final)
    return written
