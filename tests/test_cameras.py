"""Cameras stage: COLMAP accuracy on the synthetic scene, masks, pose gaps, static and known
modes, failures; and the camera math of data/geometry.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.colmap import load_reconstruction, write_colmap_model
from mono4d.data.errors import InputError, ParameterError, StageFailure
from mono4d.data.geometry import (camera_centers, interpolate_w2c, invert_rigid, opengl_c2w_to_w2c, project_points,
                                  rotation_angle_deg, trajectory_errors, transform_w2c, umeyama_sim3, w2c_to_opengl_c2w)
from mono4d.data.images import write_gray, write_rgb
from mono4d.data.nerfstudio import write_nerfstudio_transforms
from mono4d.stages import cameras, frames
from tests.conftest import shared_path


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def make_frames_dir(images: np.ndarray | list[np.ndarray], folder: Path, **params) -> Path:
    """Run the frames stage over an image folder holding ``images``."""
    source = folder / "source"
    source.mkdir(parents=True)
    for index, image in enumerate(images):
        write_rgb(source / f"{index:04d}.png", image)
    out = folder / "frames"
    out.mkdir()
    frames.run({"source": source}, frames.Params(**params), out)
    return out


def make_masks_dir(masks: np.ndarray, folder: Path) -> Path:
    """A masks-stage-like output holding ``masks (T, H, W)``."""
    (folder / "masks").mkdir(parents=True)
    for index, mask in enumerate(masks):
        write_gray(folder / "masks" / f"{index:06d}.png", mask)
    (folder / "labels.json").write_text(json.dumps({"labels": {"0": "background", "1": "cube", "2": "blob"},
                                                    "backend": "file"}))
    return folder


def run_stage(inputs: dict, folder: Path, **params) -> tuple[dict, Path]:
    out = folder
    out.mkdir(parents=True)
    return cameras.run(inputs, cameras.Params(**params), out), out


# ------------------------------------------------------------------------------------------------
# COLMAP on the synthetic scene


@pytest.fixture(scope="module")
def colmap_plain(synthetic_frames_dir, tmp_path_factory):
    return run_stage({"frames": synthetic_frames_dir}, tmp_path_factory.mktemp("cams") / "plain")


@pytest.fixture(scope="module")
def colmap_masked(synthetic_scene, synthetic_frames_dir, tmp_path_factory):
    masks = make_masks_dir(synthetic_scene.masks, tmp_path_factory.mktemp("gt_masks"))
    figures, out = run_stage({"frames": synthetic_frames_dir, "masks": masks},
                             tmp_path_factory.mktemp("cams") / "masked")
    return figures, out


def test_colmap_registers_every_synthetic_frame_accurately(synthetic_scene, colmap_plain):
    figures, out = colmap_plain
    K, w2c, registered = artifacts.read_cameras(out)
    assert registered.all() and figures["registered_fraction"] == 1.0
    errors = trajectory_errors(w2c, synthetic_scene.w2c)
    assert errors["ate_rmse"] < 0.02 * synthetic_scene.extent
    assert errors["rotation_mean_deg"] < 1.0
    assert errors["rotation_max_deg"] < 2.0
    assert K[0, 0, 0] == pytest.approx(synthetic_scene.K[0, 0], rel=0.05)
    np.testing.assert_allclose(K[:, :2, 2], np.broadcast_to(synthetic_scene.K[:2, 2], (len(K), 2)))
    assert figures["matcher"] == "exhaustive" and figures["num_points"] > 100
    assert 0 < figures["reprojection_error_px"] < 1.5 and figures["mean_track_length"] > 2


def test_sift_without_upsampling_finds_fewer_points_but_registers_accurately(synthetic_scene, synthetic_frames_dir,
                                                                             colmap_plain, tmp_path):
    """The cpu preset's ``sift_upsample=false`` (COLMAP first_octave 0): fewer features and
    points than on the 2x upsampled frames, every frame still registered within the plain run's
    tolerances."""
    figures, out = run_stage({"frames": synthetic_frames_dir}, tmp_path / "cams", sift_upsample=False)
    _, w2c, registered = artifacts.read_cameras(out)
    assert registered.all()
    errors = trajectory_errors(w2c, synthetic_scene.w2c)
    assert errors["ate_rmse"] < 0.02 * synthetic_scene.extent and errors["rotation_mean_deg"] < 1.0
    assert 0 < figures["num_points"] < 0.6 * colmap_plain[0]["num_points"]


def test_small_frames_fall_back_to_upsampled_sift(synthetic_scene, tmp_path):
    """At 96x72 SIFT on the frames as they are finds too few features for COLMAP; the stage
    reruns it on the frames upsampled 2x, registers every frame and says so in the notes."""
    small = tmp_path / "frames"
    small.mkdir()
    frames.run({"source": synthetic_scene.root / "images"}, frames.Params(max_side=96), small)
    figures, out = run_stage({"frames": small}, tmp_path / "cams", sift_upsample=False)
    assert figures["registered_fraction"] == 1.0
    assert any("upsampled 2x" in note and "these cameras come from" in note for note in figures["notes"])
    assert load_reconstruction(out / cameras.SPARSE_DIR).num_reg_images() == figures["num_frames"]


def test_upsampled_retry_is_kept_only_when_it_registers_more(monkeypatch, tmp_path):
    """The retry's reconstruction replaces the first one only with more frames registered; the
    first one's sparse/ folder is restored otherwise."""
    counts = {False: 8, True: 8}

    def fake_colmap(frames_dir, names, width, height, masks, params, work_dir, out_dir):
        (out_dir / cameras.SPARSE_DIR).mkdir()
        (out_dir / cameras.SPARSE_DIR / f"upsample_{params.sift_upsample}").write_text("")
        registered = np.arange(len(names)) < counts[params.sift_upsample]
        return {"registered": registered}, []

    monkeypatch.setattr(cameras, "run_colmap", fake_colmap)
    names = [f"{index:06d}.png" for index in range(10)]
    for upsampled, kept in ((8, False), (9, True)):
        counts[True] = upsampled
        out = tmp_path / f"out{upsampled}"
        out.mkdir()
        result, notes = cameras.reconstruct(tmp_path, names, 64, 48, None, cameras.Params(sift_upsample=False), out)
        assert int(result["registered"].sum()) == max(8, upsampled)
        assert [path.name for path in (out / cameras.SPARSE_DIR).iterdir()] == [f"upsample_{kept}"]
        assert len(notes) == 1 and ("first reconstruction is kept" in notes[0]) != kept


def test_masking_moving_objects_makes_colmap_more_accurate(synthetic_scene, colmap_plain, colmap_masked):
    figures, out = colmap_masked
    _, w2c, registered = artifacts.read_cameras(out)
    assert registered.all()
    masked = trajectory_errors(w2c, synthetic_scene.w2c)
    plain = trajectory_errors(artifacts.read_cameras(colmap_plain[1])[1], synthetic_scene.w2c)
    assert masked["ate_rmse"] < 0.005 * synthetic_scene.extent
    assert masked["rotation_max_deg"] < 1.0
    assert masked["ate_rmse"] < plain["ate_rmse"]
    # No 3D point sits on a moving object: every observation falls on a static pixel.
    points = artifacts.read_points(out)
    xy = np.floor(points["obs_xy"]).astype(int)
    labels = synthetic_scene.masks[points["obs_frame"], xy[:, 1], xy[:, 0]]
    assert np.mean(labels == 0) > 0.99


def test_outputs_are_consistent(colmap_plain):
    figures, out = colmap_plain
    content = json.loads((out / "cameras.json").read_text())
    assert {"width", "height", "model", "units", "frames"} <= content.keys() and content["units"] == "sfm"
    assert [frame["file"] for frame in content["frames"]] == [f"images/{i:06d}.png" for i in range(24)]
    K, w2c, _ = artifacts.read_cameras(out)
    points = artifacts.read_points(out)
    assert points["xyz"].dtype == np.float32 and points["rgb"].dtype == np.uint8
    assert points["obs_frame"].dtype == np.int32 and points["obs_point"].dtype == np.int32
    assert points["obs_xy"].shape == (len(points["obs_frame"]), 2) and len(points["error"]) == len(points["xyz"])
    # Observations reproject onto their points with the stored cameras (pixel-centre convention shared).
    residuals = []
    for frame in range(len(K)):
        rows = points["obs_frame"] == frame
        uv, depth = project_points(K[frame], w2c[frame], points["xyz"][points["obs_point"][rows]])
        assert (depth > 0).all()
        residuals.append(np.linalg.norm(uv - points["obs_xy"][rows], axis=1))
    assert np.median(np.concatenate(residuals)) < 1.0
    # The COLMAP model holds the same poses.
    model = load_reconstruction(out / "sparse")
    assert model.num_reg_images() == len(K)
    image = next(image for image in model.images.values() if image.name == "000005.png")
    np.testing.assert_allclose(image.cam_from_world().matrix(), w2c[5, :3], atol=1e-9)
    assert (out / "vis" / "trajectory.png").is_file()


def test_unregistered_frames_are_interpolated_or_reported(synthetic_scene, tmp_path):
    images = synthetic_scene.images.copy()
    images[12] = 128  # a flat frame COLMAP cannot register, between registered neighbours
    images[23] = 128  # the last frame: nothing to interpolate from on one side
    frames_dir = make_frames_dir(images, tmp_path)
    with pytest.raises(StageFailure, match=r"frame 23 of 24") as failure:
        run_stage({"frames": frames_dir}, tmp_path / "strict")
    assert "allow_unposed" in failure.value.hint

    figures, out = run_stage({"frames": frames_dir}, tmp_path / "lenient", allow_unposed=True)
    K, w2c, registered = artifacts.read_cameras(out)
    content = json.loads((out / "cameras.json").read_text())
    assert figures["num_registered"] == 22 and figures["num_interpolated"] == 1 and figures["num_unposed"] == 1
    assert not registered[12] and content["frames"][12]["interpolated"]
    assert content["frames"][23]["w2c"] is None and np.isnan(w2c[23]).all()
    assert any("12" in note and "interpolated" in note for note in figures["notes"])
    # The interpolated pose is close to the truth once the SfM frame is aligned on the other frames.
    posed = np.arange(23)
    scale, rotation, translation = umeyama_sim3(camera_centers(w2c[posed[registered[:23]]]),
                                                camera_centers(synthetic_scene.w2c[posed[registered[:23]]]))
    aligned = transform_w2c(w2c[12], scale, rotation, translation)
    assert np.linalg.norm(camera_centers(aligned) - camera_centers(synthetic_scene.w2c[12])) < 0.01 * synthetic_scene.extent


def test_static_or_textureless_clips_fail_with_options(synthetic_scene, tmp_path):
    still = make_frames_dir([synthetic_scene.images[0]] * 10, tmp_path / "still")
    with pytest.raises(StageFailure, match="barely moves") as failure:
        run_stage({"frames": still}, tmp_path / "still_out")
    assert "cameras.mode=static" in failure.value.hint and "cameras.mode=known" in failure.value.hint

    grey = make_frames_dir([np.full((72, 96, 3), 128, np.uint8)] * 10, tmp_path / "grey")
    with pytest.raises(StageFailure, match="too little texture"):
        run_stage({"frames": grey}, tmp_path / "grey_out")


def test_static_mode_uses_identity_poses_and_a_focal_prior(synthetic_frames_dir, tmp_path):
    figures, out = run_stage({"frames": synthetic_frames_dir}, tmp_path / "default", mode="static")
    K, w2c, registered = artifacts.read_cameras(out)
    assert registered.all() and np.allclose(w2c, np.eye(4))
    np.testing.assert_allclose(K[0], [[1.2 * 192, 0, 96], [0, 1.2 * 192, 72], [0, 0, 1]])
    assert len(artifacts.read_points(out)["xyz"]) == 0 and any("static camera" in note for note in figures["notes"])
    assert load_reconstruction(out / "sparse").num_reg_images() == 24

    _, out = run_stage({"frames": synthetic_frames_dir}, tmp_path / "focal", mode="static", focal_px=150.0)
    assert artifacts.read_cameras(out)[0][:, 0, 0] == pytest.approx(150.0)


# ------------------------------------------------------------------------------------------------
# Known cameras


def test_known_cameras_from_nerfstudio_and_colmap(synthetic_scene, synthetic_frames_dir, tmp_path):
    names = [f"{index:06d}.png" for index in range(synthetic_scene.num_frames)]
    transforms = tmp_path / "ns" / "transforms.json"
    write_nerfstudio_transforms(transforms, synthetic_scene.K, synthetic_scene.w2c, synthetic_scene.width,
                                synthetic_scene.height, [f"images/{name}" for name in names])
    write_colmap_model(tmp_path / "colmap" / "sparse" / "0", synthetic_scene.K, synthetic_scene.w2c,
                       synthetic_scene.width, synthetic_scene.height, names)
    for label, path in (("ns", transforms), ("colmap", tmp_path / "colmap")):
        figures, out = run_stage({"frames": synthetic_frames_dir}, tmp_path / f"out_{label}",
                                 mode="known", known_path=str(path))
        K, w2c, registered = artifacts.read_cameras(out)
        assert registered.all() and figures["registered_fraction"] == 1.0
        np.testing.assert_allclose(w2c, synthetic_scene.w2c, atol=1e-6)
        np.testing.assert_allclose(K, np.broadcast_to(synthetic_scene.K, K.shape), atol=1e-6)

    # Frames resized by the frames stage get rescaled intrinsics.
    half = make_frames_dir(synthetic_scene.images, tmp_path / "half", max_side=96)
    figures, out = run_stage({"frames": half}, tmp_path / "out_half", mode="known", known_path=str(transforms))
    np.testing.assert_allclose(artifacts.read_cameras(out)[0][0], np.diag([0.5, 0.5, 1.0]) @ synthetic_scene.K, atol=1e-6)
    assert any("scaled" in note for note in figures["notes"])

    # A different number of frames is an input error naming both counts.
    short = make_frames_dir(synthetic_scene.images[:5], tmp_path / "short")
    with pytest.raises(InputError, match=r"24 cameras but the frames stage wrote 5 frames"):
        run_stage({"frames": short}, tmp_path / "out_short", mode="known", known_path=str(tmp_path / "colmap"))


def test_known_cameras_for_a_subset_of_dnerf_images(tmp_path):
    from mono4d.data.dnerf import read_dnerf

    transforms = shared_path("dnerf/mutant/transforms_test.json")
    dataset = read_dnerf(transforms)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    frames.run({"source": transforms.parent / "test"}, frames.Params(stride=2, max_side=100), frames_dir)
    figures, out = run_stage({"frames": frames_dir}, tmp_path / "out", mode="known", known_path=str(transforms))
    K, w2c, _ = artifacts.read_cameras(out)
    assert len(K) == 10 and figures["units"] == "dataset"
    assert K[0, 0, 0] == pytest.approx(dataset.K[0, 0, 0] / 8) and K[0, 0, 2] == pytest.approx(50.0)
    np.testing.assert_allclose(w2c, dataset.w2c[::2])
    assert any("source indices" in note for note in figures["notes"])


# ------------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("changes, message", [
    ({"mode": "sfm"}, "cameras.mode"),
    ({"camera_model": "FISHEYE"}, "cameras.camera_model"),
    ({"focal_px": -1.0}, "focal_px"),
    ({"overlap": 0}, "overlap"),
    ({"min_registered_fraction": 0.0}, "min_registered_fraction"),
    ({"loop_detection": True}, "vocabulary tree"),
    ({"loop_detection": True, "vocab_tree_path": "/nonexistent/tree.bin"}, "does not exist"),
    ({"mode": "known"}, "known_path"),
])
def test_absurd_parameters_are_rejected(changes, message):
    with pytest.raises(ParameterError, match=message):
        cameras.Params(**changes).validate()


# ------------------------------------------------------------------------------------------------
# Camera math


def test_umeyama_recovers_a_similarity_and_trajectory_errors_vanish():
    rng = np.random.default_rng(0)
    rotation, translation, scale = random_rotation(rng), rng.normal(size=3), 2.5
    src = rng.normal(size=(20, 3))
    fitted = umeyama_sim3(src, scale * src @ rotation.T + translation)
    assert fitted[0] == pytest.approx(scale)
    np.testing.assert_allclose(fitted[1], rotation, atol=1e-10)
    np.testing.assert_allclose(fitted[2], translation, atol=1e-10)

    gt = np.stack([np.eye(4)] * 10)
    for index in range(10):
        gt[index, :3, :3] = random_rotation(rng)
        gt[index, :3, 3] = [index * 0.3, 0.05 * index ** 2, 0.0]  # a gently curved path
    estimate = transform_w2c(gt, 0.2, random_rotation(rng), rng.normal(size=3))
    errors = trajectory_errors(estimate, gt)
    assert errors["ate_rmse"] < 1e-9 and errors["rotation_max_deg"] < 1e-5
    assert errors["scale"] == pytest.approx(5.0)


def test_transform_w2c_keeps_projections():
    rng = np.random.default_rng(1)
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = random_rotation(rng), [0.1, 0.2, 3.0]
    K = np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]])
    points = rng.normal(size=(5, 3)) * 0.3
    rotation, translation, scale = random_rotation(rng), rng.normal(size=3), 3.0
    uv, depth = project_points(K, w2c, points)
    moved_uv, moved_depth = project_points(K, transform_w2c(w2c, scale, rotation, translation),
                                           scale * points @ rotation.T + translation)
    np.testing.assert_allclose(moved_uv, uv, atol=1e-9)
    np.testing.assert_allclose(moved_depth, scale * depth, atol=1e-9)


def test_opengl_conversion_and_interpolation():
    rng = np.random.default_rng(2)
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = random_rotation(rng), rng.normal(size=3)
    np.testing.assert_allclose(opengl_c2w_to_w2c(w2c_to_opengl_c2w(w2c)), w2c, atol=1e-12)
    # An OpenGL camera at the origin looking down -z sees a point at z = -2 at depth +2 (OpenCV).
    _, depth = project_points(np.eye(3), opengl_c2w_to_w2c(np.eye(4)), np.array([[0.0, 0.0, -2.0]]))
    assert depth[0] == pytest.approx(2.0)

    other = np.eye(4)
    other[:3, :3] = w2c[:3, :3] @ random_rotation(rng)
    other[:3, 3] = rng.normal(size=3)
    middle = interpolate_w2c(w2c, other, 0.5)
    np.testing.assert_allclose(camera_centers(middle), 0.5 * (camera_centers(w2c) + camera_centers(other)), atol=1e-12)
    half_angle = rotation_angle_deg(w2c[:3, :3], other[:3, :3]) / 2
    assert rotation_angle_deg(w2c[:3, :3], middle[:3, :3]) == pytest.approx(half_angle, abs=1e-6)
    np.testing.assert_allclose(interpolate_w2c(w2c, other, 0.0), w2c, atol=1e-12)
    np.testing.assert_allclose(invert_rigid(invert_rigid(other)), other, atol=1e-12)


def test_interpolate_gaps_fills_only_short_inner_gaps(synthetic_scene):
    w2c = synthetic_scene.w2c.copy()
    posed = np.ones(len(w2c), dtype=bool)
    posed[[0, 5, 9, 10, 11]] = False
    w2c[~posed] = np.nan
    filled = cameras.interpolate_gaps(w2c, posed, max_gap=2)
    assert list(np.flatnonzero(filled)) == [5]
    assert np.isnan(w2c[[0, 9, 10, 11]]).all()
    error = np.linalg.norm(camera_centers(w2c[5]) - camera_centers(synthetic_scene.w2c[5]))
    assert error < 0.01 * synthetic_scene.extent
    assert cameras.describe_frames([0, 1, 2, 5, 9, 10]) == "frames 0-2, 5, 9-10"
    assert cameras.describe_frames([4]) == "frame 4"


# ------------------------------------------------------------------------------------------------
# Real video (slow)


@pytest.mark.slow
def test_apple_video_registers_every_frame(tmp_path):
    video = shared_path("videos/apple.mp4")
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    frames.run({"source": video}, frames.Params(max_side=640), frames_dir)
    figures, out = run_stage({"frames": frames_dir}, tmp_path / "cams")
    assert figures["num_frames"] == 50 and figures["registered_fraction"] == 1.0
    assert figures["reprojection_error_px"] < 1.0 and figures["num_points"] > 1000
    K, w2c, registered = artifacts.read_cameras(out)
    assert registered.all() and np.isfinite(w2c).all()
