"""Masks stage: motion masks against the synthetic scene's ground truth, user mask files (folder and
one propagated first-frame mask), prompt parsing, flow-guided SAM re-prompting with a predictor
that answers from the ground truth, the SAM2 video backend end to end with a tiny random model,
and the errors users get for bad inputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data import artifacts, synthetic
from mono4d.data.errors import InputError, ModelUnavailableError, ParameterError
from mono4d.stages import flow as flow_stage
from mono4d.stages import frames as frames_stage
from mono4d.stages import masks, masks_refine, masks_sam
from tests.conftest import shared_path


def mean_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames of the IoU of two ``(T, H, W)`` boolean masks (empty/empty counts 1)."""
    scores = []
    for a, b in zip(predicted, truth):
        union = np.logical_or(a, b).sum()
        scores.append(np.logical_and(a, b).sum() / union if union else 1.0)
    return float(np.mean(scores))


def false_positive_share(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of the static pixels (``truth`` False) that ``predicted`` marks dynamic, over all frames."""
    return float((predicted & ~truth).sum() / (~truth).sum())


@pytest.fixture(scope="module")
def motion_run(synthetic_frames_dir, synthetic_flow_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("masks_motion")
    result = masks.run({"frames": synthetic_frames_dir, "flow": synthetic_flow_dir}, masks.Params(), out)
    return out, result


@pytest.fixture(scope="module")
def walker(tmp_path_factory) -> dict:
    """The walker preset (plain back wall, articulated walking figure) with its frames, flow
    and first-pass motion masks: ``scene``, ``frames``, ``flow``, ``masks`` folders."""
    root = tmp_path_factory.mktemp("walker")
    scene = synthetic.generate(root / "scene", preset="walker", seed=0)
    folders = {name: root / name for name in ("frames", "flow", "masks")}
    for folder in folders.values():
        folder.mkdir()
    frames_stage.run({"source": scene.root / "images"}, frames_stage.Params(), folders["frames"])
    flow_stage.run({"frames": folders["frames"]}, flow_stage.Params(), folders["flow"])
    masks.run({"frames": folders["frames"], "flow": folders["flow"]}, masks.Params(), folders["masks"])
    return {"scene": scene, **folders}


def ground_truth_geometry(scene, root: Path, depth_noise: float) -> tuple[Path, Path]:
    """A cameras stage folder with the scene's true cameras and an align stage folder with its
    true z-depth times ``1 + depth_noise * N(0, 1)`` per pixel (what a good aligned monocular
    depth gives)."""
    cameras_dir, align_dir = root / "cameras", root / "align"
    cameras_dir.mkdir()
    (align_dir / "depth").mkdir(parents=True)
    artifacts.write_cameras(cameras_dir, np.repeat(scene.K[None], scene.num_frames, axis=0), scene.w2c,
                            np.ones(scene.num_frames, bool), [f"images/{t:06d}.png" for t in range(scene.num_frames)],
                            scene.width, scene.height, units="metric")
    rng = np.random.default_rng(0)
    for t, depth in enumerate(scene.depth):
        noisy = depth * (1.0 + depth_noise * rng.standard_normal(depth.shape))
        np.save(align_dir / "depth" / f"{t:06d}.npy", noisy.astype(np.float32))
    return cameras_dir, align_dir


# ---------------------------------------------------------------------------------------------
# motion backend


def test_motion_masks_match_ground_truth(motion_run, synthetic_scene):
    out, result = motion_run
    predicted = artifacts.read_masks(out)
    truth = synthetic_scene.masks > 0
    assert predicted.shape == truth.shape and predicted.dtype == np.uint8
    assert set(np.unique(predicted)) <= {0, 1}
    # measured (benchmarks/masks_accuracy.py): IoU 0.699, 0.95 % of the static pixels marked dynamic
    iou = mean_iou(predicted > 0, truth)
    assert iou >= 0.66, f"motion masks IoU {iou:.3f} with the ground-truth dynamic masks"
    false_positives = false_positive_share(predicted > 0, truth)
    assert false_positives < 0.0125, f"{false_positives:.2%} of the static pixels marked dynamic"
    assert result["backend"] == "motion" and result["num_frames"] == synthetic_scene.num_frames
    assert result["dynamic_fraction_mean"] == pytest.approx(float((predicted > 0).mean()), abs=1e-5)
    assert abs(result["dynamic_fraction_mean"] - truth.mean()) < 0.05


def test_motion_outputs_and_loaders(motion_run, synthetic_scene):
    out, _ = motion_run
    assert artifacts.read_labels(out) == {0: "background", 1: "dynamic"}
    assert json.loads((out / "labels.json").read_text())["backend"] == "motion"
    vis = sorted((out / "vis").glob("*.png"))
    assert len(vis) == synthetic_scene.num_frames
    overlay = cv2.imread(str(vis[0]))
    assert overlay.shape == (synthetic_scene.height, synthetic_scene.width, 3)
    assert not (out / "manifest.json").exists()


def test_motion_cues_are_written(motion_run, synthetic_scene):
    out, result = motion_run
    for kind in ("score", "confidence"):
        cues = sorted((out / "vis" / "cues").glob(f"{kind}_*.png"))
        assert len(cues) == synthetic_scene.num_frames
        assert cv2.imread(str(cues[0])).shape == (synthetic_scene.height, synthetic_scene.width, 3)
    assert 0 < result["seed_fraction_mean"] < result["dynamic_fraction_mean"]


def test_motion_first_pass_leaves_a_plain_wall_static(walker):
    """The walker's back wall is one flat colour: optical flow there is interpolated noise and
    must not be called dynamic (the old backend marked 4.9 % of the static pixels, blobs on the
    wall in every frame). The figure walks nearly along the epipolar lines of the camera's
    motion, so the first pass finds only part of it; the refined pass finds the rest. The IoU
    moves with the pairs' random fit samples: measured over five sample seeds (each pair's seed
    prefixed by 0..4), IoU min 0.629 / mean 0.656 / max 0.679, 0.13-0.14 % of the static pixels
    (one draw gave 0.584 when regions were cut at 40 % of their peak score, which dropped the
    slower limbs). The bar sits 0.03 below the worst seed."""
    predicted = artifacts.read_masks(walker["masks"]) > 0
    truth = walker["scene"].masks > 0
    false_positives = false_positive_share(predicted, truth)
    assert false_positives < 0.004, f"{false_positives:.2%} of the static pixels marked dynamic"
    iou = mean_iou(predicted, truth)
    assert iou >= 0.6, f"first-pass IoU {iou:.3f} on the walker"


def test_texture_confidence_tells_flat_from_textured():
    rng = np.random.default_rng(0)
    image = np.full((60, 80), 128.0, np.float32)
    image[:, 40:] = rng.uniform(0, 255, (60, 40))
    confidence = masks.texture_confidence(image, 2)
    assert confidence.shape == image.shape and confidence.dtype == np.float32
    assert confidence[:, :30].max() < 0.01  # flat, and not lifted by the textured neighbour
    assert confidence[:, 50:].min() > 0.8


def test_snap_boundary_pulls_a_bleeding_mask_onto_the_object():
    rng = np.random.default_rng(1)
    colours = np.full((80, 100, 3), 200.0, np.float32)  # a plain wall
    colours[20:60, 30:70] = rng.uniform(0, 120, (40, 40, 3))  # a dark textured object
    truth = np.zeros((80, 100), bool)
    truth[20:60, 30:70] = True
    bleeding = cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0  # 4 px halo
    snapped = masks.snap_boundary(bleeding, colours, 6)
    assert mean_iou(snapped[None], truth[None]) > 0.95 > mean_iou(bleeding[None], truth[None])


def test_motion_needs_flow(synthetic_frames_dir, tmp_path):
    with pytest.raises(InputError, match="flow"):
        masks.run({"frames": synthetic_frames_dir}, masks.Params(), tmp_path)


@pytest.mark.parametrize("stage", ["masks", "masks_refine"])
def test_masks_do_not_depend_on_the_worker_count(stage, synthetic_scene, synthetic_frames_dir, synthetic_flow_dir,
                                                motion_run, monkeypatch, tmp_path):
    """Pairs and frames run on a thread pool whose results are gathered in a fixed order, and
    each pair's random fit sample is seeded by the pair: one worker and two write the same masks
    and cue pictures, byte for byte."""
    module = masks if stage == "masks" else masks_refine
    inputs = {"frames": synthetic_frames_dir, "flow": synthetic_flow_dir}
    if stage == "masks_refine":
        cameras_dir, align_dir = ground_truth_geometry(synthetic_scene, tmp_path, depth_noise=0.02)
        inputs.update(masks=motion_run[0], cameras=cameras_dir, align=align_dir)
    outputs = []
    for workers in (1, 2):
        monkeypatch.setattr(module, "worker_count", lambda: workers)
        out = tmp_path / f"workers{workers}"
        out.mkdir()
        module.run(inputs, module.Params(), out)
        outputs.append(out)
    one, two = (artifacts.read_masks(out) for out in outputs)
    assert one.any() and not one.all()
    np.testing.assert_array_equal(one, two)
    cues = sorted(path.name for path in (outputs[0] / "vis" / "cues").glob("*.png"))
    assert len(cues) == 2 * synthetic_scene.num_frames
    for name in cues:
        assert (outputs[0] / "vis" / "cues" / name).read_bytes() == (outputs[1] / "vis" / "cues" / name).read_bytes(), name


def test_sampson_distance_of_a_known_geometry():
    # Pure sideways translation: epipolar lines are the rows, so only vertical motion counts.
    fundamental = np.array([[0, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64)
    points = np.array([[10.0, 20.0], [30.0, 40.0]], np.float32)
    moved = points + np.array([[5.0, 0.0], [5.0, 2.0]], np.float32)
    distance = masks.sampson_distance(fundamental, points, moved)
    assert distance[0] == pytest.approx(0.0, abs=1e-6)
    assert distance[1] == pytest.approx(2.0 / np.sqrt(2.0), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# refined masks (second pass, after cameras and align)


def test_camera_flow_is_the_static_scene_flow(synthetic_scene):
    scene = synthetic_scene
    static = (scene.masks[0] == 0) & (scene.masks[1] == 0) & ~scene.flow_occluded[0]
    flow, defined = masks_refine.camera_flow(scene.depth[0], scene.K, scene.w2c[0], scene.K, scene.w2c[1])
    assert defined.all()
    error = np.linalg.norm(flow - scene.flow[0], axis=-1)
    assert np.percentile(error[static], 99) < 0.01
    assert np.median(error[scene.masks[0] > 0]) > 0.5  # the moving objects do not follow it


# measured (benchmarks/masks_accuracy.py): CI scene IoU 0.898, 1.48 % false positives; walker 0.826, 0.23 %.
# Over five fit-sample seeds of the first pass (each pair's seed prefixed by 0..4) on the CI scene: refined IoU
# min 0.886 / mean 0.895 / max 0.900, 1.44-1.70 % false positives; first pass 0.696 / 0.742 / 0.796, so the
# refined pass gains 0.090 (worst seed) to 0.203: ``min_gain`` is the worst gain less a margin (the walker's
# gain was not measured over seeds and keeps its bar).
@pytest.mark.parametrize("scene_name, min_iou, max_false_positives, min_gain",
                         [("ci", 0.86, 0.02, 0.05), ("walker", 0.8, 0.008, 0.1)])
def test_refined_masks_match_ground_truth(scene_name, min_iou, max_false_positives, min_gain, synthetic_scene,
                                          synthetic_frames_dir, synthetic_flow_dir, motion_run, walker, tmp_path):
    if scene_name == "ci":
        scene, frames_dir, flow_dir, first_dir = synthetic_scene, synthetic_frames_dir, synthetic_flow_dir, motion_run[0]
    else:
        scene, frames_dir, flow_dir, first_dir = walker["scene"], walker["frames"], walker["flow"], walker["masks"]
    cameras_dir, align_dir = ground_truth_geometry(scene, tmp_path, depth_noise=0.02)
    out = tmp_path / "refined"
    out.mkdir()
    result = masks_refine.run({"frames": frames_dir, "flow": flow_dir, "masks": first_dir, "cameras": cameras_dir,
                               "align": align_dir}, masks_refine.Params(), out)
    predicted = artifacts.read_masks(out) > 0
    truth = scene.masks > 0
    first_iou = mean_iou(artifacts.read_masks(first_dir) > 0, truth)
    iou, false_positives = mean_iou(predicted, truth), false_positive_share(predicted, truth)
    assert iou >= min_iou and iou > first_iou + min_gain, \
        f"{scene_name}: refined IoU {iou:.3f} (first pass {first_iou:.3f})"
    assert false_positives < max_false_positives, \
        f"{scene_name}: {false_positives:.2%} of the static pixels marked dynamic"
    assert artifacts.read_labels(out) == {0: "background", 1: "dynamic"}
    assert result["backend"] == "residual" and result["residual_defined_fraction"] > 0.9
    assert result["added_fraction"] > 0
    assert len(list((out / "vis" / "cues").glob("score_*.png"))) == scene.num_frames


def test_refine_passes_given_masks_through(synthetic_scene, synthetic_frames_dir, synthetic_flow_dir, tmp_path):
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    (tmp_path / "given").mkdir()
    for t, truth in enumerate(synthetic_scene.masks):
        cv2.imwrite(str(tmp_path / "given" / f"{t:06d}.png"), truth)
    masks.run({"frames": synthetic_frames_dir}, masks.Params(backend="file", mask_path=str(tmp_path / "given")),
              first_dir)
    cameras_dir, align_dir = ground_truth_geometry(synthetic_scene, tmp_path, depth_noise=0.0)
    out = tmp_path / "refined"
    out.mkdir()
    result = masks_refine.run({"frames": synthetic_frames_dir, "flow": synthetic_flow_dir, "masks": first_dir,
                               "cameras": cameras_dir, "align": align_dir}, masks_refine.Params(), out)
    np.testing.assert_array_equal(artifacts.read_masks(out), synthetic_scene.masks)
    assert artifacts.read_labels(out) == {0: "background", 1: "object1", 2: "object2"}
    assert "unchanged" in result["notes"][0]


def test_refine_bad_inputs(synthetic_frames_dir, synthetic_flow_dir, tmp_path):
    with pytest.raises(InputError, match="cameras"):
        masks_refine.run({"frames": synthetic_frames_dir, "flow": synthetic_flow_dir, "masks": tmp_path,
                          "align": tmp_path}, masks_refine.Params(), tmp_path)
    for bad in (dict(threshold=0.0), dict(max_pair_offset=0), dict(temporal_window=4), dict(min_area_fraction=0.6),
                dict(dilate_px=-1), dict(work_max_side=20)):
        with pytest.raises(ParameterError) as error:
            masks_refine.Params(**bad).validate()
        assert error.value.hint


# ---------------------------------------------------------------------------------------------
# file backend


def test_file_backend_folder_of_masks(synthetic_scene, synthetic_frames_dir, tmp_path):
    binary_dir, label_dir = tmp_path / "binary", tmp_path / "labels"
    binary_dir.mkdir()
    label_dir.mkdir()
    for t, truth in enumerate(synthetic_scene.masks):
        # other names (matched by sorted order) and twice the size (resized with nearest)
        big = cv2.resize(truth, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(binary_dir / f"mask_{t:04d}.png"), ((big > 0) * 255).astype(np.uint8))
        cv2.imwrite(str(label_dir / f"{t:06d}.png"), truth)
    out = tmp_path / "out_binary"
    out.mkdir()
    result = masks.run({"frames": synthetic_frames_dir}, masks.Params(backend="file", mask_path=str(binary_dir)), out)
    np.testing.assert_array_equal(artifacts.read_masks(out), (synthetic_scene.masks > 0).astype(np.uint8))
    assert artifacts.read_labels(out) == {0: "background", 1: "object"}
    assert result["fraction_object"] == pytest.approx(float((synthetic_scene.masks > 0).mean()), abs=1e-5)

    out = tmp_path / "out_labels"
    out.mkdir()
    masks.run({"frames": synthetic_frames_dir}, masks.Params(backend="file", mask_path=str(label_dir)), out)
    np.testing.assert_array_equal(artifacts.read_masks(out), synthetic_scene.masks)
    assert artifacts.read_labels(out) == {0: "background", 1: "object1", 2: "object2"}


def test_file_backend_single_first_frame_mask(synthetic_scene, synthetic_frames_dir, synthetic_flow_dir, tmp_path):
    first = tmp_path / "first.png"
    cv2.imwrite(str(first), ((synthetic_scene.masks[0] > 0) * 255).astype(np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    masks.run({"frames": synthetic_frames_dir, "flow": synthetic_flow_dir},
              masks.Params(backend="file", mask_path=str(first)), out)
    predicted = artifacts.read_masks(out) > 0
    truth = synthetic_scene.masks > 0
    np.testing.assert_array_equal(predicted[0], truth[0])
    # Flow propagation drifts (and cannot see newly revealed sides of the tumbling cube).
    assert mean_iou(predicted[:6], truth[:6]) >= 0.8
    assert mean_iou(predicted, truth) >= 0.6


def test_file_backend_bad_inputs(synthetic_scene, synthetic_frames_dir, synthetic_flow_dir, tmp_path):
    inputs = {"frames": synthetic_frames_dir, "flow": synthetic_flow_dir}
    with pytest.raises(InputError, match="does not exist"):
        masks.run(inputs, masks.Params(backend="file", mask_path=str(tmp_path / "missing")), tmp_path)
    few = tmp_path / "few"
    few.mkdir()
    for t in range(5):
        cv2.imwrite(str(few / f"m{t}.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="5 image"):
        masks.run(inputs, masks.Params(backend="file", mask_path=str(few)), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        masks.run(inputs, masks.Params(backend="file", mask_path=str(empty)), tmp_path)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((synthetic_scene.height, synthetic_scene.width), np.uint8))
    with pytest.raises(InputError, match="marks nothing"):
        masks.run(inputs, masks.Params(backend="file", mask_path=str(blank)), tmp_path)
    first = tmp_path / "first.png"
    cv2.imwrite(str(first), ((synthetic_scene.masks[0] > 0) * 255).astype(np.uint8))
    with pytest.raises(InputError, match="flow"):
        masks.run({"frames": synthetic_frames_dir}, masks.Params(backend="file", mask_path=str(first)), tmp_path)


def test_colour_masks_keep_their_ids_across_frames(tmp_path):
    red, green = (0, 0, 255), (0, 255, 0)  # BGR
    first, second = np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)
    first[0, 0], first[3, 5] = red, green
    second[0, 0], second[3, 5] = green, red  # green now appears first
    cv2.imwrite(str(tmp_path / "a.png"), first)
    cv2.imwrite(str(tmp_path / "b.png"), second)
    palette: dict = {}
    labels_a = masks.read_user_mask(tmp_path / "a.png", palette)
    labels_b = masks.read_user_mask(tmp_path / "b.png", palette)
    assert labels_a[0, 0] == labels_b[3, 5] == 1 and labels_a[3, 5] == labels_b[0, 0] == 2
    assert labels_a.sum() == 3 and labels_a.dtype == np.uint8


def test_mask_files_matched_through_source_indices(tmp_path):
    files = [tmp_path / f"{index:05d}.png" for index in range(10)]
    meta = {"num_frames": 3, "files": ["images/000000.png", "images/000001.png", "images/000002.png"],
            "source_indices": [0, 4, 8]}
    assert masks.match_mask_files(files, meta) == [files[0], files[4], files[8]]
    meta["source_indices"] = [0, 4, 12]
    with pytest.raises(InputError):
        masks.match_mask_files(files, meta)


def test_params_validation():
    masks.Params().validate()
    for bad in (dict(backend="magic"), dict(threshold=0.0), dict(temporal_window=2), dict(min_area_fraction=0.7),
                dict(backend="file"), dict(backend="sam", prompts="0:1,1"), dict(backend="sam2"),
                dict(backend="sam", prompts="0:1,1", sam_checkpoint="x.pth", sam_model_type="vit_q"),
                dict(device="tpu"), dict(work_max_side=10), dict(max_pair_offset=0)):
        with pytest.raises(ParameterError) as error:
            masks.Params(**bad).validate()
        assert error.value.hint
    assert masks.Params(backend="motion").needs_flow()
    assert masks.Params(backend="file", mask_path="first.png").needs_flow()
    assert not masks.Params(backend="file", mask_path="/some/folder").needs_flow()
    assert not masks.Params(backend="sam2", prompts="0:1,1").needs_flow()


# ---------------------------------------------------------------------------------------------
# prompts


def test_prompt_string_parsing():
    prompts = masks_sam.parse_prompt_string(
        "0:100,50,hand; 0:neg:10,12,hand; 0:box:5,6,70,80,cup ;4:30.5,40;7:box:1,2,3,4,3")
    by_key = {(prompt.frame, prompt.label): prompt for prompt in prompts}
    assert masks_sam.label_names(prompts) == {2: "hand", 4: "cup", 1: "object", 3: "object3"}
    hand = by_key[(0, 2)]
    assert hand.points == [(100.0, 50.0)] and hand.negative_points == [(10.0, 12.0)] and hand.box is None
    coords, labels = hand.point_arrays()
    np.testing.assert_array_equal(labels, [1, 0])
    assert coords.shape == (2, 2)
    assert by_key[(0, 4)].box == (5.0, 6.0, 70.0, 80.0)
    assert by_key[(4, 1)].points == [(30.5, 40.0)]
    assert by_key[(7, 3)].box == (1.0, 2.0, 3.0, 4.0)


def test_unlabelled_prompts_are_object():
    prompts = masks_sam.parse_prompt_string("0:10,10;3:20,20,object;0:30,30,hand")
    assert masks_sam.label_names(prompts) == {1: "object", 2: "hand"}
    assert sorted((prompt.frame, prompt.label) for prompt in prompts) == [(0, 1), (0, 2), (3, 1)]


@pytest.mark.parametrize("text", ["", "0:1", "x:1,2", "0:1,2,3,4", "0:foo:1,2", "0:box:5,5,1,1", "0:1,b",
                                  "0:neg:1,2", "0:1,2,0", "0:box:1,2,3,4;0:box:1,2,3,4", "0:1,2,300", "1:2:3:4"])
def test_bad_prompt_strings(text):
    with pytest.raises(ParameterError) as error:
        masks_sam.parse_prompt_string(text)
    assert "FRAME" in error.value.hint or "label" in error.value.hint.lower() or "positive" in error.value.hint


def test_prompt_file_and_range_checks(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": [
        {"frame": 0, "name": "hand", "points": [[10, 20]], "box": [0, 0, 50, 60]},
        {"frame": 0, "label": 1, "name": "teddy", "points": [[30, 30]], "negative_points": [[5, 5]]},
        {"frame": 3, "name": "hand", "points": [[12, 22]]}]}))
    prompts = masks_sam.load_prompts(str(path))
    assert masks_sam.label_names(prompts) == {2: "hand", 1: "teddy"}
    assert len(prompts) == 3
    masks_sam.check_prompts(prompts, num_frames=4, height=64, width=64)
    with pytest.raises(ParameterError, match="beyond the last frame"):
        masks_sam.check_prompts(prompts, num_frames=3, height=64, width=64)
    with pytest.raises(ParameterError, match="outside"):
        masks_sam.check_prompts(prompts, num_frames=4, height=40, width=40)
    with pytest.raises(InputError):
        masks_sam.load_prompts(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"frame": -1, "points": [[1, 1]]}]))
    with pytest.raises(ParameterError):
        masks_sam.load_prompts(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------
# sam: flow-guided propagation with a predictor answering from the ground truth


class GroundTruthPredictor:
    """Plays SAM on the synthetic scene: returns the ground-truth object under the positive
    points (the one most of them hit), clipped to the box; without such a point, the object
    covering most of the box; otherwise nothing. Counts its calls."""

    def __init__(self, scene) -> None:
        self.labels = scene.masks
        self.index = {frame.tobytes(): t for t, frame in enumerate(scene.images)}
        self.calls = 0

    def __call__(self, frame, points, point_labels, box):
        self.calls += 1
        truth = self.labels[self.index[frame.tobytes()]]
        height, width = truth.shape
        inside_box = np.ones_like(truth, bool)
        if box is not None:
            x0, y0, x1, y1 = np.round(box).astype(int)
            inside_box = np.zeros_like(truth, bool)
            inside_box[max(y0, 0):y1, max(x0, 0):x1] = True
        hits = [truth[int(y), int(x)] for (x, y), label in zip(points, point_labels)
                if label == 1 and 0 <= x < width and 0 <= y < height]
        hits = [hit for hit in hits if hit > 0]
        if hits:
            target = np.bincount(hits).argmax()
        else:
            counts = np.bincount(truth[inside_box].ravel(), minlength=256)
            counts[0] = 0
            if counts.max() == 0:
                return np.zeros_like(truth, bool)
            target = counts.argmax()
        return (truth == target) & inside_box


def _inner_point_of(mask: np.ndarray) -> str:
    x, y = masks_sam.inner_point(mask)
    return f"{x:g},{y:g}"


def test_sam_propagation_with_ground_truth_predictor(synthetic_scene):
    truth = synthetic_scene.masks
    images = synthetic_scene.images
    middle = len(truth) // 2
    # the cube prompted by a point on the first frame, the blob by a box on the middle frame
    rows, cols = np.nonzero(truth[middle] == 2)
    prompts = masks_sam.parse_prompt_string(
        f"0:{_inner_point_of(truth[0] == 1)},cube;"
        f"{middle}:box:{cols.min() - 2},{rows.min() - 2},{cols.max() + 3},{rows.max() + 3},blob")
    predictor = GroundTruthPredictor(synthetic_scene)
    flow = masks_sam.DisFlowSource(lambda t: images[t])
    predicted, replaced = masks_sam.propagate_prompts(len(images), lambda t: images[t], prompts, predictor, flow)
    assert predicted.shape == truth.shape and predicted.dtype == np.uint8
    assert masks_sam.label_names(prompts) == {1: "cube", 2: "blob"}
    assert predictor.calls == 2 * len(images)  # every label predicted once on every frame
    assert replaced == 0
    for label in (1, 2):
        iou = mean_iou(predicted == label, truth == label)
        assert iou >= 0.95, f"label {label}: IoU {iou:.3f}"


def test_sam_propagation_falls_back_to_warped_mask():
    frames = np.zeros((4, 40, 50, 3), np.uint8)
    square = np.zeros((40, 50), bool)
    square[10:20, 10:20] = True

    def predict(frame, points, point_labels, box):
        return square.copy() if box is None else np.zeros_like(square)  # loses it after the key frame

    def still(a, b):
        return np.zeros((40, 50, 2), np.float32)

    prompts = masks_sam.parse_prompt_string("0:15,15")
    predicted, replaced = masks_sam.propagate_prompts(4, lambda t: frames[t], prompts, predict, still)
    assert replaced == 3
    for t in range(4):
        np.testing.assert_array_equal(predicted[t] == 1, square)


def test_sam_backend_reports_missing_package(monkeypatch, synthetic_frames_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # makes the import fail
    with pytest.raises(ModelUnavailableError) as error:
        masks_sam.SamPointPredictor(str(tmp_path / "sam_vit_b.pth"), "vit_b", "cpu")
    assert "segment-anything" in str(error.value)
    assert "masks.backend=motion" in error.value.hint and "torchvision" in error.value.hint
    params = masks.Params(backend="sam", prompts="0:10,10", sam_checkpoint=str(tmp_path / "sam_vit_b.pth"))
    with pytest.raises(ModelUnavailableError):
        masks.run({"frames": synthetic_frames_dir}, params, tmp_path)


# ---------------------------------------------------------------------------------------------
# sam2: the transformers video model, tiny and randomly initialised


def _tiny_sam2(folder: Path) -> Path:
    import torch
    from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VideoModel, Sam2VisionConfig
    from transformers.models.sam2_video.configuration_sam2_video import (Sam2VideoMaskDecoderConfig,
                                                                         Sam2VideoPromptEncoderConfig)

    torch.manual_seed(0)
    backbone = Sam2HieraDetConfig(hidden_size=12, image_size=128, blocks_per_stage=[1, 1, 1, 1],
                                  embed_dim_per_stage=[12, 24, 48, 96], num_attention_heads_per_stage=[1, 1, 1, 1])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[96, 48, 24, 12],
                              backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128)
    config = Sam2VideoConfig(
        vision_config=vision, image_size=128,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(image_size=128, patch_size=16, hidden_size=128,
                                                           mask_input_channels=8),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(hidden_size=128, mlp_dim=64, num_attention_heads=4,
                                                       iou_head_hidden_dim=32),
        memory_attention_hidden_size=128, memory_encoder_hidden_size=128, mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32, memory_attention_rope_feat_sizes=[8, 8])
    Sam2VideoModel(config).save_pretrained(folder)
    return folder


def test_sam2_backend_end_to_end_with_tiny_model(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    for t in range(5):
        frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(source / f"{t:03d}.png"), frame)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    frames_stage.run({"source": source}, frames_stage.Params(), frames_dir)
    model = _tiny_sam2(tmp_path / "tiny_sam2")
    out = tmp_path / "out"
    out.mkdir()
    params = masks.Params(backend="sam2", sam2_model=str(model), device="cpu", min_area_fraction=0.0,
                          prompts="2:20,20,hand;2:neg:40,30,hand;2:box:30,10,60,40,object")
    result = masks.run({"frames": frames_dir}, params, out)
    predicted = artifacts.read_masks(out)
    assert predicted.shape == (5, 48, 64) and predicted.dtype == np.uint8
    assert set(np.unique(predicted)) <= {0, 1, 2}
    assert artifacts.read_labels(out) == {0: "background", 1: "hand", 2: "object"}
    assert result["backend"] == "sam2" and result["num_frames"] == 5
    assert {"fraction_hand", "fraction_object", "dynamic_fraction_mean"} <= set(result)
    assert len(list((out / "vis").glob("*.png"))) == 5


def test_sam2_backend_without_weights(tmp_path):
    with pytest.raises(ModelUnavailableError) as error:
        masks_sam.load_sam2_video_model(str(tmp_path / "no_such_model"), "cpu")
    assert "masks.backend=motion" in error.value.hint


# ---------------------------------------------------------------------------------------------
# real data


@pytest.mark.slow
def test_apple_first_frame_mask_and_static_scene(tmp_path):
    """apple.mp4: the camera moves around a still apple. The user's first-frame mask follows the
    apple through 20 frames, and the motion backend finds (almost) nothing moving."""
    video = shared_path("videos/apple.mp4")
    mask = shared_path("videos/apple_mask.png")
    frames_dir, flow_dir, out = tmp_path / "frames", tmp_path / "flow", tmp_path / "masks"
    for folder in (frames_dir, flow_dir, out):
        folder.mkdir()
    frames_stage.run({"source": video}, frames_stage.Params(end=1.9), frames_dir)
    assert frames_stage.read_frames_meta(frames_dir)["num_frames"] == 20
    flow_stage.run({"frames": frames_dir}, flow_stage.Params(), flow_dir)
    masks.run({"frames": frames_dir, "flow": flow_dir}, masks.Params(backend="file", mask_path=str(mask)), out)
    predicted = artifacts.read_masks(out) > 0
    meta = frames_stage.read_frames_meta(frames_dir)
    soft = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)  # anti-aliased 0..254: foreground from half the maximum
    first = cv2.resize(soft, (meta["width"], meta["height"]), interpolation=cv2.INTER_NEAREST) >= soft.max() / 2
    np.testing.assert_array_equal(predicted[0], first)
    areas = predicted.reshape(len(predicted), -1).sum(axis=1)
    assert np.all(areas > 0.5 * areas[0]) and np.all(areas < 1.5 * areas[0])
    assert len(list((out / "vis").glob("*.png"))) == 20

    motion_out = tmp_path / "motion"
    motion_out.mkdir()
    result = masks.run({"frames": frames_dir, "flow": flow_dir}, masks.Params(), motion_out)
    assert result["dynamic_fraction_mean"] < 0.02


def test_report_masks_page_shows_the_cues_next_to_each_overlay(motion_run, tmp_path):
    import shutil

    from mono4d.pipeline.report import Run, StagePage, masks_views
    from mono4d.pipeline.workspace import Workspace

    out, _ = motion_run
    work = tmp_path / "work"
    shutil.copytree(out, work / "masks")
    page = StagePage(Run("a", "run", Workspace(work), {}, {}), "masks", tmp_path / "report")
    (view,) = masks_views(page)
    images = [path.name for path in page.shown]
    for name in ("000000", "000023"):
        assert {f"{name}.png", f"score_{name}.png", f"confidence_{name}.png"} <= set(images)
    assert "motion score" in view.body and "flow confidence" in view.body


def test_refined_masks_sit_between_align_and_the_optimizer(tmp_path):
    """DAG order: masks -> cameras (SIFT masking) -> depth -> align -> masks_refine -> init/train,
    which read the refined masks as their ``inputs["masks"]``."""
    from mono4d.pipeline import dag
    from mono4d.pipeline.config import load_config
    from mono4d.pipeline.state import RunState
    from mono4d.pipeline.workspace import Workspace

    config = load_config("cpu")
    assert dag.upstream("masks_refine", config) == ["frames", "flow", "masks", "cameras", "align"]
    assert "masks" in dag.upstream("cameras", config) and "masks_refine" not in dag.closure("tracks", config)
    order = dag.closure("train", config)
    assert order.index("align") < order.index("masks_refine") < order.index("init")
    state = RunState(Workspace(tmp_path), {"config": config.to_json(), "input": str(tmp_path / "video.mp4")})
    for stage in ("init", "train"):
        inputs = state.stage_inputs(stage)
        assert inputs["masks"] == Workspace(tmp_path).stage_dir("masks_refine") and "masks_refine" not in inputs
    assert state.stage_inputs("align")["masks"] == Workspace(tmp_path).stage_dir("masks")
