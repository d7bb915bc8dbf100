"""Depth stage: the transformers backend with a tiny randomly initialised Depth Anything saved to
disk (no network), the file backend against ground truth, the weights-free sfm backend against
the synthetic scene's true depth, output formats and errors."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data import artifacts
from mono4d.data.errors import InputError, ModelUnavailableError, ParameterError
from mono4d.data.images import read_rgb, write_gray
from mono4d.stages import depth as depth_stage
from mono4d.stages.depth_backends import depth_kind_from_config
from tests.test_align import abs_rel, sample_static_points, write_cameras_dir


def build_tiny_depth_anything(folder: Path, depth_estimation_type: str = "relative") -> Path:
    """Save a randomly initialised Depth Anything (tiny DINOv2 backbone) and its image processor."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=70, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                 neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=depth_estimation_type,
                                 max_depth=20)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(do_resize=True, size={"height": 70, "width": 70}, keep_aspect_ratio=True,
                         ensure_multiple_of=14, do_rescale=True, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_depth_anything(tmp_path_factory.mktemp("tiny_depth_anything"))


def _run(frames_dir: Path, out: Path, cameras: Path | None = None, **params) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"frames": frames_dir} if cameras is None else {"frames": frames_dir, "cameras": cameras}
    return depth_stage.run(inputs, depth_stage.Params(**params), out)


# ----------------------------------------------------------------------------------------------
# transformers


def test_transformers_backend_runs_a_local_model(synthetic_scene, synthetic_frames_dir, tiny_model, tmp_path):
    figures = _run(synthetic_frames_dir, tmp_path / "out", backend="transformers", model=str(tiny_model), batch_size=5)
    depth, kind = artifacts.read_depth(tmp_path / "out")
    assert kind == "relative_inverse" and figures["kind"] == "relative_inverse"
    assert depth.shape == synthetic_scene.depth.shape and depth.dtype == np.float32
    assert np.isfinite(depth).all() and (depth >= 0).all() and (depth > 0).any()
    meta = json.loads((tmp_path / "out" / "depth.json").read_text())
    assert meta["invalid"] == "0" and meta["model"] == str(tiny_model)
    assert meta["num_frames"] == synthetic_scene.num_frames
    vis = read_rgb(tmp_path / "out" / "vis" / "000000.png")
    assert vis.shape == (synthetic_scene.height, synthetic_scene.width, 3)


def test_transformers_output_kind_comes_from_config_or_override(synthetic_frames_dir, tmp_path):
    metric_model = build_tiny_depth_anything(tmp_path / "metric_model", depth_estimation_type="metric")
    figures = _run(synthetic_frames_dir, tmp_path / "a", model=str(metric_model), batch_size=24, input_size=28)
    assert figures["kind"] == "metric"
    figures = _run(synthetic_frames_dir, tmp_path / "b", model=str(metric_model), batch_size=24, input_size=28,
                   output_kind="relative_inverse")
    assert artifacts.read_depth(tmp_path / "b")[1] == "relative_inverse"


def test_cuda_device_without_cuda_is_a_parameter_error(synthetic_frames_dir, tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ParameterError, match="CUDA is not available"):
        _run(synthetic_frames_dir, tmp_path / "out", model=str(tiny_model), device="cuda")


def test_kind_of_other_model_families():
    from transformers import DPTConfig, GLPNConfig, ViTConfig

    assert depth_kind_from_config(DPTConfig()) == "relative_inverse"
    assert depth_kind_from_config(GLPNConfig()) == "metric"
    assert depth_kind_from_config(ViTConfig()) is None


@pytest.mark.parametrize("model", ["/nonexistent/depth-model", "no-such-org/no-such-depth-model"])
def test_missing_model_names_places_and_alternatives(synthetic_frames_dir, tmp_path, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError) as caught:
        _run(synthetic_frames_dir, tmp_path / "out", model=model)
    text = str(caught.value)
    assert model in text and "depth.backend=sfm" in text and "depth.backend=file" in text and "--preset cpu" in text
    assert ("does not exist" in text) if model.startswith("/") else ("Hugging Face cache" in text)
    assert not list((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------
# file


def test_file_backend_reads_npy_maps(synthetic_scene, synthetic_frames_dir, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for index, frame_depth in enumerate(synthetic_scene.depth):
        np.save(folder / f"{index:04d}.npy", frame_depth)
    figures = _run(synthetic_frames_dir, tmp_path / "out", backend="file", file_path=str(folder), file_kind="metric")
    depth, kind = artifacts.read_depth(tmp_path / "out")
    assert kind == "metric" and figures["valid_fraction"] == 1.0
    np.testing.assert_array_equal(depth, synthetic_scene.depth)


def test_file_backend_reads_scaled_16bit_pngs_in_depth_gt_and_resizes(synthetic_scene, synthetic_frames_dir, tmp_path):
    folder = tmp_path / "dataset" / "depth_gt"
    folder.mkdir(parents=True)
    half = (synthetic_scene.width // 2, synthetic_scene.height // 2)
    for index, frame_depth in enumerate(synthetic_scene.depth):
        millimetres = np.rint(frame_depth * 1000).astype(np.uint16)
        write_gray(folder / f"{index:06d}.png", cv2.resize(millimetres, half, interpolation=cv2.INTER_NEAREST))
    _run(synthetic_frames_dir, tmp_path / "out", backend="file", file_path=str(tmp_path / "dataset"), file_scale=0.001)
    depth, _ = artifacts.read_depth(tmp_path / "out")
    assert depth.shape == synthetic_scene.depth.shape
    # Nearest-neighbour upsampling of a half-size map: exact on the pixels it came from.
    np.testing.assert_allclose(depth[:, ::2, ::2], synthetic_scene.depth[:, ::2, ::2], atol=6e-4)
    assert abs_rel(depth, synthetic_scene.depth, synthetic_scene.masks == 0) < 0.02


def test_file_backend_count_mismatch_names_both_counts(synthetic_scene, synthetic_frames_dir, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for index in range(5):
        np.save(folder / f"{index:04d}.npy", synthetic_scene.depth[index])
    with pytest.raises(InputError, match=f"5 depth maps .* {synthetic_scene.num_frames} frames"):
        _run(synthetic_frames_dir, tmp_path / "out", backend="file", file_path=str(folder))


def test_file_backend_without_maps_fails_clearly(synthetic_frames_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no depth maps"):
        _run(synthetic_frames_dir, tmp_path / "out", backend="file", file_path=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------
# sfm


def depth_edge_band(truth: np.ndarray, jump: float = 0.05, radius: int = 2) -> np.ndarray:
    """``(T, H, W)`` bool: pixels within ``radius`` of a true depth discontinuity (relative jump >
    ``jump`` between 4-neighbours)."""
    band = np.zeros(truth.shape, bool)
    for frame, depth in enumerate(truth):
        edge = np.zeros(depth.shape, bool)
        across = np.abs(np.diff(depth, axis=1)) > jump * np.minimum(depth[:, 1:], depth[:, :-1])
        down = np.abs(np.diff(depth, axis=0)) > jump * np.minimum(depth[1:], depth[:-1])
        edge[:, 1:] |= across
        edge[:, :-1] |= across
        edge[1:] |= down
        edge[:-1] |= down
        kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
        band[frame] = cv2.dilate(edge.astype(np.uint8), kernel) > 0
    return band


@pytest.fixture(scope="module")
def sfm_run(synthetic_scene, synthetic_frames_dir, tmp_path_factory, monkeypatch_module):
    """The depth stage with backend=auto offline (so: sfm) on the synthetic scene with its true
    cameras and outlier-free static SfM points: (figures, depth, kind)."""
    monkeypatch_module.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    root = tmp_path_factory.mktemp("sfm_run")
    points = sample_static_points(synthetic_scene, per_frame=150, outlier_fraction=0.0)
    cameras = write_cameras_dir(root / "cameras", synthetic_scene, points)
    params = depth_stage.Params(backend="auto", model="no-such-org/no-such-depth-model")
    assert params.backend == "sfm" and params.auto_chosen and params.needs_cameras()
    out = root / "out"
    out.mkdir()
    figures = depth_stage.run({"frames": synthetic_frames_dir, "cameras": cameras}, params, out)
    depth, kind = artifacts.read_depth(out)
    return figures, depth, kind, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_sfm_backend_is_accurate_on_static_pixels(synthetic_scene, sfm_run):
    figures, depth, kind, _ = sfm_run
    static = synthetic_scene.masks == 0
    assert kind == "sfm" and figures["kind"] == "sfm" and figures["backend"] == "sfm"
    assert depth.shape == synthetic_scene.depth.shape
    # Before the edge-aware fill and temporal fusion: 0.0176 (push-pull fill, median 5).
    assert abs_rel(depth, synthetic_scene.depth, static & (depth > 0)) < 0.015
    assert (depth[static] > 0).mean() > 0.9
    assert figures["stereo_fraction"] > 0.5 and figures["fused_fraction"] > figures["stereo_fraction"]


def test_sfm_depth_edges_follow_the_image(synthetic_scene, sfm_run):
    """Near depth discontinuities (box and object outlines) few pixels are more than 10 % off:
    the fill does not smear depth across image edges (0.40 with the previous push-pull fill)."""
    _, depth, _, _ = sfm_run
    band = depth_edge_band(synthetic_scene.depth) & (depth > 0)
    error = np.abs(depth[band] - synthetic_scene.depth[band]) / synthetic_scene.depth[band]
    assert (error > 0.1).mean() < 0.25


def test_sfm_depth_is_zero_where_nothing_is_known(synthetic_scene, sfm_run):
    """Moving objects break multi-view stereo: most of their pixels get no depth (0) instead of
    the background's (the previous fill gave all of them depth, 0.56 AbsRel)."""
    figures, depth, _, out = sfm_run
    moving = synthetic_scene.masks > 0
    assert (depth[moving] > 0).mean() < 0.4
    assert figures["unknown_fraction"] > 0.0 and (depth >= 0).all()
    assert json.loads((out / "depth.json").read_text())["invalid"] == "0"
    vis = read_rgb(out / "vis" / "000000.png")
    assert (vis[depth[0] == 0] == 0).all()   # unknown pixels are drawn black


def test_auto_without_the_model_falls_back_to_sfm_with_a_note(sfm_run):
    figures, _, _, out = sfm_run
    assert figures["auto_chosen"] is True
    assert any("depth.backend=auto used the weights-free sfm backend" in note and "HF_HUB_OFFLINE" in note
               for note in figures["notes"]), figures["notes"]
    meta = json.loads((out / "depth.json").read_text())
    assert meta["backend"] == "sfm" and meta["auto_chosen"] is True


def test_edge_aware_fill_stops_at_image_edges_and_leaves_walled_off_regions_unknown():
    """Guide: a grey background with a red square. Measurements only on the background, left half
    at inverse depth 1, right half at 2, nothing in the square: the background is filled with
    the value of its own half (up to a narrow transition), the square stays unknown."""
    from mono4d.stages.depth_backends import edge_aware_fill

    guide = np.full((80, 120, 3), 0.5, np.float32)
    guide[25:55, 45:75] = (0.9, 0.1, 0.1)
    truth = np.where(np.arange(120)[None, :] < 60, 1.0, 2.0) * np.ones((80, 1))
    guide[:, 60:] = 0.2                                  # an image edge where the value changes
    guide[25:55, 45:75] = (0.9, 0.1, 0.1)
    rng = np.random.default_rng(0)
    measured = (rng.random((80, 120)) < 0.03)
    measured[25:55, 45:75] = False
    filled, known = edge_aware_fill(guide, np.where(measured, truth, 0).astype(np.float32),
                                    measured.astype(np.float32), sigma_space=12.0, sigma_color=0.1, min_support=0.1)
    square = np.zeros((80, 120), bool)
    square[25:55, 45:75] = True
    assert not known[square].any()
    background = ~square
    assert known[background].mean() > 0.95
    assert np.abs(filled - truth)[background & known].max() < 0.05   # no blur across the x = 60 edge


def test_temporal_fusion_fills_holes_from_neighbours_and_rejects_disagreement(synthetic_scene):
    """Static-scene depths of five frames: the middle frame's hole is filled by its neighbours'
    depths reprojected through the cameras (two must agree); the one neighbour whose depth is 30 %
    off is never counted."""
    from mono4d.stages.depth_backends import fuse_temporal

    frames = [9, 10, 11, 12, 13]
    truth = np.where(synthetic_scene.masks[frames] == 0, synthetic_scene.depth[frames], 0).astype(np.float32)
    measured = truth.copy()
    measured[2, 40:80, 60:120] = 0                       # a hole in the middle frame
    measured[4] *= np.float32(1.3)                       # a neighbour with wrong depth
    K = np.repeat(synthetic_scene.K[None], len(frames), axis=0)
    sources = [[j for j in range(len(frames)) if j != i] for i in range(len(frames))]
    fused, support = fuse_temporal(measured, K, synthetic_scene.w2c[frames], sources, 0.02)
    hole = np.zeros(truth.shape[1:], bool)
    hole[40:80, 60:120] = True
    hole &= truth[2] > 0
    filled = hole & (fused[2] > 0)
    assert filled.sum() > 0.8 * hole.sum()
    assert np.median(np.abs(fused[2][filled] - truth[2][filled]) / truth[2][filled]) < 0.005
    own = (measured[2] > 0) & (fused[2] > 0)
    assert np.median(np.abs(fused[2][own] - truth[2][own]) / truth[2][own]) < 0.002
    assert np.median(support[2][own]) == 4               # itself and frames 9, 10, 12; not 13


def test_sfm_backend_needs_cameras(synthetic_frames_dir, tmp_path):
    with pytest.raises(InputError, match="cameras"):
        _run(synthetic_frames_dir, tmp_path / "out", backend="sfm")


# ----------------------------------------------------------------------------------------------
# auto


def test_auto_picks_transformers_for_a_local_model(tiny_model):
    params = depth_stage.Params(backend="auto", model=str(tiny_model))
    assert params.backend == "transformers" and params.auto_chosen and not params.needs_cameras()


def test_auto_picks_transformers_from_the_hugging_face_cache(tiny_model, tmp_path, monkeypatch):
    """A hub id whose config and weights sit in the local Hugging Face cache counts as available,
    without the network (HF_HUB_OFFLINE)."""
    from mono4d.stages.depth_backends import transformers_model_availability

    repo = tmp_path / "hub" / "models--some-org--tiny-depth"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (snapshot / name).write_bytes((tiny_model / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    available, where = transformers_model_availability("some-org/tiny-depth")
    assert available and "cache" in where
    assert depth_stage.Params(backend="auto", model="some-org/tiny-depth").backend == "transformers"
    available, where = transformers_model_availability("some-org/absent-depth")
    assert not available and "HF_HUB_OFFLINE" in where


def test_auto_never_waits_long_for_an_unreachable_hub(monkeypatch):
    import time

    from mono4d.stages import depth_backends

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", lambda *args, **kwargs: time.sleep(30))
    started = time.perf_counter()
    available, where = depth_backends.transformers_model_availability("some-org/x", hub_timeout=0.5)
    assert not available and "no answer" in where and time.perf_counter() - started < 3.0


def test_cpu_preset_resolves_auto_once_for_dag_and_fingerprint(monkeypatch):
    """Offline, the cpu preset's depth.backend=auto becomes sfm when the configuration is built:
    the DAG gives depth the cameras, config.json records sfm, and reading it back does not
    resolve again."""
    from mono4d.pipeline import dag
    from mono4d.pipeline.config import Config, load_config
    from mono4d.stages import depth_backends

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    config = load_config("cpu")
    assert config.params["depth"].backend == "sfm" and config.params["depth"].auto_chosen
    assert "cameras" in dag.upstream("depth", config)

    def fail(model, hub_timeout=0):
        raise AssertionError("auto resolved again")

    monkeypatch.setattr(depth_backends, "transformers_model_availability", fail)
    again = Config.from_json(config.to_json())
    assert again.params["depth"] == config.params["depth"]


# ----------------------------------------------------------------------------------------------
# formats and parameters


def test_load_depth_of_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(InputError, match="depth stage output"):
        artifacts.read_depth(tmp_path)


@pytest.mark.parametrize("field, value", [("backend", "midas"), ("batch_size", 0), ("device", "gpu"),
                                          ("output_kind", "disparity"), ("file_scale", 0.0), ("file_kind", "mm"),
                                          ("sfm_window", 4), ("sfm_median", 7), ("sfm_num_planes", 2),
                                          ("sfm_fill_sigma", 0.0), ("sfm_min_support", 1.0),
                                          ("sfm_fuse_window", -1)])
def test_absurd_parameters_are_rejected(field, value):
    with pytest.raises(ParameterError):
        depth_stage.Params(**{field: value}).validate()


def test_file_backend_needs_a_path():
    with pytest.raises(ParameterError, match="file_path"):
        depth_stage.Params(backend="file").validate()
