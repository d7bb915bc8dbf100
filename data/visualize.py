"""Pictures of intermediate results: colourised depth, optical-flow colour wheel, mask overlays.

All functions take NumPy arrays and return ``uint8`` RGB images; writing them is the caller's job
(see :mod:`mono4d.data.images`).
"""
from __future__ import annotations

import cv2
import numpy as np


def colorize(values: np.ndarray, valid: np.ndarray | None = None, vmin: float | None = None,
             vmax: float | None = None, colormap: int = cv2.COLORMAP_TURBO) -> np.ndarray:
    """Map a scalar field ``(H, W)`` to ``(H, W, 3)`` uint8 RGB.

    ``vmin``/``vmax`` default to the 2nd/98th percentiles of the valid finite values; invalid
    pixels (``valid`` False, NaN or inf) are drawn black.
    """
    values = np.asarray(values, dtype=np.float32)
    ok = np.isfinite(values) if valid is None else (np.asarray(valid, bool) & np.isfinite(values))
    if vmin is None or vmax is None:
        sample = values[ok]
        lo, hi = (np.percentile(sample, [2, 98]) if sample.size else (0.0, 1.0))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    scaled = np.clip((values - vmin) / max(float(vmax) - float(vmin), 1e-12), 0.0, 1.0)
    scaled = np.where(ok, scaled, 0.0)
    bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), colormap)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb[~ok] = 0
    return rgb


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None, inverse: bool = True) -> np.ndarray:
    """Colourise a depth map ``(H, W)``: near is warm, far is cool.

    With ``inverse`` the colours follow 1/depth, which spreads near structure like most depth
    viewers do. Pixels with depth <= 0 or non-finite are invalid (black).
    """
    depth = np.asarray(depth, dtype=np.float32)
    ok = np.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    values = np.where(ok, 1.0 / np.where(ok, depth, 1.0), 0.0) if inverse else np.where(ok, -depth, 0.0)
    return colorize(values, ok)


def color_bar(vmin: float, vmax: float, height: int = 256, width: int = 24,
              colormap: int = cv2.COLORMAP_TURBO) -> np.ndarray:
    """A vertical colour bar ``(height, width, 3)`` uint8 RGB, ``vmax`` at the top."""
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    return colorize(ramp, vmin=0.0, vmax=1.0, colormap=colormap)


def flow_to_color(flow: np.ndarray, valid: np.ndarray | None = None, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-wheel picture of a flow field ``(H, W, 2)`` in pixels: hue = direction,
    saturation = magnitude relative to ``max_magnitude`` (default: 99th percentile), white = zero.
    Invalid pixels are drawn black."""
    flow = np.asarray(flow, dtype=np.float32)
    u, v = flow[..., 0], flow[..., 1]
    ok = np.isfinite(u) & np.isfinite(v)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    magnitude = np.sqrt(np.where(ok, u * u + v * v, 0.0))
    if max_magnitude is None:
        max_magnitude = float(np.percentile(magnitude[ok], 99)) if ok.any() else 1.0
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    hsv = np.zeros(flow.shape[:2] + (3,), np.uint8)
    hsv[..., 0] = ((angle + 1.0) * 90.0).astype(np.uint8) % 180
    hsv[..., 1] = np.clip(magnitude / max(max_magnitude, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    hsv[..., 2] = 255
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    rgb[~ok] = 0
    return rgb


LABEL_COLORS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                         [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map ``(H, W)`` (0 = background, k > 0 = object k) over an RGB image
    ``(H, W, 3)`` uint8, with an outline around each labelled region."""
    labels = np.asarray(labels)
    out = image.astype(np.float32).copy()
    colors = LABEL_COLORS[np.asarray(labels, np.int64) % len(LABEL_COLORS)].astype(np.float32)
    fg = labels > 0
    out[fg] = (1.0 - alpha) * out[fg] + alpha * colors[fg]
    edges = cv2.morphologyEx((fg * 255).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = colors[edges]
    return out.clip(0, 255).astype(np.uint8)
