"""Scene layers (models/layers.py, stages/train_layers.py, pipeline/edit.py): mask labels carried
by the Gaussians from init through densification, per-layer renders, exports, the viewer's
toggles and edits.

The trained fixture is the CI synthetic scene with its ground truth in the stage formats (cameras,
depth as aligned depth, 3D flow pairs; tests/test_init.py), its ground-truth masks given to the
masks stage's ``file`` backend (so the test measures layering, not mask quality), the cube
(label 1) an object and the blob (label 2) named "hand" through ``init.label_names``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from mono4d.data.errors import InputError, ParameterError

#: A small init and a short training at half resolution (96 x 72) with the label loss, the static
#: layer's own terms and densification on (capped, to stay fast).
LAYER_INIT = dict(max_static=5000, max_dynamic=2500, fit_iterations=150, fit_batch=2048, sh_degree=1,
                  label_names="2:hand")
LAYER_TRAIN = dict(iterations=80, downscale=2, label_weight=0.5, static_layer_weight=1.0, max_gaussians=10000,
                   eval_fraction=0.0, export_ply=False, make_videos=True)
HELD_OUT = (4, 12, 20)
#: Least mean gain (dB) of the static layer alone over the full render against the ground-truth
#: static background on the objects' pixels of the held-out frames (about half the measured gain).
STATIC_GAIN_DB = 2.0

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def toy_model(labels: list[int], names: dict[int, str] | None = None):
    """A SceneModel of ``len(labels)`` Gaussians (0.2 wide) in a row at z = 2 (x = -1 .. 1), with these
    labels, an identity deformation and meta ``labels`` names."""
    import torch

    from mono4d.models.deformation import DeformationConfig, DeformationField
    from mono4d.models.gaussians import SceneModel, create_params

    count = len(labels)
    means = torch.stack([torch.linspace(-1, 1, count), torch.zeros(count), torch.full((count,), 2.0)], dim=1)
    label_tensor = torch.as_tensor(labels)
    params, variables = create_params(means, torch.full((count, 3), 0.5), torch.full((count, 3), 0.2),
                                      label_tensor > 0, 0, 0.9, label_tensor)
    field = DeformationField(DeformationConfig(num_layers=3, hidden=8, position_frequencies=1, time_frequencies=1))
    meta = {"labels": {str(k): v for k, v in (names or {}).items()}, "num_frames": 2, "width": 32, "height": 32}
    return SceneModel(params, variables, field, meta)


# ----------------------------------------------------------------------------------------------
# Labels, layers and edits on small models


def test_layer_names_and_selectors():
    from mono4d.models.layers import is_hand_name, layer_name, model_layers, parse_label_names, resolve_layer

    assert is_hand_name("hand") and is_hand_name("Left_Hand") and is_hand_name("hands 2")
    assert not is_hand_name("handle") and not is_hand_name("cube")
    assert [layer_name(0, "background"), layer_name(1, "cube"), layer_name(3, "right hand")] == \
        ["static", "object_1", "hand"]
    assert parse_label_names(" 1:bear, 2:hand ") == {1: "bear", 2: "hand"} and parse_label_names("") == {}
    for bad in ("2", "x:hand", "0:static", "300:big", "1:"):
        with pytest.raises(ParameterError):
            parse_label_names(bad)
    model = toy_model([0, 0, 1, 2, 3], {0: "background", 1: "cube", 2: "left hand", 3: "right hand"})
    assert model_layers(model) == {"static": [0], "object_1": [1], "hand": [2, 3]}
    assert resolve_layer(model, "hand") == ("hand", [2, 3]) and resolve_layer(model, "cube") == ("object_1", [1])
    assert resolve_layer(model, "3") == ("label_3", [3]) and resolve_layer(model, "right hand") == ("label_3", [3])
    with pytest.raises(ParameterError, match="object_1"):
        resolve_layer(model, "bear")
    # a model written before labels: its dynamic Gaussians read as label 1
    del model.variables["label"]
    model.meta = {}
    assert model_layers(model) == {"static": [0], "object_1": [1]}


def test_labels_follow_gsplat_duplicate_split_and_prune():
    """gsplat's densification operations carry every per-Gaussian tensor of the state dict: the
    label tensor follows its Gaussians exactly as is_dynamic does."""
    import torch
    from gsplat.strategy.ops import duplicate, remove, split

    model = toy_model([0, 1, 2, 0, 2, 1])
    optimizers = {name: torch.optim.Adam([value], lr=1e-3) for name, value in model.params.items()}
    state = dict(model.variables)
    means = model.params["means"]
    before = {tuple(np.round(row, 5)): int(label) for row, label in
              zip(means.detach().numpy(), state["label"].numpy())}
    duplicate(model.params, optimizers, state, torch.tensor([False, True, True, False, False, False]))
    assert state["label"].tolist() == [0, 1, 2, 0, 2, 1, 1, 2]
    split(model.params, optimizers, state, torch.tensor([False, False, False, False, True, False, False, True]))
    assert state["label"].tolist() == [0, 1, 2, 0, 1, 1, 2, 2, 2, 2]
    remove(model.params, optimizers, state, torch.tensor([True] + [False] * 8 + [True]))
    assert state["label"].tolist() == [1, 2, 0, 1, 1, 2, 2, 2]
    assert torch.equal(state["is_dynamic"], state["label"] > 0)
    # duplicated Gaussians sit where their originals were and keep their labels
    for row, label in zip(model.params["means"].detach().numpy()[:4], state["label"][:4].numpy()):
        assert before[tuple(np.round(row, 5))] == label


def test_label_map_composites_one_hot_labels_and_its_loss():
    import torch

    from mono4d.models.gaussians import gaussians_at
    from mono4d.models.layers import class_index_map, label_classes, label_loss, one_hot_labels, render_label_map

    model = toy_model([0, 1, 2])
    K = torch.tensor([[16.0, 0, 16], [0, 16.0, 16], [0, 0, 1]])
    w2c = torch.eye(4)
    gaussians = gaussians_at(model.params, model.variables, model.field, 0.0)
    classes = label_classes(model)
    assert classes == [0, 1, 2]
    label_map = render_label_map(gaussians, one_hot_labels(model.variables["label"], classes), K, w2c, 32, 32,
                                 backend="torch")
    assert label_map.shape == (32, 32, 3)
    # pixel centres over Gaussians 0, 1, 2 (x = -1, 0, 1 at z = 2 -> columns 8, 16, 24)
    for column, label in ((8, 0), (16, 1), (24, 2)):
        weights = label_map[16, column].detach()
        assert int(weights.argmax()) == label and float(weights[label]) > 0.7
    assert float(label_map[2, 2].detach().sum()) < 1e-3  # nothing there
    # the loss: 0 for a perfect one-hot map, 1 for the wrong label everywhere, -1 pixels left out
    masks = torch.tensor([[0, 1], [2, 7]], dtype=torch.uint8)
    perfect = torch.nn.functional.one_hot(torch.tensor([[0, 1], [2, 0]]), 3).float()
    indices = class_index_map(masks, classes)
    assert indices.tolist() == [[0, 1], [2, -1]]
    assert float(label_loss(perfect, indices)) == 0.0
    assert float(label_loss(perfect.roll(1, dims=-1), indices)) == pytest.approx(1.0)
    # it pulls on the Gaussians: where the masks say label 1, the label-0 Gaussian is made fainter
    masks = torch.ones(32, 32, dtype=torch.uint8)
    label_loss(label_map, class_index_map(masks, classes)).backward()
    assert float(model.params["opacities"].grad[0]) > 0.0 and float(model.params["opacities"].grad[1]) < 0.0


def test_static_layer_loss_renders_the_static_gaussians_alone():
    """The static layer's terms see only the label-0 Gaussians: the object's Gaussian gets no
    gradient, the photometric term counts only the masks' static pixels, and the opacity term
    raises the static Gaussians' opacity."""
    import torch

    from mono4d.models.gaussians import NEAR_PLANE, gaussians_at, render_gaussians, select_gaussians
    from mono4d.models.layers import static_layer_loss

    model = toy_model([0, 1, 0])
    K = torch.tensor([[16.0, 0, 16], [0, 16.0, 16], [0, 0, 1]])
    w2c = torch.eye(4)
    black = torch.zeros(3)
    gaussians = gaussians_at(model.params, model.variables, model.field, 0.0)
    static = model.variables["label"] == 0
    alone = render_gaussians(select_gaussians(gaussians, static), K, w2c, 32, 32, 0, black, "torch")
    assert float(alone["alpha"][16, 16].detach()) < 0.05 < 0.7 < float(alone["alpha"][16, 8].detach())
    target = alone["rgb"].detach().clone()
    masks = torch.zeros(32, 32, dtype=torch.uint8)
    masks[:, 12:20] = 1  # the object's columns
    target[:, 12:20] = 1.0  # a wrong colour there: the masks leave it out
    photometric, opacity = static_layer_loss(gaussians, static, target, masks, K, w2c, 32, 32, 0, black, "torch", None,
                                             NEAR_PLANE)
    assert float(photometric.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(opacity.detach()) == pytest.approx(float((1.0 - alone["alpha"].detach()).mean()), abs=1e-6)
    (photometric + opacity).backward()
    grad = model.params["opacities"].grad
    assert float(grad[1]) == 0.0 and float(grad[0]) < 0.0 and float(grad[2]) < 0.0
    everywhere = torch.ones_like(masks)
    photometric, _ = static_layer_loss(gaussians, static, target, everywhere, K, w2c, 32, 32, 0, black, "torch", None,
                                       NEAR_PLANE)
    assert float(photometric.detach()) == 0.0  # no static pixel in the frame


def test_remove_and_duplicate_layers():
    import torch

    from mono4d.models.gaussians import gaussians_at
    from mono4d.models.layers import duplicate_layer, label_names, model_layers, remove_layer

    model = toy_model([0, 0, 1, 1, 2], {0: "background", 1: "cube", 2: "hand"})
    with torch.no_grad():  # a deformation that moves the dynamic Gaussians
        for layer in model.field.couplings:
            layer.net[-1].weight.normal_(0.0, 0.5)
    removed, record = remove_layer(model, "hand")
    assert record == {"op": "remove", "layer": "hand", "labels": [2], "num_gaussians": 1}
    assert removed.num_gaussians == 4 and model_layers(removed) == {"static": [0], "object_1": [1]}
    copied, record = duplicate_layer(model, "cube", (0.5, 0.0, -0.25))
    assert record["new_labels"] == [3] and label_names(copied)[3] == "cube copy"
    assert model_layers(copied) == {"static": [0], "object_1": [1], "object_3": [3], "hand": [2]}
    for time in (0.0, 0.7):
        moved = gaussians_at(copied.params, copied.variables, copied.field, time)["means"].detach()
        assert torch.allclose(moved[5:], moved[2:4] + torch.tensor([0.5, 0.0, -0.25]), atol=1e-5)
        original = gaussians_at(model.params, model.variables, model.field, time)["means"].detach()
        assert torch.allclose(moved[:5], original, atol=1e-6)
    hands, _ = duplicate_layer(model, "hand", (0.1, 0.0, 0.0))
    assert model_layers(hands)["hand"] == [2, 3]  # a copied hand is a hand
    with pytest.raises(ParameterError):
        remove_layer(toy_model([1, 1]), "object_1")  # nothing would be left
    with pytest.raises(ParameterError):
        duplicate_layer(model, "cube", (0.0, float("nan"), 0.0))


def test_nearest_labels_take_the_local_majority():
    from mono4d.models.layers import nearest_labels

    rng = np.random.default_rng(0)
    source = np.concatenate([rng.normal(0.0, 0.1, (200, 3)), rng.normal(1.0, 0.1, (200, 3))])
    labels = np.repeat([1, 2], 200)
    labels[:10] = 2  # a few wrong votes inside the first cluster
    picked = nearest_labels(np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.05, 0.0, 0.0]]), source, labels)
    assert picked.tolist() == [1, 2, 1]
    assert nearest_labels(np.zeros((3, 3)), source, np.ones(400)).tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------------------------
# A trained layered scene


@pytest.fixture(scope="module")
def layered(synthetic_scene, synthetic_frames_dir, tmp_path_factory):
    """A workspace folder (stage folders as symlinks) with init and train run on the layered scene;
    returns ``(work, train figures, init model)``."""
    from mono4d.data.images import write_gray
    from mono4d.stages import init, masks, train
    from mono4d.stages.init import load_init
    from tests.test_init import write_ground_truth_stages

    root = tmp_path_factory.mktemp("layers")
    inputs = write_ground_truth_stages(synthetic_scene, synthetic_frames_dir, root / "gt")
    (root / "gt_masks").mkdir()
    for i, mask in enumerate(synthetic_scene.masks):
        write_gray(root / "gt_masks" / f"{i:06d}.png", mask)
    work = root / "work"
    work.mkdir()
    masks.run({"frames": synthetic_frames_dir}, masks.Params(backend="file", mask_path=str(root / "gt_masks")),
              work / "masks")
    for name in ("cameras", "align", "tracks"):
        (work / name).symlink_to(inputs[name], target_is_directory=True)
    (work / "frames").symlink_to(synthetic_frames_dir, target_is_directory=True)
    inputs = {name: work / name for name in ("frames", "cameras", "align", "masks", "tracks")}
    (work / "init").mkdir()
    (work / "train").mkdir()
    init.run(inputs, init.Params(**LAYER_INIT), work / "init")
    figures = train.run({**inputs, "init": work / "init"}, train.Params(**LAYER_TRAIN), work / "train")
    return work, figures, load_init(work / "init")


def layer_render(work: Path, layer: str, frame: int, what: str = "rgb") -> np.ndarray:
    from mono4d.data.images import read_gray, read_rgb

    path = work / "train" / "renders" / "heldout" / "layers" / layer / what / f"{frame:06d}.png"
    return read_rgb(path) if what == "rgb" else read_gray(path)


@pytest.mark.slow
def test_labels_survive_init_and_densification(layered):
    import torch

    from mono4d.models.layers import label_names, model_layers
    from mono4d.stages.train import load_trained

    work, figures, initial = layered
    model = load_trained(work / "train")
    labels = model.variables["label"]
    assert torch.equal(model.variables["is_dynamic"], labels > 0)
    assert torch.equal(initial.variables["is_dynamic"], initial.variables["label"] > 0)
    assert model.num_gaussians != initial.num_gaussians  # densification ran
    assert model_layers(model) == {"static": [0], "object_1": [1], "hand": [2]}
    assert label_names(model)[2] == "hand" and label_names(model)[1] == "object1"  # file backend's name, renamed
    counts = {label: int((labels == label).sum()) for label in (1, 2)}
    assert min(counts.values()) > 100, counts
    assert figures["num_layers"] == 3


@pytest.mark.slow
def test_layer_renders_match_ground_truth_masks(layered, synthetic_scene):
    """Each dynamic layer rendered alone covers its ground-truth mask: IoU of alpha > 0.5 with
    the mask >= 0.8 on average over the held-out frames (>= 0.7 on each)."""
    work, figures, _ = layered
    table = json.loads((work / "train" / "layers.json").read_text())["layers"]
    assert list(table) == ["static", "object_1", "hand"]
    for layer, label in (("object_1", 1), ("hand", 2)):
        ious = []
        for frame in HELD_OUT:
            alpha = layer_render(work, layer, frame, "alpha")
            truth = cv2.resize(synthetic_scene.masks[frame], alpha.shape[::-1], interpolation=cv2.INTER_NEAREST) == label
            covered = alpha > 127
            ious.append(np.logical_and(covered, truth).sum() / np.logical_or(covered, truth).sum())
        assert np.mean(ious) >= 0.8 and min(ious) >= 0.7, (layer, ious)
        assert table[layer]["mask_iou_heldout"] == pytest.approx(np.mean(ious), abs=0.02)
        assert figures[f"mask_iou_{layer}"] == table[layer]["mask_iou_heldout"]
    for split in ("heldout", "train"):
        for layer in table:
            assert len(list((work / "train" / "renders" / split / "layers" / layer / "rgb").glob("*.png"))) == \
                (3 if split == "heldout" else 21)


@pytest.mark.slow
def test_static_layer_shows_the_background_behind_the_objects(layered, synthetic_scene):
    """With ``static_layer_weight``, the static layer rendered alone reproduces the ground-truth
    static background (the frame rendered without its objects) on the objects' pixels of the
    held-out frames better than the full render does: by at least STATIC_GAIN_DB on average
    over the frames, and on each frame."""
    import torch

    from mono4d.data.images import read_rgb
    from mono4d.models.losses import psnr

    work, _, _ = layered
    gains = []
    for frame in HELD_OUT:
        static = layer_render(work, "static", frame)
        full = read_rgb(work / "train" / "renders" / "heldout" / "rgb" / f"{frame:06d}.png")
        size = static.shape[1::-1]
        truth = cv2.resize(synthetic_scene.static_background(frame), size, interpolation=cv2.INTER_AREA)
        objects = cv2.resize(synthetic_scene.masks[frame], size, interpolation=cv2.INTER_NEAREST) > 0

        def score(image: np.ndarray) -> float:
            return float(psnr(torch.as_tensor(image / 255.0), torch.as_tensor(truth / 255.0), torch.as_tensor(objects)))

        gains.append(score(static) - score(full))
    assert np.mean(gains) >= STATIC_GAIN_DB and min(gains) > 0.0, gains


@pytest.mark.slow
def test_novel_view_without_hands(layered):
    work, _, _ = layered
    for name in ("novel_view.mp4", "novel_view_without_hands.mp4"):
        capture = cv2.VideoCapture(str(work / "train" / name))
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 24, name
        capture.release()


@pytest.mark.slow
def test_export_one_layer_as_ply(layered, tmp_path):
    from mono4d.data.ply import read_ply
    from mono4d.pipeline.cli import main
    from mono4d.pipeline.export import export_workspace
    from mono4d.stages.train import load_trained

    work, _, _ = layered
    model = load_trained(work / "train")
    hands = int((model.variables["label"] == 2).sum())
    written = export_workspace(work, "ply", tmp_path / "export", frames="0,12", layer="hand")
    assert [path.relative_to(tmp_path).as_posix() for path in written["ply"]] == \
        ["export/ply_hand/000000.ply", "export/ply_hand/000012.ply"]
    assert len(read_ply(written["ply"][1])["means"]) == hands
    assert main(["export", str(work), "--format", "ply", "--frames", "0", "--layer", "static",
                 "--out", str(tmp_path / "cli")]) == 0
    assert len(read_ply(tmp_path / "cli" / "ply_static" / "000000.ply")["means"]) == \
        int((model.variables["label"] == 0).sum())
    with pytest.raises(ParameterError, match="hand"):
        export_workspace(work, "ply", tmp_path / "bad", layer="bear")
    with pytest.raises(ParameterError):
        export_workspace(work, "tracks", tmp_path / "bad", layer="hand")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_edit_removes_and_duplicates_into_a_new_workspace(layered, tmp_path):
    """``mono4d edit`` writes a new workspace whose trained model renders and exports like any
    other: without the hand, its renders lose the hand's pixels; a duplicated cube adds as many
    Gaussians, moved by the offset."""
    import torch

    from mono4d.data.ply import read_ply
    from mono4d.models.gaussians import gaussians_at
    from mono4d.pipeline.cli import main
    from mono4d.pipeline.edit import edit_workspace
    from mono4d.pipeline.export import export_workspace
    from mono4d.stages.train import load_trained

    work, _, _ = layered
    source = load_trained(work / "train")
    assert main(["edit", str(work), "--remove", "hand", "--out", str(tmp_path / "no_hand")]) == 0
    edited = load_trained(tmp_path / "no_hand" / "train")
    assert edited.num_gaussians == source.num_gaussians - int((source.variables["label"] == 2).sum())
    assert 2 not in edited.variables["label"].tolist()
    manifest = json.loads((tmp_path / "no_hand" / "train" / "manifest.json").read_text()) \
        if (work / "train" / "manifest.json").is_file() else {}
    edit = json.loads((tmp_path / "no_hand" / "train" / "edit.json").read_text())
    assert edit["edits"][0]["op"] == "remove" and edit["edits"][0]["layer"] == "hand"
    assert not manifest or manifest["edit"] == edit["edits"]
    alpha = layer_render(tmp_path / "no_hand", "object_1", 12, "alpha")
    assert alpha.max() > 200 and not (tmp_path / "no_hand" / "train" / "renders" / "heldout" / "layers" / "hand").exists()
    assert not (tmp_path / "no_hand" / "train" / "novel_view_without_hands.mp4").exists()
    written = export_workspace(tmp_path / "no_hand", "ply", frames="0")
    assert len(read_ply(written["ply"][0])["means"]) == edited.num_gaussians

    out = edit_workspace(work, duplicate=["object_1"], offsets=["0.3,0,0"])
    assert out == work.parent / "work-object_1-copy"
    copied = load_trained(out / "train")
    cube = int((source.variables["label"] == 1).sum())
    assert copied.num_gaussians == source.num_gaussians + cube
    with torch.no_grad():
        at = gaussians_at(copied.params, copied.variables, copied.field, 0.5)["means"]
    original, copy = at[copied.variables["label"] == 1], at[copied.variables["label"] == 3]
    assert torch.allclose(copy - original, torch.tensor([0.3, 0.0, 0.0]), atol=1e-5)
    with pytest.raises(ParameterError, match="already exists"):
        edit_workspace(work, duplicate=["object_1"], offsets=["0.3,0,0"])
    with pytest.raises(ParameterError):
        edit_workspace(work, duplicate=["object_1"], offsets=["0.3,0"], out=tmp_path / "x")
    with pytest.raises(ParameterError):
        edit_workspace(work, remove=["bear"], out=tmp_path / "x")
    with pytest.raises(InputError):
        edit_workspace(tmp_path / "nothing", remove=["hand"])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_viewer_toggles_layers(layered):
    pytest.importorskip("viser")
    from mono4d.pipeline.viewer import opencv_to_viser_pose, serve_viewer

    work, _, _ = layered
    viewer = serve_viewer(work, host="127.0.0.1", port=0, max_side=96, backend="torch")
    try:
        assert list(viewer.layer_toggles) == ["static", "object_1", "hand"]
        frame = 12
        wxyz, position = opencv_to_viser_pose(viewer.w2c[frame])

        def picture() -> np.ndarray:
            return viewer.render_view(position, wxyz, viewer.fov_y(frame), viewer.width, viewer.height,
                                      viewer.frame_time(frame)).astype(np.float64)

        everything = picture()
        viewer.set_layer_visible("hand", False)
        assert viewer.shown_model.num_gaussians == viewer.model.num_gaussians - \
            int((viewer.model.variables["label"] == 2).sum())
        without_hand = picture()
        viewer.set_layer_visible("static", False)
        viewer.set_layer_visible("object_1", False)
        assert viewer.shown_model is None and picture().max() == 0.0  # nothing shown: the black background
        hand_pixels = np.abs(everything - without_hand).mean(axis=2) > 20
        assert hand_pixels.mean() > 0.005  # hiding the hand changes its pixels ...
        assert hand_pixels.mean() < 0.2  # ... and only those
        with pytest.raises(ParameterError):
            viewer.set_layer_visible("bear", True)
    finally:
        viewer.stop()


@pytest.mark.slow
def test_report_shows_the_layers_side_by_side(layered, tmp_path):
    from mono4d.pipeline.report import Run, StagePage, layers_views
    from mono4d.pipeline.workspace import Workspace

    work, _, _ = layered
    page = StagePage(Run("a", "run", Workspace(work), {}, {}), "train", tmp_path)
    views = {view.title: view.body for view in layers_views(page)}
    assert set(views) == {"Scene layers: heldout", "Scene layers: train"}
    body = views["Scene layers: heldout"]
    for heading in ("full render", "static", "object_1", "hand"):
        assert f"<b>{heading}</b>" in body
    assert body.count("<img") == 4 * 3  # the full render and three layers for each held-out frame
    assert "mask IoU" in body and "(hand)" in body
    for source in __import__("re").findall(r'src="([^"]+)"', body):
        assert (tmp_path / source).resolve().is_file(), source
