"""Time-conditioned, invertible deformation of the dynamic Gaussians.

The dynamic part of the scene lives in a canonical space; :class:`DeformationField` maps a
canonical point ``x_c`` to its world position at normalised time ``t`` in [0, 1]
(``x_t = F(x_c, t)``) and back (``x_c = F^-1(x_t, t)``), exactly, for every ``t``. Stage 1
(init) needs the inverse: a 3D flow pair (point at frame i, point at frame j) is fitted by
``F(F^-1(x_i, t_i), t_j) ~= x_j`` (MoDGS-style 3D-aware initialisation), and stage 2 uses it to
reproject 2D tracks.

Design (chosen to train well on CPU at small sizes, a few thousand dynamic Gaussians):

- Position: a stack of affine coupling layers (real-NVP). Layer ``l`` changes one coordinate
  ``d = l mod 3`` of the normalised point, ``x_d <- x_d * exp(s) + m``, where ``(s, m)`` come
  from a small MLP of the two other coordinates and of ``t`` (both with sinusoidal
  encodings). Shears conditioned on the other coordinates compose to rotations, translations
  and mild squash/stretch, locally different for different objects; each layer inverts in
  closed form.
- Rotation and scale: a second small MLP of ``(x_c, t)`` gives a rotation delta (a unit
  quaternion, wxyz, composed on the left of the canonical rotation) and a log-scale delta.
- Canonical time: every output is multiplied by ``(t - canonical_time)``, so the deformation is
  exactly the identity at ``canonical_time`` and the canonical space *is* the scene at that
  time. Physical priors measured against the canonical configuration (rigidity, isometry) are
  therefore meaningful, and a zero-initialised field starts as "nothing moves".

World coordinates are normalised inside the field by ``(x - center) / radius`` (buffers set
from the dynamic points' bounding sphere) so the encodings' frequencies are scene independent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Bound of the per-layer log-scale of a coupling layer (keeps the map well conditioned).
MAX_LOG_SCALE = 0.5


@dataclass(frozen=True)
class DeformationConfig:
    """Size of the deformation field.

    num_layers: affine coupling layers of the position map (>= 3; multiples of 3 treat the
        axes alike).
    hidden: width of each MLP's two hidden layers.
    position_frequencies: sinusoidal frequencies ``2^k * pi`` (k < this) encoding normalised
        coordinates.
    time_frequencies: sinusoidal frequencies encoding time.
    canonical_time: the normalised time at which the deformation is the identity.
    """

    num_layers: int = 6
    hidden: int = 64
    position_frequencies: int = 4
    time_frequencies: int = 5
    canonical_time: float = 0.5


def encode(values: Tensor, num_frequencies: int) -> Tensor:
    """Sinusoidal encoding ``(..., D) -> (..., D * (1 + 2 * num_frequencies))``: the values,
    then ``sin`` and ``cos`` of ``2^k * pi * values`` for ``k < num_frequencies``."""
    if num_frequencies == 0:
        return values
    scales = (2.0 ** torch.arange(num_frequencies, device=values.device, dtype=values.dtype)) * math.pi
    angles = (values[..., None] * scales).flatten(-2)
    return torch.cat([values, torch.sin(angles), torch.cos(angles)], dim=-1)


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """Two hidden ReLU layers; the last layer starts at zero so the MLP outputs 0."""
    network = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, outputs))
    nn.init.zeros_(network[-1].weight)
    nn.init.zeros_(network[-1].bias)
    return network


class CouplingLayer(nn.Module):
    """Affine coupling on one coordinate ``axis`` of ``(N, 3)`` normalised points, conditioned on
    the other two coordinates and time; the shift and log-scale are gated by ``gate (N, 1)``."""

    def __init__(self, axis: int, config: DeformationConfig) -> None:
        super().__init__()
        self.axis = axis
        self.others = [a for a in range(3) if a != axis]
        self.position_frequencies = config.position_frequencies
        self.time_frequencies = config.time_frequencies
        inputs = 2 * (1 + 2 * config.position_frequencies) + (1 + 2 * config.time_frequencies)
        self.net = _mlp(inputs, config.hidden, 2)

    def _shift_scale(self, points: Tensor, time: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.cat([encode(points[:, self.others], self.position_frequencies),
                              encode(time, self.time_frequencies)], dim=-1)
        raw = self.net(features)
        log_scale = MAX_LOG_SCALE * torch.tanh(raw[:, :1]) * gate
        return raw[:, 1:] * gate, log_scale

    def forward(self, points: Tensor, time: Tensor, gate: Tensor) -> Tensor:
        shift, log_scale = self._shift_scale(points, time, gate)
        moved = points[:, self.axis:self.axis + 1] * torch.exp(log_scale) + shift
        return torch.cat([points[:, :self.axis], moved, points[:, self.axis + 1:]], dim=1)

    def inverse(self, points: Tensor, time: Tensor, gate: Tensor) -> Tensor:
        shift, log_scale = self._shift_scale(points, time, gate)
        restored = (points[:, self.axis:self.axis + 1] - shift) * torch.exp(-log_scale)
        return torch.cat([points[:, :self.axis], restored, points[:, self.axis + 1:]], dim=1)


class DeformationField(nn.Module):
    """Invertible time-conditioned map of canonical points to world points at time ``t``, plus
    per-point rotation and log-scale deltas (see the module docstring).

    Times are normalised to [0, 1] (``t = i / (T - 1)`` for frame i); they may be a float or a
    tensor ``(N,)`` / ``(N, 1)`` giving each point its own time.
    """

    def __init__(self, config: DeformationConfig = DeformationConfig(), center: Tensor | None = None,
                 radius: float = 1.0) -> None:
        super().__init__()
        if config.num_layers < 3:
            raise ValueError(f"a deformation field needs at least 3 coupling layers, got {config.num_layers}")
        self.config = config
        self.register_buffer("center", torch.zeros(3) if center is None else torch.as_tensor(center, dtype=torch.float32))
        self.register_buffer("radius", torch.tensor(float(radius)))
        self.couplings = nn.ModuleList(CouplingLayer(layer % 3, config) for layer in range(config.num_layers))
        shape_inputs = 3 * (1 + 2 * config.position_frequencies) + (1 + 2 * config.time_frequencies)
        self.shape_head = _mlp(shape_inputs, config.hidden, 7)

    def set_bounds(self, center: Tensor, radius: float) -> None:
        """Normalisation of world coordinates: ``(x - center) / radius`` (world units)."""
        self.center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.radius.fill_(max(float(radius), 1e-6))

    def _time_and_gate(self, time: float | Tensor, count: int, reference: Tensor) -> tuple[Tensor, Tensor]:
        time = torch.as_tensor(time, dtype=reference.dtype, device=reference.device).reshape(-1, 1)
        time = time.expand(count, 1) if time.shape[0] == 1 else time
        return time, time - self.config.canonical_time

    def to_time(self, canonical: Tensor, time: float | Tensor) -> Tensor:
        """World positions ``(N, 3)`` at ``time`` of canonical points ``(N, 3)``."""
        time, gate = self._time_and_gate(time, len(canonical), canonical)
        points = (canonical - self.center) / self.radius
        for layer in self.couplings:
            points = layer(points, time, gate)
        return points * self.radius + self.center

    def to_canonical(self, world: Tensor, time: float | Tensor) -> Tensor:
        """Canonical positions ``(N, 3)`` of world points ``(N, 3)`` observed at ``time``."""
        time, gate = self._time_and_gate(time, len(world), world)
        points = (world - self.center) / self.radius
        for layer in reversed(self.couplings):
            points = layer.inverse(points, time, gate)
        return points * self.radius + self.center

    def transfer(self, world: Tensor, source_time: float | Tensor, target_time: float | Tensor) -> Tensor:
        """World points ``(N, 3)`` seen at ``source_time`` moved to ``target_time``."""
        return self.to_time(self.to_canonical(world, source_time), target_time)

    def shape_deltas(self, canonical: Tensor, time: float | Tensor) -> tuple[Tensor, Tensor]:
        """Rotation delta ``(N, 4)`` unit quaternions (wxyz; identity at the canonical time) and
        log-scale delta ``(N, 3)`` of canonical points ``(N, 3)`` at ``time``."""
        time, gate = self._time_and_gate(time, len(canonical), canonical)
        points = (canonical - self.center) / self.radius
        features = torch.cat([encode(points, self.config.position_frequencies),
                              encode(time, self.config.time_frequencies)], dim=-1)
        raw = self.shape_head(features) * gate
        identity = torch.zeros_like(raw[:, :4])
        identity[:, 0] = 1.0
        return F.normalize(identity + raw[:, :4], dim=-1), raw[:, 4:]

    def export_config(self) -> dict:
        """The constructor arguments as plain values (for checkpoints)."""
        return {"config": asdict(self.config), "center": self.center.tolist(), "radius": float(self.radius)}

    @classmethod
    def from_export(cls, exported: dict) -> "DeformationField":
        """Rebuild an (untrained) field from :meth:`export_config`; load its state_dict next."""
        return cls(DeformationConfig(**exported["config"]), torch.tensor(exported["center"]), exported["radius"])


def quaternion_multiply(left: Tensor, right: Tensor) -> Tensor:
    """Hamilton product of quaternions ``(..., 4)`` in wxyz order (``left`` applied after ``right``)."""
    w1, x1, y1, z1 = left.unbind(-1)
    w2, x2, y2, z2 = right.unbind(-1)
    return torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
                        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], dim=-1)


def quaternion_conjugate(quats: Tensor) -> Tensor:
    """The conjugate (the inverse of a unit quaternion) of wxyz quaternions ``(..., 4)``."""
    return quats * quats.new_tensor([1.0, -1.0, -1.0, -1.0])


def rotate_vectors(quaternions: Tensor, vectors: Tensor) -> Tensor:
    """Rotate vectors ``(..., 3)`` by unit quaternions ``(..., 4)`` (wxyz)."""
    w, axis = quaternions[..., :1], quaternions[..., 1:]
    twice_cross = 2.0 * torch.cross(axis, vectors, dim=-1)
    return vectors + w * twice_cross + torch.cross(axis, twice_cross, dim=-1)
