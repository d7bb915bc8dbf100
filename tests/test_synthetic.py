"""The synthetic scene's ground truth is self-consistent: images, depth, cameras, flow, masks and
tracks agree with each other to tight tolerances, files round-trip, bad settings are refused."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mono4d.data import synthetic
from mono4d.data.errors import InputError, ParameterError
from mono4d.data.geometry import camera_centers, project_points


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    """Two renders of the tiny preset with seed 0 and one with seed 1."""
    root = tmp_path_factory.mktemp("synthetic_tiny")
    return (synthetic.generate(root / "a", preset="tiny", seed=0),
            synthetic.generate(root / "b", preset="tiny", seed=0),
            synthetic.generate(root / "c", preset="tiny", seed=1))


def pixel_index_grid(scene) -> tuple[np.ndarray, np.ndarray]:
    """Column and row index maps ``(H, W)`` float32 (cv2.remap coordinates)."""
    cols, rows = np.meshgrid(np.arange(scene.width, dtype=np.float32), np.arange(scene.height, dtype=np.float32))
    return cols, rows


def unproject_depth(scene, frame: int) -> np.ndarray:
    """World points ``(H, W, 3)`` of the depth map of ``frame`` at pixel centres."""
    cols, rows = pixel_index_grid(scene)
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones_like(cols)], axis=-1).astype(np.float64)
    camera = (pixels @ np.linalg.inv(scene.K).T) * scene.depth[frame][..., None]
    rotation, translation = scene.w2c[frame, :3, :3], scene.w2c[frame, :3, 3]
    return (camera - translation) @ rotation


def test_same_seed_renders_identically_and_another_seed_differs(tiny_scenes):
    first, again, other = tiny_scenes
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.depth, again.depth)
    np.testing.assert_array_equal(first.flow, again.flow)
    np.testing.assert_array_equal(first.tracks_xy, again.tracks_xy)
    # the pipeline's input: end-to-end figures are reproducible only if the video is too
    assert (first.root / "video.mp4").read_bytes() == (again.root / "video.mp4").read_bytes()
    assert np.abs(first.images.astype(int) - other.images.astype(int)).mean() > 10.0


def test_tiny_preset_shapes_and_ranges(tiny_scenes):
    scene = tiny_scenes[0]
    frames, height, width = scene.num_frames, scene.height, scene.width
    assert (frames, height, width) == (12, 72, 96)
    assert scene.images.shape == (frames, height, width, 3) and scene.images.dtype == np.uint8
    assert scene.depth.shape == (frames, height, width) and scene.depth.dtype == np.float32
    assert scene.flow.shape == (frames - 1, height, width, 2) and scene.flow_occluded.dtype == bool
    assert scene.tracks_xyz.shape == scene.tracks_xy.shape[:2] + (3,)
    assert scene.depth.min() > 0.5 and scene.depth.max() < 10.0
    assert set(np.unique(scene.masks)) == {0, 1, 2}
    assert 3.0 < scene.extent < 10.0


def test_gt_flow_warps_next_frame_onto_current(synthetic_scene):
    scene = synthetic_scene
    cols, rows = pixel_index_grid(scene)
    gt_errors, zero_errors = [], []
    for i in range(scene.num_frames - 1):
        flow, visible = scene.flow[i], ~scene.flow_occluded[i]
        warped = cv2.remap(scene.images[i + 1], cols + flow[..., 0], rows + flow[..., 1], cv2.INTER_LINEAR)
        gt_errors.append(np.abs(warped.astype(np.float64) - scene.images[i])[visible].mean())
        zero_errors.append(np.abs(scene.images[i + 1].astype(np.float64) - scene.images[i])[visible].mean())
    assert np.mean(gt_errors) < 4.5, gt_errors
    assert max(gt_errors) < 6.0, gt_errors
    assert np.mean(zero_errors) > 2.5 * np.mean(gt_errors)
    assert 0.0 < scene.flow_occluded.mean() < 0.15


def test_image_motion_is_small_and_camera_has_baseline(synthetic_scene):
    scene = synthetic_scene
    magnitude = np.linalg.norm(scene.flow, axis=-1)[~scene.flow_occluded]
    assert np.percentile(magnitude, 99) < 6.0 and magnitude.max() < 8.0
    assert np.median(magnitude) > 0.5
    centres = camera_centers(scene.w2c)
    assert 0.5 < np.linalg.norm(centres[-1] - centres[0]) < 1.5


def test_depth_cameras_and_tracks_agree(synthetic_scene):
    scene = synthetic_scene
    for frame in range(scene.num_frames):
        visible = scene.tracks_visible[:, frame]
        xy, z = project_points(scene.K, scene.w2c[frame], scene.tracks_xyz[:, frame].astype(np.float64))
        assert np.abs(xy[visible] - scene.tracks_xy[visible, frame]).max() < 0.05
        queried = visible & (scene.tracks_query_frame == frame)
        cols, rows = np.floor(scene.tracks_xy[queried, frame]).astype(int).T
        np.testing.assert_allclose(scene.depth[frame, rows, cols], z[queried], rtol=1e-5)
        sampled = cv2.remap(scene.depth[frame], scene.tracks_xy[visible, frame, 0] - 0.5,
                            scene.tracks_xy[visible, frame, 1] - 0.5, cv2.INTER_LINEAR).ravel()
        relative = np.abs(sampled - z[visible]) / z[visible]
        assert np.median(relative) < 1e-3
    assert 0.5 < scene.tracks_visible.mean() < 1.0
    assert set(np.unique(scene.tracks_query_frame)) == {0, (scene.num_frames - 1) // 2, scene.num_frames - 1}


def test_depth_unprojects_to_the_surface_points(synthetic_scene):
    scene = synthetic_scene
    for frame in (0, scene.num_frames - 1):
        points = scene.point_at_time(frame, frame)
        error = np.linalg.norm(unproject_depth(scene, frame) - points, axis=-1)
        assert error.max() < 1e-5 * scene.depth.max()


def test_flow_between_matches_stored_flow_and_point_motion(synthetic_scene):
    scene = synthetic_scene
    flow, occluded = scene.flow_between(3, 4)
    np.testing.assert_array_equal(flow, scene.flow[3])
    np.testing.assert_array_equal(occluded, scene.flow_occluded[3])

    i, j = 2, 9
    flow, occluded = scene.flow_between(i, j)
    moved = scene.point_at_time(i, j).reshape(-1, 3)
    xy, z = project_points(scene.K, scene.w2c[j], moved)
    cols, rows = pixel_index_grid(scene)
    centres = np.stack([cols, rows], axis=-1).reshape(-1, 2) + 0.5
    np.testing.assert_allclose(flow.reshape(-1, 2), xy - centres, atol=1e-3)
    # Non-occluded points are what frame j sees there: its depth agrees with their z.
    visible = ~occluded.reshape(-1)
    target = np.floor(xy[visible]).astype(int)
    target_depth = scene.depth[j][np.clip(target[:, 1], 0, scene.height - 1), np.clip(target[:, 0], 0, scene.width - 1)]
    relative = np.abs(target_depth - z[visible]) / z[visible]
    assert np.mean(relative < 0.02) > 0.97
    # And a long-range warp is still photometrically right on those pixels.
    warped = cv2.remap(scene.images[j], cols + flow[..., 0], rows + flow[..., 1], cv2.INTER_LINEAR)
    error = np.abs(warped.astype(np.float64) - scene.images[i])[~occluded].mean()
    assert error < 6.0
    assert occluded.mean() > scene.flow_occluded[i].mean()


def test_static_points_stay_and_dynamic_points_move(synthetic_scene):
    scene = synthetic_scene
    i, j = 4, 15
    here, later = scene.point_at_time(i, i), scene.point_at_time(i, j)
    displacement = np.linalg.norm(later - here, axis=-1)
    labels = scene.masks[i]
    assert displacement[labels == 0].max() < 1e-9
    assert displacement[labels == 1].min() > 0.05  # the cube flies across the room
    assert np.median(displacement[labels == 2]) > 0.02  # the blob deforms and drifts


def test_static_background_removes_the_objects_only(synthetic_scene):
    """A frame rendered without its moving objects equals the frame wherever no object touches a
    pixel (masks 0, one pixel away from the objects: anti-aliasing mixes the edge pixels), differs
    where an object stood, is deterministic and is the same from a reloaded scene."""
    scene = synthetic_scene
    frame = 12
    background = scene.static_background(frame)
    assert background.shape == scene.images[frame].shape and background.dtype == np.uint8
    objects = scene.masks[frame] > 0
    near_objects = cv2.dilate(objects.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    np.testing.assert_array_equal(background[~near_objects], scene.images[frame][~near_objects])
    change = np.abs(background.astype(np.int16) - scene.images[frame]).max(axis=2)
    assert objects.sum() > 200 and np.mean(change[objects] > 10) > 0.8  # the objects are gone
    np.testing.assert_array_equal(synthetic.load(scene.root).static_background(frame), background)
    # what now shows there is the static scene the object hid: the room seen from that camera
    # (its depth is beyond the object's)
    depth_behind = scene._model.cast(frame, scene._model.pixel_centres(), static_only=True)[0].depth
    assert np.all(depth_behind.reshape(objects.shape)[objects] > scene.depth[frame][objects])


def test_files_exist_parse_and_load_round_trips(synthetic_scene):
    scene = synthetic_scene
    root = scene.root
    for name in ("video.mp4", "scene.json", "gt/cameras.json", "gt/depth.npy", "gt/masks.npy", "gt/flow.npz",
                 "gt/tracks.npz"):
        assert (root / name).is_file(), name
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:06d}.png" for i in range(scene.num_frames)]
    meta = json.loads((root / "scene.json").read_text())
    assert (meta["preset"], meta["seed"]) == ("ci", 0)
    assert meta["labels"] == {"0": "background", "1": "cube", "2": "blob"}
    cameras = json.loads((root / "gt" / "cameras.json").read_text())
    assert (cameras["width"], cameras["height"]) == (scene.width, scene.height)
    assert len(cameras["frames"]) == scene.num_frames
    np.testing.assert_allclose(cameras["frames"][7]["w2c"], scene.w2c[7])

    loaded = synthetic.load(root)
    for name in ("images", "K", "w2c", "depth", "masks", "flow", "flow_occluded", "tracks_xy",
                 "tracks_visible", "tracks_xyz", "tracks_query_frame"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(scene, name), err_msg=name)
    assert (loaded.num_frames, loaded.height, loaded.width) == (scene.num_frames, scene.height, scene.width)
    assert loaded.fps == scene.fps
    assert loaded.extent == pytest.approx(scene.extent)
    np.testing.assert_array_equal(loaded.flow_between(0, 1)[0], scene.flow[0])

    capture = cv2.VideoCapture(str(root / "video.mp4"))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame)
    capture.release()
    assert len(decoded) == scene.num_frames
    assert decoded[0].shape == (scene.height, scene.width, 3)
    assert np.abs(decoded[5][..., ::-1].astype(np.float64) - scene.images[5]).mean() < 12.0


def test_overrides_are_applied(tmp_path):
    scene = synthetic.generate(tmp_path / "small", preset="tiny", seed=3, width=64, height=48, num_frames="3", fps=5)
    assert scene.images.shape == (3, 48, 64, 3)
    assert scene.fps == 5.0
    assert scene.K[0, 0] == pytest.approx(0.9 * 64)
    loaded = synthetic.load(tmp_path / "small")
    np.testing.assert_array_equal(loaded.images, scene.images)
    np.testing.assert_array_equal(loaded.flow_between(0, 2)[0], scene.flow_between(0, 2)[0])


@pytest.mark.parametrize("preset, overrides", [
    ("huge", {}),
    ("tiny", {"width": 16}),
    ("tiny", {"width": 97}),
    ("tiny", {"num_frames": 1}),
    ("tiny", {"fps": 0}),
    ("tiny", {"supersample": 0}),
    ("tiny", {"width": "wide"}),
    ("tiny", {"num_frames": 2.5}),
    ("tiny", {"colour": "red"}),
])
def test_bad_settings_raise_parameter_error(tmp_path, preset, overrides):
    with pytest.raises(ParameterError) as raised:
        synthetic.generate(tmp_path / "out", preset=preset, seed=0, **overrides)
    assert raised.value.hint
    assert not (tmp_path / "out").exists()


def test_bad_seed_frame_and_folder_are_refused(tmp_path, synthetic_scene):
    with pytest.raises(ParameterError):
        synthetic.generate(tmp_path / "out", preset="tiny", seed=-1)
    with pytest.raises(ParameterError):
        synthetic_scene.flow_between(0, synthetic_scene.num_frames)
    with pytest.raises(InputError):
        synthetic.load(tmp_path)


def test_walker_preset_has_a_plain_wall_and_an_articulated_figure(tmp_path):
    scene = synthetic.generate(tmp_path / "walker", preset="walker", seed=0, width=128, height=96, num_frames=6,
                               supersample=1)
    assert scene.labels == {0: "background", 1: "walker"}
    assert set(np.unique(scene.masks)) == {0, 1} and 0.02 < (scene.masks > 0).mean() < 0.2
    meta = json.loads((scene.root / "scene.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "walker"} and "walker" in meta["conventions"]["masks"]
    assert synthetic.load(scene.root).labels == scene.labels
    # the back wall: a large part of every frame has no texture at all
    for image in scene.images:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gradient = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
        assert (gradient == 0).mean() > 0.2
    # articulated: distances between points of the figure change (a rigid body keeps them)
    rows, cols = np.nonzero(scene.masks[0] == 1)
    start, end = scene.point_at_time(0, 0)[rows, cols], scene.point_at_time(0, scene.num_frames // 2)[rows, cols]
    pick = np.random.default_rng(0).choice(len(rows), size=min(200, len(rows)), replace=False)
    change = np.abs(np.linalg.norm(start[pick, None] - start[None, pick], axis=-1)
                    - np.linalg.norm(end[pick, None] - end[None, pick], axis=-1))
    assert change.max() > 0.1
    # the ground-truth flow carries the static scene and the figure onto the next frame
    cols_grid, rows_grid = pixel_index_grid(scene)
    for i in range(scene.num_frames - 1):
        flow, visible = scene.flow[i], ~scene.flow_occluded[i]
        warped = cv2.remap(scene.images[i + 1], cols_grid + flow[..., 0], rows_grid + flow[..., 1], cv2.INTER_LINEAR)
        assert np.abs(warped.astype(np.float64) - scene.images[i])[visible].mean() < 6.0
