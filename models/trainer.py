"""The training loop of the dynamic Gaussians (stage 2 of the optimiser), as plain functions on
tensors: schedule, optimisers, one step's loss, densification hookup, evaluation, resumable
state. The train stage (:mod:`mono4d.stages.train`) reads its inputs into a :class:`TrainingData`,
calls :func:`optimize` and writes the outputs; ``params`` is that stage's ``Params``.

Layout as in Dynamic 3D Gaussians' train.py: the optimised tensors live in ``model.params`` (one
dict, one Adam per entry, gsplat's convention) and the non-optimised per-Gaussian state in one
``variables`` dict (``is_dynamic``, ``label`` and gsplat's strategy statistics, all kept aligned
through densification); densification is gsplat's ``DefaultStrategy`` object, separate from the
loop. Each step renders one random training frame at its time ``t``
(:func:`mono4d.models.gaussians.render`) over a random or fixed background and minimises

- ``(1 - ssim_weight) * L1 + ssim_weight * (1 - SSIM)`` against the frame;
- ``ordinal_weight`` x the ordinal depth loss (MoDGS): random pixel pairs whose prior depths
  differ by more than ``ordinal_min_gap`` of the frame's depth range are penalised by
  ``|tanh(ordinal_alpha * (R_a - R_b) / range) - sign(D_a - D_b)|`` (R rendered depth), so only
  the prior's depth *order* is trusted;
- ``depth_l1_weight`` x mean ``|R - D| / median(D)``;
- ``reprojection_weight`` x the track reprojection error: track points lifted with the rendered
  depth, moved by the deformation to another training frame and projected, against the tracked
  positions (errors capped at :data:`REPROJECTION_CAP` of the larger image side);
- ``rigidity_weight``, ``rotation_weight``, ``isometry_weight`` x Dynamic 3D Gaussians' priors on
  the dynamic Gaussians (k nearest neighbours in canonical space, refreshed after densification);
- ``label_weight`` x the label-map loss (:func:`mono4d.models.layers.label_loss`);
- ``static_layer_weight`` x the static layer's own terms (:func:`mono4d.models.layers.static_layer_loss`:
  the static Gaussians rendered alone, L1 on the masks' static pixels plus ``1 - alpha``);

then steps Adam (positions decaying exponentially to 1 %, the deformation field to 10 %) and the
strategy (duplicate / split / prune, capped at ``max_gaussians``), with our own opacity reset.
The SH degree in use grows by one every ``sh_degree_fraction`` of the iterations; every
step-based setting is such a fraction of ``iterations`` (:class:`Schedule`). With ``exposure``
a per-frame colour affine is learned too. The evaluation frames are scored (:func:`evaluate`)
every ``eval_fraction`` of the iterations.
"""
from __future__ import annotations

import time as timer
from dataclasses import asdict, dataclass, field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from torch import Tensor

    from mono4d.stages.train import Params


#: Reprojection errors are capped at this fraction of the image's larger side (outlier tracks).
REPROJECTION_CAP = 0.05
#: Random pixel pairs of the depth-order score, and their minimal depth gap (fraction of range).
DEPTH_ORDER_PAIRS = 20000
DEPTH_ORDER_MIN_GAP = 0.05


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
    ``fps`` the frame rate of the videos written; for multi-view input, ``cameras (T,)`` the
    dataset camera id and ``timesteps (T,)`` the timestep index of every frame (int arrays).
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
    cameras: np.ndarray | None = None
    timesteps: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def sequence_times(self) -> np.ndarray:
        """The normalised times of the scene's instants: every frame's time in frame order, or for
        multi-view input each timestep's once, increasing (``(S,)`` float64)."""
        return np.unique(self.times) if self.timesteps is not None else self.times


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

    from mono4d.data.geometry import scale_intrinsics
    from mono4d.models.losses import depth_range

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
    dynamic Gaussians' :class:`~mono4d.models.losses.NeighbourGraph` (None: priors off)."""
    from mono4d.models import losses
    from mono4d.models.gaussians import render

    time = float(data.times[frame])
    exposure = None if model.exposure is None else model.exposure[frame]
    out = render(model.params, variables, model.field, time, data.K[frame], data.w2c[frame], data.width,
                 data.height, sh_degree, background, params.backend, exposure, params.near_plane)
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
        from mono4d.models import layers

        classes = layers.label_classes(model)
        label_map = layers.render_label_map(out["gaussians"], layers.one_hot_labels(variables["label"], classes),
                                            data.K[frame], data.w2c[frame], data.width, data.height, params.backend)
        label_term = layers.label_loss(label_map, layers.class_index_map(data.masks[frame], classes))
        loss = loss + params.label_weight * label_term
        parts["label"] = float(label_term.detach())
    static = variables["label"] == 0 if params.static_layer_weight > 0 and data.masks is not None else None
    if static is not None and bool(static.any()):
        from mono4d.models import layers

        static_photometric, static_opacity = layers.static_layer_loss(
            out["gaussians"], static, target, data.masks[frame], data.K[frame], data.w2c[frame], data.width,
            data.height, sh_degree, background, params.backend, exposure, params.near_plane)
        loss = loss + params.static_layer_weight * (static_photometric + static_opacity)
        parts["static_photometric"] = float(static_photometric.detach())
        parts["static_opacity"] = float(static_opacity.detach())
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

    from mono4d.models.losses import reprojection_loss

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



def needs_priors(params: Params) -> bool:
    """Whether any physical prior is on."""
    return params.rigidity_weight > 0 or params.rotation_weight > 0 or params.isometry_weight > 0


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
    from mono4d.models.gaussians import save_model

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
    from mono4d.models.gaussians import load_model

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
             init_digest: str = "", notes: list[str] | None = None) -> tuple[dict, dict, dict]:
    """Run the optimisation loop on ``model`` (a :class:`mono4d.models.gaussians.SceneModel`) in place.

    Every ``Schedule.eval_every`` steps the evaluation frames (the training frames when there are
    none) are scored (:func:`evaluate`) into the curves. With ``resume_path``, the resumable state
    is written there every ``Schedule.checkpoint_every`` steps and at the end, and a state found
    there whose ``init_digest`` matches is resumed from (:func:`try_resume`). Returns
    ``(variables, curves, stats)`` with ``stats`` holding ``iterations_per_second`` and
    ``resumed_from_step``; ``notes`` gets what the loop noticed.
    """
    import torch

    from mono4d.models.layers import gaussian_labels
    from mono4d.models.losses import knn_graph

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
        if schedule.eval_every and step > 0 and step % schedule.eval_every == 0:
            scores = evaluate(model, data, data.eval_frames or data.train_frames, params)["mean"]
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
    unposed) to the training frames' interpolated in time (:func:`mono4d.models.gaussians.exposure_at`)."""
    import torch

    from mono4d.models.gaussians import exposure_at

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



def render_view(model, data: TrainingData, time: float, K, w2c, params: Params, background=None) -> dict:
    """Render one view without gradients: ``rgb (H, W, 3)`` uint8, ``rgb_float`` tensor,
    ``depth (H, W)`` float32, ``alpha (H, W)`` float32. A model with a colour affine uses the
    training frames' affine interpolated at ``time`` (:func:`mono4d.models.gaussians.exposure_at`)."""
    import torch

    from mono4d.models.gaussians import exposure_at, render

    with torch.no_grad():
        exposure = None if model.exposure is None else exposure_at(model.exposure, data.times, data.train_frames, time)
        out = render(model.params, model.variables, model.field, time, K, w2c, data.width, data.height,
                     model.sh_degree, data.eval_background if background is None else background, params.backend,
                     exposure, params.near_plane)
    rgb = out["rgb"].clamp(0.0, 1.0)
    return {"rgb": (rgb * 255.0 + 0.5).byte().cpu().numpy(), "rgb_float": rgb,
            "depth": out["depth"].cpu().numpy().astype(np.float32), "alpha": out["alpha"].cpu().numpy()}


def frame_scores(view: dict, data: TrainingData, frame: int) -> dict[str, float]:
    """Scores of a :func:`render_view` of ``frame`` against the frame: ``psnr`` (dB), ``ssim``,
    ``psnr_dynamic`` (pixels with mask > 0, when the frame has any) and ``depth_order`` (fraction
    of random pixel pairs whose rendered depth order matches the prior depth's, with a prior)."""
    from mono4d.models import losses

    target = data.images[frame].float() / 255.0
    scores = {"psnr": round(float(losses.psnr(view["rgb_float"], target)), 4),
              "ssim": round(float(losses.ssim(view["rgb_float"], target)), 5)}
    if data.masks is not None and bool((data.masks[frame] > 0).any()):
        scores["psnr_dynamic"] = round(float(losses.psnr(view["rgb_float"], target, data.masks[frame] > 0)), 4)
    if data.prior_depth is not None:
        order = losses.ordering_accuracy(view["depth"], data.prior_depth[frame].cpu().numpy(), DEPTH_ORDER_PAIRS,
                                         DEPTH_ORDER_MIN_GAP, seed=frame)
        if np.isfinite(order):
            scores["depth_order"] = round(order, 5)
    return scores


def mean_scores(per_frame: dict[int, dict]) -> dict[str, float]:
    """The mean of every score over the frames that have it."""
    keys = sorted({key for scores in per_frame.values() for key in scores})
    return {key: round(float(np.mean([s[key] for s in per_frame.values() if key in s])), 5) for key in keys}


def evaluate(model, data: TrainingData, frames: list[int], params: Params) -> dict:
    """Render and score ``frames`` (:func:`frame_scores`). Returns ``{"frames": {i: scores},
    "mean": scores}``."""
    per_frame = {frame: frame_scores(render_view(model, data, float(data.times[frame]), data.K[frame],
                                                 data.w2c[frame], params), data, frame) for frame in frames}
    return {"frames": per_frame, "mean": mean_scores(per_frame)}
