"""Losses and metrics of the dynamic Gaussian optimiser.

Images are ``(H, W, 3)`` float tensors in [0, 1]; depth maps ``(H, W)`` z-depth in world
units (prior depth: 0 = invalid). Pixel coordinates follow data/geometry.py: pixel ``[r, c]``
is centred at ``(c + 0.5, r + 0.5)``.

- Photometric: ``(1 - w) * L1 + w * (1 - SSIM)`` (3DGS).
- Ordinal depth (MoDGS): for random pixel pairs whose prior depths differ by more than a
  fraction of the frame's depth range, ``|tanh(alpha * (R_a - R_b) / range) - sign(D_a - D_b)|``
  with R the rendered and D the prior depth; only the *order* of the prior is trusted.
- Physical priors (Dynamic 3D Gaussians) on the dynamic Gaussians over a k-nearest-neighbour
  graph built in canonical space: local rigidity, rotation similarity and isometry, measured
  between the canonical configuration and time t, in units of the neighbours' spacing.
- Track reprojection: a 2D track point of frame i is lifted with the rendered depth, moved to
  frame j (by the deformation field where it is dynamic) and projected; the pixel error to
  the track's position in frame j is penalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mono4d.models.deformation import DeformationField, rotate_vectors

#: Side of SSIM's Gaussian window (pixels), as in 3DGS.
SSIM_WINDOW = 11


def psnr(image: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio (dB) of images in [0, 1]; ``mask (H, W)`` restricts the pixels."""
    error = (image - target) ** 2
    mse = error[mask].mean() if mask is not None else error.mean()
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


def ssim(image: Tensor, target: Tensor) -> Tensor:
    """Mean structural similarity of two ``(H, W, 3)`` images in [0, 1] (11x11 Gaussian window)."""
    from kornia.metrics import ssim as ssim_map

    return ssim_map(image.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None], SSIM_WINDOW).mean()


def photometric_loss(image: Tensor, target: Tensor, ssim_weight: float) -> Tensor:
    """``(1 - ssim_weight) * L1 + ssim_weight * (1 - SSIM)`` of ``(H, W, 3)`` images."""
    l1 = (image - target).abs().mean()
    if ssim_weight <= 0:
        return l1
    return (1.0 - ssim_weight) * l1 + ssim_weight * (1.0 - ssim(image, target))


def depth_range(prior: np.ndarray) -> float:
    """Robust depth range of a prior depth map (2nd to 98th percentile of its valid values);
    0 when it has fewer than two valid pixels."""
    valid = prior[np.isfinite(prior) & (prior > 0)]
    if valid.size < 2:
        return 0.0
    low, high = np.percentile(valid, [2, 98])
    return float(high - low)


def sample_ordinal_pairs(prior: Tensor, valid_index: Tensor, num_pairs: int, min_gap: float,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Random pixel pairs for the ordinal depth loss.

    ``prior (H*W,)`` flattened prior depth, ``valid_index (V,)`` flat indices of its valid pixels,
    ``min_gap`` the smallest prior depth difference kept (world units). Draws ``num_pairs``
    candidate pairs uniformly among valid pixels and keeps those whose prior depths differ by
    more than ``min_gap``. Returns flat indices ``a``, ``b`` and ``order = sign(D_a - D_b)``.
    """
    device = prior.device
    picks = torch.randint(len(valid_index), (2, num_pairs), generator=generator, device="cpu").to(device)
    a, b = valid_index[picks[0]], valid_index[picks[1]]
    difference = prior[a] - prior[b]
    keep = difference.abs() > min_gap
    return a[keep], b[keep], torch.sign(difference[keep])


def ordinal_depth_loss(rendered: Tensor, a: Tensor, b: Tensor, order: Tensor, alpha: float,
                       scale: float) -> Tensor:
    """Mean ``|tanh(alpha * (R_a - R_b) / scale) - order|`` over the pairs (flat indices into
    ``rendered (H*W,)``); ``scale`` (world units, the frame's depth range) makes ``alpha`` unit free.
    Zero when there are no pairs."""
    if len(a) == 0:
        return rendered.sum() * 0.0
    return (torch.tanh(alpha * (rendered[a] - rendered[b]) / scale) - order).abs().mean()


def ordering_accuracy(rendered: np.ndarray, reference: np.ndarray, num_pairs: int, min_gap_fraction: float,
                      seed: int = 0) -> float:
    """Fraction of random pixel pairs whose rendered depths are ordered like the reference
    depths, among pairs whose reference depths differ by more than ``min_gap_fraction`` of the
    reference depth range (an evaluation metric; arrays ``(H, W)``, reference 0 = invalid)."""
    rng = np.random.default_rng(seed)
    valid = np.flatnonzero(np.isfinite(reference.ravel()) & (reference.ravel() > 0) & np.isfinite(rendered.ravel()))
    if valid.size < 2:
        return float("nan")
    a, b = valid[rng.integers(0, valid.size, (2, num_pairs))]
    difference = reference.ravel()[a] - reference.ravel()[b]
    keep = np.abs(difference) > min_gap_fraction * depth_range(reference)
    if not keep.any():
        return float("nan")
    rendered_difference = rendered.ravel()[a[keep]] - rendered.ravel()[b[keep]]
    return float(np.mean(np.sign(rendered_difference) == np.sign(difference[keep])))


def depth_l1_loss(rendered: Tensor, prior: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Mean ``|R - D| / scale`` over valid prior pixels (``scale``: e.g. the median prior depth)."""
    if not bool(valid.any()):
        return rendered.sum() * 0.0
    return (rendered[valid] - prior[valid]).abs().mean() / scale


@dataclass
class NeighbourGraph:
    """k nearest neighbours of the dynamic Gaussians in canonical space.

    ``index (D, k)`` rows into the dynamic Gaussians (not into all Gaussians), ``weight (D, k)``
    Gaussian falloff of the canonical distance (rows sum to 1), ``distance (D, k)`` canonical
    distances, ``spacing`` the median nearest-neighbour distance (world units) that priors are
    measured in. ``count`` is the number of Gaussians the graph was built for.
    """

    index: Tensor
    weight: Tensor
    distance: Tensor
    spacing: float
    count: int


def knn_graph(canonical: Tensor, k: int) -> NeighbourGraph:
    """Build the :class:`NeighbourGraph` of canonical dynamic means ``(D, 3)`` (D > k)."""
    from scipy.spatial import cKDTree

    points = canonical.detach().cpu().numpy().astype(np.float64)
    distance, index = cKDTree(points).query(points, k=k + 1)
    distance, index = distance[:, 1:], index[:, 1:]
    # densification duplicates Gaussians onto one spot: the spacing of the distinct positions
    nearest = distance[:, 0][distance[:, 0] > 0]
    spacing = float(max(np.median(nearest), 1e-9)) if len(nearest) else 1e-9
    weight = np.exp(-0.5 * (distance / (2.0 * spacing)) ** 2)
    weight /= np.maximum(weight.sum(axis=1, keepdims=True), 1e-30)
    device = canonical.device
    return NeighbourGraph(torch.as_tensor(index, device=device), torch.as_tensor(weight, dtype=torch.float32, device=device),
                          torch.as_tensor(distance, dtype=torch.float32, device=device), spacing, len(points))


def smooth_norm(vectors: Tensor, eps: float = 1e-12) -> Tensor:
    """``sqrt(|v|^2 + eps)`` over the last axis: the Euclidean norm with a finite gradient (0) at
    ``v = 0``, where ``Tensor.norm``'s is NaN (densification duplicates Gaussians onto one spot, so
    neighbour offsets of exactly zero occur)."""
    return torch.sqrt((vectors * vectors).sum(dim=-1) + eps)


def physical_priors(canonical: Tensor, deformed: Tensor, rotation_delta: Tensor,
                    graph: NeighbourGraph) -> dict[str, Tensor]:
    """Dynamic 3D Gaussians' priors between the canonical configuration and time t.

    ``canonical``, ``deformed`` ``(D, 3)`` means of the dynamic Gaussians; ``rotation_delta (D, 4)``
    their rotation from canonical to t (unit wxyz). Returns ``rigidity`` (neighbour offsets at t
    vs. canonical offsets turned by the Gaussian's rotation), ``rotation`` (neighbours rotate
    alike) and ``isometry`` (neighbour distances kept), weighted means in units of
    ``graph.spacing`` (rotation: quaternion distance).
    """
    index, weight = graph.index, graph.weight
    offsets_now = deformed[index] - deformed[:, None]
    offsets_rest = (canonical[index] - canonical[:, None]).detach()
    turned = rotate_vectors(rotation_delta[:, None].expand(-1, index.shape[1], -1), offsets_rest)
    rigidity = (weight * smooth_norm(offsets_now - turned)).sum(dim=1).mean() / graph.spacing
    neighbour_rotation = rotation_delta[index]
    same_sign = torch.where((neighbour_rotation * rotation_delta[:, None]).sum(-1, keepdim=True) < 0,
                            -neighbour_rotation, neighbour_rotation)
    rotation = (weight * smooth_norm(same_sign - rotation_delta[:, None])).sum(dim=1).mean()
    isometry = (weight * (smooth_norm(offsets_now) - graph.distance).abs()).sum(dim=1).mean() / graph.spacing
    return {"rigidity": rigidity, "rotation": rotation, "isometry": isometry}


def sample_image(image: Tensor, xy: Tensor) -> Tensor:
    """Bilinear samples ``(M,)`` of a single-channel image ``(H, W)`` at image points ``xy (M, 2)``
    (pixel centres at half-integers; borders clamp)."""
    height, width = image.shape
    grid = torch.stack([xy[:, 0] / width * 2.0 - 1.0, xy[:, 1] / height * 2.0 - 1.0], dim=-1)
    return F.grid_sample(image[None, None], grid[None, None], mode="bilinear", padding_mode="border",
                         align_corners=False)[0, 0, 0]


def unproject_points(xy: Tensor, depth: Tensor, K: Tensor, w2c: Tensor) -> Tensor:
    """World points ``(M, 3)`` of image points ``xy (M, 2)`` with z-depth ``(M,)``."""
    homogeneous = torch.cat([xy, torch.ones_like(xy[:, :1])], dim=1)
    camera = (homogeneous @ torch.linalg.inv(K).T) * depth[:, None]
    return (camera - w2c[:3, 3]) @ w2c[:3, :3]


def project_points(points: Tensor, K: Tensor, w2c: Tensor) -> tuple[Tensor, Tensor]:
    """Image points ``(M, 2)`` and z-depths ``(M,)`` of world points ``(M, 3)``."""
    camera = points @ w2c[:3, :3].T + w2c[:3, 3]
    depth = camera[:, 2]
    pixels = camera @ K.T
    return pixels[:, :2] / depth.clamp_min(1e-6)[:, None], depth


def reprojection_loss(field: DeformationField, rendered_depth: Tensor, xy_source: Tensor, xy_target: Tensor,
                      dynamic: Tensor, K_source: Tensor, w2c_source: Tensor, K_target: Tensor, w2c_target: Tensor,
                      time_source: float, time_target: float, max_error: float) -> Tensor:
    """Track reprojection error, ``mean(min(|p - p_track|, max_error)) / max_error``.

    Track points ``xy_source (M, 2)`` of the rendered (source) frame are lifted with
    ``rendered_depth (H, W)``, moved by the deformation field from ``time_source`` to
    ``time_target`` where ``dynamic (M,)`` is True (static points stay), projected into the
    target camera and compared with ``xy_target (M, 2)``; ``max_error`` (pixels) caps outliers.
    """
    if len(xy_source) == 0:
        return rendered_depth.sum() * 0.0
    depth = sample_image(rendered_depth, xy_source)
    world = unproject_points(xy_source, depth, K_source, w2c_source)
    if bool(dynamic.any()):
        moved = field.transfer(world[dynamic], time_source, time_target)
        world = world.index_put((torch.nonzero(dynamic, as_tuple=True)[0],), moved)
    projected, z = project_points(world, K_target, w2c_target)
    error = (projected - xy_target).norm(dim=-1).clamp(max=max_error)
    error = torch.where(z > 0, error, torch.full_like(error, max_error))
    return error.mean() / max_error
