"""Train stage (stage 2 of the optimiser): photometric + ordinal-depth optimisation of the dynamic
Gaussians from the init stage, with densification, evaluation on held-out frames and exports.

The loop itself (losses, Adam, gsplat's densification strategy, schedule, evaluation, resumable
state) is :mod:`mono4d.models.trainer`; this module holds the stage's :class:`Params`, reads the stage
inputs into a :class:`~mono4d.models.trainer.TrainingData` (:func:`load_training_data`), calls
:func:`mono4d.models.trainer.optimize` and writes the outputs (:mod:`mono4d.stages.train_outputs`).

Inputs: the init stage's model (its checkpoint names the training and held-out frames and their
times), the frames and cameras, and, unless turned off (``use_depth`` / ``use_masks``: inputs
without them, such as a D-NeRF folder), the aligned depth (depth-prior losses and the depth-order
score) and the refined masks (label loss, PSNR on dynamic pixels, layer IoU). Pixels of moving
objects are left out of the depth-prior losses when the prior cannot measure them
(``prior_on_dynamic``: the weights-free ``sfm`` depth).

Held-out frames are never trained on; they are rendered and scored (PSNR, SSIM, PSNR on dynamic
pixels, depth-order agreement with the aligned depth) every ``eval_fraction`` of the iterations
and at the end. LPIPS is not computed: it needs the lpips package with pretrained AlexNet/VGG
weights (and torchvision), none of which is available offline here.

Resuming: with ``resume_from`` set to a file path, the full optimiser state (model, Adam states,
densification statistics, step, curves, random state) is written there every
``checkpoint_fraction`` of the iterations and at the end; a rerun with the same path and the
same init output continues from it (the pipeline gives every run a fresh output folder, so the
path must lie outside it). A checkpoint from another init output is ignored, with a note.

``mode=online`` (synchronized multi-view input such as a Panoptic folder) trains timestep by
timestep instead (:mod:`mono4d.models.online`); held-out views are then the held-out cameras,
scored per camera too.

Outputs (see :mod:`mono4d.stages.train_outputs`): ``model.pt``, ``metrics.json``, ``curves.json`` and
``curves.png``, ``renders/`` (rgb, depth .npy and colourised, held-out comparisons),
``novel_view.mp4`` and ``time_sweep.mp4``, ``ply/`` (standard 3DGS PLY per frame),
``trajectories.npz`` (dense 3D tracks of the dynamic Gaussians). Loader: :func:`load_trained`.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mono4d.data.errors import InputError, ParameterError, require_inputs

if TYPE_CHECKING:
    from mono4d.models.trainer import TrainingData

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
BACKGROUNDS = ("random", "black", "white")
PRIOR_ON_DYNAMIC = ("auto", "use", "ignore")
TRAIN_MODES = ("batch", "online")
#: Depth kinds (``alignment.json``'s ``depth_kind``) measured under a static-scene assumption.
STATIC_SCENE_DEPTH_KINDS = ("sfm",)

@dataclass(frozen=True)
class Params:
    """Parameters of the train stage.

    mode: "batch" (every frame's time at once: canonical Gaussians and the deformation field,
        :func:`mono4d.models.trainer.optimize`) or "online" (Dynamic 3D Gaussians' method for
        synchronized multi-view input, :mod:`mono4d.models.online`: the first timestep
        optimises every Gaussian parameter with densification for ``iterations`` steps, each
        later timestep only the foreground Gaussians' positions and rotations, from the
        previous velocity, for ``online_fraction`` x ``iterations`` steps under the rigidity,
        rotation and isometry priors; per-Gaussian poses per timestep).
    iterations: optimisation steps (online: of the first timestep).
    online_fraction: online mode: steps of every later timestep, as a fraction of ``iterations``.
    lr_online_means: online mode: learning rate of the foreground positions at the later
        timesteps, times the scene scale (no decay). Dynamic 3D Gaussians' 1.6e-4 moves a
        Gaussian at most ~1.6e-4 x steps scene scales per timestep: raise it with short budgets.
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
        more rasterization per step; see :mod:`mono4d.models.layers`).
    static_layer_weight: weight of the static layer's own terms (0 = off; needs the masks):
        the static Gaussians (label 0) rendered alone each step, their L1 distance to the frame on
        the pixels the masks mark static plus the mean of ``1 - alpha`` over the frame, so the
        static layer alone fills the background behind the moving objects (with colours learned
        from the frames where it shows) instead of leaving dark holes there (one more
        rasterization of the static Gaussians per step; see
        :func:`mono4d.models.layers.static_layer_loss`).
    use_depth: read the align stage's depth (the depth-prior losses and the depth-order score);
        false for inputs without depth (a D-NeRF folder), which needs ordinal_weight and
        depth_l1_weight at 0.
    use_masks: read the refined masks (label loss, dynamic pixels of the depth-prior and
        reprojection losses, PSNR on dynamic pixels, layer IoU); false for inputs without masks,
        which needs label_weight and static_layer_weight at 0.
    refine_masks: read the masks from ``masks_refine`` (true) or straight from ``masks`` (false:
        a dataset's own foreground masks, which the refinement would pass through anyway, without
        the flow, depth and align stages it needs).
    background: "random" (a random colour per step; evaluation on black), "black" or "white".
    exposure: learn a per-frame colour affine (Dynamic 3D Gaussians' per-camera ``cam_m`` /
        ``cam_c``): the render of frame i is ``C * exp(m_i) + alpha * c_i + (1 - alpha) * bg``
        with ``m_i, c_i (3,)`` identity-initialised (C the rendered colour, bg the background,
        which the affine leaves alone), for phone videos whose exposure or white balance
        changes. Held-out frames (and video frames between frames) use the training frames'
        values interpolated linearly in time; PLY files, exports and the viewer show the
        unadjusted colours.
    lr_exposure: learning rate of ``m_i`` and ``c_i``.
    near_plane: Gaussians at a camera z of at most this (world units: the cameras stage's) are not
        drawn, in training, scoring and every render of the model. Raise it where the scene has
        surfaces close to a held-out camera's lens that no training camera sees as close (the
        Panoptic dome's walls around its cameras: 0.2, Dynamic 3D Gaussians' rasterizer's cull).
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

    mode: str = "batch"
    iterations: int = 3000
    online_fraction: float = 0.2
    lr_online_means: float = 1.6e-4
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
    static_layer_weight: float = 0.0
    use_depth: bool = True
    use_masks: bool = True
    refine_masks: bool = True
    background: str = "random"
    exposure: bool = False
    lr_exposure: float = 0.01
    near_plane: float = 0.01
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
                     "lr_exposure", "lr_online_means"):
            if not 0 <= getattr(self, name) < 1:
                raise ParameterError(f"train.{name}={getattr(self, name)} is not a learning rate in [0, 1)",
                                     "use the default")
        for name in ("ordinal_weight", "depth_l1_weight", "reprojection_weight", "rigidity_weight", "rotation_weight",
                     "isometry_weight", "label_weight", "static_layer_weight", "novel_offset", "grow_grad2d"):
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
        if not self.use_depth and (self.ordinal_weight > 0 or self.depth_l1_weight > 0):
            raise ParameterError("train.use_depth=false leaves the depth-prior losses without depth",
                                 "set train.ordinal_weight=0 and train.depth_l1_weight=0, or train.use_depth=true")
        if not self.use_masks and (self.label_weight > 0 or self.static_layer_weight > 0):
            raise ParameterError("train.use_masks=false leaves the label loss and the static layer's terms "
                                 "without masks", "set train.label_weight=0 and train.static_layer_weight=0, "
                                 "or train.use_masks=true")
        if self.mode not in TRAIN_MODES:
            raise ParameterError(f"train.mode={self.mode!r} is unknown", f"use one of {', '.join(TRAIN_MODES)}")
        if not 0 < self.online_fraction <= 1:
            raise ParameterError(f"train.online_fraction={self.online_fraction} is not in (0, 1]",
                                 "use e.g. 0.2 (Dynamic 3D Gaussians: 2000 steps per timestep after 10000)")
        if self.mode == "online" and (self.resume_from or self.exposure or self.reprojection_weight > 0):
            raise ParameterError("train.mode=online does not resume, learn exposure or use tracks",
                                 "set train.resume_from='', train.exposure=false and train.reprojection_weight=0")
        if self.prior_on_dynamic not in PRIOR_ON_DYNAMIC:
            raise ParameterError(f"train.prior_on_dynamic={self.prior_on_dynamic!r} is unknown",
                                 f"use one of {', '.join(PRIOR_ON_DYNAMIC)}")
        if not self.near_plane > 0:
            raise ParameterError(f"train.near_plane must be > 0 (world units), got {self.near_plane}",
                                 "use e.g. 0.01 (the default)")
        if self.background not in BACKGROUNDS:
            raise ParameterError(f"train.background={self.background!r} is unknown", f"use one of {', '.join(BACKGROUNDS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ParameterError(f"train.device={self.device!r} is unknown", "use auto, cpu or cuda")
        if self.backend not in ("auto", "gsplat", "numba", "torch"):
            raise ParameterError(f"train.backend={self.backend!r} is unknown", "use auto, gsplat, numba or torch")


def ignores_dynamic_prior(setting: str, depth_kind: str | None) -> bool:
    """Whether the depth-prior losses leave out dynamic pixels (``Params.prior_on_dynamic``)."""
    return setting == "ignore" or (setting == "auto" and depth_kind in STATIC_SCENE_DEPTH_KINDS)


def file_digest(path: Path) -> str:
    """SHA-1 of a file's bytes (identifies the init checkpoint a resumable state belongs to)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_training_data(inputs: Mapping[str, Path], params: Params, meta: dict, device: str,
                       notes: list[str]) -> TrainingData:
    """The :class:`~mono4d.models.trainer.TrainingData` of a model whose ``meta`` (frame count, size,
    times, training and held-out frames, scene scale) the init stage wrote, from the stage
    outputs ``inputs`` (``frames``, ``cameras``, ``align`` with ``use_depth``, ``masks`` with
    ``use_masks``, and ``tracks`` when the reprojection loss is on); appends what it notices to
    ``notes``."""
    from mono4d.data.artifacts import (read_aligned_depth, read_aligned_kind, read_camera_views, read_cameras,
                                       read_masks)
    from mono4d.models.trainer import build_training_data
    from mono4d.stages.frames import load_frames, read_frames_meta

    images = load_frames(inputs["frames"])
    K, w2c, _ = read_cameras(inputs["cameras"])
    depth = read_aligned_depth(inputs["align"]) if params.use_depth else None
    masks = read_masks(inputs["masks"]) if params.use_masks else None
    expected = (meta["num_frames"], meta["height"], meta["width"])
    for what, array in (("frames", images), ("aligned depth", depth), ("masks", masks)):
        if array is not None and tuple(array.shape[:3]) != expected:
            raise InputError(f"{what} {tuple(array.shape[:3])} do not match the init stage's frames {expected}",
                             "rerun init and train on the same upstream outputs")
    depth_kind = read_aligned_kind(inputs["align"]) if depth is not None else None
    if depth is not None and ignores_dynamic_prior(params.prior_on_dynamic, depth_kind):
        if masks is None:
            notes.append(f"train.use_masks=false: the depth-prior losses use the dynamic pixels too, although "
                         f"the aligned depth (kind {depth_kind!r}) cannot measure them")
        else:
            depth = np.where(masks > 0, 0.0, depth).astype(np.float32)
            notes.append(f"depth-prior losses skip the dynamic pixels of the masks stage (aligned depth kind "
                         f"{depth_kind!r}; train.prior_on_dynamic={params.prior_on_dynamic})")
    tracks = None
    if "tracks" in inputs and params.reprojection_weight > 0:
        from mono4d.data.artifacts import read_tracks

        tracks = read_tracks(inputs["tracks"])
    train_frames = [int(i) for i in meta["train_frames"]]
    eval_frames = [int(i) for i in meta["holdout_frames"] if np.isfinite(w2c[i]).all()]
    if not eval_frames:
        notes.append("no held-out frame (init.holdout_every = 0): scores are on training frames only")
    data = build_training_data(images, K, np.nan_to_num(w2c), np.asarray(meta["times"]), train_frames, eval_frames,
                               float(meta["scene_scale"]), params, device, prior_depth=depth, masks=masks,
                               tracks=tracks)
    data.fps = float(read_frames_meta(inputs["frames"]).get("fps") or data.fps)
    views = read_camera_views(inputs["cameras"])
    if views is not None:
        data.cameras, data.timesteps = views
    return data


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Train the init stage's model on the frames (see the module docstring).

    ``inputs``: ``init``, ``frames``, ``cameras``, ``align`` (with ``use_depth``), ``masks`` (with
    ``use_masks``) and optionally ``tracks`` (needed when ``reprojection_weight`` > 0). Returns
    key figures: ``psnr_heldout``,
    ``ssim_heldout``, ``psnr_train``, ``ssim_train``, ``psnr_dynamic_heldout``,
    ``depth_order_heldout`` (agreement of rendered depth order with the aligned depth),
    ``num_gaussians``, ``num_dynamic``, ``iterations_per_second``, ``lpips`` (None: see the
    module docstring), with ``notes``.
    """
    import torch

    from mono4d.models.online import optimize_online
    from mono4d.models.trainer import optimize
    from mono4d.stages import init as init_stage
    from mono4d.stages import train_outputs

    params.validate()
    needed = ["init", "frames", "cameras"] + ["align"] * params.use_depth + ["masks"] * params.use_masks
    require_inputs(inputs, needed, "train")
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
    if params.ordinal_weight > 0 and not np.any(data.depth_ranges[data.train_frames] > 0):
        notes.append("the aligned depth has no valid pixels: the ordinal depth loss is inactive")
    if params.mode == "online":
        curves, stats = optimize_online(model, data, params, device, notes)
    else:
        resume_path = Path(params.resume_from) if params.resume_from else None
        _, curves, stats = optimize(model, data, params, device, resume_path, file_digest(init_path), notes)
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
    """The train stage's model (:class:`mono4d.models.gaussians.SceneModel`) on ``device``."""
    from mono4d.models.gaussians import load_model

    path = Path(train_dir) / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: {train_dir} is not a finished train stage output",
                         "run the train stage first")
    model, _ = load_model(path, device)
    return model
