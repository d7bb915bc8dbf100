"""The stage registry: every stage of the pipeline declared once, in pipeline order.

Each :class:`Stage` names the module holding its ``Params`` dataclass and its plain ``run(inputs,
params, out_dir) -> figures`` function (``stages/<name>.py``, which knows nothing of Luigi), the
stages it reads (``upstream(params)``: some edges depend on the parameters, see
../shared/DESIGN.md "What flows where"), which parameters only one backend reads, which
parameters name files outside the workspace, and whether its chosen backend runs on CUDA.
Everything else is derived from :data:`STAGES`: the Luigi task classes (:mod:`mono4d.pipeline.tasks`),
the configuration sections (:mod:`mono4d.pipeline.config`), the DAG (:mod:`mono4d.pipeline.dag`), the
fingerprints (:mod:`mono4d.pipeline.state`) and the stage order of the CLI, ``mono4d status`` and the
report.

Adding a stage = its module in ``stages/``, one entry in :data:`STAGES`, and its section with
every parameter in ``luigi.cfg``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether a CUDA device can be used (asked once per process).

    Machines without an NVIDIA device node answer at once; only where one exists is torch
    imported (seconds) to ask it, so CPU-only runs and no-op reruns start fast.
    """
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def device_is_cuda(device: str) -> bool:
    """Whether a stage's ``device`` parameter (``auto``, ``cpu``, ``cuda``, ``cuda:N``) resolves to CUDA."""
    return device.startswith("cuda") or (device == "auto" and cuda_available())


def _never(params: Any) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """One stage's declaration.

    name: stage name (folder ``DIR/<name>/``, ``luigi.cfg`` section, ``--set name.param``).
    module: importable module with ``Params`` (a dataclass with ``validate()``) and ``run``.
    description: one line, the Luigi task's docstring.
    upstream: ``Params -> [stage names]`` whose outputs ``run`` reads, for these parameters.
    backend_param: the parameter choosing the backend (``None``: one implementation).
    backends: backend value -> the parameters only that backend reads; a parameter listed under
        no backend is read by all. Only the active backend's parameters count in the fingerprint.
    path_params: parameters naming files or folders outside the workspace that ``run`` reads
        (some also accept a non-path value, e.g. a hub model id); their content is hashed into
        the fingerprint when the value names an existing path.
    reads_source: ``run`` reads the run's INPUT (``inputs["source"]``, content-hashed).
    input_names: upstream stage -> the ``inputs`` key ``run`` reads it under, where they differ
        (init and train read the refined masks as ``inputs["masks"]``).
    uses_cuda: ``Params -> bool``: the chosen backend runs on CUDA; the task then holds a
        ``gpu`` resource unit so a machine never runs more CUDA stages than ``[resources] gpu``.
    """

    name: str
    module: str
    description: str
    upstream: Callable[[Any], Sequence[str]]
    backend_param: str | None = None
    backends: Mapping[str, Sequence[str]] = field(default_factory=dict)
    path_params: Sequence[str] = ()
    reads_source: bool = False
    uses_cuda: Callable[[Any], bool] = _never
    input_names: Mapping[str, str] = field(default_factory=dict)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def params_class(self) -> type:
        return self.load().Params

    @property
    def run(self) -> Callable[..., dict | None]:
        return self.load().run

    def active_params(self, params: Any) -> dict[str, Any]:
        """The parameters the chosen backend reads (all of them for a stage without backends)."""
        values = dataclasses.asdict(params)
        if self.backend_param is None:
            return values
        active = set(self.backends.get(values[self.backend_param], ()))
        inactive = {name for names in self.backends.values() for name in names} - active
        return {name: value for name, value in values.items() if name not in inactive}


#: Stage name -> declaration, in pipeline order (the last one is what `mono4d run` builds).
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("frames", "mono4d.stages.frames", "Decode the input video or image folder into frames (stages/frames.py).",
          upstream=lambda p: [], reads_source=True),
    Stage("flow", "mono4d.stages.flow",
          "Forward/backward optical flow over consecutive and longer-range pairs (stages/flow.py).",
          upstream=lambda p: ["frames"], backend_param="backend",
          backends={"dis": ("dis_preset", "dis_finest_scale", "dis_refine_iterations", "dis_blur"),
                    "raft": ("raft_model", "raft_iterations", "batch_size", "device")},
          path_params=("raft_model",),
          uses_cuda=lambda p: p.backend == "raft" and device_is_cuda(p.device)),
    Stage("masks", "mono4d.stages.masks", "Dynamic-object / hand masks (stages/masks.py).",
          upstream=lambda p: ["frames", "flow"] if p.needs_flow() else ["frames"], backend_param="backend",
          backends={"motion": ("threshold", "temporal_window", "homography_cue", "fit_samples", "max_pair_offset",
                               "work_max_side"),
                    "file": ("mask_path",),
                    "sam": ("prompts", "sam_checkpoint", "sam_model_type", "device"),
                    "sam2": ("prompts", "sam2_model", "device")},
          path_params=("prompts", "sam_checkpoint", "sam2_model", "mask_path"),
          uses_cuda=lambda p: p.backend in ("sam", "sam2") and device_is_cuda(p.device)),
    Stage("cameras", "mono4d.stages.cameras",
          "Intrinsics and world-to-camera poses: COLMAP, static or known cameras (stages/cameras.py).",
          upstream=lambda p: ["frames", "masks"] if p.mode == "colmap" and p.use_masks else ["frames"],
          backend_param="mode",
          backends={"colmap": ("camera_model", "focal_px", "shared_camera", "matcher", "exhaustive_below", "overlap",
                               "loop_detection", "vocab_tree_path", "max_features", "use_masks", "mask_dilate_px",
                               "min_registered_fraction", "max_interp_gap", "allow_unposed", "refine_focal",
                               "refine_principal_point", "refine_extra", "num_threads", "seed"),
                    "static": ("focal_px",),
                    "known": ("known_path", "known_camera")},
          path_params=("vocab_tree_path", "known_path")),
    Stage("depth", "mono4d.stages.depth", "Per-frame monocular or multi-view depth (stages/depth.py).",
          upstream=lambda p: ["frames", "cameras"] if p.needs_cameras() else ["frames"], backend_param="backend",
          backends={"transformers": ("model", "batch_size", "device", "fp16", "input_size", "output_kind"),
                    "file": ("file_path", "file_scale", "file_kind"),
                    "sfm": ("sfm_neighbors", "sfm_num_planes", "sfm_window", "sfm_max_side", "sfm_min_score",
                            "sfm_consistency", "sfm_min_consistent", "sfm_max_gap", "sfm_baseline", "sfm_fuse_window",
                            "sfm_fill_sigma", "sfm_fill_color", "sfm_min_support", "sfm_median")},
          path_params=("model", "file_path"),
          uses_cuda=lambda p: p.backend == "transformers" and device_is_cuda(p.device)),
    Stage("align", "mono4d.stages.align", "Depth scale/shift aligned to the SfM points, per frame (stages/align.py).",
          upstream=lambda p: ["depth", "cameras", "masks"] if p.use_masks else ["depth", "cameras"]),
    Stage("masks_refine", "mono4d.stages.masks_refine", "Motion masks redone with the residual against the flow the cameras "
          "and aligned depth predict (stages/masks_refine.py).",
          upstream=lambda p: ["frames", "flow", "masks", "cameras", "align"]),
    Stage("tracks", "mono4d.stages.tracks", "Long-term 2D tracks and 3D flow pairs (stages/tracks.py).",
          upstream=lambda p: ["frames", "flow", "cameras", "align"]),
    Stage("init", "mono4d.stages.init", "Stage 1 of the optimizer: deformation fitted to the 3D flow pairs, canonical "
          "Gaussians; a silhouette hull of an RGBA dataset; or a multi-view dataset's first timestep (stages/init.py).",
          upstream=lambda p: (["frames", "cameras"] if p.mode == "silhouette"
                              else ["frames", "cameras", "masks"] if p.mode == "multiview"
                              else ["frames", "cameras", "align", "masks_refine", "tracks"]),
          backend_param="mode",
          backends={"flow": ("max_static", "depth_edge_threshold", "fit_iterations", "fit_lr", "fit_batch",
                             "smoothness_weight", "rigidity_weight", "device"),
                    "silhouette": ("hull_candidates", "hull_half_size", "hull_min_foreground"),
                    "multiview": ("max_static", "hull_candidates", "hull_min_foreground", "background_max_std")},
          input_names={"masks_refine": "masks"},
          uses_cuda=lambda p: p.mode == "flow" and device_is_cuda(p.device)),
    # train.resume_from is not a path input: the stage writes that checkpoint itself.
    Stage("train", "mono4d.stages.train", "Stage 2: photometric + ordinal depth + priors optimisation, renders, exports "
          "(stages/train.py).",
          upstream=lambda p: (["init", "frames", "cameras"] + (["align"] if p.use_depth else [])
                              + ([("masks_refine" if p.refine_masks else "masks")] if p.use_masks else [])
                              + (["tracks"] if p.reprojection_weight > 0 else [])),
          input_names={"masks_refine": "masks"},
          uses_cuda=lambda p: p.backend == "gsplat" or device_is_cuda(p.device)),
)}

