"""CMU Panoptic sequences as prepared by Dynamic 3D Gaussians: ``train_meta.json`` / ``test_meta.json``.

A meta file holds ``w``, ``h`` (image size), and per timestep ``t`` and camera slot ``c``:
``k[t][c]`` (3x3 intrinsics), ``w2c[t][c]`` (4x4 world-to-camera, already OpenCV),
``fn[t][c]`` (image path under ``ims/``) and ``cam_id[t][c]``. For monocular use one camera
id is picked and its frames over time form the video.

A Panoptic folder (``train_meta.json``, optionally ``test_meta.json``, ``ims/``, ``seg/``) or its
``train_meta.json`` is also a pipeline input (``mono4d run FOLDER``): the frames stage writes
every camera of both meta files over the first timesteps (:func:`read_panoptic_dataset`; the
test file's cameras are held out), and :data:`PIPELINE_SETTINGS` are the configuration such a
run starts from (see :mod:`mono4d.pipeline.config`): known cameras, the ``seg/`` masks through
the masks stage's ``file`` backend, the multi-view initialisation and online training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mono4d.data.dataset_frames import DatasetFrames, linear_times, read_json
from mono4d.data.errors import InputError

TRAIN_META = "train_meta.json"
TEST_META = "test_meta.json"
#: Folder of the foreground masks, mirroring ``ims/`` (``seg/<cam>/<t>.png``).
SEG_DIR = "seg"
#: ``stage.param`` -> value of a pipeline run over a Panoptic folder, applied after the preset and
#: before ``--set`` (``cameras.known_path`` and ``masks.mask_path`` are added for the folder):
#: the dataset's cameras, its ``seg/`` foreground masks as they are (no refinement), the
#: multi-view initialisation, Dynamic 3D Gaussians' online training with the rigidity,
#: rotation-similarity and isometry priors (our rigidity and isometry are in units of the
#: Gaussians' spacing, about 1/30 of Dynamic 3D Gaussians' world units here, hence weights
#: 0.1 / 1 / 0.05 for their 4 / 4 / 2: at 4 / 4 / 2 the foreground did not move in short
#: budgets), a black background, no depth prior, no videos (a camera path through 27 fixed
#: cameras is not a video) and Dynamic 3D Gaussians' near plane: its rasterizer draws nothing
#: within 0.2 world units (metres here) of a camera. Without it, Gaussians of the dome wall and
#: camera housings around a held-out camera sit in front of its lens (basketball, 1000 steps:
#: held-out 16.8 dB at 0.01, 22.6 dB at 0.2, scoring the same model).
PIPELINE_SETTINGS = {
    "cameras.mode": "known",
    "masks.backend": "file",
    "init.mode": "multiview",
    "init.hull_min_foreground": "0.6",
    "train.mode": "online",
    "train.downscale": "1",
    "train.background": "black",
    "train.ordinal_weight": "0",
    "train.use_depth": "false",
    "train.refine_masks": "false",
    "train.rigidity_weight": "0.1",
    "train.rotation_weight": "1",
    "train.isometry_weight": "0.05",
    "train.make_videos": "false",
    "train.near_plane": "0.2",
}


def panoptic_root(path: str | Path) -> Path | None:
    """The dataset folder when ``path`` is a Panoptic folder (it holds ``train_meta.json``) or its
    ``train_meta.json``; None otherwise."""
    path = Path(path)
    if path.is_file() and path.name == TRAIN_META:
        return path.parent
    if path.is_dir() and (path / TRAIN_META).is_file():
        return path
    return None


def is_panoptic_input(path: str | Path) -> bool:
    """Whether ``path`` is a Panoptic folder or its ``train_meta.json`` (see :func:`panoptic_root`)."""
    return panoptic_root(path) is not None


def panoptic_camera_ids(meta_path: str | Path) -> list[int]:
    """The camera ids present at the first timestep of a meta file."""
    content = read_json(Path(meta_path))
    try:
        return [int(camera_id) for camera_id in content["cam_id"][0]]
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError(f"{meta_path} has no usable cam_id table", "point to a train_meta.json / test_meta.json") from error


def require_images(meta_path: Path, image_paths: list[Path]) -> None:
    """Raise :class:`InputError` naming the count and one example when any image file is missing."""
    missing = [str(path) for path in image_paths if not path.is_file()]
    if missing:
        raise InputError(f"{len(missing)} images of {meta_path} are missing, e.g. {missing[0]}",
                         "check that the ims/ folder next to the meta file is complete")


def read_panoptic(meta_path: str | Path, camera: int = -1) -> DatasetFrames:
    """The video of one camera of a Panoptic meta file, one frame per timestep.

    ``camera`` is a camera id (``cam_id`` value, not a slot index); -1 is allowed only for a file
    holding a single camera. Images are ``<meta folder>/ims/<fn>``; times are ``t / (T - 1)``.
    """
    meta_path = Path(meta_path)
    content = read_json(meta_path)
    available = panoptic_camera_ids(meta_path)
    if camera == -1:
        if len(available) != 1:
            raise InputError(f"{meta_path} holds {len(available)} cameras; pick one for a monocular video",
                             f"set the camera id (e.g. --set cameras.known_camera={available[0]}); ids: {available}")
        camera = available[0]
    try:
        width, height = int(content["w"]), int(content["h"])
        K, w2c, image_paths = [], [], []
        for t, ids in enumerate(content["cam_id"]):
            ids = [int(camera_id) for camera_id in ids]
            if camera not in ids:
                raise InputError(f"camera {camera} is missing at timestep {t} of {meta_path}",
                                 f"pick a camera id present in every timestep; ids at t=0: {available}")
            slot = ids.index(camera)
            K.append(content["k"][t][slot])
            w2c.append(content["w2c"][t][slot])
            image_paths.append(meta_path.parent / "ims" / content["fn"][t][slot])
        K_array = np.array(K, dtype=np.float64)
        w2c_array = np.array(w2c, dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError(f"malformed Panoptic meta file {meta_path}: {error}",
                         "expected keys w, h, k[t][c], w2c[t][c], fn[t][c], cam_id[t][c]") from error
    if K_array.shape != (len(K), 3, 3) or w2c_array.shape != (len(K), 4, 4):
        raise InputError(f"{meta_path} has intrinsics/extrinsics of the wrong shape", "expected 3x3 k and 4x4 w2c")
    require_images(meta_path, image_paths)
    return DatasetFrames(image_paths=image_paths, K=K_array, w2c=w2c_array, times=linear_times(len(K)),
                         width=width, height=height, units="dataset", format="panoptic")


@dataclass(frozen=True)
class PanopticViews:
    """Every camera of a Panoptic meta file over its first timesteps (multi-view input).

    ``image_paths[t][c]``: image of timestep ``t`` and camera slot ``c``; ``seg_paths[t][c]``: its
    foreground mask under ``seg/`` (``.png``), or None where the dataset has none (the held-out
    cameras); ``K (T, C, 3, 3)`` float64 pixel intrinsics for ``width`` x ``height`` images;
    ``w2c (T, C, 4, 4)`` float64 OpenCV world-to-camera; ``camera_ids (C,)`` the ``cam_id`` values
    (the same at every timestep); ``times (T,)`` ``t / (T_file - 1)`` of the file's timestep count.
    """

    image_paths: list[list[Path]]
    seg_paths: list[list[Path | None]]
    K: np.ndarray
    w2c: np.ndarray
    camera_ids: list[int]
    times: np.ndarray
    width: int
    height: int


def read_panoptic_views(meta_path: str | Path, timesteps: int = 0) -> PanopticViews:
    """All cameras of ``meta_path`` for its first ``timesteps`` timesteps (0 = all). Raises
    :class:`InputError` when a timestep's cameras differ from the first one's or images are missing."""
    meta_path = Path(meta_path)
    content = read_json(meta_path)
    camera_ids = panoptic_camera_ids(meta_path)
    try:
        width, height = int(content["w"]), int(content["h"])
        total = len(content["cam_id"])
        count = total if timesteps <= 0 else min(timesteps, total)
        for t in range(count):
            if [int(camera_id) for camera_id in content["cam_id"][t]] != camera_ids:
                raise InputError(f"timestep {t} of {meta_path} has cameras {content['cam_id'][t]}, not {camera_ids}",
                                 "use a meta file whose timesteps share one camera list")
        K = np.array(content["k"][:count], dtype=np.float64)
        w2c = np.array(content["w2c"][:count], dtype=np.float64)
        names = [[str(name) for name in content["fn"][t]] for t in range(count)]
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError(f"malformed Panoptic meta file {meta_path}: {error}",
                         "expected keys w, h, k[t][c], w2c[t][c], fn[t][c], cam_id[t][c]") from error
    shape = (count, len(camera_ids))
    if K.shape != (*shape, 3, 3) or w2c.shape != (*shape, 4, 4):
        raise InputError(f"{meta_path} has intrinsics/extrinsics of the wrong shape", "expected 3x3 k and 4x4 w2c")
    images = [[meta_path.parent / "ims" / name for name in row] for row in names]
    require_images(meta_path, [path for row in images for path in row])
    segs = [[seg if (seg := (meta_path.parent / "seg" / name).with_suffix(".png")).is_file() else None
             for name in row] for row in names]
    return PanopticViews(image_paths=images, seg_paths=segs, K=K, w2c=w2c, camera_ids=camera_ids,
                         times=linear_times(total)[:count], width=width, height=height)


def read_panoptic_dataset(root: str | Path, timesteps: int = 0) -> tuple[PanopticViews, PanopticViews | None]:
    """The training cameras (``train_meta.json``) and the held-out cameras (``test_meta.json``, None
    when the folder has none) of a Panoptic folder over their first ``timesteps`` timesteps (0 =
    all), each as :func:`read_panoptic_views`. Raises :class:`InputError` when the two files differ
    in image size or timestep count, or share a camera."""
    root = Path(root)
    train = read_panoptic_views(root / TRAIN_META, timesteps)
    if not (root / TEST_META).is_file():
        return train, None
    test = read_panoptic_views(root / TEST_META, timesteps)
    if (test.width, test.height) != (train.width, train.height) or len(test.times) != len(train.times):
        raise InputError(f"{root / TEST_META} ({test.width}x{test.height}, {len(test.times)} timesteps) does not match "
                         f"{root / TRAIN_META} ({train.width}x{train.height}, {len(train.times)} timesteps)",
                         "use meta files written for the same sequence")
    shared = sorted(set(train.camera_ids) & set(test.camera_ids))
    if shared:
        raise InputError(f"cameras {shared} are in both {TRAIN_META} and {TEST_META}",
                         "a held-out camera must not be trained on: fix the meta files")
    return train, test
