"""A small dynamic scene rendered from a handheld-like camera, with exact ground truth.

Every later stage (cameras, depth, flow, masks, tracks, reconstruction) is measured against
this scene. It is analytic: a closed textured room with static boxes, a rigid cube that flies
and tumbles, and a blob (ellipsoid) that squashes, stretches and turns. Each frame is rendered
by ray casting in NumPy (anti-aliased by supersampling), so depth, masks, camera poses, optical
flow and point tracks are known exactly, and :class:`SyntheticScene` can recompute flow and
point motion between any two frames and render any frame without its moving objects (the static
background behind them, :meth:`SyntheticScene.static_background`).

The ``walker`` preset renders another layout, the hard case for motion masks: the room's back
wall is plain (one flat colour, no texture, as a white wall at home), and a figure built of
ellipsoids walks diagonally across the room in front of it (nearly along the camera's own
motion), its limbs swinging and bending relative to the torso (label 1, ``walker``); two static
boxes stay. Same camera path, conventions and files.

Conventions
-----------
- Units: metres. World frame: x right, y down, z forward into the room (the floor is at
  ``y = +1.3``, the ceiling at ``y = -1.5``).
- Cameras: OpenCV pinhole (x right, y down, z forward); ``w2c`` 4x4 world-to-camera with
  ``x_cam = R @ x_world + t``; ``K`` 3x3 with ``fx = fy = 0.9 * width``, ``cx = width / 2``,
  ``cy = height / 2``.
- Pixel coordinates: continuous ``(x, y)`` = (column, row) with pixel centres at half-integers
  (pixel ``[r, c]`` is centred at ``(c + 0.5, r + 0.5)``; the image spans ``[0, W] x [0, H]``),
  as in :mod:`mono4d.data.geometry` and COLMAP. Flows are differences, so they do not depend on this.
- Time: frame ``i`` is at ``t = i / (T - 1)``. The clip always spans the same motion; more
  frames sample it more densely. ``fps`` is only the playback rate of ``video.mp4``.
- Ground truth is taken at pixel centres (the images average ``supersample**2`` rays per pixel).
- ``depth``: z-depth (camera-frame z, not ray length) of the surface at each pixel centre, > 0.
- ``masks``: 0 = static (room and boxes), 1 = cube (rigid), 2 = blob (deforming); walker: 0
  static, 1 walker.
- Flow ``i -> j``: ``flow[r, c] = (x_j - (c + 0.5), y_j - (r + 0.5))`` where ``(x_j, y_j)`` is
  where the surface point seen at pixel ``[r, c]`` of frame ``i`` projects in frame ``j``
  after moving with its object to time ``j``. ``occluded[r, c]`` is True when that point is not
  visible in frame ``j``: another surface is in front of it (including its own object's near
  side when it turned away), it is behind the camera, or it projects outside ``[0, W] x [0, H]``.
  Flow is exact even where occluded (0 only behind the camera).
- Tracks: ``N`` query points (grids on the first, middle and last frames plus points on each
  dynamic object), at pixel centres of their query frame. ``xyz (N, T, 3)`` world positions,
  ``xy (N, T, 2)`` their projections (half-integer-centre pixels), ``visible (N, T)`` with the
  same visibility test as the flow.

Files under ``root``: ``video.mp4`` (H.264, data/video.py ``write_video``), ``images/000000.png ...`` (lossless RGB),
``gt/cameras.json``, ``gt/depth.npy (T, H, W) float32``, ``gt/masks.npy (T, H, W) uint8``,
``gt/flow.npz`` (``flow (T-1, H, W, 2) float32``, ``occluded (T-1, H, W) bool``),
``gt/tracks.npz`` (``xy``, ``visible``, ``xyz``, ``query_frame (N,) int32``) and ``scene.json``
(preset, seed, overrides, conventions, extent, labels), written last.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from tqdm import tqdm

from mono4d.data.errors import InputError, ParameterError
from mono4d.data.geometry import intrinsics_matrix, project_points
from mono4d.data.images import read_rgb, write_rgb
from mono4d.data.video import write_video

logger = logging.getLogger(__name__)

FORMAT_NAME = "mono4d-synthetic"
FORMAT_VERSION = 1
LABELS = {0: "background", 1: "cube", 2: "blob"}
CONVENTIONS = {
    "units": "metres",
    "camera": "OpenCV: x right, y down, z forward; w2c is 4x4 world-to-camera; K is 3x3 pixel intrinsics",
    "pixels": "continuous (x, y) = (column, row), pixel centres at half-integers (image spans [0, W] x [0, H])",
    "time": "frame i is at t = i / (T - 1)",
    "depth": "z-depth in the camera frame at pixel centres, metres, > 0 everywhere",
    "masks": "0 static, 1 cube (rigid), 2 blob (deforming)",
    "flow": "flow[i] maps pixel centres of frame i to frame i+1 (pixels); occluded = not visible in frame i+1",
    "tracks": "xy (N,T,2) projections, visible (N,T) by depth test, xyz (N,T,3) world, query_frame (N,)",
}

FOCAL_PER_WIDTH = 0.9
MIN_RAY_DEPTH = 1e-6  # ray parameter (z-depth) below which an intersection is ignored
VISIBILITY_TOLERANCE = 1e-4  # relative depth slack of the occlusion test
RAYS_PER_CHUNK = 1 << 15  # bounds memory when rendering large supersampled frames

ROOM_MIN = np.array([-2.6, -1.5, -1.2])
ROOM_MAX = np.array([2.6, 1.3, 4.6])
LIGHT_DIRECTION = np.array([0.35, -1.0, -0.45]) / np.linalg.norm([0.35, -1.0, -0.45])
AMBIENT, DIFFUSE = 0.65, 0.35

NOISE_LATTICE = 48  # value-noise lattice period (cells per axis)
NOISE_OCTAVES = ((1.5, 0.5, 3), (4.0, 0.3, 1), (10.0, 0.2, 1))  # (cycles per metre, amplitude, channels)
RECT_CELL = 0.5  # metres; at most one box (a rectangle on a face) per cell
DISC_CELL = 0.2  # metres; at most one sphere (a disc on a face) per cell


@dataclass(frozen=True)
class SceneConfig:
    """Size and sampling of a synthetic clip.

    width, height: image size in pixels (even, 32..4096).
    num_frames: frames in the clip (2..5000); the motion is the same for any count.
    fps: playback rate of video.mp4 and cameras.json, frames per second.
    supersample: anti-aliasing; each pixel averages supersample x supersample rays (1..8).
    track_grid: query points per row of the first frame's track grid (1..min(width, height)).
    """

    width: int
    height: int
    num_frames: int
    fps: float
    supersample: int
    track_grid: int

    def validate(self) -> None:
        """Raise :class:`ParameterError` for sizes or rates that make no sense."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 32 <= value <= 4096:
                raise ParameterError(f"synthetic {name}={value} is out of range",
                                     f"use a {name} between 32 and 4096 pixels")
            if value % 2:
                raise ParameterError(f"synthetic {name}={value} is odd", f"use an even {name} (video codecs need it)")
        if not 2 <= self.num_frames <= 5000:
            raise ParameterError(f"synthetic num_frames={self.num_frames} is out of range", "use 2..5000 frames")
        if not 0 < self.fps <= 1000:
            raise ParameterError(f"synthetic fps={self.fps} is out of range", "use a frame rate in (0, 1000]")
        if not 1 <= self.supersample <= 8:
            raise ParameterError(f"synthetic supersample={self.supersample} is out of range",
                                 "use 1..8 rays per pixel side")
        if not 1 <= self.track_grid <= min(self.width, self.height):
            raise ParameterError(f"synthetic track_grid={self.track_grid} is out of range",
                                 f"use 1..{min(self.width, self.height)} query points per row")


PRESETS: dict[str, SceneConfig] = {
    "tiny": SceneConfig(width=96, height=72, num_frames=12, fps=6.0, supersample=3, track_grid=8),
    "ci": SceneConfig(width=192, height=144, num_frames=24, fps=12.0, supersample=2, track_grid=12),
    "bench": SceneConfig(width=480, height=360, num_frames=48, fps=24.0, supersample=2, track_grid=16),
    "walker": SceneConfig(width=256, height=192, num_frames=16, fps=8.0, supersample=2, track_grid=8),
}
# Presets that render the walker layout (see the module docstring) instead of the room with cube and blob.
WALKER_PRESETS = frozenset({"walker"})
WALKER_LABELS = {0: "background", 1: "walker"}
WALKER_MASKS_CONVENTION = "0 static, 1 walker (articulated: torso, head, arms and legs move relative to each other)"


def describe_presets() -> str:
    """One line listing every preset of :data:`PRESETS` with its size and frame count (and the
    layout for the walker presets), e.g. for a command line's help."""
    entries = []
    for name, config in PRESETS.items():
        layout = "; plain wall, walking figure" if name in WALKER_PRESETS else ""
        entries.append(f"{name} ({config.width}x{config.height}, {config.num_frames} frames{layout})")
    return ", ".join(entries)


def scene_config(preset: str, overrides: Mapping[str, object] | None = None) -> SceneConfig:
    """The validated configuration of ``preset`` with ``overrides`` (field name -> value; strings
    such as ``"320"`` from a command line are converted). Raises :class:`ParameterError`."""
    if preset not in PRESETS:
        raise ParameterError(f"unknown synthetic preset {preset!r}", f"use one of: {', '.join(PRESETS)}")
    values = asdict(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in values:
            raise ParameterError(f"unknown synthetic scene setting {key!r}", f"settings: {', '.join(values)}")
        values[key] = _coerce(key, value, type(values[key]))
    config = SceneConfig(**values)
    config.validate()
    return config


def _coerce(name: str, value: object, kind: type) -> int | float:
    """``value`` as an int or float setting, or a :class:`ParameterError`."""
    if isinstance(value, bool):
        raise ParameterError(f"synthetic {name}={value!r} is not a number", f"write e.g. {name}=64")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ParameterError(f"synthetic {name}={value!r} is not a number", f"write e.g. {name}=64") from None
    if kind is int:
        if not number.is_integer():
            raise ParameterError(f"synthetic {name}={value!r} is not a whole number", f"write e.g. {name}=64")
        return int(number)
    if not np.isfinite(number):
        raise ParameterError(f"synthetic {name}={value!r} is not finite", f"write e.g. {name}=12")
    return number


# ----------------------------------------------------------------------------------------------
# Geometry helpers


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix (3, 3) of ``angle`` radians about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def _look_at_w2c(centre: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """World-to-camera (4, 4) of an OpenCV camera at ``centre`` looking at ``target``, image
    "down" along world +y, rotated by ``roll`` radians about its optical axis."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    right, down = (np.cos(roll) * right + np.sin(roll) * down, -np.sin(roll) * right + np.cos(roll) * down)
    rotation = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    w2c = np.eye(4)
    w2c[:3, :3] = rotation
    w2c[:3, 3] = -rotation @ centre
    return w2c


def _hash_uniform(cells: np.ndarray, salt: int, count: int) -> np.ndarray:
    """Deterministic uniform numbers in (0, 1) ``(count, N)`` (16-bit resolution) for integer
    lattice cells ``(3, N)``: splitmix64 of a mix of the coordinates and ``salt``, four numbers
    per 64-bit hash."""
    c = cells.astype(np.int64).view(np.uint64)
    mixed = (c[0] * np.uint64(0x8CB92BA72F3D8DD7)) ^ (c[1] * np.uint64(0xD6E8FEB86659FD93)) \
        ^ (c[2] * np.uint64(0xA0761D6478BD642F))
    out = np.empty((count, cells.shape[1]))
    for block in range(0, count, 4):
        x = mixed ^ np.uint64((salt + 0x9E3779B97F4A7C15 * (block + 1)) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
        for field in range(min(4, count - block)):
            out[block + field] = (x >> np.uint64(16 * field)) & np.uint64(0xFFFF)
    return (out + 0.5) / 65536.0


class _Texture:
    """Procedural solid texture: smooth multi-octave value noise (for optical flow) with
    sharp-cornered coloured boxes, some checkered, and spheres laid on a lattice (their cuts
    by a surface are rectangles and discs with corners for SIFT). Evaluated at texture-space
    points in metres; deterministic from the seed."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.lattice = rng.random((3, NOISE_LATTICE, NOISE_LATTICE, NOISE_LATTICE))  # (channel, x, y, z)
        self.octave_shifts = rng.uniform(0.0, NOISE_LATTICE, size=(len(NOISE_OCTAVES), 3, 1))
        self.salt = int(rng.integers(0, 2 ** 62))

    def _value_noise(self, coords: np.ndarray, channels: int) -> np.ndarray:
        """Lattice noise ``(channels, N)`` in [0, 1] at points ``(3, N)`` in lattice units:
        trilinear interpolation at coordinates warped by smoothstep inside each cell, i.e. value
        noise with smoothstep weights (continuous first derivatives)."""
        from scipy import ndimage

        base = np.floor(coords)
        frac = coords - base
        warped = base + frac * frac * (3.0 - 2.0 * frac)
        return np.stack([ndimage.map_coordinates(channel, warped, order=1, mode="grid-wrap")
                         for channel in self.lattice[:channels]])

    def _cell(self, coords: np.ndarray, size: float, salt: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Position inside the lattice cell of side ``size`` ``(3, N)`` in [0, 1) and ``count``
        random numbers of the cell ``(count, N)``."""
        scaled = coords / size
        cells = np.floor(scaled)
        return scaled - cells, _hash_uniform(cells, self.salt + salt, count)

    def colour(self, points: np.ndarray, base: np.ndarray) -> np.ndarray:
        """RGB in [0, 1] ``(N, 3)`` at texture points ``(N, 3)`` (metres) over base colours ``(N, 3)``."""
        coords = np.ascontiguousarray(points.T)
        noise = np.zeros_like(coords)
        for (frequency, amplitude, channels), shift in zip(NOISE_OCTAVES, self.octave_shifts):
            noise += amplitude * (self._value_noise(coords * frequency + shift, channels) - 0.5)
        brightness = (noise[0] + noise[1] + noise[2]) / 3.0
        colour = base.T * (0.8 + 1.2 * brightness) + 0.35 * (noise - brightness)

        inside, r = self._cell(coords, RECT_CELL, salt=1, count=10)
        centre, half = 0.35 + 0.3 * r[1:4], 0.15 + 0.2 * r[4:7]
        outside = np.abs(inside - centre) >= half
        in_box = (r[0] < 0.8) & ~(outside[0] | outside[1] | outside[2])
        box_colour = 0.1 + 0.8 * (0.75 * (r[7:10] > 0.5) + 0.25 * r[7:10])
        cells = np.floor(inside * 8.0)
        checker = ((cells[0] + cells[1] + cells[2]) % 2 == 1) & (r[0] < 0.25)
        box_colour = np.where(checker, 1.0 - box_colour, box_colour)
        colour = np.where(in_box, box_colour, colour)

        inside, r = self._cell(coords, DISC_CELL, salt=2, count=8)
        radius = 0.15 + 0.25 * r[1]
        offset = inside - (radius + (1.0 - 2.0 * radius) * r[2:5])
        in_disc = (r[0] < 0.5) & (offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2 < radius ** 2)
        colour = np.where(in_disc, 0.05 + 0.9 * (r[5:8] > 0.5), colour)
        return np.clip(colour.T, 0.0, 1.0)


Pose = Callable[[float], tuple[np.ndarray, np.ndarray]]  # time t -> (A (3, 3), b (3,)): world = A @ local + b


@dataclass(frozen=True)
class _Primitive:
    """A box (local cube ``[-1, 1]^3``) or ellipsoid (local unit sphere) placed by an affine pose
    ``world = A(t) @ local + b(t)``. Its local coordinates identify a surface point at all times."""

    name: str
    shape: str  # "box" or "ellipsoid"
    label: int
    seen_from_inside: bool
    pose: Pose
    face_colours: np.ndarray  # (6, 3) base RGB of faces +x, -x, +y, -y, +z, -z (local axes)
    texture_scale: np.ndarray  # (3,) texture metres per local unit
    texture_offset: np.ndarray  # (3,) texture-space shift, metres
    plain_faces: tuple[int, ...] = ()  # faces (indices as face_colours) painted flat, without texture


@dataclass(frozen=True)
class _Hits:
    """What rays hit: ``depth (N,)`` ray parameter = z-depth in the casting camera, ``primitive
    (N,)`` index, ``local (N, 3)`` primitive-local coordinates of the hit point."""

    depth: np.ndarray
    primitive: np.ndarray
    local: np.ndarray


def _static_pose(rotation: np.ndarray, half_size: np.ndarray, centre: np.ndarray) -> Pose:
    """Time-independent pose of a static primitive."""
    matrix = rotation @ np.diag(half_size)
    return lambda t: (matrix, centre)


class _SceneModel:
    """The analytic scene: primitives with poses over time, camera path, intrinsics, texture.
    ``walker`` selects the walker layout instead of the room with cube and blob."""

    def __init__(self, config: SceneConfig, seed: int, walker: bool = False) -> None:
        self.config = config
        texture_seq, layout_seq, camera_seq, track_seq = np.random.SeedSequence(seed).spawn(4)
        self.texture = _Texture(np.random.default_rng(texture_seq))
        self.track_rng_seed = track_seq
        self.K = intrinsics_matrix(FOCAL_PER_WIDTH * config.width, FOCAL_PER_WIDTH * config.width,
                                   config.width / 2.0, config.height / 2.0)
        self.labels = dict(WALKER_LABELS if walker else LABELS)
        build = self._build_walker if walker else self._build_primitives
        self.primitives = build(np.random.default_rng(layout_seq))
        self.times = np.linspace(0.0, 1.0, config.num_frames)
        self.w2c = self._build_camera_path(np.random.default_rng(camera_seq))

    def _build_primitives(self, rng: np.random.Generator) -> list[_Primitive]:
        """Room, four static boxes, the tumbling cube and the breathing blob."""
        def palette(low: float = 0.25, high: float = 0.85) -> np.ndarray:
            return rng.uniform(low, high, size=(6, 3))

        def offset() -> np.ndarray:
            return rng.uniform(0.0, 100.0, size=3)

        y_axis = np.array([0.0, 1.0, 0.0])
        room_centre, room_half = (ROOM_MIN + ROOM_MAX) / 2, (ROOM_MAX - ROOM_MIN) / 2
        primitives = [_Primitive("room", "box", 0, True, _static_pose(np.eye(3), room_half, room_centre),
                                 palette(0.35, 0.8), room_half, offset())]
        floor = ROOM_MAX[1]
        boxes = [("box_left", (-1.5, 3.2), (0.35, 0.3, 0.35)), ("box_right", (1.7, 3.6), (0.3, 0.45, 0.3)),
                 ("box_back", (0.3, 3.9), (0.5, 0.2, 0.25)), ("pillar", (-0.9, 4.05), (0.25, 0.8, 0.25))]
        for name, (x, z), half in boxes:
            half = np.array(half)
            centre = np.array([x, floor - half[1], z])
            rotation = _rotation(y_axis, rng.uniform(-0.4, 0.4))
            primitives.append(_Primitive(name, "box", 0, False, _static_pose(rotation, half, centre),
                                         palette(), 1.5 * half, offset()))

        cube_half = 0.22
        cube_start = np.array([-0.75, 0.7, 2.3]) + rng.uniform(-0.05, 0.05, 3)
        cube_end = np.array([-0.15, 0.6, 2.5]) + rng.uniform(-0.05, 0.05, 3)
        cube_axis = np.array([0.3, 1.0, 0.2]) + rng.uniform(-0.2, 0.2, 3)
        cube_angle0, cube_spin = rng.uniform(0.0, 2 * np.pi), rng.choice([-1.0, 1.0]) * 1.5

        def cube_pose(t: float) -> tuple[np.ndarray, np.ndarray]:
            centre = cube_start + (cube_end - cube_start) * t - np.array([0.0, 0.15 * np.sin(np.pi * t), 0.0])
            return _rotation(cube_axis, cube_angle0 + cube_spin * t) * cube_half, centre

        primitives.append(_Primitive("cube", "box", 1, False, cube_pose, palette(0.2, 0.9),
                                     np.full(3, 3.0 * cube_half), offset()))

        blob_radii = np.array([0.32, 0.26, 0.28])
        blob_centre = np.array([0.9, 0.85, 2.2]) + rng.uniform(-0.05, 0.05, 3)
        blob_phase, blob_yaw0 = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.0, 2 * np.pi)

        def blob_pose(t: float) -> tuple[np.ndarray, np.ndarray]:
            wave = 2 * np.pi * t + blob_phase
            radii = blob_radii * (1.0 + 0.22 * np.sin(wave + np.array([0.0, np.pi, 0.5 * np.pi])))
            centre = blob_centre + np.array([-0.1 * t, -0.08 * np.sin(2 * np.pi * t), 0.0])
            return _rotation(y_axis, blob_yaw0 + 0.9 * t) @ np.diag(radii), centre

        primitives.append(_Primitive("blob", "ellipsoid", 2, False, blob_pose, palette(0.2, 0.9),
                                     2.5 * blob_radii, offset()))
        return primitives

    def _build_walker(self, rng: np.random.Generator) -> list[_Primitive]:
        """Room with a plain (textureless) back wall, two static boxes, and a figure of ellipsoids
        walking diagonally across the room towards the camera's path: torso and head bob, thighs and arms swing about
        hips and shoulders in opposite phase, shins bend at the knees (one stride per clip)."""
        y_axis, z_axis = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
        room_centre, room_half = (ROOM_MIN + ROOM_MAX) / 2, (ROOM_MAX - ROOM_MIN) / 2
        wall_colour = rng.uniform(0.75, 0.9) * np.ones(3)
        room_colours = rng.uniform(0.35, 0.8, size=(6, 3))
        room_colours[4] = wall_colour  # +z: the back wall
        primitives = [_Primitive("room", "box", 0, True, _static_pose(np.eye(3), room_half, room_centre),
                                 room_colours, room_half, rng.uniform(0.0, 100.0, 3), plain_faces=(4,))]
        floor = ROOM_MAX[1]
        for name, (x, z), half in (("box_left", (-1.6, 3.0), (0.3, 0.3, 0.3)), ("box_right", (1.6, 3.4), (0.3, 0.4, 0.3))):
            half = np.array(half)
            primitives.append(_Primitive(name, "box", 0, False,
                                         _static_pose(_rotation(y_axis, rng.uniform(-0.4, 0.4)), half,
                                                      np.array([x, floor - half[1], z])),
                                         rng.uniform(0.25, 0.85, size=(6, 3)), 1.5 * half, rng.uniform(0.0, 100.0, 3)))

        start = np.array([-0.8 + rng.uniform(-0.05, 0.05), 0.0, 3.4])
        yaw = np.radians(35.0)  # heading: +x turned towards the camera (-z)
        heading = _rotation(y_axis, yaw)
        direction, swing_axis = heading @ np.array([1.0, 0.0, 0.0]), heading @ z_axis
        speed = 1.2  # metres per clip
        phase = rng.uniform(0.0, 2 * np.pi)
        hip_height, thigh, shin, upper_arm, forearm = 0.78, 0.4, 0.38, 0.3, 0.28

        def gait(t: float) -> tuple[np.ndarray, float]:
            """Hip centre (world) and gait angle at time ``t`` (one stride per clip)."""
            angle = 2 * np.pi * t + phase
            hip = start + speed * t * direction + np.array([0.0, floor - hip_height - 0.03 * abs(np.cos(angle)), 0.0])
            return hip, angle

        def segment(joint: Callable[[float], np.ndarray], swing: Callable[[float], float], length: float,
                    radius: float) -> Pose:
            """An ellipsoid hanging from ``joint(t)`` along ``length``, turned by ``swing(t)`` about the figure's side axis."""
            def pose(t: float) -> tuple[np.ndarray, np.ndarray]:
                rotation = _rotation(swing_axis, swing(t)) @ heading
                return rotation @ np.diag([radius, length / 2, radius]), joint(t) + rotation @ np.array([0.0, length / 2, 0.0])
            return pose

        def body(offset: np.ndarray, radii: np.ndarray) -> Pose:
            return lambda t: (heading @ np.diag(radii), gait(t)[0] + heading @ offset)

        def thigh_swing(side: float) -> Callable[[float], float]:
            return lambda t: 0.45 * np.sin(gait(t)[1] + side * np.pi / 2)

        def knee_bend(side: float) -> Callable[[float], float]:
            return lambda t: thigh_swing(side)(t) - 0.6 * max(0.0, np.sin(gait(t)[1] + side * np.pi / 2 + 1.2))

        def arm_swing(side: float) -> Callable[[float], float]:
            return lambda t: -0.35 * np.sin(gait(t)[1] + side * np.pi / 2)

        def hip_joint(side: float) -> Callable[[float], np.ndarray]:
            return lambda t: gait(t)[0] + heading @ np.array([0.0, 0.0, 0.1 * side])

        def knee_joint(side: float) -> Callable[[float], np.ndarray]:
            return lambda t: hip_joint(side)(t) + _rotation(swing_axis, thigh_swing(side)(t)) @ np.array([0.0, thigh, 0.0])

        def shoulder_joint(side: float) -> Callable[[float], np.ndarray]:
            return lambda t: gait(t)[0] + heading @ np.array([0.0, -0.52, 0.2 * side])

        def elbow_joint(side: float) -> Callable[[float], np.ndarray]:
            return lambda t: shoulder_joint(side)(t) + _rotation(swing_axis, arm_swing(side)(t)) @ np.array([0.0, upper_arm, 0.0])

        def forearm_swing(side: float) -> Callable[[float], float]:
            return lambda t: arm_swing(side)(t) + 0.3

        parts: list[tuple[str, Pose, np.ndarray]] = [
            ("torso", body(np.array([0.0, -0.3, 0.0]), np.array([0.13, 0.3, 0.18])), np.array([0.13, 0.3, 0.18])),
            ("head", body(np.array([0.0, -0.74, 0.0]), np.full(3, 0.11)), np.full(3, 0.11))]
        for side, name in ((-1.0, "left"), (1.0, "right")):
            parts += [(f"thigh_{name}", segment(hip_joint(side), thigh_swing(side), thigh, 0.07), np.array([0.07, thigh / 2, 0.07])),
                      (f"shin_{name}", segment(knee_joint(side), knee_bend(side), shin, 0.055), np.array([0.055, shin / 2, 0.055])),
                      (f"upper_arm_{name}", segment(shoulder_joint(side), arm_swing(side), upper_arm, 0.045),
                       np.array([0.045, upper_arm / 2, 0.045])),
                      (f"forearm_{name}", segment(elbow_joint(side), forearm_swing(side), forearm, 0.04),
                       np.array([0.04, forearm / 2, 0.04]))]
        clothes = {"torso": rng.uniform(0.2, 0.9, 3), "head": rng.uniform(0.2, 0.9, 3), "legs": rng.uniform(0.2, 0.9, 3)}
        for name, pose, scale in parts:
            base = clothes["head" if name == "head" else "legs" if "thigh" in name or "shin" in name else "torso"]
            primitives.append(_Primitive(name, "ellipsoid", 1, False, pose, np.tile(base, (6, 1)), 3.0 * scale,
                                         rng.uniform(0.0, 100.0, 3)))
        return primitives

    def _build_camera_path(self, rng: np.random.Generator) -> np.ndarray:
        """World-to-camera ``(T, 4, 4)``: a 0.9 m sideways arc around the objects with gentle
        handheld wobble (centimetre-scale sinusoids, a degree or two of roll)."""
        frequencies = np.array([1.3, 2.6, 3.9])  # cycles per clip
        phases = rng.uniform(0.0, 2 * np.pi, size=(3, 3))  # (axis, frequency)
        amplitudes = np.array([0.012, 0.008, 0.005])  # metres per frequency
        target_phases = rng.uniform(0.0, 2 * np.pi, size=2)
        roll_phase = rng.uniform(0.0, 2 * np.pi)
        poses = []
        for t in self.times:
            wobble = (amplitudes * np.sin(2 * np.pi * frequencies * t + phases)).sum(axis=1)
            centre = np.array([-0.45 + 0.9 * t, -0.05 - 0.05 * np.sin(np.pi * t), 0.3 * t]) + wobble
            target = np.array([0.1 + 0.08 * np.sin(2 * np.pi * t + target_phases[0]),
                               0.45 + 0.05 * np.sin(2 * np.pi * 1.5 * t + target_phases[1]), 2.6])
            roll = np.radians(1.5) * np.sin(2 * np.pi * 0.7 * t + roll_phase)
            poses.append(_look_at_w2c(centre, target, roll))
        return np.stack(poses)

    # --- ray casting -----------------------------------------------------------------------

    def rays(self, frame: int, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Camera centre ``(3,)`` and world ray directions ``(N, 3)`` through pixel points
        ``xy (N, 2)`` of ``frame``, scaled so the ray parameter equals z-depth."""
        rotation, translation = self.w2c[frame, :3, :3], self.w2c[frame, :3, 3]
        camera_dirs = np.column_stack([(xy[:, 0] - self.K[0, 2]) / self.K[0, 0],
                                       (xy[:, 1] - self.K[1, 2]) / self.K[1, 1], np.ones(len(xy))])
        return -rotation.T @ translation, camera_dirs @ rotation

    def _candidate_rays(self, frame: int, matrix: np.ndarray, centre: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Indices of the pixel points ``xy (N, 2)`` inside the image rectangle that bounds a
        primitive (the projection of its local cube's corners, which enclose it)."""
        corners = np.array(np.meshgrid([-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0])).reshape(3, 8).T
        projected, z = project_points(self.K, self.w2c[frame], corners @ matrix.T + centre)
        if np.any(z <= MIN_RAY_DEPTH):
            return np.arange(len(xy))
        low, high = projected.min(axis=0) - 1.0, projected.max(axis=0) + 1.0
        inside = (xy >= low) & (xy <= high)
        return np.flatnonzero(inside[:, 0] & inside[:, 1])

    def cast(self, frame: int, xy: np.ndarray, static_only: bool = False) -> tuple[_Hits, np.ndarray]:
        """Nearest surfaces along the rays through pixel points ``xy (N, 2)`` of ``frame`` at
        that frame's time, and the rays' world directions ``(N, 3)``; with ``static_only`` the
        moving objects (label > 0) are left out, so the rays hit the static scene behind them."""
        origin, dirs = self.rays(frame, xy)
        best = np.full(len(dirs), np.inf)
        primitive = np.full(len(dirs), -1, dtype=np.int64)
        inverses = []
        for index, prim in enumerate(self.primitives):
            matrix, centre = prim.pose(self.times[frame])
            inverse = np.linalg.inv(matrix)
            inverses.append((inverse, centre))
            if static_only and prim.label > 0:
                continue
            rays = np.arange(len(xy)) if prim.seen_from_inside else self._candidate_rays(frame, matrix, centre, xy)
            depth = _intersect(prim, inverse @ (origin - centre), dirs[rays] @ inverse.T)
            closer = depth < best[rays]
            best[rays[closer]] = depth[closer]
            primitive[rays[closer]] = index
        local = np.zeros((len(dirs), 3))
        for index, (inverse, centre) in enumerate(inverses):
            sel = np.flatnonzero(primitive == index)
            local[sel] = (origin + best[sel, None] * dirs[sel] - centre) @ inverse.T
        return _Hits(best, primitive, local), dirs

    def pixel_centres(self) -> np.ndarray:
        """All pixel centres ``(H * W, 2)`` in row-major order."""
        cols, rows = np.meshgrid(np.arange(self.config.width), np.arange(self.config.height))
        return np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64) + 0.5

    def world_at(self, hits: _Hits, t: float) -> np.ndarray:
        """World positions ``(N, 3)`` at time ``t`` of the surface points ``hits``."""
        out = np.empty_like(hits.local)
        for index, prim in enumerate(self.primitives):
            sel = hits.primitive == index
            matrix, centre = prim.pose(t)
            out[sel] = hits.local[sel] @ matrix.T + centre
        return out

    def labels_of(self, hits: _Hits) -> np.ndarray:
        """Mask labels ``(N,)`` uint8 of the hit primitives."""
        return np.array([prim.label for prim in self.primitives], dtype=np.uint8)[hits.primitive]

    def visible(self, frame: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projections ``xy (N, 2)``, z-depths ``(N,)`` and visibility ``(N,)`` of world points
        ``(N, 3)`` in ``frame`` (points must lie on surfaces at that frame's time)."""
        xy, z = project_points(self.K, self.w2c[frame], points)
        inside = (z > MIN_RAY_DEPTH) & np.all(np.isfinite(xy), axis=1)
        inside &= (xy[:, 0] >= 0) & (xy[:, 0] <= self.config.width) & (xy[:, 1] >= 0) & (xy[:, 1] <= self.config.height)
        visible = np.zeros(len(points), dtype=bool)
        hits, _ = self.cast(frame, xy[inside])
        visible[inside] = hits.depth >= z[inside] * (1.0 - VISIBILITY_TOLERANCE)
        xy[~(z > MIN_RAY_DEPTH)] = np.nan
        return xy, z, visible

    def flow_from_hits(self, hits: _Hits, target: int) -> tuple[np.ndarray, np.ndarray]:
        """Flow ``(H, W, 2)`` float32 and occlusion ``(H, W)`` bool from pixel-centre hits of some
        frame (row-major) to frame ``target``."""
        height, width = self.config.height, self.config.width
        xy, _, visible = self.visible(target, self.world_at(hits, self.times[target]))
        flow = xy - self.pixel_centres()
        flow[~np.isfinite(flow)] = 0.0
        return flow.reshape(height, width, 2).astype(np.float32), ~visible.reshape(height, width)

    # --- appearance ------------------------------------------------------------------------

    def shade(self, hits: _Hits, dirs: np.ndarray, t: float) -> np.ndarray:
        """RGB in [0, 1] ``(N, 3)``: texture times (ambient + Lambert) shading."""
        colour = np.zeros((len(dirs), 3))
        for index, prim in enumerate(self.primitives):
            sel = np.flatnonzero(hits.primitive == index)
            if not len(sel):
                continue
            local = hits.local[sel]
            matrix, _ = prim.pose(t)
            axis = np.argmax(np.abs(local), axis=1)
            face = 2 * axis + (local[np.arange(len(sel)), axis] < 0)
            if prim.shape == "box":
                local_normal = np.zeros_like(local)
                local_normal[np.arange(len(sel)), axis] = np.sign(local[np.arange(len(sel)), axis])
            else:
                local_normal = local
            normal = local_normal @ np.linalg.inv(matrix)  # inverse-transpose applied to rows
            normal /= np.linalg.norm(normal, axis=1, keepdims=True)
            normal *= -np.sign(np.sum(normal * dirs[sel], axis=1, keepdims=True))  # face the camera
            lambert = np.clip(normal @ LIGHT_DIRECTION, 0.0, None)
            albedo = self.texture.colour(local * prim.texture_scale + prim.texture_offset, prim.face_colours[face])
            if prim.plain_faces:
                plain = np.isin(face, prim.plain_faces)
                albedo[plain] = prim.face_colours[face[plain]]
            colour[sel] = albedo * (AMBIENT + DIFFUSE * lambert)[:, None]
        return colour

    def render(self, frame: int, static_only: bool = False) -> np.ndarray:
        """Anti-aliased image ``(H, W, 3)`` uint8 RGB of ``frame`` (box filter over
        supersample x supersample rays per pixel); with ``static_only`` without the moving objects."""
        height, width, factor = self.config.height, self.config.width, self.config.supersample
        offsets = (np.arange(factor) + 0.5) / factor
        xs = (np.arange(width)[:, None] + offsets).ravel()
        ys = (np.arange(height)[:, None] + offsets).ravel()
        rows_per_chunk = max(1, RAYS_PER_CHUNK // len(xs))
        sub_image = np.empty((len(ys), len(xs), 3))
        for start in range(0, len(ys), rows_per_chunk):
            grid_x, grid_y = np.meshgrid(xs, ys[start:start + rows_per_chunk])
            hits, dirs = self.cast(frame, np.column_stack([grid_x.ravel(), grid_y.ravel()]), static_only)
            colours = self.shade(hits, dirs, self.times[frame])
            sub_image[start:start + rows_per_chunk] = colours.reshape(grid_x.shape + (3,))
        image = sub_image.reshape(height, factor, width, factor, 3).mean(axis=(1, 3))
        return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _intersect(prim: _Primitive, origin_local: np.ndarray, dirs_local: np.ndarray) -> np.ndarray:
    """Ray parameter ``(N,)`` of the visible intersection with a primitive in its local frame
    (``inf`` where missed): the entry point, or the exit point for a room seen from inside."""
    if prim.shape == "box":
        safe = np.where(np.abs(dirs_local) < 1e-15, 1e-15, dirs_local)
        t_low, t_high = (-1.0 - origin_local) / safe, (1.0 - origin_local) / safe
        entry, leave = np.minimum(t_low, t_high), np.maximum(t_low, t_high)
        near = np.maximum(np.maximum(entry[:, 0], entry[:, 1]), entry[:, 2])
        far = np.minimum(np.minimum(leave[:, 0], leave[:, 1]), leave[:, 2])
        depth = far if prim.seen_from_inside else near
        hit = near <= far
    else:
        a = np.sum(dirs_local * dirs_local, axis=1)
        b = dirs_local @ origin_local
        c = origin_local @ origin_local - 1.0
        discriminant = b * b - a * c
        root = np.sqrt(np.clip(discriminant, 0.0, None))
        depth = ((-b + root) if prim.seen_from_inside else (-b - root)) / a
        hit = discriminant >= 0
    return np.where(hit & (depth > MIN_RAY_DEPTH), depth, np.inf)


# ----------------------------------------------------------------------------------------------
# The scene object, generation and loading


@dataclass(eq=False, repr=False)
class SyntheticScene:
    """A generated clip with its ground truth (see the module docstring for conventions).

    images (T, H, W, 3) uint8 RGB; K (3, 3); w2c (T, 4, 4); depth (T, H, W) float32 z-depth;
    masks (T, H, W) uint8; flow (T-1, H, W, 2) float32 i -> i+1; flow_occluded (T-1, H, W) bool;
    tracks_xy (N, T, 2) float32; tracks_visible (N, T) bool; tracks_xyz (N, T, 3) float32 world;
    tracks_query_frame (N,) int32; extent: diagonal of the bounding box of all geometry seen.
    """

    root: Path
    preset: str
    seed: int
    config: SceneConfig
    images: np.ndarray
    K: np.ndarray
    w2c: np.ndarray
    depth: np.ndarray
    masks: np.ndarray
    flow: np.ndarray
    flow_occluded: np.ndarray
    tracks_xy: np.ndarray
    tracks_visible: np.ndarray
    tracks_xyz: np.ndarray
    tracks_query_frame: np.ndarray
    extent: float
    labels: dict[int, str]
    _model: _SceneModel

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def height(self) -> int:
        return self.config.height

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def fps(self) -> float:
        return self.config.fps

    def __repr__(self) -> str:
        return (f"SyntheticScene(root={str(self.root)!r}, preset={self.preset!r}, seed={self.seed}, "
                f"{self.num_frames} frames {self.width}x{self.height}, {len(self.tracks_xy)} tracks)")

    def _check_frame(self, index: int, name: str) -> int:
        if not 0 <= int(index) < self.num_frames:
            raise ParameterError(f"frame {name}={index} is outside the clip", f"use 0..{self.num_frames - 1}")
        return int(index)

    def flow_between(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact flow ``(H, W, 2)`` float32 from frame ``i`` to frame ``j`` and its occlusion
        ``(H, W)`` bool (True = the point of frame ``i`` is not visible in frame ``j``)."""
        i, j = self._check_frame(i, "i"), self._check_frame(j, "j")
        model = self._model
        return model.flow_from_hits(model.cast(i, model.pixel_centres())[0], j)

    def static_background(self, i: int) -> np.ndarray:
        """Frame ``i`` rendered without its moving objects ``(H, W, 3)`` uint8 RGB: the static
        scene behind them, as the image's own renderer shows it (same camera, shading and
        anti-aliasing, so it equals ``images[i]`` wherever no object touches a pixel). The
        ground truth of a static layer rendered alone; computed on demand, not stored."""
        return self._model.render(self._check_frame(i, "i"), static_only=True)

    def point_at_time(self, i: int, j: int) -> np.ndarray:
        """World positions ``(H, W, 3)`` float64 at time ``j`` of the surface points seen at the
        pixel centres of frame ``i`` (static points do not move; object points move with it)."""
        i, j = self._check_frame(i, "i"), self._check_frame(j, "j")
        model = self._model
        hits, _ = model.cast(i, model.pixel_centres())
        return model.world_at(hits, model.times[j]).reshape(self.height, self.width, 3)


def _query_points(model: _SceneModel, first_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Track queries: pixel centres ``(N, 2)`` and their frames ``(N,)``: a grid on the first
    frame, half-density grids on the middle and last frames, and up to ``track_grid`` random
    pixels of each dynamic object in the first frame (``first_mask (H, W)`` labels)."""
    config = model.config
    rng = np.random.default_rng(model.track_rng_seed)

    def grid(columns: int) -> np.ndarray:
        rows = max(1, round(columns * config.height / config.width))
        xs = np.round(np.linspace(0.1, 0.9, columns) * config.width - 0.5) if columns > 1 else [config.width // 2]
        ys = np.round(np.linspace(0.1, 0.9, rows) * config.height - 0.5) if rows > 1 else [config.height // 2]
        gx, gy = np.meshgrid(xs, ys)
        return np.column_stack([gx.ravel(), gy.ravel()]) + 0.5

    last = config.num_frames - 1
    points = [grid(config.track_grid)]
    frames = [np.zeros(len(points[0]), dtype=np.int32)]
    for frame in sorted({last // 2, last} - {0}):
        points.append(grid(max(1, config.track_grid // 2)))
        frames.append(np.full(len(points[-1]), frame, dtype=np.int32))
    for label in sorted(set(model.labels) - {0}):
        rows, cols = np.nonzero(first_mask == label)
        pick = rng.choice(len(rows), size=min(config.track_grid, len(rows)), replace=False) if len(rows) else []
        points.append(np.column_stack([cols[pick], rows[pick]]).astype(np.float64) + 0.5)
        frames.append(np.zeros(len(pick), dtype=np.int32))
    return np.concatenate(points), np.concatenate(frames)


def _tracks(model: _SceneModel, queries: np.ndarray,
            query_frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xy (N, T, 2)`` float32, ``visible (N, T)`` bool, ``xyz (N, T, 3)`` float32 world of the
    surface points at the query pixels."""
    count, frames = len(queries), model.config.num_frames
    depth, primitive, local = np.zeros(count), np.zeros(count, dtype=np.int64), np.zeros((count, 3))
    for frame in np.unique(query_frames):
        sel = query_frames == frame
        hits, _ = model.cast(int(frame), queries[sel])
        depth[sel], primitive[sel], local[sel] = hits.depth, hits.primitive, hits.local
    surface = _Hits(depth, primitive, local)
    xy, visible, xyz = np.zeros((count, frames, 2)), np.zeros((count, frames), dtype=bool), np.zeros((count, frames, 3))
    for frame in range(frames):
        xyz[:, frame] = model.world_at(surface, model.times[frame])
        xy[:, frame], _, visible[:, frame] = model.visible(frame, xyz[:, frame])
    return xy.astype(np.float32), visible, xyz.astype(np.float32)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"synthetic seed {seed!r} is not a non-negative integer", "use e.g. --seed 0")
    return int(seed)


def generate(out_dir: str | Path, preset: str = "ci", seed: int = 0, **overrides: object) -> SyntheticScene:
    """Render the scene of ``preset`` (``tiny``, ``ci``, ``bench``, ``walker``; ``overrides`` replace
    :class:`SceneConfig` fields) with ``seed`` into ``out_dir`` and return it.

    Existing ``images/*.png`` of an earlier clip in ``out_dir`` are replaced. Raises
    :class:`ParameterError` for an unknown preset or absurd settings.
    """
    config = scene_config(preset, overrides)
    seed = _check_seed(seed)
    walker = preset in WALKER_PRESETS
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ParameterError(f"output {root} exists and is not a folder", "choose a new folder for the synthetic scene")
    model = _SceneModel(config, seed, walker)
    frames, height, width = config.num_frames, config.height, config.width
    images_dir, gt_dir = root / "images", root / "gt"
    images_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    (root / "scene.json").unlink(missing_ok=True)  # written last: its presence marks a complete scene
    for stale in images_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        stale.unlink()
    logger.info("rendering synthetic scene %r (seed %d): %d frames of %dx%d into %s",
                preset, seed, frames, width, height, root)

    images = np.empty((frames, height, width, 3), dtype=np.uint8)
    depth = np.empty((frames, height, width), dtype=np.float32)
    masks = np.empty((frames, height, width), dtype=np.uint8)
    flow = np.empty((frames - 1, height, width, 2), dtype=np.float32)
    occluded = np.empty((frames - 1, height, width), dtype=bool)
    low, high = np.full(3, np.inf), np.full(3, -np.inf)
    centres = model.pixel_centres()
    for frame in tqdm(range(frames), desc="synthetic frames", unit="frame"):
        images[frame] = model.render(frame)
        write_rgb(images_dir / f"{frame:06d}.png", images[frame])
        hits, _ = model.cast(frame, centres)
        depth[frame] = hits.depth.reshape(height, width)
        masks[frame] = model.labels_of(hits).reshape(height, width)
        points = model.world_at(hits, model.times[frame])
        low, high = np.minimum(low, points.min(axis=0)), np.maximum(high, points.max(axis=0))
        if frame + 1 < frames:
            flow[frame], occluded[frame] = model.flow_from_hits(hits, frame + 1)
    logger.info("wrote %d images to %s", frames, images_dir)

    queries, query_frames = _query_points(model, masks[0])
    tracks_xy, tracks_visible, tracks_xyz = _tracks(model, queries, query_frames)
    extent = float(np.linalg.norm(high - low))

    write_video(root / "video.mp4", images, config.fps)
    logger.info("wrote %s", root / "video.mp4")
    cameras = {
        "width": width, "height": height, "fps": config.fps, "num_frames": frames,
        "model": "PINHOLE", "units": "metric", "convention": CONVENTIONS["camera"] + "; " + CONVENTIONS["pixels"],
        "K": model.K.tolist(),
        "frames": [{"index": i, "file": f"images/{i:06d}.png", "time": float(model.times[i]), "K": model.K.tolist(),
                    "w2c": model.w2c[i].tolist(), "registered": True, "interpolated": False} for i in range(frames)],
    }
    _write_json(gt_dir / "cameras.json", cameras)
    np.save(gt_dir / "depth.npy", depth)
    logger.info("wrote %s", gt_dir / "depth.npy")
    np.save(gt_dir / "masks.npy", masks)
    logger.info("wrote %s", gt_dir / "masks.npy")
    np.savez_compressed(gt_dir / "flow.npz", flow=flow, occluded=occluded)
    logger.info("wrote %s (%d forward flows)", gt_dir / "flow.npz", frames - 1)
    np.savez_compressed(gt_dir / "tracks.npz", xy=tracks_xy, visible=tracks_visible, xyz=tracks_xyz,
                        query_frame=query_frames)
    logger.info("wrote %s (%d tracks)", gt_dir / "tracks.npz", len(queries))
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "preset": preset, "seed": seed,
        "overrides": {key: getattr(config, key) for key in overrides}, "config": asdict(config),
        "conventions": dict(CONVENTIONS, masks=WALKER_MASKS_CONVENTION) if walker else CONVENTIONS, "extent": extent,
        "labels": {str(k): v for k, v in model.labels.items()},
        "objects": [{"name": p.name, "shape": p.shape, "label": p.label} for p in model.primitives],
        "num_tracks": len(queries),
    }
    _write_json(root / "scene.json", meta)
    return SyntheticScene(root, preset, seed, config, images, model.K.copy(), model.w2c.copy(), depth, masks,
                          flow, occluded, tracks_xy, tracks_visible, tracks_xyz, query_frames, extent,
                          dict(model.labels), model)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))
    logger.info("wrote %s", path)


def load(root: str | Path) -> SyntheticScene:
    """Read a scene written by :func:`generate`; the analytic model behind
    :meth:`SyntheticScene.flow_between` is rebuilt from ``scene.json``. Raises :class:`InputError`
    when ``root`` is not a complete synthetic scene."""
    root = Path(root)
    meta_path = root / "scene.json"
    if not meta_path.is_file():
        raise InputError(f"{root} is not a synthetic scene (no scene.json)",
                         "create one with `mono4d synth OUT --preset ci` (scene.json is written last)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise InputError(f"{meta_path} is not a version-{FORMAT_VERSION} {FORMAT_NAME} description",
                         "regenerate the scene with this version of mono4d")
    config = scene_config(meta["preset"], meta["overrides"])
    model = _SceneModel(config, meta["seed"], meta["preset"] in WALKER_PRESETS)
    frames = config.num_frames
    try:
        images = np.stack([read_rgb(root / "images" / f"{i:06d}.png") for i in range(frames)])
        cameras = json.loads((root / "gt" / "cameras.json").read_text())
        depth = np.load(root / "gt" / "depth.npy")
        masks = np.load(root / "gt" / "masks.npy")
        with np.load(root / "gt" / "flow.npz") as flow_file:
            flow, occluded = flow_file["flow"], flow_file["occluded"]
        with np.load(root / "gt" / "tracks.npz") as tracks:
            tracks_xy, tracks_visible = tracks["xy"], tracks["visible"]
            tracks_xyz, query_frame = tracks["xyz"], tracks["query_frame"]
    except (OSError, KeyError, ValueError) as error:
        raise InputError(f"synthetic scene {root} is incomplete or damaged: {error}",
                         "regenerate it with `mono4d synth`") from None
    if images.shape != (frames, config.height, config.width, 3) or depth.shape != images.shape[:3]:
        raise InputError(f"synthetic scene {root} does not match its scene.json",
                         "regenerate it with `mono4d synth`")
    K = np.array(cameras["K"], dtype=np.float64)
    w2c = np.array([frame["w2c"] for frame in cameras["frames"]], dtype=np.float64)
    labels = {int(k): v for k, v in meta["labels"].items()}
    return SyntheticScene(root, meta["preset"], int(meta["seed"]), config, images, K, w2c, depth, masks, flow,
                          occluded, tracks_xy, tracks_visible, tracks_xyz, query_frame, float(meta["extent"]),
                          labels, model)
