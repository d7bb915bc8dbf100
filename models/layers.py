"""Scene layers: the Gaussians of the static scene, of each moving object and of the hands, kept
separable so they can be rendered, exported and edited one by one.

Labels. Every Gaussian carries ``label``, an int64 ``(N,)`` tensor in the model's ``variables``
(next to ``is_dynamic``, so gsplat's densification duplicates, splits and prunes it with the
parameters): the mask label id it was created from at init (0 = static background, k > 0 = the
masks stage's label k). ``is_dynamic`` is ``label > 0``. The names of the ids are kept in the
model's ``meta["labels"]`` (``{"0": "background", "1": "cube", "2": "hand"}``, from the masks
stage's ``labels.json`` or ``init.label_names``). A model without labels (written before them)
reads as label 1 for its dynamic Gaussians and 0 for the others.

Layers. Label ids are grouped into named layers: ``static`` (label 0), ``hand`` (every label
whose name has the word "hand" or "hands" in it: "hand", "left_hand", "hands 2" ...; EgoMask's
hand/scene split) and ``object_<k>`` for every other label k. A *selector* (``mono4d export
--layer``, ``mono4d edit --remove``) is a layer name, a label name or a label id.

Editing (Dynamic 3D Gaussians' compositional edits): :func:`remove_layer` drops a layer's
Gaussians; :func:`duplicate_layer` appends a copy under a new label id, moved by a world offset.
A duplicated Gaussian keeps its canonical position (so the deformation field moves it as it
moves the original) and gets the offset in ``variables["offset"]`` (float32 ``(N, 3)``, world
units), which :func:`mono4d.models.gaussians.gaussians_at` adds after the deformation.

Static layer. The static Gaussians rendered alone must show the whole background, also where a
moving object stands in front of it: :func:`static_layer_loss` (the train stage's
``static_layer_weight``) renders them alone and asks for the frame's colours on the pixels the
masks mark static and for full opacity everywhere (the background is opaque; behind an object it
is the colour learned from the frames where it shows), so no hole is left where objects stand.

Label maps. :func:`render_label_map` renders the one-hot labels of the Gaussians as colours
(one channel per label id, through the same rasterizer), so channel c of a pixel is the
alpha-composited weight of the Gaussians of label c there; :func:`label_loss` compares it with
the masks (the train stage's ``label_weight``), which keeps Gaussians in their layer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from mono4d.data.errors import ParameterError

if TYPE_CHECKING:
    from torch import Tensor

STATIC = "static"
HAND = "hand"
#: Words that make a label name a hand (matched as whole words, case-insensitive).
HAND_WORDS = ("hand", "hands")
#: Neighbours whose majority label a downsampled Gaussian takes (:func:`nearest_labels`).
LABEL_NEIGHBOURS = 8


def is_hand_name(name: str) -> bool:
    """Whether a label name names a hand (a whole word "hand"/"hands": "left_hand", "Hand 2")."""
    return any(word in HAND_WORDS for word in re.split(r"[^a-z]+", name.lower()))


def layer_name(label: int, name: str) -> str:
    """The layer of label id ``label`` named ``name``: ``static``, ``hand`` or ``object_<label>``."""
    if label == 0:
        return STATIC
    return HAND if is_hand_name(name) else f"object_{label}"


def parse_label_names(spec: str) -> dict[int, str]:
    """``"1:cube,2:hand"`` -> ``{1: "cube", 2: "hand"}``; "" -> {}. :class:`ParameterError` for
    malformed entries or ids outside 1..255."""
    names: dict[int, str] = {}
    hint = 'write label names as "ID:NAME,ID:NAME", e.g. "1:bear,2:hand" (ids of the masks stage, 1..255)'
    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue
        key, sep, name = part.partition(":")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise ParameterError(f"label names {spec!r}: cannot read {part!r}", hint)
        label = int(key)
        if not 1 <= label <= 255:
            raise ParameterError(f"label names {spec!r}: id {label} is not a dynamic mask label (1..255)", hint)
        names[label] = name.strip()
    return names


def gaussian_labels(model) -> Tensor:
    """``(N,)`` int64 label ids of a :class:`~mono4d.models.gaussians.SceneModel`'s Gaussians (see the
    module docstring for models without labels)."""
    labels = model.variables.get("label")
    return labels if labels is not None else model.variables["is_dynamic"].long()


def label_names(model) -> dict[int, str]:
    """Label id -> name of a model: its ``meta["labels"]``, plus "background" for 0 and
    "object<k>" for an id in use that has no name."""
    names = {int(key): str(value) for key, value in (model.meta.get("labels") or {}).items()}
    names.setdefault(0, "background")
    for label in np.unique(gaussian_labels(model).cpu().numpy()).tolist():
        names.setdefault(int(label), "dynamic" if label == 1 and len(names) == 1 else f"object{label}")
    return dict(sorted(names.items()))


def model_layers(model) -> dict[str, list[int]]:
    """Layer name -> its label ids, for the layers that hold at least one Gaussian: ``static``
    first, then the objects by id, then ``hand``."""
    present = set(np.unique(gaussian_labels(model).cpu().numpy()).tolist())
    layers: dict[str, list[int]] = {}
    for label, name in label_names(model).items():
        if label in present:
            layers.setdefault(layer_name(label, name), []).append(label)
    order = sorted(layers, key=lambda layer: (layer != STATIC, layer == HAND, min(layers[layer])))
    return {layer: layers[layer] for layer in order}


def resolve_layer(model, selector: str) -> tuple[str, list[int]]:
    """The layer name and label ids a selector means: a layer name (``static``, ``hand``,
    ``object_1``), or a label name or id (``cube``, ``"2"``: that label alone, named after its
    layer when the layer has no other label, else ``label_<id>``). :class:`ParameterError`
    listing the choices when it matches no Gaussian."""
    text = str(selector).strip()
    layers = model_layers(model)
    if text in layers:
        return text, layers[text]
    names = label_names(model)
    for layer, labels in layers.items():
        for label in labels:
            if text in (names[label], str(label)):
                return (layer if labels == [label] else f"label_{label}"), [label]
    choices = ", ".join(list(layers) + [f"{names[label]} (label {label})" for ids in layers.values() for label in ids])
    raise ParameterError(f"no Gaussian of the model belongs to layer or label {text!r}", f"use one of: {choices}")


def labels_mask(model, labels: Iterable[int]) -> Tensor:
    """``(N,)`` bool: the Gaussians whose label is one of ``labels``."""
    import torch

    current = gaussian_labels(model)
    wanted = torch.as_tensor(sorted(set(int(label) for label in labels)), dtype=current.dtype, device=current.device)
    return torch.isin(current, wanted)


def subset(model, keep: Tensor):
    """A new :class:`~mono4d.models.gaussians.SceneModel` with the Gaussians where ``keep (N,)`` is True
    (parameters detached and copied; the deformation field, meta and exposure shared)."""
    import torch

    from mono4d.models.gaussians import SceneModel

    index = torch.nonzero(keep, as_tuple=True)[0]
    count = model.num_gaussians
    params = {name: torch.nn.Parameter(value.detach()[index].clone()) for name, value in model.params.items()}
    variables = {name: value[index].clone() for name, value in model.variables.items()
                 if torch.is_tensor(value) and value.dim() > 0 and len(value) == count}
    variables.setdefault("label", gaussian_labels(model)[index].clone())
    if "trajectory_times" in model.variables:  # per-timestep poses of an online model: their times
        variables["trajectory_times"] = list(model.variables["trajectory_times"])
    return SceneModel(params, variables, model.field, dict(model.meta), model.exposure)


def layer_model(model, selector: str):
    """The model restricted to the layer or label ``selector`` (see :func:`resolve_layer`)."""
    _, labels = resolve_layer(model, selector)
    return subset(model, labels_mask(model, labels))


def remove_layer(model, selector: str) -> tuple[object, dict]:
    """The model without the Gaussians of ``selector``, and a description of the edit
    (``{"op": "remove", "layer", "labels", "num_gaussians"}``)."""
    layer, labels = resolve_layer(model, selector)
    chosen = labels_mask(model, labels)
    if bool(chosen.all()):
        raise ParameterError(f"removing {selector!r} would remove every Gaussian of the model",
                             "remove another layer, or keep this one")
    return subset(model, ~chosen), {"op": "remove", "layer": layer, "labels": labels,
                                    "num_gaussians": int(chosen.sum())}


def duplicate_layer(model, selector: str, offset: Iterable[float]) -> tuple[object, dict]:
    """The model with a copy of the Gaussians of ``selector`` moved by ``offset (3,)`` (world
    units, added after the deformation at every time), under one new label id per copied label
    (named ``"<name> copy"``, so a copied hand is a hand again); and a description of the edit."""
    import torch

    from mono4d.models.gaussians import SceneModel

    shift = torch.as_tensor(list(offset), dtype=torch.float32)
    if shift.shape != (3,) or not bool(torch.isfinite(shift).all()):
        raise ParameterError(f"offset {list(offset)!r} is not three finite numbers", "write it as x,y,z, e.g. 0.5,0,0")
    layer, labels = resolve_layer(model, selector)
    chosen = labels_mask(model, labels)
    copy = subset(model, chosen)
    names = label_names(model)
    first_new = max(names) + 1
    if first_new + len(labels) - 1 > 255:
        raise ParameterError("the model has no free label id for the copy (ids go up to 255)",
                             "remove a layer first")
    new_ids = {label: first_new + k for k, label in enumerate(sorted(labels))}
    copied_labels = gaussian_labels(copy).clone()
    for old, new in new_ids.items():
        copied_labels[gaussian_labels(copy) == old] = new
    device = model.params["means"].device
    count = model.num_gaussians
    offsets = model.variables.get("offset", torch.zeros(count, 3, device=device))
    params = {name: torch.nn.Parameter(torch.cat([value.detach(), copy.params[name].detach()]))
              for name, value in model.params.items()}
    variables = {"is_dynamic": torch.cat([model.variables["is_dynamic"], copy.variables["is_dynamic"]]),
                 "label": torch.cat([gaussian_labels(model), copied_labels]),
                 "offset": torch.cat([offsets, offsets[chosen] + shift.to(device)])}
    if "trajectory_means" in model.variables:  # an online model: the copy keeps its per-timestep poses
        for name in ("trajectory_means", "trajectory_quats"):
            variables[name] = torch.cat([model.variables[name], copy.variables[name]])
        variables["trajectory_times"] = list(model.variables["trajectory_times"])
    meta = dict(model.meta)
    meta["labels"] = {str(label): name for label, name in names.items()}
    meta["labels"].update({str(new): f"{names[old]} copy" for old, new in new_ids.items()})
    edited = SceneModel(params, variables, model.field, meta, model.exposure)
    return edited, {"op": "duplicate", "layer": layer, "labels": labels, "new_labels": sorted(new_ids.values()),
                    "offset": shift.tolist(), "num_gaussians": int(chosen.sum())}


def nearest_labels(points: np.ndarray, source_points: np.ndarray, source_labels: np.ndarray,
                   neighbours: int = LABEL_NEIGHBOURS) -> np.ndarray:
    """``(M,)`` int64: for each of ``points (M, 3)`` the most frequent label among its
    ``neighbours`` nearest ``source_points (S, 3)`` with ``source_labels (S,)`` (ties: the
    nearer label), e.g. the labels of voxel-downsampled points from the points they average."""
    from scipy.spatial import cKDTree

    source_labels = np.asarray(source_labels, np.int64)
    if len(points) == 0 or len(source_points) == 0:
        return np.zeros(len(points), np.int64)
    distinct = np.unique(source_labels)
    if len(distinct) == 1:
        return np.full(len(points), distinct[0], np.int64)
    k = min(neighbours, len(source_points))
    _, index = cKDTree(source_points).query(points, k=k)
    index = index.reshape(len(points), k)
    votes = source_labels[index]
    counts = np.stack([(votes == label).sum(axis=1) for label in distinct], axis=1).astype(np.float64)
    counts += np.stack([(votes[:, 0] == label) for label in distinct], axis=1) * 0.5  # ties: the nearest
    return distinct[np.argmax(counts, axis=1)]


def label_classes(model) -> list[int]:
    """The label ids of a model in channel order of :func:`render_label_map` (sorted)."""
    return sorted(label_names(model))


def one_hot_labels(labels: Tensor, classes: list[int]) -> Tensor:
    """``(N, C)`` float32 one-hot rows of ``labels (N,)`` over ``classes`` (C ids)."""
    import torch

    table = torch.as_tensor(classes, dtype=labels.dtype, device=labels.device)
    return (labels[:, None] == table[None, :]).float()


def class_index_map(masks: Tensor, classes: list[int]) -> Tensor:
    """``masks (..., H, W)`` label ids -> int64 channel indices into ``classes`` (-1 for an id
    that is not one of them)."""
    import torch

    table = torch.full((256,), -1, dtype=torch.long, device=masks.device)
    table[torch.as_tensor(classes, dtype=torch.long, device=masks.device)] = torch.arange(len(classes),
                                                                                          device=masks.device)
    return table[masks.long()]


def render_label_map(gaussians: Mapping[str, Tensor], one_hot: Tensor, K: Tensor, w2c: Tensor, width: int,
                     height: int, backend: str = "auto") -> Tensor:
    """``(H, W, C)`` label weights: the one-hot labels ``one_hot (N, C)`` of the Gaussians
    ``gaussians`` (activated, at one time: the ``gaussians`` of :func:`mono4d.models.gaussians.render`)
    alpha-composited through ``K (3, 3)``, ``w2c (4, 4)`` over nothing (their sum is the
    alpha). Differentiable."""
    from mono4d.models.rasterizer import rasterization

    colors, _, _ = rasterization(
        means=gaussians["means"], quats=gaussians["quats"], scales=gaussians["scales"],
        opacities=gaussians["opacities"], colors=one_hot, viewmats=w2c[None], Ks=K[None], width=width, height=height,
        sh_degree=None, render_mode="RGB", backend=backend)
    return colors[0]


def label_loss(label_map: Tensor, class_map: Tensor) -> Tensor:
    """Half the L1 distance between a rendered ``label_map (H, W, C)`` and the one-hot masks
    ``class_map (H, W)`` (channel indices; -1 pixels are left out), averaged over pixels: 0 when
    every pixel is covered by its own label only, 1 when covered by another label only."""
    import torch

    valid = class_map >= 0
    if not bool(valid.any()):
        return label_map.sum() * 0.0
    target = torch.nn.functional.one_hot(class_map.clamp_min(0), label_map.shape[-1]).to(label_map.dtype)
    return 0.5 * (label_map - target).abs().sum(dim=-1)[valid].mean()


def static_layer_loss(gaussians: Mapping[str, Tensor], static: Tensor, target: Tensor, masks: Tensor, K: Tensor,
                      w2c: Tensor, width: int, height: int, sh_degree: int, background: Tensor,
                      backend: str, exposure: Tensor | None, near_plane: float) -> tuple[Tensor, Tensor]:
    """The static layer's own terms for one frame: the Gaussians ``gaussians`` (activated, at the
    frame's time: the ``gaussians`` of :func:`mono4d.models.gaussians.render`) where ``static (N,)``
    is True, rendered alone through ``K (3, 3)``, ``w2c (4, 4)`` with SH degree ``sh_degree`` over
    ``background (3,)`` (and the frame's colour affine ``exposure (2, 3)``; ``near_plane`` as
    :func:`mono4d.models.gaussians.render`). Returns
    ``(photometric, opacity)``: the mean L1 distance to ``target (H, W, 3)`` in [0, 1] over the
    pixels where ``masks (H, W)`` is 0 (0 when there is none), and the mean of ``1 - alpha`` over
    all pixels (0 when the layer is opaque everywhere). Differentiable."""
    from mono4d.models.gaussians import render_gaussians, select_gaussians

    out = render_gaussians(select_gaussians(gaussians, static), K, w2c, width, height, sh_degree, background,
                           backend, exposure, near_plane)
    seen = masks == 0
    photometric = (out["rgb"] - target).abs()[seen].mean() if bool(seen.any()) else out["rgb"].sum() * 0.0
    return photometric, (1.0 - out["alpha"]).mean()
