"""The dynamic Gaussian scene: canonical 3D Gaussians, a static/dynamic split and a deformation.

State is kept the way Dynamic 3D Gaussians and gsplat keep it:

- ``params``: the optimised per-Gaussian tensors (``torch.nn.Parameter``, first dimension N,
  the names gsplat's densification strategies expect): ``means (N, 3)`` canonical positions
  (world units), ``quats (N, 4)`` canonical rotations (wxyz, not necessarily normalised),
  ``scales (N, 3)`` log of the standard deviations, ``opacities (N,)`` logits, ``sh0 (N, 1, 3)``
  and ``shN (N, K - 1, 3)`` spherical-harmonics colour coefficients (``K = (degree + 1)^2``; the
  DC term of colour ``c`` in [0, 1] is ``(c - 0.5) / SH_C0``).
- ``variables``: non-optimised per-Gaussian state, the dict gsplat's ``DefaultStrategy`` keeps
  its running statistics in (so densification duplicates, splits and prunes it along with the
  parameters): ``is_dynamic (N,)`` bool, ``label (N,)`` int64 mask label ids (0 static; ``is_dynamic``
  is ``label > 0``; see :mod:`mono4d.models.layers`), optionally ``offset (N, 3)`` world translations
  added after the deformation (edited copies of layers), plus the strategy's
  ``grad2d``/``count``/``scene_scale``. A model trained online (one pose per timestep, Dynamic
  3D Gaussians' method, :mod:`mono4d.models.online`) holds its poses there instead of using the
  field: ``trajectory_means (N, S, 3)`` world positions and ``trajectory_quats (N, S, 4)`` unit
  wxyz rotations at the S timesteps whose normalised times are the list ``trajectory_times``.
- ``field``: the :class:`~mono4d.models.deformation.DeformationField` (an ``nn.Module`` with its own
  optimiser) that moves the dynamic Gaussians. Static Gaussians never move.
- ``exposure`` (optional): ``(T, 2, 3)`` per-frame colour affine of the clip's T frames, row
  ``[i, 0]`` the log gain and ``[i, 1]`` the offset of frame i (:func:`render`'s ``exposure``).

Cameras follow OpenCV (x right, y down, z forward); ``w2c`` is 4x4 world-to-camera and ``K``
3x3 pixel intrinsics with pixel centres at half-integers. Time is normalised, ``t = i / (T - 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mono4d.models.deformation import DeformationField, quaternion_conjugate, quaternion_multiply

#: Zeroth-order spherical-harmonics basis constant, 1 / (2 sqrt(pi)).
SH_C0 = 0.28209479177387814
#: Version of the checkpoint layout written by :func:`save_model`.
CHECKPOINT_FORMAT = 1
#: The per-timestep poses of a model trained online (see the module docstring), saved with it.
TRAJECTORY_VARIABLES = ("trajectory_means", "trajectory_quats", "trajectory_times")
#: Default camera-z (world units) at or below which a Gaussian is not drawn (gsplat's default).
NEAR_PLANE = 0.01


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per channel for a degree: ``(degree + 1)^2``."""
    return (degree + 1) ** 2


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """DC SH coefficient of colours in [0, 1] (any shape)."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """Colour in [0, 1] (unclamped) of a DC SH coefficient (any shape)."""
    return sh0 * SH_C0 + 0.5


def create_params(means: Tensor, rgb: Tensor, scales: Tensor, is_dynamic: Tensor, sh_degree: int,
                  opacity: float, labels: Tensor | None = None) -> tuple[dict[str, torch.nn.Parameter], dict]:
    """Fresh ``params`` and ``variables`` for Gaussians at ``means (N, 3)`` with colours
    ``rgb (N, 3)`` in [0, 1], isotropic or anisotropic standard deviations ``scales (N, 3)``
    (world units, > 0), identity rotations and the same ``opacity`` in (0, 1); ``labels (N,)``
    mask label ids (None: 1 for the dynamic Gaussians, 0 for the others)."""
    count = len(means)
    quats = torch.zeros(count, 4, dtype=torch.float32, device=means.device)
    quats[:, 0] = 1.0
    params = {
        "means": means.float(),
        "quats": quats,
        "scales": torch.log(scales.float()),
        "opacities": torch.full((count,), float(np.log(opacity / (1.0 - opacity))), device=means.device),
        "sh0": rgb_to_sh0(rgb.float())[:, None, :],
        "shN": torch.zeros(count, num_sh_bases(sh_degree) - 1, 3, device=means.device),
    }
    params = {name: torch.nn.Parameter(value.contiguous()) for name, value in params.items()}
    is_dynamic = is_dynamic.bool().to(means.device)
    labels = is_dynamic.long() if labels is None else labels.long().to(means.device)
    return params, {"is_dynamic": is_dynamic, "label": labels}


def trajectory_pose(means: Tensor, quats: Tensor, times: list[float], time: float) -> tuple[Tensor, Tensor]:
    """Positions ``(N, 3)`` and unit wxyz rotations ``(N, 4)`` at normalised ``time`` of the poses
    ``means (N, S, 3)``, ``quats (N, S, 4)`` at the increasing ``times`` (S): a keyframe's own pose
    at its time, linear between the two keyframes around ``time`` (rotations normalised linearly
    interpolated, the shorter way), the first / last one's outside them. Differentiable."""
    keys = np.asarray(times, np.float64)
    after = int(np.searchsorted(keys, time, side="right"))
    if after == 0 or after >= len(keys):
        index = 0 if after == 0 else len(keys) - 1
        return means[:, index], torch.nn.functional.normalize(quats[:, index], dim=-1)
    weight = float((time - keys[after - 1]) / max(keys[after] - keys[after - 1], 1e-12))
    if weight == 0.0:
        return means[:, after - 1], torch.nn.functional.normalize(quats[:, after - 1], dim=-1)
    start, end = quats[:, after - 1], quats[:, after]
    end = torch.where((start * end).sum(-1, keepdim=True) < 0, -end, end)
    means_at = (1.0 - weight) * means[:, after - 1] + weight * means[:, after]
    return means_at, torch.nn.functional.normalize((1.0 - weight) * start + weight * end, dim=-1)


def gaussians_at(params: dict[str, Tensor], variables: dict, field: DeformationField,
                 time: float) -> dict[str, Tensor]:
    """The Gaussians at normalised ``time``, activated: ``means (N, 3)`` world, ``quats (N, 4)``
    unit wxyz, ``scales (N, 3)`` standard deviations, ``opacities (N,)`` in (0, 1) and
    ``sh (N, K, 3)`` colour coefficients. Dynamic Gaussians are moved, turned and rescaled by
    the deformation field; static ones are returned as they are; a model with per-timestep poses
    (``variables["trajectory_means"]``, see the module docstring) takes every Gaussian's pose
    from them (:func:`trajectory_pose`) instead; ``variables["offset"]`` (when
    present) is added to every position after that. Also ``dynamic (D,)``, the
    indices of the dynamic Gaussians, and their ``rotation_delta (D, 4)`` (unit wxyz, canonical
    -> ``time``) for the physical priors. Differentiable."""
    dynamic = torch.nonzero(variables["is_dynamic"], as_tuple=True)[0]
    means, quats, log_scales = params["means"], torch.nn.functional.normalize(params["quats"], dim=-1), params["scales"]
    rotation_delta = quats.new_zeros(0, 4)
    if "trajectory_means" in variables:
        canonical_quats = quats
        means, quats = trajectory_pose(variables["trajectory_means"], variables["trajectory_quats"],
                                       variables["trajectory_times"], time)
        rotation_delta = quaternion_multiply(quats[dynamic], quaternion_conjugate(canonical_quats[dynamic]))
    elif len(dynamic):
        canonical = means[dynamic]
        rotation_delta, log_scale_delta = field.shape_deltas(canonical, time)
        means = means.index_put((dynamic,), field.to_time(canonical, time))
        quats = quats.index_put((dynamic,), quaternion_multiply(rotation_delta, quats[dynamic]))
        log_scales = log_scales.index_put((dynamic,), log_scales[dynamic] + log_scale_delta)
    if "offset" in variables:
        means = means + variables["offset"]
    return {"means": means, "quats": quats, "scales": torch.exp(log_scales),
            "opacities": torch.sigmoid(params["opacities"]),
            "sh": torch.cat([params["sh0"], params["shN"]], dim=1),
            "dynamic": dynamic, "rotation_delta": rotation_delta}


def render(params: dict[str, Tensor], variables: dict, field: DeformationField, time: float, K: Tensor,
           w2c: Tensor, width: int, height: int, sh_degree: int, background: Tensor | None = None,
           backend: str = "auto", exposure: Tensor | None = None, near_plane: float = NEAR_PLANE) -> dict:
    """Render one camera at normalised ``time``.

    ``K (3, 3)``, ``w2c (4, 4)`` float32 tensors on the model's device; ``sh_degree`` is the
    degree used now (<= the stored one); ``background (3,)`` RGB in [0, 1] (None: black);
    ``exposure (2, 3)`` (None: identity) a colour affine ``(log gain, offset)`` applied to the
    scene, not the background: ``rgb = C * exp(gain) + alpha * offset + (1 - alpha) * bg``;
    Gaussians whose camera z is at most ``near_plane`` (world units) are not drawn.
    Returns ``rgb (H, W, 3)``, ``depth (H, W)`` expected z-depth (world units; meaningless where
    ``alpha`` is ~0), ``alpha (H, W)``, the rasterizer's gsplat-compatible ``info`` dict
    (``means2d`` keeps its gradient for densification) and ``gaussians``, the output of
    :func:`gaussians_at` (for the priors).
    """
    gaussians = gaussians_at(params, variables, field, time)
    return {**render_gaussians(gaussians, K, w2c, width, height, sh_degree, background, backend, exposure,
                               near_plane),
            "gaussians": gaussians}


def select_gaussians(gaussians: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """The activated Gaussians of :func:`gaussians_at` where ``keep (N,)`` bool is True: ``means``,
    ``quats``, ``scales``, ``opacities`` and ``sh`` (the dynamic-only entries are left out).
    Differentiable: gradients flow back to the selected rows."""
    index = torch.nonzero(keep, as_tuple=True)[0]
    return {name: gaussians[name][index] for name in ("means", "quats", "scales", "opacities", "sh")}


def render_gaussians(gaussians: dict[str, Tensor], K: Tensor, w2c: Tensor, width: int, height: int,
                     sh_degree: int, background: Tensor | None = None, backend: str = "auto",
                     exposure: Tensor | None = None, near_plane: float = NEAR_PLANE) -> dict:
    """Rasterize activated Gaussians (:func:`gaussians_at` or :func:`select_gaussians`) through one
    camera: :func:`render` without the deformation, returning its ``rgb``, ``depth``, ``alpha`` and
    ``info``."""
    from mono4d.models.rasterizer import rasterization

    sh = gaussians["sh"][:, :num_sh_bases(sh_degree)]
    colors, alphas, info = rasterization(
        means=gaussians["means"], quats=gaussians["quats"], scales=gaussians["scales"],
        opacities=gaussians["opacities"], colors=sh, viewmats=w2c[None], Ks=K[None], width=width, height=height,
        near_plane=near_plane, sh_degree=sh_degree, backgrounds=None if background is None else background[None],
        render_mode="RGB+ED", backend=backend)
    rgb, alpha = colors[0, ..., :3], alphas[0, ..., 0]
    if exposure is not None:
        alpha3 = alpha[..., None]
        behind = (1.0 - alpha3) * (background if background is not None else torch.zeros_like(exposure[1]))
        rgb = (rgb - behind) * torch.exp(exposure[0]) + alpha3 * exposure[1] + behind
    return {"rgb": rgb, "depth": colors[0, ..., 3], "alpha": alpha, "info": info}


def exposure_at(exposure: Tensor, times: np.ndarray, known: list[int], time: float) -> Tensor:
    """The ``(2, 3)`` colour affine at normalised ``time`` from the rows ``known`` (e.g. the
    training frames) of ``exposure (T, 2, 3)`` whose frames lie at ``times (T,)``: linear in time
    between the two nearest known frames, the first / last one's outside them (a known frame's
    own row at its time)."""
    order = sorted(known, key=lambda frame: times[frame])
    known_times = np.asarray([times[frame] for frame in order], np.float64)
    after = int(np.searchsorted(known_times, time))
    if after == 0:
        return exposure[order[0]]
    if after >= len(order):
        return exposure[order[-1]]
    weight = float((time - known_times[after - 1]) / max(known_times[after] - known_times[after - 1], 1e-12))
    return (1.0 - weight) * exposure[order[after - 1]] + weight * exposure[order[after]]


@dataclass
class SceneModel:
    """A loaded model: ``params``, ``variables``, ``field`` and ``exposure`` as described in the
    module docstring, and ``meta``, the plain-data description written with it (frame count, image
    size, held-out frames, the parameters of the stage that wrote it...)."""

    params: dict[str, torch.nn.Parameter]
    variables: dict
    field: DeformationField
    meta: dict = dataclass_field(default_factory=dict)
    exposure: torch.nn.Parameter | None = None

    @property
    def num_gaussians(self) -> int:
        """Number of Gaussians N."""
        return int(self.params["means"].shape[0])

    @property
    def num_dynamic(self) -> int:
        """Number of dynamic Gaussians."""
        return int(self.variables["is_dynamic"].sum())

    @property
    def sh_degree(self) -> int:
        """The highest SH degree the colour coefficients hold."""
        return int(round(np.sqrt(self.params["shN"].shape[1] + 1))) - 1

    @property
    def near_plane(self) -> float:
        """The near plane (world units) the model was trained and scored with (``train.near_plane``)."""
        return float(self.meta.get("train_params", {}).get("near_plane", NEAR_PLANE))


def save_model(path: str | Path, model: SceneModel, extra: dict | None = None) -> None:
    """Write a model (and optional ``extra`` plain data / tensors, e.g. optimiser states) to
    ``path`` with ``torch.save``; the file is replaced atomically."""
    path = Path(path)
    content = {
        "format": CHECKPOINT_FORMAT,
        "params": {name: value.detach().cpu() for name, value in model.params.items()},
        "is_dynamic": model.variables["is_dynamic"].cpu(),
        **{name: model.variables[name].cpu() for name in ("label", "offset") if name in model.variables},
        **{name: (value.cpu() if torch.is_tensor(value) else list(value)) for name in TRAJECTORY_VARIABLES
           if (value := model.variables.get(name)) is not None},
        "field_config": model.field.export_config(),
        "field_state": {name: value.cpu() for name, value in model.field.state_dict().items()},
        "meta": model.meta,
        "extra": extra or {},
    }
    if model.exposure is not None:
        content["exposure"] = model.exposure.detach().cpu()
    temporary = path.with_name(path.name + ".partial")
    torch.save(content, temporary)
    temporary.replace(path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[SceneModel, dict]:
    """Read a file written by :func:`save_model`. Returns the model on ``device`` (parameters
    requiring gradients) and the ``extra`` dict. Raises ``ValueError`` for another layout."""
    content = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mono4d Gaussian checkpoint (format {CHECKPOINT_FORMAT})")
    params = {name: torch.nn.Parameter(value.to(device)) for name, value in content["params"].items()}
    field = DeformationField.from_export(content["field_config"])
    field.load_state_dict(content["field_state"])
    variables = {"is_dynamic": content["is_dynamic"].to(device)}
    variables["label"] = content["label"].to(device) if "label" in content else variables["is_dynamic"].long()
    if "offset" in content:
        variables["offset"] = content["offset"].to(device)
    for name in TRAJECTORY_VARIABLES:
        if name in content:
            value = content[name]
            variables[name] = value.to(device) if torch.is_tensor(value) else [float(t) for t in value]
    exposure = torch.nn.Parameter(content["exposure"].to(device)) if "exposure" in content else None
    return SceneModel(params, variables, field.to(device), content["meta"], exposure), content["extra"]
