"""Online training of synchronized multi-view video, Dynamic 3D Gaussians' method (Luiten et al.,
3DV 2024), as plain functions on tensors; the train stage calls :func:`optimize_online` with
``train.mode=online``.

1. The first timestep: every Gaussian parameter is optimised on that timestep's training views
   with densification, by :func:`mono4d.models.trainer.optimize` itself (``iterations`` steps; the
   deformation field and the priors are off: all views show one instant).
2. Every later timestep s: only the foreground (dynamic) Gaussians' positions and rotations are
   optimised, for ``online_fraction`` x ``iterations`` steps on timestep s's training views
   (positions at ``lr_online_means`` x the scene scale, rotations at ``lr_quats``);
   colours, opacities and scales stay fixed, and the background stays where the first timestep
   put it. They start from the previous velocity: ``x_s = 2 x_{s-1} - x_{s-2}`` and
   ``q_s = normalise(2 q_{s-1} - q_{s-2})`` (from timestep 2 on). Besides the photometric loss
   (L1 + SSIM), the priors of :func:`mono4d.models.losses.physical_priors` hold over the k
   nearest foreground neighbours found at the first timestep: local rigidity (neighbour offsets
   turn with the Gaussian's rotation since s-1), rotation similarity (neighbours rotate alike
   since s-1) and long-term isometry (neighbour distances of the first timestep kept), weighted
   by ``rigidity_weight``, ``rotation_weight`` and ``isometry_weight``.

The result is a pose per Gaussian and timestep in the model's ``variables`` (``trajectory_means``,
``trajectory_quats``, ``trajectory_times``, see :mod:`mono4d.models.gaussians`), which rendering,
exports and the viewer read like any model. ``params`` is the train stage's ``Params``.
"""
from __future__ import annotations

import time as timer
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from mono4d.data.errors import InputError

if TYPE_CHECKING:
    from mono4d.models.gaussians import SceneModel
    from mono4d.models.trainer import TrainingData
    from mono4d.stages.train import Params


def timestep_frames(data: TrainingData, frames: list[int]) -> dict[int, list[int]]:
    """Timestep index -> the ``frames`` showing it, in increasing timestep order."""
    grouped: dict[int, list[int]] = {}
    for frame in frames:
        grouped.setdefault(int(data.timesteps[frame]), []).append(frame)
    return dict(sorted(grouped.items()))


def velocity_start(history_means: list, history_quats: list) -> tuple[object, object]:
    """The starting pose of the next timestep from the previous ones (lists of ``(D, 3)`` means and
    ``(D, 4)`` unit quaternions, oldest first): constant velocity from the last two, or the last
    pose when there is only one."""
    import torch

    if len(history_means) < 2:
        return history_means[-1].clone(), history_quats[-1].clone()
    means = 2.0 * history_means[-1] - history_means[-2]
    quats = torch.nn.functional.normalize(2.0 * history_quats[-1] - history_quats[-2], dim=-1)
    return means, quats


def optimize_online(model: SceneModel, data: TrainingData, params: Params, device: str,
                    notes: list[str]) -> tuple[dict, dict]:
    """Train ``model`` in place on the multi-view ``data`` (needs ``data.timesteps``) as the module
    docstring says. Returns ``(curves, stats)``: the curves of :func:`mono4d.models.trainer.optimize`
    continued over the later timesteps (their steps numbered on from ``iterations``; held-out
    scores of each timestep's held-out views when it ends), and ``iterations_per_second``,
    ``resumed_from_step`` (0), ``num_timesteps``, ``steps_per_timestep``, ``seconds_first_timestep``,
    ``seconds_per_timestep`` (mean over the later ones)."""
    import torch

    from mono4d.models import losses
    from mono4d.models.deformation import quaternion_conjugate, quaternion_multiply
    from mono4d.models.gaussians import render
    from mono4d.models.trainer import evaluate, optimize, record

    if data.timesteps is None:
        raise InputError("train.mode=online needs multi-view input (several cameras per timestep), but the "
                         "cameras stage recorded one camera per frame",
                         "give a Panoptic folder as the input, or use train.mode=batch for a video")
    train_by_step = timestep_frames(data, data.train_frames)
    eval_by_step = timestep_frames(data, data.eval_frames)
    steps = list(train_by_step)
    first = steps[0]
    started = timer.perf_counter()
    first_params = replace(params, lr_deformation=0.0, rigidity_weight=0.0, rotation_weight=0.0,
                           isometry_weight=0.0)
    variables, curves, _ = optimize(model, replace(data, train_frames=train_by_step[first],
                                                   eval_frames=eval_by_step.get(first, [])),
                                    first_params, device, notes=notes)
    model.variables = variables
    first_seconds = timer.perf_counter() - started

    dynamic = torch.nonzero(variables["is_dynamic"], as_tuple=True)[0]
    fixed = {name: value.detach() for name, value in model.params.items()}
    means_all = [fixed["means"]]
    quats_all = [torch.nn.functional.normalize(fixed["quats"], dim=-1)]
    history_means, history_quats = [means_all[0][dynamic]], [quats_all[0][dynamic]]
    priors_on = params.rigidity_weight > 0 or params.rotation_weight > 0 or params.isometry_weight > 0
    graph = losses.knn_graph(history_means[0], params.knn) if priors_on and len(dynamic) > params.knn else None
    if priors_on and graph is None:
        notes.append(f"online priors off: {len(dynamic)} foreground Gaussians are not more than train.knn={params.knn}")
    if not len(dynamic):
        notes.append("no foreground Gaussians: the later timesteps keep the first timestep's scene")
    per_step = max(1, round(params.online_fraction * params.iterations))
    generator = torch.Generator().manual_seed(params.seed + 1)
    step_number = params.iterations
    step_seconds = []
    for timestep in tqdm(steps[1:], desc="online timesteps", unit="timestep", leave=False):
        clock = timer.perf_counter()
        frames = train_by_step[timestep]
        time = float(data.times[frames[0]])
        start_means, start_quats = velocity_start(history_means, history_quats)
        means = torch.nn.Parameter(start_means.contiguous())
        quats = torch.nn.Parameter(start_quats.contiguous())
        optimizer = torch.optim.Adam([{"params": [means], "lr": params.lr_online_means * data.scene_scale},
                                      {"params": [quats], "lr": params.lr_quats}], eps=1e-15)
        previous_means, previous_quats = history_means[-1], history_quats[-1]
        for iteration in range(per_step if len(dynamic) else 0):
            frame = frames[int(torch.randint(len(frames), (1,), generator=generator))]
            pose = {**variables, "trajectory_means": means_all[0].index_put((dynamic,), means)[:, None],
                    "trajectory_quats": quats_all[0].index_put((dynamic,), quats)[:, None],
                    "trajectory_times": [time]}
            background = (torch.rand(3, generator=generator).to(device) if params.background == "random"
                          else data.eval_background)
            out = render(fixed, pose, model.field, time, data.K[frame], data.w2c[frame], data.width, data.height,
                         model.sh_degree, background, params.backend, near_plane=params.near_plane)
            target = data.images[frame].float() / 255.0
            loss = losses.photometric_loss(out["rgb"], target, params.ssim_weight)
            parts = {"photometric": float(loss.detach()), "psnr": float(losses.psnr(out["rgb"].detach(), target))}
            if graph is not None:
                turned = quaternion_multiply(torch.nn.functional.normalize(quats, dim=-1),
                                             quaternion_conjugate(previous_quats))
                priors = losses.physical_priors(previous_means, means, turned, graph)
                for name, weight in (("rigidity", params.rigidity_weight), ("rotation", params.rotation_weight),
                                     ("isometry", params.isometry_weight)):
                    if weight > 0:
                        loss = loss + weight * priors[name]
                        parts[name] = float(priors[name].detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if iteration == per_step - 1 or iteration % max(1, round(params.log_fraction * per_step)) == 0:
                record(curves, step_number + iteration, float(loss.detach()), parts, model.num_gaussians,
                       model.sh_degree)
        step_number += per_step
        with torch.no_grad():
            history_means.append(means.detach())
            history_quats.append(torch.nn.functional.normalize(quats.detach(), dim=-1))
            means_all.append(means_all[0].index_put((dynamic,), history_means[-1]))
            quats_all.append(quats_all[0].index_put((dynamic,), history_quats[-1]))
        step_seconds.append(timer.perf_counter() - clock)
        if eval_by_step.get(timestep):
            model.variables = with_trajectories(variables, means_all, quats_all, data, steps[:len(means_all)])
            scores = evaluate(model, data, eval_by_step[timestep], params)["mean"]
            curves["eval_step"].append(step_number - 1)
            curves["psnr_eval"].append(scores["psnr"])
            curves["ssim_eval"].append(scores["ssim"])
    model.variables = with_trajectories(variables, means_all, quats_all, data, steps)
    elapsed = timer.perf_counter() - started
    total_steps = params.iterations + per_step * (len(steps) - 1)
    stats = {"iterations_per_second": round(total_steps / elapsed, 3) if elapsed > 0 else 0.0, "resumed_from_step": 0,
             "num_timesteps": len(steps), "steps_per_timestep": per_step,
             "seconds_first_timestep": round(first_seconds, 2),
             "seconds_per_timestep": round(float(np.mean(step_seconds)), 2) if step_seconds else 0.0}
    return curves, stats


def with_trajectories(variables: dict, means_all: list, quats_all: list, data: TrainingData,
                      steps: list[int]) -> dict:
    """``variables`` with the per-timestep poses: ``means_all`` / ``quats_all`` (one ``(N, 3)`` /
    ``(N, 4)`` tensor per timestep of ``steps``, in order) stacked, at those timesteps' times."""
    import torch

    times = [float(data.times[np.flatnonzero(data.timesteps == step)[0]]) for step in steps]
    return {**variables, "trajectory_means": torch.stack(means_all, dim=1),
            "trajectory_quats": torch.stack(quats_all, dim=1), "trajectory_times": times}
