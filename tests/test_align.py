"""Align stage: per-frame robust scale/shift of monocular depth to SfM points, temporal
smoothing, outputs and their formats, measured against the synthetic scene's ground truth.

The helpers at the top write cameras/, masks/ and depth/ stage folders from ground truth in the
documented formats; test_depth.py and benchmarks/depth_accuracy.py reuse them."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import ParameterError, StageFailure
from mono4d.data.geometry import invert_rigid
from mono4d.stages import align

# ----------------------------------------------------------------------------------------------
# Ground-truth stage folders


def sample_static_points(scene, per_frame: int = 150, outlier_fraction: float = 0.1,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """``points.npz`` arrays: per frame, ``per_frame`` random static pixels lifted to world points
    with the true depth and camera (one observation each); ``outlier_fraction`` of them moved along
    their viewing ray by a factor in [0.5, 0.8] or [1.25, 2] (wrong depth, same pixel)."""
    rng = np.random.default_rng(seed)
    K_inv = np.linalg.inv(scene.K)
    xyz, obs_frame, obs_xy = [], [], []
    for frame in range(scene.num_frames):
        rows, cols = np.nonzero(scene.masks[frame] == 0)
        pick = rng.choice(len(rows), per_frame, replace=False)
        rows, cols = rows[pick], cols[pick]
        depth = scene.depth[frame][rows, cols].astype(np.float64)
        wrong = rng.random(per_frame) < outlier_fraction
        factor = np.where(rng.random(per_frame) < 0.5, rng.uniform(0.5, 0.8, per_frame),
                          rng.uniform(1.25, 2.0, per_frame))
        depth = np.where(wrong, depth * factor, depth)
        pixels = np.stack([cols + 0.5, rows + 0.5, np.ones(per_frame)])
        camera = (K_inv @ pixels) * depth
        c2w = invert_rigid(scene.w2c[frame])
        xyz.append((c2w[:3, :3] @ camera + c2w[:3, 3:4]).T)
        obs_frame.append(np.full(per_frame, frame))
        obs_xy.append(pixels[:2].T)
    xyz = np.concatenate(xyz).astype(np.float32)
    count = len(xyz)
    return {"xyz": xyz, "rgb": np.zeros((count, 3), np.uint8), "error": np.zeros(count, np.float32),
            "obs_frame": np.concatenate(obs_frame).astype(np.int32), "obs_point": np.arange(count, dtype=np.int32),
            "obs_xy": np.concatenate(obs_xy).astype(np.float32)}


def write_cameras_dir(out_dir: Path, scene, points: dict[str, np.ndarray],
                      registered: np.ndarray | None = None) -> Path:
    """A cameras stage folder (``cameras.json`` + ``points.npz``) with the scene's true cameras."""
    out_dir.mkdir(parents=True, exist_ok=True)
    registered = np.ones(scene.num_frames, bool) if registered is None else np.asarray(registered, bool)
    artifacts.write_cameras(out_dir, np.repeat(scene.K[None], scene.num_frames, axis=0), scene.w2c, registered,
                            [f"images/{i:06d}.png" for i in range(scene.num_frames)], scene.width, scene.height,
                            interpolated=~registered, units="metric")
    artifacts.write_points(out_dir, points)
    return out_dir


def write_masks_dir(out_dir: Path, masks: np.ndarray) -> Path:
    """A masks stage folder (``masks/000000.png`` label maps + ``labels.json``)."""
    artifacts.write_masks(out_dir, masks.astype(np.uint8), {1: "cube", 2: "blob"}, "ground truth")
    return out_dir


def corrupted_inverse_depth(scene, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    """What an affine-invariant monocular model might say: the true inverse depth under an unknown
    per-frame map ``a_t / z + b_t`` (a slow drift plus per-frame jitter of scale and shift) with
    ``noise`` relative Gaussian noise per pixel. ``(T, H, W)`` float32, all > 0."""
    rng = np.random.default_rng(seed)
    frames = np.arange(scene.num_frames)
    scale = 3.0 * np.exp(0.4 * np.sin(frames / 5.0) + rng.normal(0.0, 0.1, len(frames)))
    shift = 0.2 + 0.1 * np.cos(frames / 7.0) + rng.normal(0.0, 0.03, len(frames))
    inverse = scale[:, None, None] / scene.depth + shift[:, None, None]
    inverse *= 1.0 + noise * rng.standard_normal(inverse.shape)
    return np.maximum(inverse, 1e-3).astype(np.float32)


def empty_dir(path: Path) -> Path:
    """Create and return an empty output folder, as the pipeline hands to a stage."""
    path.mkdir(parents=True)
    return path


def abs_rel(depth: np.ndarray, truth: np.ndarray, region: np.ndarray) -> float:
    """Mean |depth - truth| / truth over ``region`` pixels with depth > 0 (invalid ones count as 1)."""
    estimate, reference = depth[region], truth[region]
    error = np.where(estimate > 0, np.abs(estimate - reference) / reference, 1.0)
    return float(error.mean())


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def geometry(synthetic_scene, tmp_path_factory):
    """cameras/ (true cameras, 10 % outlier points) and masks/ folders for the synthetic scene."""
    root = tmp_path_factory.mktemp("align_inputs")
    cameras = write_cameras_dir(root / "cameras", synthetic_scene, sample_static_points(synthetic_scene))
    masks = write_masks_dir(root / "masks", synthetic_scene.masks)
    return {"cameras": cameras, "masks": masks}


@pytest.fixture(scope="module")
def corrupted_depth_dir(synthetic_scene, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mono_depth")
    artifacts.write_depth(out, corrupted_inverse_depth(synthetic_scene), "relative_inverse", backend="test")
    return out


@pytest.fixture(scope="module")
def aligned(synthetic_scene, geometry, corrupted_depth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    figures = align.run({"depth": corrupted_depth_dir, **geometry}, align.Params(), out)
    return out, figures


# ----------------------------------------------------------------------------------------------
# Tests


def test_aligned_corrupted_inverse_depth_is_accurate_on_static_pixels(synthetic_scene, aligned):
    out, figures = aligned
    depth = artifacts.read_aligned_depth(out)
    assert depth.shape == synthetic_scene.depth.shape and depth.dtype == np.float32
    static = synthetic_scene.masks == 0
    assert abs_rel(depth, synthetic_scene.depth, static) < 0.05
    # Mono depth is valid on moving objects too: aligning the frame carries them along.
    assert abs_rel(depth, synthetic_scene.depth, ~static) < 0.1
    assert figures["frames_too_few_points"] == 0
    assert 0.0 < figures["median_residual"] < 0.05
    assert figures["mean_num_points"] > 100


def test_alignment_json_records_every_frame_and_flags_outliers(synthetic_scene, aligned):
    out, _ = aligned
    meta = json.loads((out / "alignment.json").read_text())
    assert meta["depth_kind"] == "relative_inverse" and meta["fit_space"] == "inverse_depth"
    assert artifacts.read_aligned_kind(out) == "relative_inverse"
    assert meta["masks_used"] is True and meta["invalid"] == "0"
    frames = meta["frames"]
    assert [f["index"] for f in frames] == list(range(synthetic_scene.num_frames))
    for record in frames:
        assert record["scale"] > 0 and np.isfinite(record["shift"])
        # 10 % of the points were given a wrong depth: RANSAC/IRLS must reject about that many.
        assert 0.8 <= record["inlier_fraction"] <= 0.95
        assert not record["filled"]
    scatter = cv2.imread(str(out / "scatter.png"))
    assert scatter is not None and scatter.shape == (512, 512, 3)
    red = (scatter[..., 2] > 180) & (scatter[..., 1] < 80)
    green = (scatter[..., 1] > 130) & (scatter[..., 2] < 60)
    assert red.sum() > 0 and green.sum() > red.sum()
    assert len(list((out / "vis").glob("*.png"))) == synthetic_scene.num_frames


def test_frames_without_points_are_filled_from_neighbours(synthetic_scene, corrupted_depth_dir, tmp_path):
    points = sample_static_points(synthetic_scene, outlier_fraction=0.0, seed=1)
    dropped = [5, 6, 17]
    keep = ~np.isin(points["obs_frame"], dropped)
    points = {key: (value[keep] if key.startswith("obs") else value) for key, value in points.items()}
    cameras = write_cameras_dir(tmp_path / "cameras", synthetic_scene, points)
    # A depth with a scale that drifts slowly, so neighbours' alignments transfer.
    frames = np.arange(synthetic_scene.num_frames)
    smooth = (2.0 + 0.02 * frames)[:, None, None] / synthetic_scene.depth + 0.1
    artifacts.write_depth(tmp_path / "depth", smooth.astype(np.float32), "relative_inverse", backend="test")
    figures = align.run({"depth": tmp_path / "depth", "cameras": cameras}, align.Params(), empty_dir(tmp_path / "out"))
    meta = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert [f["index"] for f in meta["frames"] if f["filled"]] == dropped
    assert figures["frames_too_few_points"] == 3 and any("interpolated" in note for note in figures["notes"])
    depth = artifacts.read_aligned_depth(tmp_path / "out")
    for frame in dropped:
        assert abs_rel(depth[frame], synthetic_scene.depth[frame], np.ones_like(depth[frame], bool)) < 0.03


def test_metric_depth_is_fitted_in_depth_space(synthetic_scene, geometry, tmp_path):
    biased = (1.3 * synthetic_scene.depth + 0.2).astype(np.float32)
    artifacts.write_depth(tmp_path / "depth", biased, "metric", backend="test")
    align.run({"depth": tmp_path / "depth", **geometry}, align.Params(), empty_dir(tmp_path / "out"))
    meta = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert meta["fit_space"] == "depth"
    scales = np.array([f["scale"] for f in meta["frames"]])
    shifts = np.array([f["shift"] for f in meta["frames"]])
    np.testing.assert_allclose(scales, 1 / 1.3, rtol=0.01)
    np.testing.assert_allclose(shifts, -0.2 / 1.3, atol=0.02)
    depth = artifacts.read_aligned_depth(tmp_path / "out")
    assert abs_rel(depth, synthetic_scene.depth, synthetic_scene.masks == 0) < 0.01


def test_depth_kind_of_a_foreign_or_broken_align_folder(tmp_path):
    from mono4d.data.errors import InputError

    assert artifacts.read_aligned_kind(tmp_path) is None  # aligned depth written by other tools
    (tmp_path / "alignment.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid alignment record"):
        artifacts.read_aligned_kind(tmp_path)


def test_robust_fit_rejects_gross_outliers():
    rng = np.random.default_rng(3)
    mono = rng.uniform(0.2, 2.0, 400)
    target = 0.7 * mono + 0.05
    target[:120] *= rng.uniform(1.5, 3.0, 120)   # 30 % gross outliers
    fit = align.fit_frame(mono, target, threshold=0.15, iterations=200, min_points=20, rng=rng)
    assert fit.scale == pytest.approx(0.7, rel=1e-3) and fit.shift == pytest.approx(0.05, abs=1e-3)
    assert not fit.inliers[:120].any() and fit.inliers[120:].all()


def test_depth_beyond_the_range_is_marked_invalid():
    mono = np.array([[1.0, 0.5], [0.01, 0.0]], np.float32)
    depth = align.aligned_depth(mono, scale=1.0, shift=-0.02, inverse=True, max_depth=10.0)
    # 1/(1-0.02), 1/(0.5-0.02) valid; 0.01-0.02 < 0 -> invalid; mono 0 -> invalid.
    np.testing.assert_allclose(depth, [[1 / 0.98, 1 / 0.48], [0.0, 0.0]], rtol=1e-6)
    assert align.aligned_depth(mono, 1.0, 0.0, inverse=True, max_depth=10.0)[1, 0] == 0.0  # 100 > max_depth


def test_no_usable_points_fail_clearly(synthetic_scene, corrupted_depth_dir, tmp_path):
    points = sample_static_points(synthetic_scene, per_frame=5, seed=2)
    cameras = write_cameras_dir(tmp_path / "cameras", synthetic_scene, points)
    with pytest.raises(StageFailure, match="enough SfM points"):
        align.run({"depth": corrupted_depth_dir, "cameras": cameras}, align.Params(), empty_dir(tmp_path / "out"))


@pytest.mark.parametrize("field, value", [("min_points", 1), ("inlier_threshold", 0.0), ("temporal_drift", 0.0),
                                          ("max_depth_ratio", 0.5), ("mask_dilation", -1)])
def test_absurd_parameters_are_rejected(field, value):
    with pytest.raises(ParameterError):
        align.Params(**{field: value}).validate()
