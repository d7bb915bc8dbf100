"""Standard 3D Gaussian Splatting PLY files (the layout of the original 3DGS code, which common
splat viewers read).

One binary little-endian ``vertex`` element with float32 properties, in this order:
``x, y, z`` (position), ``nx, ny, nz`` (zeros), ``f_dc_0..2`` (DC spherical-harmonics
coefficient per RGB channel), ``f_rest_0..3*(K-1)-1`` (higher-order coefficients, channel-major:
``f_rest_{c * (K - 1) + k}`` is coefficient ``k + 1`` of channel ``c``; ``K = (degree + 1)^2``),
``opacity`` (logit), ``scale_0..2`` (log standard deviations), ``rot_0..3`` (quaternion w, x, y, z).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mono4d.data.errors import InputError

_HEADER_END = b"end_header\n"


def _property_names(num_rest: int) -> list[str]:
    """Vertex property names for ``num_rest`` higher-order coefficients per channel."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * num_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_ply(path: str | Path, means: np.ndarray, quats: np.ndarray, log_scales: np.ndarray,
              opacity_logits: np.ndarray, sh0: np.ndarray, sh_rest: np.ndarray | None = None) -> None:
    """Write N Gaussians: ``means (N, 3)``, ``quats (N, 4)`` wxyz, ``log_scales (N, 3)``,
    ``opacity_logits (N,)``, ``sh0 (N, 3)`` or ``(N, 1, 3)`` DC coefficients and ``sh_rest
    (N, K-1, 3)`` higher-order coefficients (None or K = 1: degree 0)."""
    count = len(means)
    sh0 = np.asarray(sh0, np.float32).reshape(count, 3)
    sh_rest = np.zeros((count, 0, 3), np.float32) if sh_rest is None else np.asarray(sh_rest, np.float32)
    num_rest = sh_rest.shape[1]
    columns = [np.asarray(means, np.float32).reshape(count, 3), np.zeros((count, 3), np.float32), sh0,
               sh_rest.transpose(0, 2, 1).reshape(count, 3 * num_rest),
               np.asarray(opacity_logits, np.float32).reshape(count, 1),
               np.asarray(log_scales, np.float32).reshape(count, 3), np.asarray(quats, np.float32).reshape(count, 4)]
    table = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype="<f4")
    names = _property_names(num_rest)
    header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
                       + [f"property float {name}" for name in names] + ["end_header"]) + "\n"
    with open(path, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(table.tobytes())


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY (as written by :func:`write_ply` or the original 3DGS code).

    Returns ``means (N, 3)``, ``quats (N, 4)`` wxyz, ``log_scales (N, 3)``, ``opacity_logits (N,)``,
    ``sh0 (N, 3)`` and ``sh_rest (N, K-1, 3)``, all float32. Raises :class:`InputError` for files
    that are not binary little-endian float Gaussian PLYs.
    """
    data = Path(path).read_bytes()
    end = data.find(_HEADER_END)
    if not data.startswith(b"ply\n") or end < 0:
        raise InputError(f"{path} is not a PLY file", "point to a .ply file written by a Gaussian splatting tool")
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise InputError(f"{path} is not a binary little-endian PLY", "convert it to binary_little_endian")
    count, names, in_vertex = 0, [], False
    for line in lines:
        words = line.split()
        if words[:2] == ["element", "vertex"]:
            count, in_vertex = int(words[2]), True
        elif words[:1] == ["element"]:
            in_vertex = False
        elif words[:1] == ["property"] and in_vertex:
            if words[1] != "float":
                raise InputError(f"{path}: vertex property {words[-1]} is {words[1]}, not float",
                                 "only float32 Gaussian PLYs are supported")
            names.append(words[-1])
    required = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                "rot_0", "rot_1", "rot_2", "rot_3"}
    if not required <= set(names):
        raise InputError(f"{path} lacks Gaussian properties {sorted(required - set(names))}",
                         "point to a 3D Gaussian splatting PLY")
    body = data[end + len(_HEADER_END):]
    if len(body) < count * len(names) * 4:
        raise InputError(f"{path} is truncated ({len(body)} bytes for {count} vertices)", "rewrite the file")
    table = np.frombuffer(body, dtype="<f4", count=count * len(names)).reshape(count, len(names))
    column = {name: table[:, i] for i, name in enumerate(names)}

    def stack(*keys: str) -> np.ndarray:
        return np.stack([column[key] for key in keys], axis=1).astype(np.float32)

    rest_names = sorted((name for name in names if name.startswith("f_rest_")), key=lambda n: int(n[7:]))
    num_rest = len(rest_names) // 3
    sh_rest = (stack(*rest_names).reshape(count, 3, num_rest).transpose(0, 2, 1) if num_rest
               else np.zeros((count, 0, 3), np.float32))
    return {"means": stack("x", "y", "z"), "quats": stack("rot_0", "rot_1", "rot_2", "rot_3"),
            "log_scales": stack("scale_0", "scale_1", "scale_2"), "opacity_logits": column["opacity"].astype(np.float32),
            "sh0": stack("f_dc_0", "f_dc_1", "f_dc_2"), "sh_rest": np.ascontiguousarray(sh_rest)}
