"""Cameras stage: intrinsics and a pose for every frame.

Three modes:

- ``colmap`` (default): structure from motion with pycolmap. SIFT features (pixels of moving
  objects left out when the masks stage ran: its label > 0 marks them), one shared camera for
  the whole video, sequential or exhaustive matching, incremental mapping; the largest model
  wins. Frames COLMAP leaves out are interpolated from their neighbours (SLERP of the rotation,
  linear camera centre) when the gap is at most ``max_interp_gap`` frames and registered frames
  lie on both sides; others make the stage fail unless ``allow_unposed`` (then their ``w2c`` is
  NaN). Units are SfM units (arbitrary scale).
- ``static``: the camera does not move (tripod). Identity ``w2c`` for every frame and a
  pinhole ``K`` with ``focal_px`` (default 1.2 x the longer image side, COLMAP's prior for an
  unknown lens: a ~45 degree horizontal field of view for landscape video) and the principal
  point at the image centre. No 3D points.
- ``known``: cameras read from a dataset (``known_path``: D-NeRF ``transforms_*.json``,
  Panoptic ``train_meta.json``, nerfstudio ``transforms.json`` or a COLMAP model folder) and
  matched to the frames by order; intrinsics are rescaled to the frames' size. Frames written
  from a D-NeRF folder (``known_path`` that folder) take the cameras of its train and test splits.

Outputs: ``cameras.json`` and ``points.npz`` (see :func:`mono4d.data.artifacts.write_cameras`,
:func:`~mono4d.data.artifacts.write_points`), ``sparse/`` (a COLMAP model of the result, in every mode)
and ``vis/trajectory.png``.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from mono4d.data.artifacts import empty_points, read_masks, write_cameras, write_points
from mono4d.data.dataset_frames import DatasetFrames
from mono4d.data.errors import InputError, ParameterError, StageFailure
from mono4d.data.geometry import camera_centers, intrinsics_matrix, interpolate_w2c, scale_intrinsics
from mono4d.data.images import write_gray, write_rgb

logger = logging.getLogger(__name__)

MODES = ("colmap", "static", "known")
CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "OPENCV")
MATCHERS = ("auto", "sequential", "exhaustive")
SPARSE_DIR = "sparse"
#: Focal length prior for an unknown lens, as a multiple of the longer image side (COLMAP's default).
DEFAULT_FOCAL_FACTOR = 1.2
#: Relative difference of the width and height scale factors tolerated when resizing known intrinsics.
_ASPECT_TOLERANCE = 0.01
#: Frames whose static (unmasked) area is below this fraction are named in the notes.
_LOW_STATIC_FRACTION = 0.2


@dataclass(frozen=True)
class Params:
    """Parameters of the cameras stage.

    mode: "colmap" (structure from motion), "static" (camera does not move: identity poses) or
        "known" (cameras read from ``known_path``).
    camera_model: COLMAP camera model, one of SIMPLE_PINHOLE (f, cx, cy), PINHOLE (fx, fy, cx,
        cy), SIMPLE_RADIAL (+ k1), OPENCV (+ k1, k2, p1, p2). With distortion, ``K`` in
        cameras.json ignores it (noted in the figures).
    focal_px: focal length in pixels of the frames (after the frames stage's resize); 0 = unknown:
        COLMAP starts from 1.2 x the longer side, static mode assumes that value.
    shared_camera: one camera (intrinsics) for all frames (a phone video); false = per frame.
    matcher: "sequential" (each frame with its ``overlap`` successors, plus quadratic
        overlap), "exhaustive" (all pairs) or "auto" (exhaustive below ``exhaustive_below`` frames).
    exhaustive_below: with matcher "auto", clips with fewer frames than this match all pairs.
    overlap: sequential matching: number of following frames each frame is matched with.
    loop_detection: sequential matching also matches visually similar distant frames; needs a
        vocabulary tree file (``vocab_tree_path``), which is not downloaded.
    vocab_tree_path: COLMAP vocabulary tree (.bin) for ``loop_detection``.
    max_features: most SIFT features per frame.
    sift_upsample: detect SIFT features on the frames upsampled 2x as well (COLMAP's default,
        ``first_octave=-1``): about 3x the features and points on small frames, and about 3.5x
        the time of extraction, matching and mapping together. When false and COLMAP then fails
        or leaves frames unregistered, the stage reruns it with upsampling and keeps whichever
        registers more frames (noted in the figures).
    use_masks: colmap mode: leave the masks stage's dynamic pixels out of feature extraction
        (the pipeline then runs the masks stage first); false ignores moving objects' masks.
    mask_dilate_px: grow the moving-object masks by this many pixels before leaving their
        features out (SIFT features reach past object edges).
    min_registered_fraction: fail when COLMAP registers fewer than this fraction of the frames.
    max_interp_gap: longest run of unregistered frames whose poses are interpolated between the
        registered frames on both sides (0 = never interpolate).
    allow_unposed: keep frames without a pose (registered and interpolated false, ``w2c`` NaN)
        instead of failing.
    refine_focal: bundle adjustment refines the focal length (false keeps ``focal_px`` fixed).
    refine_principal_point: bundle adjustment refines the principal point (usually ill-posed
        for a video; default keeps the image centre).
    refine_extra: bundle adjustment refines distortion parameters (models with distortion).
    known_path: mode "known": dataset camera file or folder.
    known_camera: mode "known" with a multi-camera Panoptic file: the camera id to use
        (-1 = the file's only camera).
    num_threads: CPU threads for COLMAP (-1 = all).
    seed: random seed of COLMAP's RANSAC and mapper.
    """

    mode: str = "colmap"
    camera_model: str = "SIMPLE_PINHOLE"
    focal_px: float = 0.0
    shared_camera: bool = True
    matcher: str = "auto"
    exhaustive_below: int = 30
    overlap: int = 6
    loop_detection: bool = False
    vocab_tree_path: str = ""
    max_features: int = 8192
    sift_upsample: bool = True
    use_masks: bool = True
    mask_dilate_px: int = 5
    min_registered_fraction: float = 0.5
    max_interp_gap: int = 2
    allow_unposed: bool = False
    refine_focal: bool = True
    refine_principal_point: bool = False
    refine_extra: bool = True
    known_path: str = ""
    known_camera: int = -1
    num_threads: int = -1
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ParameterError` for values that cannot make sense."""
        choices = {"mode": MODES, "camera_model": CAMERA_MODELS, "matcher": MATCHERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ParameterError(f"cameras.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                                     f"e.g. --set cameras.{name}={allowed[0]}")
        if not math.isfinite(self.focal_px) or self.focal_px < 0:
            raise ParameterError(f"cameras.focal_px must be >= 0, got {self.focal_px}",
                                 "give the focal length in pixels of the extracted frames, or 0 if unknown")
        for name, low in (("exhaustive_below", 0), ("overlap", 1), ("max_features", 64), ("mask_dilate_px", 0),
                          ("max_interp_gap", 0)):
            if getattr(self, name) < low:
                raise ParameterError(f"cameras.{name} must be >= {low}, got {getattr(self, name)}",
                                     f"use e.g. {Params.__dataclass_fields__[name].default}")
        if not 0.0 < self.min_registered_fraction <= 1.0:
            raise ParameterError(f"cameras.min_registered_fraction must be in (0, 1], got {self.min_registered_fraction}",
                                 "use e.g. 0.5")
        if self.num_threads == 0 or self.num_threads < -1:
            raise ParameterError(f"cameras.num_threads must be -1 (all) or >= 1, got {self.num_threads}", "use -1")
        if self.loop_detection and self.mode == "colmap":
            if not self.vocab_tree_path:
                raise ParameterError(
                    "cameras.loop_detection needs a COLMAP vocabulary tree, and none is downloaded automatically",
                    "download one (e.g. vocab_tree_flickr100K_words32K.bin from the COLMAP website) and set "
                    "cameras.vocab_tree_path=FILE, or use cameras.matcher=exhaustive for short clips")
            if not Path(self.vocab_tree_path).is_file():
                raise ParameterError(f"cameras.vocab_tree_path {self.vocab_tree_path} does not exist",
                                     "point to a COLMAP vocabulary tree .bin file")
        if self.mode == "known" and not self.known_path:
            raise ParameterError("cameras.mode=known needs cameras.known_path",
                                 "set it to a transforms_*.json, transforms.json, train_meta.json or COLMAP model folder")


# ----------------------------------------------------------------------------------------------
# Pose gaps


def interpolate_gaps(w2c: np.ndarray, posed: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill runs of at most ``max_gap`` unposed frames lying between two posed frames.

    ``w2c (T, 4, 4)``, ``posed (T,)`` bool. Returns a bool ``(T,)`` mask of the frames filled;
    ``w2c`` is updated in place (SLERP rotation, linear centre, by frame index).
    """
    filled = np.zeros(len(posed), dtype=bool)
    posed_indices = np.flatnonzero(posed)
    for before, after in zip(posed_indices[:-1], posed_indices[1:]):
        gap = after - before - 1
        if 0 < gap <= max_gap:
            for index in range(before + 1, after):
                w2c[index] = interpolate_w2c(w2c[before], w2c[after], (index - before) / (after - before))
                filled[index] = True
    return filled


def describe_frames(indices: Sequence[int]) -> str:
    """Frame numbers in words: ``frame 7``, ``frames 0-3, 7, 10-11``."""
    ordered = sorted(int(i) for i in indices)
    runs: list[list[int]] = []
    for index in ordered:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    listed = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"frame {listed}" if len(ordered) == 1 else f"frames {listed}"


# ----------------------------------------------------------------------------------------------
# COLMAP


def colmap_camera_params(model: str, focal: float, width: int, height: int) -> list[float]:
    """Initial COLMAP parameters of ``model`` for a known focal length (no distortion, centred)."""
    cx, cy = width / 2.0, height / 2.0
    return {"SIMPLE_PINHOLE": [focal, cx, cy], "PINHOLE": [focal, focal, cx, cy],
            "SIMPLE_RADIAL": [focal, cx, cy, 0.0], "OPENCV": [focal, focal, cx, cy, 0.0, 0.0, 0.0, 0.0]}[model]


def write_colmap_masks(masks: np.ndarray, names: Sequence[str], mask_dir: Path, dilate_px: int) -> np.ndarray:
    """Write COLMAP feature masks (``<name>.png``, 0 = ignore) from labels ``(T, H, W)`` (>0 = moving).

    Moving regions are dilated by ``dilate_px``. Returns the static fraction ``(T,)`` of each frame.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1)) if dilate_px else None
    static_fraction = np.zeros(len(names))
    for index, name in enumerate(names):
        moving = (masks[index] > 0).astype(np.uint8)
        if kernel is not None:
            moving = cv2.dilate(moving, kernel)
        keep = np.where(moving > 0, 0, 255).astype(np.uint8)
        static_fraction[index] = float(np.mean(keep > 0))
        target = mask_dir / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_gray(target, keep)
    return static_fraction


def diagnose_failure(database_path: Path, num_frames: int, masked: bool) -> str:
    """Why COLMAP could not reconstruct: a sentence built from features and verified matches."""
    import pycolmap

    database = pycolmap.Database.open(database_path)
    try:
        images = database.read_all_images()
        feature_counts = [database.num_keypoints_for_image(image.image_id) for image in images]
        median_features = float(np.median(feature_counts)) if feature_counts else 0.0
        pair_ids, geometries = database.read_two_view_geometries()
        displacements, inlier_counts = [], []
        for pair_id, geometry in zip(pair_ids, geometries):
            matches = np.asarray(geometry.inlier_matches)
            inlier_counts.append(len(matches))
            if len(matches) == 0:
                continue
            first, second = pycolmap.pair_id_to_image_pair(pair_id)
            points_a = database.read_keypoints(first)[matches[:, 0], :2]
            points_b = database.read_keypoints(second)[matches[:, 1], :2]
            displacements.append(float(np.median(np.linalg.norm(points_a - points_b, axis=1))))
    finally:
        database.close()
    verified = sum(count > 0 for count in inlier_counts)
    if median_features < 50:
        return (f"the frames have too little texture: median {median_features:.0f} SIFT features per frame"
                + (" outside the moving-object masks" if masked else ""))
    if verified == 0:
        return (f"no two frames could be matched reliably (median {median_features:.0f} features per frame, "
                "0 geometrically verified pairs)")
    if displacements and float(np.percentile(displacements, 90)) < 2.0:
        return (f"the camera barely moves: matched features shift by {float(np.median(displacements)):.2f} px "
                "(median over verified pairs), so there is no parallax to triangulate (tripod or static camera)")
    return (f"COLMAP found no initial pair with enough parallax and matches ({verified} verified pairs of "
            f"{num_frames} frames, median {float(np.median(inlier_counts)):.0f} inliers): the camera may only "
            "rotate, or move too little")


FAILURE_HINT = ("if the camera does not move use --set cameras.mode=static (optionally cameras.focal_px=F); "
                "with known cameras use --set cameras.mode=known --set cameras.known_path=FILE; otherwise give "
                "a clip with more camera translation and texture, try --set cameras.matcher=exhaustive, a known "
                "focal length (cameras.focal_px), or more resolution (frames.max_side)")


def run_colmap(frames_dir: Path, names: Sequence[str], width: int, height: int, masks: np.ndarray | None,
               params: Params, work_dir: Path, out_dir: Path) -> tuple[dict, list[str]]:
    """Run SfM on the frames; write the largest model to ``out_dir/sparse``.

    Returns ``(result, notes)`` where ``result`` holds ``K``, ``w2c``, ``registered``, ``points``,
    the reconstruction's figures and the matcher used.
    """
    import pycolmap

    from mono4d.data.colmap import reconstruction_cameras, reconstruction_points

    notes: list[str] = []
    num_frames = len(names)
    images_dir = frames_dir / Path(names[0]).parent
    image_names = [Path(name).name for name in names]
    database_path = work_dir / "database.db"

    reader = pycolmap.ImageReaderOptions(camera_model=params.camera_model,
                                         default_focal_length_factor=DEFAULT_FOCAL_FACTOR)
    if params.focal_px > 0:
        reader.camera_params = ",".join(f"{value:.10g}" for value in
                                        colmap_camera_params(params.camera_model, params.focal_px, width, height))
    if masks is not None:
        mask_dir = work_dir / "masks"
        static_fraction = write_colmap_masks(masks, image_names, mask_dir, params.mask_dilate_px)
        reader.mask_path = str(mask_dir)
        low = np.flatnonzero(static_fraction < _LOW_STATIC_FRACTION)
        if len(low):
            notes.append(f"{describe_frames(low)} are mostly covered by moving-object masks "
                         f"(< {_LOW_STATIC_FRACTION:.0%} static pixels): few features left for SfM")
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = params.num_threads
    extraction.max_image_size = max(width, height)
    extraction.sift.max_num_features = params.max_features
    extraction.sift.first_octave = -1 if params.sift_upsample else 0

    started = time.perf_counter()
    pycolmap.extract_features(database_path, images_dir, image_names=image_names,
                              camera_mode=pycolmap.CameraMode.SINGLE if params.shared_camera else pycolmap.CameraMode.PER_IMAGE,
                              reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
    logger.info("SIFT features of %d frames in %.1f s", num_frames, time.perf_counter() - started)

    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = params.num_threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = params.seed
    matcher = params.matcher
    if matcher == "auto":
        matcher = "exhaustive" if num_frames < params.exhaustive_below else "sequential"
    started = time.perf_counter()
    if matcher == "exhaustive":
        pycolmap.match_exhaustive(database_path, matching_options=matching, verification_options=verification,
                                  device=pycolmap.Device.cpu)
    else:
        pairing = pycolmap.SequentialPairingOptions(overlap=params.overlap, quadratic_overlap=True)
        pairing.num_threads = params.num_threads
        if params.loop_detection:
            pairing.loop_detection = True
            pairing.vocab_tree_path = params.vocab_tree_path
        pycolmap.match_sequential(database_path, matching_options=matching, pairing_options=pairing,
                                  verification_options=verification, device=pycolmap.Device.cpu)
    logger.info("%s matching in %.1f s", matcher, time.perf_counter() - started)

    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = params.num_threads
    mapping.random_seed = params.seed
    mapping.min_model_size = int(min(10, max(2, num_frames // 2)))
    mapping.ba_refine_focal_length = params.refine_focal
    mapping.ba_refine_principal_point = params.refine_principal_point
    mapping.ba_refine_extra_params = params.refine_extra
    mapping.mapper.abs_pose_refine_focal_length = params.refine_focal
    mapping.mapper.abs_pose_refine_extra_params = params.refine_extra
    # Cheaper but sound bundle adjustment (teddy: mapping CPU time 95 s -> 53 s, 141/141 registered,
    # reprojection error 0.76 -> 0.72 px): stop a BA once the cost changes by less than 1e-6
    # relative (COLMAP's 0 runs every iteration), at most 30 global iterations, global BA after
    # 20% (not 10%) model growth, and points that add no coverage left out of global BA.
    mapping.ba_global_function_tolerance = 1e-6
    mapping.ba_local_function_tolerance = 1e-6
    mapping.ba_global_max_num_iterations = 30
    mapping.ba_global_frames_ratio = 1.2
    mapping.ba_global_points_ratio = 1.2
    mapping.mapper.ba_global_ignore_redundant_points3D = True
    sparse_work = work_dir / "sparse"
    sparse_work.mkdir()
    started = time.perf_counter()
    models = pycolmap.incremental_mapping(database_path, images_dir, sparse_work, mapping)
    logger.info("incremental mapping in %.1f s: %d model(s)", time.perf_counter() - started, len(models))
    if not models:
        cause = diagnose_failure(database_path, num_frames, masked=masks is not None)
        raise StageFailure(f"COLMAP could not reconstruct the cameras: {cause}", FAILURE_HINT)
    reconstruction = max(models.values(), key=lambda model: (model.num_reg_images(), model.num_points3D()))
    if len(models) > 1:
        used = {image.name for image in reconstruction.images.values() if image.has_pose}
        elsewhere = {image.name for model in models.values() if model is not reconstruction
                     for image in model.images.values() if image.has_pose} - used
        if elsewhere:
            lost = [index for index, name in enumerate(image_names) if name in elsewhere]
            notes.append(f"COLMAP made {len(models)} separate models; the largest ({len(used)} frames) is used, "
                         f"so {describe_frames(lost)} (registered only in a smaller one) have no COLMAP pose")

    sparse_out = out_dir / SPARSE_DIR
    sparse_out.mkdir()
    reconstruction.write(sparse_out)
    K, w2c, registered = reconstruction_cameras(reconstruction, image_names)
    frame_of_name = {name: index for index, name in enumerate(image_names)}
    frame_of_image = {image.image_id: frame_of_name[image.name] for image in reconstruction.images.values()
                      if image.name in frame_of_name}
    points = reconstruction_points(reconstruction, frame_of_image)
    camera_entries = [{"model": camera.model_name, "params": [float(v) for v in camera.params]}
                      for camera in reconstruction.cameras.values()]
    if any(not camera.is_undistorted() for camera in reconstruction.cameras.values()):
        notes.append(f"camera model {params.camera_model} has lens distortion; K in cameras.json ignores it "
                     "(sparse/ keeps the full model)")
    if not params.refine_focal and params.focal_px == 0:
        notes.append(f"focal length fixed at the unknown-lens prior {DEFAULT_FOCAL_FACTOR} x longer side "
                     f"({DEFAULT_FOCAL_FACTOR * max(width, height):.1f} px)")
    result = {
        "K": K, "w2c": w2c, "registered": registered, "points": points, "matcher": matcher,
        "colmap_cameras": camera_entries,
        "reprojection_error_px": float(reconstruction.compute_mean_reprojection_error()),
        "mean_track_length": float(reconstruction.compute_mean_track_length()) if reconstruction.num_points3D() else 0.0,
        "num_models": len(models),
    }
    return result, notes


def reconstruct(frames_dir: Path, names: Sequence[str], width: int, height: int, masks: np.ndarray | None,
                params: Params, out_dir: Path) -> tuple[dict, list[str]]:
    """:func:`run_colmap` in a temporary folder. Without ``sift_upsample``, a reconstruction that
    fails or leaves frames unregistered is run again on the frames upsampled 2x (small or weakly
    textured frames give too few features without), and whichever registers more frames is kept
    (the first on a tie), with a note saying what happened."""
    def attempt(attempt_params: Params) -> tuple[dict, list[str]]:
        with tempfile.TemporaryDirectory(prefix="mono4d_colmap_") as work:
            return run_colmap(frames_dir, names, width, height, masks, attempt_params, Path(work), out_dir)

    if params.sift_upsample:
        return attempt(params)
    first, failure = None, None
    try:
        first = attempt(params)
    except StageFailure as error:
        failure = error
    if first is not None and first[0]["registered"].all():
        return first
    shortfall = (f"failed ({failure.message})" if first is None
                 else f"registered {int(first[0]['registered'].sum())} of {len(names)} frames")
    logger.warning("cameras: SIFT on the frames as they are %s; retrying on the frames upsampled 2x", shortfall)
    with tempfile.TemporaryDirectory(prefix="mono4d_colmap_first_") as kept:
        if (out_dir / SPARSE_DIR).exists():
            shutil.move(out_dir / SPARSE_DIR, Path(kept) / SPARSE_DIR)
        try:
            second = attempt(replace(params, sift_upsample=True))
        except StageFailure:
            if first is None:
                raise
            second = None
        if first is not None and (second is None
                                  or int(second[0]["registered"].sum()) <= int(first[0]["registered"].sum())):
            shutil.rmtree(out_dir / SPARSE_DIR, ignore_errors=True)
            shutil.move(Path(kept) / SPARSE_DIR, out_dir / SPARSE_DIR)
            result, notes = first
            notes.append(f"SIFT on the frames as they are (cameras.sift_upsample=false) {shortfall}; on the frames "
                         "upsampled 2x it registered no more, so the first reconstruction is kept")
            return result, notes
    result, notes = second
    notes.append(f"SIFT on the frames as they are (cameras.sift_upsample=false) {shortfall}; these cameras come "
                 f"from SIFT on the frames upsampled 2x ({int(result['registered'].sum())} frames registered)")
    return result, notes


# ----------------------------------------------------------------------------------------------
# Known cameras


def match_known_frames(dataset: DatasetFrames, meta: dict) -> tuple[np.ndarray, list[str]]:
    """Dataset frame index of every frame. Returns ``(indices, notes)``.

    Frames and dataset cameras correspond in order when their counts match. When the frames
    stage picked a subset (stride, fps, window) of the dataset's own image folder, holding
    exactly the dataset's images in name order, its ``source_indices`` give the correspondence.
    Anything else is an :class:`InputError`.
    """
    num_frames = int(meta["num_frames"])
    if dataset.num_frames == num_frames:
        return np.arange(num_frames), []
    source = Path(meta["source"]).resolve()
    dataset_paths = [path.resolve() for path in dataset.image_paths]
    folder_images = sorted(path.resolve() for path in source.iterdir()
                           if path.suffix.lower() in (".png", ".jpg", ".jpeg")) if source.is_dir() else []
    if meta.get("source_type") == "images" and folder_images == dataset_paths:
        indices = np.asarray(meta["source_indices"], dtype=np.int64)
        return indices, [f"{num_frames} frames matched to {dataset.num_frames} dataset cameras through the "
                         "frames stage's source indices (frames picked from the dataset's image folder)"]
    raise InputError(f"the dataset has {dataset.num_frames} cameras but the frames stage wrote {num_frames} frames",
                     "cameras are matched to frames by order: run the frames stage on the dataset's own image "
                     "folder, or keep every frame (frames.fps=0, frames.stride=1, frames.max_frames=0)")


def panoptic_frame_cameras(root: Path, meta: dict) -> DatasetFrames:
    """The cameras of the frames the frames stage wrote from the Panoptic folder ``root``: frame i
    is camera ``meta["views"]["camera"][i]`` at timestep ``meta["views"]["timestep"][i]``."""
    from mono4d.data.panoptic import read_panoptic_dataset

    views = meta["views"]
    train, test = read_panoptic_dataset(root, int(meta["dataset"]["timesteps"]))
    slots = {camera: (group, slot) for group in [train] + ([test] if test is not None else [])
             for slot, camera in enumerate(group.camera_ids)}
    missing = sorted(set(views["camera"]) - set(slots))
    if missing:
        raise InputError(f"cameras {missing} of the frames are not in the meta files of {root}",
                         "rerun the frames stage on this Panoptic folder")
    picked = [slots[camera] for camera in views["camera"]]
    K = np.array([group.K[t, slot] for (group, slot), t in zip(picked, views["timestep"])])
    w2c = np.array([group.w2c[t, slot] for (group, slot), t in zip(picked, views["timestep"])])
    return DatasetFrames(image_paths=[group.image_paths[t][slot] for (group, slot), t in zip(picked, views["timestep"])],
                         K=K, w2c=w2c, times=np.asarray(meta["times"], np.float64), width=train.width,
                         height=train.height, units="dataset", format="panoptic")


def known_cameras(params: Params, meta: dict) -> tuple[np.ndarray, np.ndarray, dict, str, list[str]]:
    """Read dataset cameras for the frames. Returns ``(K, w2c, points, units, notes)``. Frames the
    frames stage wrote from this D-NeRF folder itself get the cameras of the same splits, in the
    same order; frames written from this Panoptic folder the camera of each frame's view."""
    from mono4d.data.datasets import read_dataset
    from mono4d.data.dnerf import read_dnerf_splits

    path = Path(params.known_path)
    written = meta.get("dataset", {})
    from_source = path.resolve() == Path(meta["source"]).resolve()
    if written.get("format") == "panoptic" and from_source:
        dataset = panoptic_frame_cameras(path, meta)
    elif written.get("format") == "dnerf" and from_source:
        dataset = read_dnerf_splits(path, list(written["splits"]))
    else:
        dataset = read_dataset(path, camera=params.known_camera)
    indices, notes = match_known_frames(dataset, meta)
    notes = [*dataset.notes, *notes]
    width, height = int(meta["width"]), int(meta["height"])
    scale_x, scale_y = width / dataset.width, height / dataset.height
    if abs(scale_x / scale_y - 1.0) > _ASPECT_TOLERANCE:
        raise InputError(f"the frames ({width}x{height}) and the dataset's images ({dataset.width}x{dataset.height}) "
                         "have different aspect ratios", "the frames must be the dataset's images, resized but not cropped")
    K = scale_intrinsics(dataset.K[indices], scale_x, scale_y)
    if (width, height) != (dataset.width, dataset.height):
        notes.append(f"dataset intrinsics for {dataset.width}x{dataset.height} scaled to the frames' {width}x{height}")
    points = empty_points()
    if dataset.format == "colmap":
        from mono4d.data.colmap import read_colmap_points

        dataset_points = read_colmap_points(path)
        frame_of_dataset = {int(d): i for i, d in enumerate(indices)}
        keep = np.array([int(frame) in frame_of_dataset for frame in dataset_points["obs_frame"]], dtype=bool)
        points = dict(dataset_points)
        points["obs_frame"] = np.array([frame_of_dataset[int(f)] for f in dataset_points["obs_frame"][keep]], np.int32)
        points["obs_point"] = dataset_points["obs_point"][keep]
        points["obs_xy"] = (dataset_points["obs_xy"][keep] * np.array([scale_x, scale_y])).astype(np.float32)
    return K, dataset.w2c[indices], points, dataset.units, notes


# ----------------------------------------------------------------------------------------------
# Figures


def draw_trajectory(w2c: np.ndarray, posed: np.ndarray, xyz: np.ndarray, size: int = 512) -> np.ndarray:
    """Top view ``(size, size, 3)`` uint8 RGB of camera centres (blue to red over time) and points (grey).

    The view looks along the average camera "down" axis (y), so the image plane is roughly the
    ground plane of a handheld video.
    """
    canvas = np.full((size, size, 3), 255, np.uint8)
    centres = camera_centers(w2c[posed])
    if len(centres) == 0:
        return canvas
    down = np.mean(w2c[posed][:, 1, :3], axis=0)
    forward = np.mean(w2c[posed][:, 2, :3], axis=0)
    down /= max(np.linalg.norm(down), 1e-12)
    forward = forward - down * (forward @ down)
    forward /= max(np.linalg.norm(forward), 1e-12)
    right = np.cross(down, forward)
    basis = np.stack([right, -forward])

    def plane(points: np.ndarray) -> np.ndarray:
        return points @ basis.T

    centres_2d = plane(centres)
    points_2d = plane(np.asarray(xyz, dtype=np.float64)) if len(xyz) else np.zeros((0, 2))
    everything = np.concatenate([centres_2d, points_2d]) if len(points_2d) else centres_2d
    low, high = np.percentile(everything, 2, axis=0), np.percentile(everything, 98, axis=0)
    low, high = np.minimum(low, centres_2d.min(0)), np.maximum(high, centres_2d.max(0))
    span = max(float((high - low).max()), 1e-9)
    margin = 0.06 * size

    def to_pixels(points: np.ndarray) -> np.ndarray:
        return np.round(margin + (points - low) / span * (size - 2 * margin)).astype(np.int32)

    inside = np.all((points_2d >= low) & (points_2d <= low + span), axis=1) if len(points_2d) else np.zeros(0, bool)
    for x, y in to_pixels(points_2d[inside]):
        canvas[np.clip(y, 0, size - 1), np.clip(x, 0, size - 1)] = (150, 150, 150)
    pixels = to_pixels(centres_2d)
    for order, (x, y) in enumerate(pixels):
        fraction = order / max(len(pixels) - 1, 1)
        colour = (int(255 * fraction), 0, int(255 * (1 - fraction)))
        cv2.circle(canvas, (int(x), int(y)), 3, colour, -1, lineType=cv2.LINE_AA)
    cv2.polylines(canvas, [pixels.reshape(-1, 1, 2)], False, (60, 60, 60), 1, lineType=cv2.LINE_AA)
    cv2.putText(canvas, "top view: cameras first (blue) to last (red), points grey", (8, size - 8),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


# ----------------------------------------------------------------------------------------------
# Stage


def run(inputs: Mapping[str, Path], params: Params, out_dir: Path) -> dict:
    """Compute cameras for ``inputs["frames"]`` (``inputs["masks"]`` optional, colmap mode only).

    Writes ``cameras.json``, ``points.npz``, ``sparse/`` and ``vis/trajectory.png`` in ``out_dir``.
    Returns figures: ``num_frames``, ``num_registered``, ``registered_fraction``, ``num_interpolated``,
    ``num_unposed``, ``num_points``, ``focal_px`` (mean fx), ``time_s`` and, with COLMAP,
    ``reprojection_error_px``, ``mean_track_length``, ``matcher``; plus ``notes``.
    """
    from mono4d.data.colmap import write_colmap_model
    from mono4d.stages.frames import read_frames_meta

    params.validate()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    frames_dir = Path(inputs["frames"])
    meta = read_frames_meta(frames_dir)
    width, height, num_frames = int(meta["width"]), int(meta["height"]), int(meta["num_frames"])
    names = list(meta["files"])
    notes: list[str] = []
    figures: dict = {"mode": params.mode, "num_frames": num_frames}
    colmap_cameras: list[dict] = []
    units = "sfm"
    write_sparse = True

    if params.mode == "static":
        focal = params.focal_px if params.focal_px > 0 else DEFAULT_FOCAL_FACTOR * max(width, height)
        K = np.repeat(intrinsics_matrix(focal, focal, width / 2.0, height / 2.0)[None], num_frames, axis=0)
        w2c = np.repeat(np.eye(4)[None], num_frames, axis=0)
        registered = np.ones(num_frames, dtype=bool)
        points = empty_points()
        notes.append("static camera assumed: identity pose for every frame"
                     + ("" if params.focal_px > 0 else
                        f"; focal {focal:.1f} px = {DEFAULT_FOCAL_FACTOR} x longer side (unknown lens prior)"))
    elif params.mode == "known":
        K, w2c, points, units, known_notes = known_cameras(params, meta)
        registered = np.ones(num_frames, dtype=bool)
        notes.extend(known_notes)
        if "masks" in inputs:
            notes.append("masks are not used with known cameras")
    else:
        masks = None
        if "masks" in inputs:
            masks = read_masks(inputs["masks"])
            if masks.shape != (num_frames, height, width):
                raise InputError(f"masks {masks.shape} do not match the frames ({num_frames}, {height}, {width})",
                                 "rerun the masks stage on the current frames")
        import pycolmap

        previous_level = pycolmap.logging.minloglevel
        # COLMAP's own log is verbose; keep its errors (predictable failures are raised below anyway).
        pycolmap.logging.minloglevel = 2 if logger.getEffectiveLevel() > logging.DEBUG else 0
        try:
            result, colmap_notes = reconstruct(frames_dir, names, width, height, masks, params, out_dir)
        finally:
            pycolmap.logging.minloglevel = previous_level
        write_sparse = False
        notes.extend(colmap_notes)
        K, w2c, registered = result["K"], result["w2c"], result["registered"]
        points = result["points"]
        colmap_cameras = result["colmap_cameras"]
        figures.update(matcher=result["matcher"], reprojection_error_px=round(result["reprojection_error_px"], 4),
                       mean_track_length=round(result["mean_track_length"], 3), num_models=result["num_models"])

    interpolated = np.zeros(num_frames, dtype=bool)
    if params.mode == "colmap":
        fraction = float(registered.mean())
        if fraction < params.min_registered_fraction:
            unregistered = np.flatnonzero(~registered)
            raise StageFailure(
                f"COLMAP registered only {int(registered.sum())} of {num_frames} frames ({fraction:.0%} < "
                f"min_registered_fraction {params.min_registered_fraction:g}); missing: {describe_frames(unregistered)}",
                FAILURE_HINT)
        interpolated = interpolate_gaps(w2c, registered, params.max_interp_gap)
        if interpolated.any():
            notes.append(f"poses of {describe_frames(np.flatnonzero(interpolated))} interpolated from "
                         "the registered neighbours (COLMAP did not register them)")
        unposed = np.flatnonzero(~(registered | interpolated))
        if len(unposed):
            if not params.allow_unposed:
                raise StageFailure(
                    f"COLMAP did not register {describe_frames(unposed)} of {num_frames}, and they are not "
                    f"gaps of at most max_interp_gap={params.max_interp_gap} frames between registered frames",
                    "trim the clip (frames.start/frames.end), raise cameras.max_interp_gap, give masks of moving "
                    "objects, or --set cameras.allow_unposed=true to keep them without a pose")
            notes.append(f"no pose (w2c NaN) for {describe_frames(unposed)}: COLMAP did not register them")
        # Frames COLMAP did not register take the intrinsics of the nearest registered frame
        # (identical with a shared camera; the nearest estimate with per-frame cameras).
        registered_indices = np.flatnonzero(registered)
        for index in np.flatnonzero(~registered):
            K[index] = K[registered_indices[np.argmin(np.abs(registered_indices - index))]]

    posed = np.isfinite(w2c).all(axis=(1, 2))
    views = meta.get("views") if params.mode == "known" else None
    write_cameras(out_dir, K, w2c, registered, names, width, height, interpolated=interpolated,
                  model=params.camera_model if params.mode == "colmap" else "PINHOLE", units=units, mode=params.mode,
                  colmap_cameras=colmap_cameras,
                  views=None if views is None else (np.asarray(views["camera"]), np.asarray(views["timestep"])))
    write_points(out_dir, points)
    if write_sparse:
        write_colmap_model(out_dir / SPARSE_DIR, K[posed], w2c[posed], width, height,
                           [Path(names[index]).name for index in np.flatnonzero(posed)],
                           points=points if len(points["xyz"]) else None)
    (out_dir / "vis").mkdir(exist_ok=True)
    write_rgb(out_dir / "vis" / "trajectory.png", draw_trajectory(w2c, posed, points["xyz"]))

    figures.update(
        num_registered=int(registered.sum()),
        registered_fraction=round(float(registered.mean()), 4),
        num_interpolated=int(interpolated.sum()),
        num_unposed=int((~posed).sum()),
        num_points=int(len(points["xyz"])),
        focal_px=round(float(K[:, 0, 0].mean()), 3),
        units=units,
        time_s=round(time.perf_counter() - started, 2),
    )
    if notes:
        figures["notes"] = notes
    logger.info("cameras (%s): %d/%d frames registered, %d points", params.mode, figures["num_registered"],
                num_frames, figures["num_points"])
    return figures
