"""Train stage (stage 2 of the optimiser): photometric + ordinal-depth optimisation of the dynamic
Gaussians from the init stage, with densification, evaluation on held-out frames and exports.

Loop (Dynamic 3D Gaussians' layout, gsplat's densification): each step renders one random
training frame at its time ``t = i / (T - 1)`` (:func:`models.gaussians.render`) over a random
or fixed background and minimises

- ``(1 - ssim_weight) * L1 + ssim_weight * (1 - SSIM)`` against the frame;
- ``ordinal_weight`` x the ordinal depth loss (MoDGS): random pixel pairs whose aligned (prior)
  depths differ by more than ``ordinal_min_gap`` of the frame's depth range are penalised by
  ``|tanh(ordinal_alpha * (R_a - R_b) / range) - sign(D_a - D_b)|`` (R rendered depth), so only
  the prior's depth *order* is trusted; pixels of moving objects are left out when the prior
  cannot measure them (``prior_on_dynamic``: the weights-free ``sfm`` depth);
- ``depth_l1_weight`` x mean ``|R - D| / median(D)`` (off by default: mono depth is rarely metric);
- ``reprojection_weight`` x the track reprojection error (needs the tracks stage): track points
  lifted with the rendered depth, moved by the deformation to another training frame and
  projected, against the tracked positions;
- ``rigidity_weight``, ``rotation_weight``, ``isometry_weight`` x Dynamic 3D Gaussians' priors on
  the dynamic Gaussians (k nearest neighbours in canonical space, refreshed after densification);
- ``label_weight`` x the label-map loss (:func:`models.layers.label_loss`): the Gaussians'
  one-hot labels rendered as colours against the masks, so each layer (static, objects, hands)
  covers its own pixels only;

then steps Adam (per-parameter learning rates, positions decaying exponentially to 1 %, the
deformation field to 10 %) and gsplat's ``DefaultStrategy`` (duplicate / split / prune; it runs
unchanged on CPU with the torch rasterizer's ``info``), capped at ``max_gaussians``, with our
own opacity reset (``opacity_reset_fraction``). The SH degree in use grows by one every
``sh_degree_fraction`` of the iterations; every step-based setting is such a fraction of
``iterations`` (:class:`Schedule`). With ``exposure``, a per-frame colour affine is learned too.

Held-out frames (the init stage's ``holdout_every``) are never trained on; they are rendered and
scored (PSNR, SSIM, PSNR on dynamic pixels, depth-order agreement with the aligned depth) every
``eval_fraction`` of the iterations and at the end. LPIPS is not computed: it needs the lpips
package with pretrained AlexNet/VGG weights (and torchvision), none of which is available
offline here.

Resuming: with ``resume_from`` set to a file path, the full optimiser state (model, Adam states,
densification statistics, step, curves, random state) is written there every
``checkpoint_fraction`` of the iterations and at the end; a rerun with the same path and the
same init output continues from it (the pipeline gives every run a fresh output folder, so the
path must lie outside it). A checkpoint from another init output is ignored, with a note.

Outputs (see :mod:`stages.train_outputs`): ``model.pt``, ``metrics.json``, ``curves.json`` and
``curves.png``, ``renders/`` (rgb, depth .npy and colourised, held-out comparisons),
``novel_view.mp4`` and ``time_sweep.mp4``, ``ply/`` (standard 3DGS PLY per frame),
``trajectories.npz`` (dense 3D tracks of the dynamic Gaussians). Loader: :func:`load_trained`.

D-NeRF: :func:`train_dnerf` trains on a D-NeRF folder's train split and scores its test split
(white background), with the same loop.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time as timer
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field as dataclass_field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

from data.errors import InputError, ParameterError

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
BACKGROUNDS = ("random", "black", "white")
PRIOR_ON_DYNAMIC = ("auto", "use", "ignore")
#: Depth kinds (``alignment.json``'s ``depth_kind``) measured under a static-scene assumption.
STATIC_SCENE_DEPTH_KINDS = ("sfm",)
#: Candidate pixel pairs drawn per step for the ordinal loss (those with too close prior depths are dropped).
ORDINAL_CANDIDATES_FACTOR = 2
#: Reprojection errors are capped at this fraction of the image's larger side (outlier tracks).
REPROJECTION_CAP = 0.05


@dataclass(frozen=True)
class Params:
    """Parameters of the train stage.

    iterations: optimisation steps.
    downscale: train and evaluate at 1/downscale of the frames' resolution (1 = full).
    lr_means: learning rate of the canonical positions, times the scene scale (median depth);
        decays exponentially to 1 % at the last step.
    lr_scales, lr_quats, lr_opacities, lr_sh0, lr_shN: learning rates of log-scales,
        rotations, opacity logits and SH colour coefficients (DC and higher orders).
    lr_deformation: learning rate of the deformation field (decays to 10 %).
    ssim_weight: weight of (1 - SSIM) in the photometric loss (the rest is L1).
    ordinal_weight: weight of the ordinal depth loss (0 = off).
    ordinal_alpha: sharpness of the ordinal loss's tanh (unit-free: depth differences are
        divided by the frame's depth range).
    ordinal_pairs: candidate pixel pairs per step for the ordinal loss.
    ordinal_min_gap: pairs whose prior depths differ by less than this fraction of the frame's
        depth range are not used.
    depth_l1_weight: weight of the L1 loss to the aligned depth (0 = off).
    prior_on_dynamic: whether the depth-prior losses (ordinal, depth L1) use the pixels the masks
        stage marks dynamic: "use", "ignore", or "auto" = ignore them when the aligned depth comes
        from the ``sfm`` depth backend (multi-view stereo cannot measure moving objects; its depth
        there is interpolated from the surrounding background, so its order is wrong exactly
        where an object stands in front of the background) and use them otherwise.
    reprojection_weight: weight of the track reprojection loss (0 = off; needs the tracks stage).
    reprojection_tracks: tracks per step in that loss.
    rigidity_weight, rotation_weight, isometry_weight: weights of Dynamic 3D Gaussians' local
        rigidity, rotation similarity and isometry priors on the dynamic Gaussians (0 = off).
    knn: neighbours per dynamic Gaussian in those priors.
    label_weight: weight of the label-map loss (0 = off): the one-hot mask labels of the
        Gaussians rendered as colours, half the L1 distance to the masks' one-hot labels (one
        more rasterization per step; see :mod:`models.layers`).
    background: "random" (a random colour per step; evaluation on black), "black" or "white".
    exposure: learn a per-frame colour affine (Dynamic 3D Gaussians' per-camera ``cam_m`` /
        ``cam_c``): the render of frame i is ``C * exp(m_i) + alpha * c_i + (1 - alpha) * bg``
        with ``m_i, c_i (3,)`` identity-initialised (C the rendered colour, bg the background,
        which the affine leaves alone), for phone videos whose exposure or white balance
        changes. Held-out frames (and video frames between frames) use the training frames'
        values interpolated linearly in time; PLY files, exports and the viewer show the
        unadjusted colours.
    lr_exposure: learning rate of ``m_i`` and ``c_i``.
    densify: run gsplat's DefaultStrategy (duplicate / split / prune).
    grow_grad2d: image-space gradient threshold for duplicating / splitting.
    max_gaussians: densification stops growing once there are this many Gaussians.

    Schedule: every step-based setting is a fraction of ``iterations`` (rounded to whole steps,
    at least 1), so changing the budget changes one number, as gsplat's ``steps_scaler`` does.
    The learning-rate decays above are relative to ``iterations`` too.

    refine_start_fraction: first densification after this fraction of the iterations.
    refine_stop_fraction: no densification (nor opacity reset) after this fraction.
    refine_every_fraction: densify every this fraction of the iterations.
    opacity_reset_fraction: while densifying, clamp all opacities to 0.01 every this fraction of
        the iterations (3DGS's opacity reset; 0 = never). Never at step 0, so the init stage's
        opacities are what training starts from, whatever gsplat version is installed (older
        releases reset at step 0, 1.5.3 never resets: the strategy's own reset is not used).
    sh_degree_fraction: the SH degree in use grows by one every this fraction of the iterations
        (from 0 to the model's degree).
    log_fraction: record the loss curve every this fraction of the iterations (0 = every step).
    eval_fraction: score the held-out frames every this fraction (0 = only at the end).
    checkpoint_fraction: with resume_from, save the resumable state every this fraction (and at
        the end). A resumed run follows the schedule of its own ``iterations``.
    resume_from: file path of the resumable checkpoint ("" = none); see the module docstring.
    make_videos: write novel_view.mp4 and time_sweep.mp4.
    novel_offset: amplitude of the novel camera path's sway, as a fraction of the scene scale.
    export_ply: write a standard 3DGS PLY per exported frame.
    ply_every: export every this many frames.
    seed: random seed.
    device: "auto" (CUDA when available), "cpu" or "cuda".
    backend: rasterizer backend, "auto" (gsplat on CUDA, else numba), "gsplat", "numba" (compiled
        CPU) or "torch" (pure-PyTorch reference).
    """

    iterations: int = 3000
    downscale: int = 1
    lr_means: float = 1.6e-4
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2.5e-3
    lr_shN: float = 1.25e-4
    lr_deformation: float = 5e-4
    ssim_weight: float = 0.2
    ordinal_weight: float = 0.1
    ordinal_alpha: float = 50.0
    ordinal_pairs: int = 4096
    ordinal_min_gap: float = 0.05
    depth_l1_weight: float = 0.0
    prior_on_dynamic: str = "auto"
    reprojection_weight: float = 0.0
    reprojection_tracks: int = 1024
    rigidity_weight: float = 0.0
    rotation_weight: float = 0.0
    isometry_weight: float = 0.0
    knn: int = 8
    label_weight: float = 0.0
    background: str = "random"
    exposure: bool = False
    lr_exposure: float = 0.01
    densify: bool = True
    grow_grad2d: float = 0.0002
    max_gaussians: int = 200000
    refine_start_fraction: float = 0.15
    refine_stop_fraction: float = 0.75
    refine_every_fraction: float = 0.05
    opacity_reset_fraction: float = 0.0
    sh_degree_fraction: float = 0.1
    log_fraction: float = 0.01
    eval_fraction: float = 0.2
    checkpoint_fraction: float = 0.25
    resume_from: str = ""
    make_videos: bool = True
    novel_offset: float = 0.05
    export_ply: bool = True
    ply_every: int = 1
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot make sense."""
        whole = ("iterations", "downscale", "ordinal_pairs", "reprojection_tracks", "knn", "max_gaussians",
                 "ply_every", "seed")
        for name in whole:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ParameterError(f"train.{name} must be a whole number, got {value!r}",
                                     f"write train.{name} without a decimal point")
        positive = ("iterations", "downscale", "ordinal_pairs", "reprojection_tracks", "knn", "max_gaussians",
                    "ply_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ParameterError(f"train.{name}={getattr(self, name)} must be at least 1", f"raise train.{name}")
        for name in ("lr_means", "lr_scales", "lr_quats", "lr_opacities", "lr_sh0", "lr_shN", "lr_deformation",
                     "lr_exposure"):
            if not 0 <= getattr(self, name) < 1:
                raise ParameterError(f"train.{name}={getattr(self, name)} is not a learning rate in [0, 1)",
                                     "use the default")
        for name in ("ordinal_weight", "depth_l1_weight", "reprojection_weight", "rigidity_weight", "rotation_weight",
                     "isometry_weight", "label_weight", "novel_offset", "grow_grad2d"):
            if getattr(self, name) < 0:
                raise ParameterError(f"train.{name}={getattr(self, name)} must not be negative", "use 0 to turn it off")
        if not 0 <= self.ssim_weight <= 1:
            raise ParameterError(f"train.ssim_weight={self.ssim_weight} is not in [0, 1]", "use e.g. 0.2")
        if not self.ordinal_alpha > 0 or not 0 <= self.ordinal_min_gap < 1:
            raise ParameterError("train.ordinal_alpha must be > 0 and train.ordinal_min_gap in [0, 1)",
                                 "use e.g. ordinal_alpha=50, ordinal_min_gap=0.05")
        for name in ("refine_start_fraction", "refine_stop_fraction", "opacity_reset_fraction", "sh_degree_fraction",
                     "log_fraction", "eval_fraction", "checkpoint_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParameterError(f"train.{name}={getattr(self, name)} is not a fraction of the iterations in "
                                     f"[0, 1]", "use the default")
        if not 0 < self.refine_every_fraction <= 1 or not 0 < self.sh_degree_fraction:
            raise ParameterError("train.refine_every_fraction and train.sh_degree_fraction must be in (0, 1]",
                                 "use e.g. 0.05 and 0.1")
        if self.refine_start_fraction >= self.refine_stop_fraction and self.densify:
            raise ParameterError(f"train.refine_start_fraction={self.refine_start_fraction} is not below "
                                 f"train.refine_stop_fraction={self.refine_stop_fraction}: nothing would densify",
                                 "lower refine_start_fraction, or set train.densify=false")
        if self.prior_on_dynamic not in PRIOR_ON_DYNAMIC:
            raise ParameterError(f"train.prior_on_dynamic={self.prior_on_dynamic!r} is unknown",
                                 f"use one of {', '.join(PRIOR_ON_DYNAMIC)}")
        if self.background not in BACKGROUNDS:
            raise ParameterError(f"train.background={self.background!r} is unknown", f"use one of {', '.join(BACKGROUNDS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ParameterError(f"train.device={self.device!r} is unknown", "use auto, cpu or cuda")
        if self.backend not in ("auto", "gsplat", "numba", "torch"):
            raise ParameterError(f"train.backend={self.backend!r} is unknown", "use auto, gsplat, numba or torch")


@dataclass(frozen=True)
class Schedule:
    """The step numbers of :class:`Params`' schedule for its ``iterations``: densification from
    ``refine_start`` (exclusive, gsplat's convention) to ``refine_stop`` every ``refine_every``
    steps, opacity resets every ``opacity_reset_every`` steps (0 = never), the SH degree growing
    every ``sh_degree_every`` steps, and log / evaluation (0 = only at the end) / checkpoint
    intervals."""

    refine_start: int
    refine_stop: int
    refine_every: int
    opacity_reset_every: int
    sh_degree_every: int
    log_every: int
    eval_every: int
    checkpoint_every: int


def make_schedule(params: Params) -> Schedule:
    """:class:`Schedule` of ``params``: each fraction times ``iterations``, rounded, at least 1
    step (the fractions that may be 0 keep their "off" meaning)."""

    def steps(fraction: float) -> int:
        return max(1, round(fraction * params.iterations))

    return Schedule(refine_start=round(params.refine_start_fraction * params.iterations),
                    refine_stop=round(params.refine_stop_fraction * params.iterations) if params.densify else 0,
                    refine_every=steps(params.refine_every_fraction),
                    opacity_reset_every=steps(params.opacity_reset_fraction) if params.opacity_reset_fraction else 0,
                    sh_degree_every=steps(params.sh_degree_fraction), log_every=steps(params.log_fraction),
                    eval_every=steps(params.eval_fraction) if params.eval_fraction else 0,
                    checkpoint_every=steps(params.checkpoint_fraction))


def sh_degree_at(step: int, schedule: Schedule, max_degree: int) -> int:
    """The SH degree in use at ``step``."""
    return min(step // schedule.sh_degree_every, max_degree)


@dataclass
class TrainingData:
    """Everything the loop reads, at training resolution, on the training device.

    ``images (T, H, W, 3)`` uint8 tensor; ``K (T, 3, 3)``, ``w2c (T, 4, 4)`` float32 tensors;
    ``times (T,)`` normalised times; ``train_frames`` / ``eval_frames`` indices; optional
    ``prior_depth (T, H, W)`` float32 tensor (0 = invalid) with per-frame ``depth_ranges`` and
    ``depth_medians`` (world units); optional ``masks (T, H, W)`` uint8 tensor (0 static); optional
    ``tracks`` (``xy (N, T, 2)`` float32 tensor at training resolution, ``visible (N, T)`` bool);
    ``eval_background (3,)`` background used for evaluation; ``scene_scale`` (world units);
    ``fps`` the frame rate of the videos written.
    """

    images: Tensor
    K: Tensor
    w2c: Tensor
    times: np.ndarray
    train_frames: list[int]
    eval_frames: list[int]
    scene_scale: float
    eval_background: Tensor
    prior_depth: Tensor | None = None
    depth_ranges: np.ndarray | None = None
    depth_medians: np.ndarray | None = None
    masks: Tensor | None = None
    tracks: dict | None = None
    valid_depth_index: list = dataclass_field(default_factory=list)
    fps: float = 10.0

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])


def resize_stack(stack: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    """Resize every ``(H, W, ...)`` slice of ``stack (T, H, W, ...)`` to ``width`` x ``height``."""
    if stack.shape[2] == width and stack.shape[1] == height:
        return stack
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return np.stack([cv2.resize(item, (width, height), interpolation=interpolation) for item in stack])


def background_colour(mode: str, device) -> Tensor:
    """``(3,)`` float32 evaluation background: white for "white", else black."""
    import torch

    return torch.full((3,), 1.0 if mode == "white" else 0.0, device=device)


def build_training_data(images: np.ndarray, K: np.ndarray, w2c: np.ndarray, times: np.ndarray,
                        train_frames: list[int], eval_frames: list[int], scene_scale: float, params: Params,
                        device: str, prior_depth: np.ndarray | None = None, masks: np.ndarray | None = None,
                        tracks: dict | None = None) -> TrainingData:
    """Resize to the training resolution (``params.downscale``), scale ``K`` and track positions,
    precompute the ordinal loss's per-frame depth statistics and move everything to ``device``."""
    import torch

    from data.geometry import scale_intrinsics
    from models.losses import depth_range

    num_frames, height, width = images.shape[:3]
    new_width, new_height = max(8, round(width / params.downscale)), max(8, round(height / params.downscale))
    sx, sy = new_width / width, new_height / height
    data = TrainingData(
        images=torch.as_tensor(resize_stack(images, new_width, new_height, nearest=False), device=device),
        K=torch.as_tensor(scale_intrinsics(K, sx, sy), dtype=torch.float32, device=device),
        w2c=torch.as_tensor(w2c, dtype=torch.float32, device=device), times=np.asarray(times, np.float64),
        train_frames=list(train_frames), eval_frames=list(eval_frames), scene_scale=float(scene_scale),
        eval_background=background_colour(params.background, device))
    if prior_depth is not None:
        depth = resize_stack(prior_depth.astype(np.float32), new_width, new_height, nearest=True)
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        data.prior_depth = torch.as_tensor(depth, device=device)
        data.depth_ranges = np.array([depth_range(frame) for frame in depth])
        data.depth_medians = np.array([np.median(frame[frame > 0]) if np.any(frame > 0) else 0.0 for frame in depth])
        data.valid_depth_index = [torch.as_tensor(np.flatnonzero(frame.ravel() > 0), device=device) for frame in depth]
    if masks is not None:
        data.masks = torch.as_tensor(resize_stack(masks, new_width, new_height, nearest=True), device=device)
    if tracks is not None:
        xy = tracks["xy"].astype(np.float32) * np.array([sx, sy], np.float32)
        visible = tracks["visible"].astype(bool) & np.isfinite(xy).all(axis=2)
        data.tracks = {"xy": torch.as_tensor(np.nan_to_num(xy), device=device),
                       "visible": torch.as_tensor(visible, device=device)}
    return data


def make_optimizers(model, params: Params, scene_scale: float) -> tuple[dict, object]:
    """One Adam per Gaussian parameter (gsplat's convention, which its strategies need) and one
    for the deformation field."""
    import torch

    rates = {"means": params.lr_means * scene_scale, "scales": params.lr_scales, "quats": params.lr_quats,
             "opacities": params.lr_opacities, "sh0": params.lr_sh0, "shN": params.lr_shN}
    optimizers = {name: torch.optim.Adam([{"params": [model.params[name]], "lr": rates[name], "name": name}],
                                         eps=1e-15) for name in model.params}
    field_optimizer = torch.optim.Adam(model.field.parameters(), lr=params.lr_deformation)
    return optimizers, field_optimizer


def set_learning_rates(optimizers: dict, field_optimizer, params: Params, scene_scale: float, step: int) -> None:
    """Exponential decays: positions to 1 %, the deformation field to 10 % at the last step."""
    progress = step / max(params.iterations - 1, 1)
    for group in optimizers["means"].param_groups:
        group["lr"] = params.lr_means * scene_scale * 0.01 ** progress
    for group in field_optimizer.param_groups:
        group["lr"] = params.lr_deformation * 0.1 ** progress


def make_strategy(params: Params, schedule: Schedule, scene_scale: float):
    """gsplat's DefaultStrategy with this stage's schedule, and its fresh state dict. Its
    ``reset_every`` is the opacity-reset interval (it also gates the pruning of too large
    Gaussians to after the first reset) or, without resets, longer than the run; the reset itself
    is :func:`maybe_reset_opacities`' (gsplat releases differ: see ``Params``)."""
    from gsplat import DefaultStrategy

    strategy = DefaultStrategy(refine_start_iter=schedule.refine_start, refine_stop_iter=schedule.refine_stop,
                               refine_every=schedule.refine_every, grow_grad2d=params.grow_grad2d,
                               reset_every=schedule.opacity_reset_every or params.iterations + 1)
    return strategy, strategy.initialize_state(scene_scale=scene_scale)


def maybe_reset_opacities(model, optimizers: dict, variables: dict, strategy, schedule: Schedule, step: int) -> bool:
    """3DGS's opacity reset after ``step``: clamp every opacity to twice the strategy's pruning
    threshold every ``opacity_reset_every`` steps while densifying, never at step 0. Returns
    whether it reset. (Idempotent with a gsplat release that resets at the same steps.)"""
    from gsplat.strategy.ops import reset_opa

    every = schedule.opacity_reset_every
    if not every or step == 0 or step % every or step >= strategy.refine_stop_iter:
        return False
    reset_opa(params=model.params, optimizers=optimizers, state=variables, value=strategy.prune_opa * 2.0)
    return True


def training_loss(model, variables: dict, data: TrainingData, frame: int, sh_degree: int, params: Params, graph,
                  generator, background) -> tuple[object, dict, dict]:
    """Render ``frame`` with SH degree ``sh_degree`` (and the frame's colour affine when the model
    has one) and compute the weighted loss. Returns ``(loss, parts, render output)``; ``parts``
    maps each active term's name to its unweighted float value (and ``psnr``). ``graph`` is the
    dynamic Gaussians' :class:`~models.losses.NeighbourGraph` (None: priors off)."""
    from models import losses
    from models.gaussians import render

    time = float(data.times[frame])
    exposure = None if model.exposure is None else model.exposure[frame]
    out = render(model.params, variables, model.field, time, data.K[frame], data.w2c[frame], data.width,
                 data.height, sh_degree, background, params.backend, exposure)
    target = data.images[frame].float() / 255.0
    loss = losses.photometric_loss(out["rgb"], target, params.ssim_weight)
    parts = {"photometric": float(loss.detach()), "psnr": float(losses.psnr(out["rgb"].detach(), target))}
    rendered_depth = out["depth"].reshape(-1)
    if data.prior_depth is not None and (params.ordinal_weight > 0 or params.depth_l1_weight > 0):
        prior = data.prior_depth[frame].reshape(-1)
        valid_index = data.valid_depth_index[frame]
        depth_scale = float(data.depth_ranges[frame])
        if params.ordinal_weight > 0 and depth_scale > 0 and len(valid_index) > 1:
            a, b, order = losses.sample_ordinal_pairs(prior, valid_index, params.ordinal_pairs,
                                                      params.ordinal_min_gap * depth_scale, generator)
            ordinal = losses.ordinal_depth_loss(rendered_depth, a, b, order, params.ordinal_alpha, depth_scale)
            loss = loss + params.ordinal_weight * ordinal
            parts["ordinal"] = float(ordinal.detach())
        if params.depth_l1_weight > 0 and data.depth_medians[frame] > 0:
            depth_l1 = losses.depth_l1_loss(out["depth"], data.prior_depth[frame], data.prior_depth[frame] > 0,
                                            float(data.depth_medians[frame]))
            loss = loss + params.depth_l1_weight * depth_l1
            parts["depth_l1"] = float(depth_l1.detach())
    if params.reprojection_weight > 0 and data.tracks is not None and len(data.train_frames) > 1:
        reprojection = track_reprojection(model, data, frame, out["depth"], params, generator)
        loss = loss + params.reprojection_weight * reprojection
        parts["reprojection"] = float(reprojection.detach())
    if params.label_weight > 0 and data.masks is not None:
        from models import layers

        classes = layers.label_classes(model)
        label_map = layers.render_label_map(out["gaussians"], layers.one_hot_labels(variables["label"], classes),
                                            data.K[frame], data.w2c[frame], data.width, data.height, params.backend)
        label_term = layers.label_loss(label_map, layers.class_index_map(data.masks[frame], classes))
        loss = loss + params.label_weight * label_term
        parts["label"] = float(label_term.detach())
    if graph is not None:
        gaussians = out["gaussians"]
        dynamic = gaussians["dynamic"]
        priors = losses.physical_priors(model.params["means"][dynamic], gaussians["means"][dynamic],
                                        gaussians["rotation_delta"], graph)
        for name, weight in (("rigidity", params.rigidity_weight), ("rotation", params.rotation_weight),
                             ("isometry", params.isometry_weight)):
            if weight > 0:
                loss = loss + weight * priors[name]
                parts[name] = float(priors[name].detach())
    return loss, parts, out


def track_reprojection(model, data: TrainingData, frame: int, rendered_depth, params: Params, generator):
    """The track reprojection loss from ``frame`` to another random training frame."""
    import torch

    from models.losses import reprojection_loss

    others = [f for f in data.train_frames if f != frame]
    target = others[int(torch.randint(len(others), (1,), generator=generator))]
    visible = data.tracks["visible"]
    usable = torch.nonzero(visible[:, frame] & visible[:, target], as_tuple=True)[0]
    if len(usable) > params.reprojection_tracks:
        usable = usable[torch.randperm(len(usable), generator=generator)[:params.reprojection_tracks].to(usable.device)]
    xy_source, xy_target = data.tracks["xy"][usable, frame], data.tracks["xy"][usable, target]
    if data.masks is not None:
        cols = xy_source[:, 0].long().clamp(0, data.width - 1)
        rows = xy_source[:, 1].long().clamp(0, data.height - 1)
        dynamic = data.masks[frame][rows, cols] > 0
    else:
        dynamic = torch.ones(len(usable), dtype=torch.bool, device=xy_source.device)
    return reprojection_loss(model.field, rendered_depth, xy_source, xy_target, dynamic, data.K[frame],
                             data.w2c[frame], data.K[target], data.w2c[target], float(data.times[frame]),
                             float(data.times[target]), REPROJECTION_CAP * max(data.width, data.height))


def ignores_dynamic_prior(setting: str, depth_kind: str | None) -> bool:
    """Whether the depth-prior losses leave out dynamic pixels (``Params.prior_on_dynamic``)."""
    return setting == "ignore" or (setting == "auto" and depth_kind in STATIC_SCENE_DEPTH_KINDS)


def needs_priors(params: Params) -> bool:
    """Whether any physical prior is on."""
    return params.rigidity_weight > 0 or params.rotation_weight > 0 or params.isometry_weight > 0


def file_digest(path: Path) -> str:
    """SHA-1 of a file's bytes (identifies the init checkpoint a resumable state belongs to)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoopState:
    """Mutable state of the optimisation: the strategy's per-Gaussian ``variables``, optimisers
    (``exposure_optimizer`` None without ``Params.exposure``), the next ``step``, the ``curves``
    recorded so far and the torch ``generator``."""

    variables: dict
    optimizers: dict
    field_optimizer: object
    strategy: object
    step: int
    curves: dict
    generator: object
    exposure_optimizer: object = None


def new_curves() -> dict:
    """Empty training curves: losses every ``Schedule.log_every`` steps, evaluations every
    ``Schedule.eval_every``."""
    return {"step": [], "loss": [], "psnr_train_step": [], "num_gaussians": [], "sh_degree": [], "parts": {},
            "eval_step": [], "psnr_eval": [], "ssim_eval": []}


def save_resumable(path: Path, model, state: LoopState, init_digest: str, params: Params) -> None:
    """Write the full optimisation state to ``path`` (atomically)."""
    from models.gaussians import save_model

    strategy_state = {key: value for key, value in state.variables.items() if key not in ("is_dynamic", "label")}
    extra = {"step": state.step, "curves": state.curves, "init_digest": init_digest, "params": asdict(params),
             "optimizers": {name: optimizer.state_dict() for name, optimizer in state.optimizers.items()},
             "field_optimizer": state.field_optimizer.state_dict(), "strategy_state": strategy_state,
             "generator": state.generator.get_state()}
    if state.exposure_optimizer is not None:
        extra["exposure_optimizer"] = state.exposure_optimizer.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, extra)


def try_resume(path: Path, init_digest: str, params: Params, device: str, notes: list[str]):
    """The model and ``extra`` of a resumable checkpoint at ``path`` when it exists and belongs to
    this init output; else None (with a note when a foreign checkpoint was found)."""
    from models.gaussians import load_model

    if not path.is_file():
        return None
    try:
        model, extra = load_model(path, device)
    except (ValueError, RuntimeError, OSError) as error:
        notes.append(f"resume checkpoint {path} is unreadable ({error}); training from the init output")
        return None
    if extra.get("init_digest") != init_digest:
        notes.append(f"resume checkpoint {path} belongs to another init output; training from the init output")
        return None
    changed = sorted(key for key, value in extra.get("params", {}).items()
                     if key in asdict(params) and asdict(params)[key] != value and key != "iterations")
    if changed:
        notes.append(f"resumed from {path} written with other train parameters: {', '.join(changed)}")
    return model, extra


def optimize(model, data: TrainingData, params: Params, device: str, resume_path: Path | None = None,
             init_digest: str = "", notes: list[str] | None = None, evaluate_fn=None) -> tuple[object, dict, dict]:
    """Run the optimisation loop on ``model`` (a :class:`models.gaussians.SceneModel`) in place.

    ``evaluate_fn(model, variables, step) -> dict`` (optional) scores the evaluation frames for the
    curves every ``Schedule.eval_every`` steps. Returns ``(variables, curves, stats)`` with ``stats``
    holding ``iterations_per_second`` and ``resumed_from_step``.
    """
    import torch

    from models.layers import gaussian_labels
    from models.losses import knn_graph

    notes = notes if notes is not None else []
    generator = torch.Generator().manual_seed(params.seed)
    schedule = make_schedule(params)
    strategy, strategy_state = make_strategy(params, schedule, data.scene_scale)
    resumed_from = 0
    resumed = try_resume(resume_path, init_digest, params, device, notes) if resume_path else None
    if resumed is not None:
        resumed_model, extra = resumed
        model.params, model.field = resumed_model.params, resumed_model.field
        model.variables, model.exposure = resumed_model.variables, resumed_model.exposure
        strategy_state.update({key: (value.to(device) if torch.is_tensor(value) else value)
                               for key, value in extra["strategy_state"].items()})
        generator.set_state(extra["generator"])
        resumed_from = int(extra["step"])
    variables = dict(strategy_state)
    variables["is_dynamic"] = model.variables["is_dynamic"].to(device)
    variables["label"] = gaussian_labels(model).to(device)  # kept through densification like is_dynamic
    model.variables = variables
    optimizers, field_optimizer = make_optimizers(model, params, data.scene_scale)
    exposure_optimizer = None
    if params.exposure:
        if model.exposure is None or len(model.exposure) != len(data.images):
            model.exposure = torch.nn.Parameter(torch.zeros(len(data.images), 2, 3, device=device))
        exposure_optimizer = torch.optim.Adam([model.exposure], lr=params.lr_exposure)
    else:
        model.exposure = None
    if resumed is not None:
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(extra["optimizers"][name])
        field_optimizer.load_state_dict(extra["field_optimizer"])
        if exposure_optimizer is not None and "exposure_optimizer" in extra:
            exposure_optimizer.load_state_dict(extra["exposure_optimizer"])
    strategy.check_sanity(model.params, optimizers)
    state = LoopState(variables, optimizers, field_optimizer, strategy, resumed_from,
                      extra["curves"] if resumed is not None else new_curves(), generator, exposure_optimizer)

    graph, graph_means = None, None
    started, first_step = timer.perf_counter(), state.step
    progress = tqdm(range(state.step, params.iterations), desc="train", unit="step", leave=False)
    for step in progress:
        set_learning_rates(optimizers, field_optimizer, params, data.scene_scale, step)
        if needs_priors(params) and model.num_dynamic > params.knn:
            # densification replaces the parameter tensors (and reorders Gaussians): rebuild then,
            # and every refine_every steps as the canonical positions drift
            if graph_means is not model.params["means"] or step % schedule.refine_every == 0:
                dynamic = torch.nonzero(variables["is_dynamic"], as_tuple=True)[0]
                graph, graph_means = knn_graph(model.params["means"][dynamic], params.knn), model.params["means"]
        frame = data.train_frames[int(torch.randint(len(data.train_frames), (1,), generator=generator))]
        background = (torch.rand(3, generator=generator).to(device) if params.background == "random"
                      else data.eval_background)
        sh_degree = sh_degree_at(step, schedule, model.sh_degree)
        loss, parts, out = training_loss(model, variables, data, frame, sh_degree, params, graph, generator,
                                         background)
        strategy.step_pre_backward(model.params, optimizers, variables, step, out["info"])
        loss.backward()
        for optimizer in [*optimizers.values(), field_optimizer, *([exposure_optimizer] if params.exposure else [])]:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step > 0:  # older gsplat releases reset all opacities at step 0 (see Params)
            strategy.step_post_backward(model.params, optimizers, variables, step, out["info"],
                                        packed=out["info"]["means2d"].dim() == 2)
            maybe_reset_opacities(model, optimizers, variables, strategy, schedule, step)
        if model.num_gaussians >= params.max_gaussians and strategy.refine_stop_iter > step:
            strategy.refine_stop_iter = step
            notes.append(f"densification stopped at step {step}: {model.num_gaussians} Gaussians reached "
                         f"train.max_gaussians")
        state.step = step + 1
        if step % schedule.log_every == 0 or step == params.iterations - 1:
            loss_value = float(loss.detach())
            record(state.curves, step, loss_value, parts, model.num_gaussians, sh_degree)
            progress.set_postfix(loss=f"{loss_value:.4f}", psnr=f"{parts['psnr']:.2f}", n=model.num_gaussians)
        if evaluate_fn is not None and schedule.eval_every and step > 0 and step % schedule.eval_every == 0:
            scores = evaluate_fn(model, variables, step)
            state.curves["eval_step"].append(step)
            state.curves["psnr_eval"].append(scores["psnr"])
            state.curves["ssim_eval"].append(scores["ssim"])
        if resume_path and (state.step % schedule.checkpoint_every == 0):
            save_resumable(resume_path, model, state, init_digest, params)
    elapsed = timer.perf_counter() - started
    if model.exposure is not None:
        fill_exposure(model.exposure, data)
    if resume_path:
        save_resumable(resume_path, model, state, init_digest, params)
    steps_run = params.iterations - first_step
    stats = {"iterations_per_second": round(steps_run / elapsed, 3) if steps_run > 0 and elapsed > 0 else 0.0,
             "resumed_from_step": resumed_from}
    return variables, state.curves, stats


def fill_exposure(exposure, data: TrainingData) -> None:
    """Set the colour affine ``exposure (T, 2, 3)`` of the frames not trained on (held out,
    unposed) to the training frames' interpolated in time (:func:`models.gaussians.exposure_at`)."""
    import torch

    from models.gaussians import exposure_at

    trained = set(data.train_frames)
    with torch.no_grad():
        for frame in range(len(exposure)):
            if frame not in trained:
                exposure[frame] = exposure_at(exposure, data.times, data.train_frames, float(data.times[frame]))


def record(curves: dict, step: int, loss: float, parts: dict, num_gaussians: int, sh_degree: int) -> None:
    """Append one point of the training curves."""
    curves["step"].append(step)
    curves["loss"].append(round(loss, 6))
    curves["psnr_train_step"].append(round(parts["psnr"], 3))
    curves["num_gaussians"].append(num_gaussians)
    curves.setdefault("sh_degree", []).append(sh_degree)
    for name, value in parts.items():
        if name != "psnr":
            curves["parts"].setdefault(name, []).append(round(value, 6))


def load_training_data(inputs: Mapping[str, Path], params: Params, meta: dict, device: str,
                       notes: list[str]) -> TrainingData:
    """The :class:`TrainingData` of a model whose ``meta`` (frame count, size, times, training and
    held-out frames, scene scale) the init stage wrote, from the stage outputs ``inputs``
    (``frames``, ``cameras``, ``align``, ``masks``, and ``tracks`` when the reprojection loss is
    on); appends what it notices to ``notes``."""
    from data.artifacts import read_aligned_depth, read_aligned_kind, read_cameras, read_masks
    from stages.frames import load_frames, read_frames_meta

    images = load_frames(inputs["frames"])
    K, w2c, _ = read_cameras(inputs["cameras"])
    depth = read_aligned_depth(inputs["align"])
    masks = read_masks(inputs["masks"])
    expected = (meta["num_frames"], meta["height"], meta["width"])
    for what, shape in (("frames", images.shape[:3]), ("aligned depth", depth.shape), ("masks", masks.shape)):
        if tuple(shape) != expected:
            raise InputError(f"{what} {tuple(shape)} do not match the init stage's frames {expected}",
                             "rerun init and train on the same upstream outputs")
    depth_kind = read_aligned_kind(inputs["align"])
    if ignores_dynamic_prior(params.prior_on_dynamic, depth_kind):
        depth = np.where(masks > 0, 0.0, depth).astype(np.float32)
        notes.append(f"depth-prior losses skip the dynamic pixels of the masks stage (aligned depth kind "
                     f"{depth_kind!r}; train.prior_on_dynamic={params.prior_on_dynamic})")
    tracks = None
    if "tracks" in inputs and params.reprojection_weight > 0:
        from data.artifacts import read_tracks

        tracks = read_tracks(inputs["tracks"])
    train_frames = [int(i) for i in meta["train_frames"]]
    eval_frames = [int(i) for i in meta["holdout_frames"] if np.isfinite(w2c[i]).all()]
    if not eval_frames:
        notes.append("no held-out frame (init.holdout_every = 0): scores are on training frames only")
    data = build_training_data(images, K, np.nan_to_num(w2c), np.asarray(meta["times"]), train_frames, eval_frames,
                               float(meta["scene_scale"]), params, device, prior_depth=depth, masks=masks,
                               tracks=tracks)
    data.fps = float(read_frames_meta(inputs["frames"]).get("fps") or data.fps)
    return data


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Train the init stage's model on the frames (see the module docstring).

    ``inputs``: ``init``, ``frames``, ``cameras``, ``align``, ``masks`` and optionally ``tracks``
    (needed when ``reprojection_weight`` > 0). Returns key figures: ``psnr_heldout``,
    ``ssim_heldout``, ``psnr_train``, ``ssim_train``, ``psnr_dynamic_heldout``,
    ``depth_order_heldout`` (agreement of rendered depth order with the aligned depth),
    ``num_gaussians``, ``num_dynamic``, ``iterations_per_second``, ``lpips`` (None: see the
    module docstring), with ``notes``.
    """
    import torch

    from stages import init as init_stage
    from stages import train_outputs

    params.validate()
    for name in ("init", "frames", "cameras", "align", "masks"):
        if name not in inputs:
            raise InputError(f"the train stage needs the {name} stage's output (inputs[{name!r}])",
                             f"run the {name} stage first")
    if params.reprojection_weight > 0 and "tracks" not in inputs:
        raise InputError("train.reprojection_weight > 0 needs the tracks stage's output (inputs['tracks'])",
                         "run the tracks stage, or set train.reprojection_weight=0")
    out_dir = Path(out_dir)
    device = init_stage.resolve_device(params.device)
    torch.manual_seed(params.seed)
    notes: list[str] = []

    init_path = Path(inputs["init"]) / init_stage.CHECKPOINT_FILE
    model = init_stage.load_init(inputs["init"], device)
    meta = model.meta
    data = load_training_data(inputs, params, meta, device, notes)
    train_frames, eval_frames = data.train_frames, data.eval_frames
    if params.ordinal_weight > 0 and not np.any(data.depth_ranges[train_frames] > 0):
        notes.append("the aligned depth has no valid pixels: the ordinal depth loss is inactive")

    def evaluate_fn(current, variables, step):
        return train_outputs.score_frames(current, data, eval_frames or train_frames, params)["mean"]

    resume_path = Path(params.resume_from) if params.resume_from else None
    variables, curves, stats = optimize(model, data, params, device, resume_path, file_digest(init_path), notes,
                                        evaluate_fn)
    model.meta = {**meta, "stage": "train", "train_params": asdict(params)}
    figures = train_outputs.write_all(out_dir, model, data, params, curves)
    figures.update(stats)
    figures["lpips"] = None
    notes.append("LPIPS not computed: it needs the lpips package with pretrained AlexNet/VGG weights "
                 "(and torchvision), none of which is available offline here")
    figures["notes"] = notes
    logger.info("train: held-out PSNR %.2f dB, %d Gaussians, %.2f it/s", figures.get("psnr_heldout", float("nan")),
                figures["num_gaussians"], stats["iterations_per_second"])
    return figures


def load_trained(train_dir: str | Path, device: str = "cpu"):
    """The train stage's model (:class:`models.gaussians.SceneModel`) on ``device``."""
    from models.gaussians import load_model

    path = Path(train_dir) / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: {train_dir} is not a finished train stage output",
                         "run the train stage first")
    model, _ = load_model(path, device)
    return model


# ----------------------------------------------------------------------------------------------
# D-NeRF


@dataclass(frozen=True)
class DnerfInit:
    """Initial Gaussians of a D-NeRF scene (no depth): ``num_points`` random points in the cube
    ``[-half_size, half_size]^3`` that project onto the foreground (alpha > 0.5) in at least
    ``min_foreground`` of all training views (a loose visual hull, loose because the object
    moves), coloured with the mean of those views' pixels; all dynamic. ``candidates`` points are
    drawn before that filter."""

    num_points: int = 20000
    candidates: int = 400000
    half_size: float = 1.5
    min_foreground: float = 0.6
    sh_degree: int = 3
    init_opacity: float = 0.1
    deform_layers: int = 6
    deform_width: int = 64
    position_frequencies: int = 4
    time_frequencies: int = 6


def read_rgba_frames(paths: list[Path], width: int, height: int) -> np.ndarray:
    """``(T, H, W, 4)`` uint8 RGBA images resized (area) to ``width`` x ``height``."""
    frames = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise InputError(f"cannot read image {path}", "check the D-NeRF dataset's image folders")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
        elif image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
        frames.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def composite(rgba: np.ndarray, background: float) -> np.ndarray:
    """``(..., 3)`` uint8 RGB of RGBA images over a grey level ``background`` in [0, 1]."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * background * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def dnerf_initial_model(rgba: np.ndarray, K: np.ndarray, w2c: np.ndarray, settings: DnerfInit, seed: int):
    """The :class:`DnerfInit` Gaussians and an identity deformation field (a SceneModel)."""
    import torch

    from data.geometry import project_points
    from models.deformation import DeformationConfig, DeformationField
    from models.gaussians import SceneModel, create_params
    from stages.init import nearest_neighbour_scales

    rng = np.random.default_rng(seed)
    points = rng.uniform(-settings.half_size, settings.half_size, (settings.candidates, 3))
    height, width = rgba.shape[1:3]
    inside = np.zeros(len(points))
    color_sum = np.zeros((len(points), 3))
    for frame in range(len(rgba)):
        uv, depth = project_points(K[frame], w2c[frame], points)
        cols, rows = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        ok = (depth > 0) & (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        r, c = rows[ok].astype(np.int64), cols[ok].astype(np.int64)
        foreground = rgba[frame, r, c, 3] > 127
        inside[np.flatnonzero(ok)[foreground]] += 1
        color_sum[np.flatnonzero(ok)[foreground]] += rgba[frame, r[foreground], c[foreground], :3] / 255.0
    keep = np.flatnonzero((inside > 0) & (inside >= settings.min_foreground * len(rgba)))
    if len(keep) < 100:
        raise InputError(f"only {len(keep)} random points fall on the D-NeRF foreground",
                         "check the dataset (RGBA images with an alpha channel, cameras around the origin)")
    keep = rng.choice(keep, min(settings.num_points, len(keep)), replace=False)
    points, colors = points[keep], color_sum[keep] / inside[keep, None]
    scales = nearest_neighbour_scales(points)
    params, variables = create_params(torch.as_tensor(points, dtype=torch.float32),
                                      torch.as_tensor(colors, dtype=torch.float32),
                                      torch.as_tensor(np.repeat(scales[:, None], 3, 1), dtype=torch.float32),
                                      torch.ones(len(points), dtype=torch.bool), settings.sh_degree,
                                      settings.init_opacity)
    config = DeformationConfig(num_layers=settings.deform_layers, hidden=settings.deform_width,
                               position_frequencies=settings.position_frequencies,
                               time_frequencies=settings.time_frequencies, canonical_time=0.5)
    field = DeformationField(config, torch.zeros(3), settings.half_size * math.sqrt(3.0))
    return SceneModel(params, variables, field, {"stage": "dnerf-init"})


def train_dnerf(root: str | Path, out_dir: str | Path, params: Params, init: DnerfInit = DnerfInit(),
                resolution: int = 400, write_renders: bool = True) -> dict:
    """Train on a D-NeRF folder's train split and score its test split at ``resolution`` x
    ``resolution`` over a white background (the standard protocol). Writes ``model.pt``,
    ``metrics.json``, ``curves.json``/``curves.png`` and (``write_renders``) the test renders to
    ``out_dir``. Returns ``psnr_test``, ``ssim_test``, ``num_gaussians``,
    ``iterations_per_second``."""
    import torch

    from data.dnerf import read_dnerf
    from data.geometry import scale_intrinsics
    from stages import train_outputs
    from stages.init import resolve_device

    params.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(params.device)
    train_split, test_split = read_dnerf(root, "train"), read_dnerf(root, "test")
    scale = resolution / train_split.width
    rgba = np.concatenate([read_rgba_frames(split.image_paths, resolution, resolution)
                           for split in (train_split, test_split)])
    K = scale_intrinsics(np.concatenate([train_split.K, test_split.K]), scale, scale)
    w2c = np.concatenate([train_split.w2c, test_split.w2c])
    times = np.concatenate([train_split.times, test_split.times])
    white = 1.0 if params.background == "white" else 0.0
    images = composite(rgba, white)
    num_train = train_split.num_frames
    model = dnerf_initial_model(rgba[:num_train], K[:num_train], w2c[:num_train], init, params.seed)
    model.params = {name: torch.nn.Parameter(value.detach().to(device)) for name, value in model.params.items()}
    model.field = model.field.to(device)
    model.variables = {"is_dynamic": model.variables["is_dynamic"].to(device)}
    camera_distance = float(np.median(np.linalg.norm(np.linalg.inv(w2c[:num_train])[:, :3, 3], axis=1)))
    data = build_training_data(images, K, w2c, times, list(range(num_train)), list(range(num_train, len(images))),
                               camera_distance, replace(params, downscale=1), device)
    eval_frames = data.eval_frames

    def evaluate_fn(current, variables, step):
        return train_outputs.score_frames(current, data, eval_frames, params)["mean"]

    notes: list[str] = []
    variables, curves, stats = optimize(model, data, params, device, None, "", notes, evaluate_fn)
    model.meta = {"stage": "train-dnerf", "dataset": str(root), "train_params": asdict(params),
                  "dnerf_init": asdict(init), "resolution": resolution}
    scores = train_outputs.score_frames(model, data, eval_frames, params, out_dir / "renders" if write_renders else None)
    train_outputs.write_metrics_and_curves(out_dir, model, scores, None, curves)
    return {"psnr_test": scores["mean"]["psnr"], "ssim_test": scores["mean"]["ssim"],
            "num_gaussians": model.num_gaussians, "iterations_per_second": stats["iterations_per_second"],
            "notes": notes}
