"""Depth stage: the transformers backend with a tiny randomly initialised Depth Anything saved to
disk (no network), the file backend against ground truth, the weights-free sfm backend against
the synthetic scene's true depth, output formats and errors."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.errors import InputError, ModelUnavailableError, ParameterError
from data.images import read_rgb, write_gray
from stages import depth as depth_stage
from stages.depth_backends import depth_kind_from_config
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
    depth, kind = depth_stage.load_depth(tmp_path / "out")
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
    assert depth_stage.load_depth(tmp_path / "b")[1] == "relative_inverse"


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
    depth, kind = depth_stage.load_depth(tmp_path / "out")
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
    depth, _ = depth_stage.load_depth(tmp_path / "out")
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


def test_sfm_backend_is_accurate_on_static_pixels(synthetic_scene, synthetic_frames_dir, tmp_path):
    points = sample_static_points(synthetic_scene, per_frame=150, outlier_fraction=0.0)
    cameras = write_cameras_dir(tmp_path / "cameras", synthetic_scene, points)
    figures = _run(synthetic_frames_dir, tmp_path / "out", cameras=cameras, backend="sfm")
    depth, kind = depth_stage.load_depth(tmp_path / "out")
    assert kind == "sfm" and figures["kind"] == "sfm"
    assert depth.shape == synthetic_scene.depth.shape
    assert (depth > 0).all()
    assert abs_rel(depth, synthetic_scene.depth, synthetic_scene.masks == 0) < 0.04
    assert figures["stereo_fraction"] > 0.5


def test_sfm_backend_needs_cameras(synthetic_frames_dir, tmp_path):
    with pytest.raises(InputError, match="cameras"):
        _run(synthetic_frames_dir, tmp_path / "out", backend="sfm")


# ----------------------------------------------------------------------------------------------
# formats and parameters


def test_load_depth_of_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(InputError, match="depth stage output"):
        depth_stage.load_depth(tmp_path)


@pytest.mark.parametrize("field, value", [("backend", "midas"), ("batch_size", 0), ("device", "gpu"),
                                          ("output_kind", "disparity"), ("file_scale", 0.0), ("file_kind", "mm"),
                                          ("sfm_window", 4), ("sfm_median", 7), ("sfm_num_planes", 2)])
def test_absurd_parameters_are_rejected(field, value):
    with pytest.raises(ParameterError):
        depth_stage.Params(**{field: value}).validate()


def test_file_backend_needs_a_path():
    with pytest.raises(ParameterError, match="file_path"):
        depth_stage.Params(backend="file").validate()
