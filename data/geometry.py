"""Camera math shared by stages, readers and tests.

Conventions: OpenCV cameras (x right, y down, z forward); ``w2c`` is a 4x4 world-to-camera
matrix ``[R | t]`` so that ``x_cam = R @ x_world + t``; ``K`` is the 3x3 pixel intrinsics matrix
with pixel centres at half-integers (COLMAP's convention: the image spans ``[0, W] x [0, H]``).
Blender / OpenGL cameras (D-NeRF, nerfstudio) look down -z with y up; they are converted here.
"""
from __future__ import annotations

import numpy as np

#: Flips the camera's y and z axes: OpenGL/Blender camera frame <-> OpenCV camera frame.
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """The ``(3, 3)`` float64 pinhole matrix for focal lengths and principal point in pixels."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def scale_intrinsics(K: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Intrinsics ``(..., 3, 3)`` for an image resized by ``scale_x`` (width) and ``scale_y`` (height)."""
    return np.diag([scale_x, scale_y, 1.0]) @ np.asarray(K, dtype=np.float64)


def invert_rigid(matrix: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms ``(..., 4, 4)`` (rotation + translation), e.g. w2c -> c2w."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rotation_t = np.swapaxes(matrix[..., :3, :3], -1, -2)
    inverse = np.zeros_like(matrix)
    inverse[..., :3, :3] = rotation_t
    inverse[..., :3, 3] = -(rotation_t @ matrix[..., :3, 3:4])[..., 0]
    inverse[..., 3, 3] = 1.0
    return inverse


def opengl_c2w_to_w2c(c2w_opengl: np.ndarray) -> np.ndarray:
    """OpenGL/Blender camera-to-world ``(..., 4, 4)`` -> OpenCV world-to-camera ``(..., 4, 4)``."""
    return invert_rigid(np.asarray(c2w_opengl, dtype=np.float64) @ OPENGL_TO_OPENCV)


def w2c_to_opengl_c2w(w2c: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera ``(..., 4, 4)`` -> OpenGL/Blender camera-to-world ``(..., 4, 4)``."""
    return invert_rigid(w2c) @ OPENGL_TO_OPENCV


def camera_centers(w2c: np.ndarray) -> np.ndarray:
    """Camera centres in world coordinates ``(..., 3)`` from world-to-camera ``(..., 4, 4)``."""
    return invert_rigid(w2c)[..., :3, 3]


def project_points(K: np.ndarray, w2c: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points ``(N, 3)`` into one camera.

    Returns ``(uv (N, 2) pixels, depth (N,))`` where depth is the camera-frame z (> 0 in front).
    Points with depth <= 0 get non-finite or meaningless ``uv``; check ``depth`` first.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    depth = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (cam @ np.asarray(K, dtype=np.float64).T)[:, :2] / depth[:, None]
    return uv, depth


def umeyama_sim3(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~= scale * R @ src + t`` (Umeyama 1991).

    ``src``, ``dst``: ``(N, 3)`` corresponding points, N >= 3 not all collinear (for N = 2 the
    rotation about the line is arbitrary). Returns ``(scale, R (3, 3), t (3,))``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 2:
        raise ValueError(f"umeyama_sim3 needs two (N, 3) arrays with N >= 2, got {src.shape} and {dst.shape}")
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rotation = u @ sign @ vt
    variance_src = (src_c ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(singular) @ sign) / variance_src) if with_scale and variance_src > 0 else 1.0
    translation = mean_dst - scale * rotation @ mean_src
    return scale, rotation, translation


def transform_w2c(w2c: np.ndarray, scale: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Cameras ``(..., 4, 4)`` expressed in a new world ``x' = scale * rotation @ x + translation``.

    Camera-frame coordinates are scaled by ``scale`` too, so projections are unchanged.
    """
    w2c = np.asarray(w2c, dtype=np.float64)
    out = np.array(w2c, copy=True)
    new_rotation = w2c[..., :3, :3] @ rotation.T
    out[..., :3, :3] = new_rotation
    out[..., :3, 3] = scale * w2c[..., :3, 3] - new_rotation @ translation
    return out


def rotation_angle_deg(rotation_a: np.ndarray, rotation_b: np.ndarray) -> np.ndarray:
    """Angle in degrees of the relative rotation between ``(..., 3, 3)`` rotation matrices."""
    relative = np.swapaxes(np.asarray(rotation_a), -1, -2) @ np.asarray(rotation_b)
    cosine = (np.trace(relative, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def project_to_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation ``(3, 3)`` nearest (Frobenius) to a ``(3, 3)`` matrix."""
    u, _, vt = np.linalg.svd(matrix)
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    return u @ sign @ vt


def world_rotation_from_orientations(est_w2c: np.ndarray, gt_w2c: np.ndarray) -> np.ndarray:
    """Rotation ``Q (3, 3)`` of the world that best maps estimated camera orientations onto ground truth.

    Minimises ``sum_i ||R_est_i @ Q.T - R_gt_i||_F^2`` (chordal mean of ``R_gt_i.T @ R_est_i``).
    Unlike a fit of camera centres it is well defined for a straight camera path.
    """
    stacked = np.swapaxes(np.asarray(gt_w2c)[:, :3, :3], -1, -2) @ np.asarray(est_w2c)[:, :3, :3]
    return project_to_rotation(stacked.sum(axis=0))


def trajectory_errors(est_w2c: np.ndarray, gt_w2c: np.ndarray) -> dict[str, float]:
    """Compare estimated cameras ``(T, 4, 4)`` with ground truth ``(T, 4, 4)`` (world-to-camera).

    ``ate_rmse``/``ate_max``: camera-centre position error (ground-truth units) after the
    :func:`umeyama_sim3` fit of the estimated centres to the true ones (the usual absolute
    trajectory error), with the fitted ``scale``. ``rotation_mean_deg``/``rotation_max_deg``:
    orientation error after the best global rotation of the orientations
    (:func:`world_rotation_from_orientations`), because a nearly straight camera path leaves the
    centre fit's rotation about the path undetermined.
    """
    est_w2c, gt_w2c = np.asarray(est_w2c, dtype=np.float64), np.asarray(gt_w2c, dtype=np.float64)
    scale, rotation, translation = umeyama_sim3(camera_centers(est_w2c), camera_centers(gt_w2c))
    aligned = transform_w2c(est_w2c, scale, rotation, translation)
    distances = np.linalg.norm(camera_centers(aligned) - camera_centers(gt_w2c), axis=-1)
    world_rotation = world_rotation_from_orientations(est_w2c, gt_w2c)
    angles = rotation_angle_deg(est_w2c[:, :3, :3] @ world_rotation.T, gt_w2c[:, :3, :3])
    return {
        "ate_rmse": float(np.sqrt(np.mean(distances ** 2))),
        "ate_max": float(distances.max()),
        "rotation_mean_deg": float(angles.mean()),
        "rotation_max_deg": float(angles.max()),
        "scale": scale,
    }


def interpolate_w2c(w2c_a: np.ndarray, w2c_b: np.ndarray, alpha: float) -> np.ndarray:
    """Pose between two cameras ``(4, 4)``: SLERP of the orientation, linear camera centre.

    ``alpha`` = 0 gives ``w2c_a``, 1 gives ``w2c_b``.
    """
    from scipy.spatial.transform import Rotation, Slerp

    c2w_a, c2w_b = invert_rigid(w2c_a), invert_rigid(w2c_b)
    slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([c2w_a[:3, :3], c2w_b[:3, :3]])))
    c2w = np.eye(4)
    c2w[:3, :3] = slerp([alpha]).as_matrix()[0]
    c2w[:3, 3] = (1.0 - alpha) * c2w_a[:3, 3] + alpha * c2w_b[:3, 3]
    return invert_rigid(c2w)
