"""RAFT optical flow through torchvision: model loading (torchvision weights, torchvision-layout
checkpoints, or original princeton-vl/RAFT checkpoints whose keys are renamed on load) and
batched inference on uint8 RGB frames.

torchvision is imported lazily and only here; it is absent on CPU-only installs, where the
flow stage's weights-free backend (``--set flow.backend=dis``) is the alternative.

Key renaming follows torchvision's module tree (``torchvision.models.optical_flow.raft``):
``fnet``/``cnet`` -> ``feature_encoder``/``context_encoder``, each ``convK`` inside a block ->
``convnormreluK.0`` (its norm -> ``convnormreluK.1``), the encoder stem ``conv1``/``norm1`` ->
``convnormrelu.0``/``.1``, the encoder head ``conv2`` -> ``conv``, the motion encoder
``convc*/convf*/conv`` -> ``convcorr*.0/convflow*.0/conv.0``, the GRU(s) -> ``recurrent_block.convgru1``
(and ``convgru2`` for the separable GRU of RAFT-large), the upsampling mask head -> ``mask_predictor``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mono4d.data.errors import ModelUnavailableError, ParameterError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install a CUDA build of torch together with the torchvision release that matches it "
                "(e.g. `pip install torch torchvision` from the same PyTorch index), or use the weights-free "
                "backend: --set flow.backend=dis")

_ENCODERS = {"fnet": "feature_encoder", "cnet": "context_encoder"}
_MOTION_ENCODER = {"convc1": "convcorr1.0", "convc2": "convcorr2.0", "convf1": "convflow1.0",
                   "convf2": "convflow2.0", "conv": "conv.0"}
_BLOCK_PART = re.compile(r"^(layer[1-3]\.[01])\.(conv|norm)([1-4])\.(.+)$")
_GRU_PART = re.compile(r"^conv([zrq])([12]?)\.(.+)$")


def _map_encoder_key(rest: str, bottleneck: bool) -> str | None:
    """Rename one key inside an original BasicEncoder/SmallEncoder (prefix removed).
    Returns None for the alias of the downsample norm (``norm3`` of a residual block,
    ``norm4`` of a bottleneck block), which the original stores twice."""
    if rest.startswith("conv1."):
        return "convnormrelu.0." + rest[len("conv1."):]
    if rest.startswith("norm1."):
        return "convnormrelu.1." + rest[len("norm1."):]
    if rest.startswith("conv2."):
        return "conv." + rest[len("conv2."):]
    if re.match(r"^layer[1-3]\.[01]\.downsample\.[01]\.", rest):
        return rest
    match = _BLOCK_PART.match(rest)
    if match is None:
        raise ValueError(f"unexpected encoder key {rest!r}")
    block, kind, number, tail = match.group(1), match.group(2), int(match.group(3)), match.group(4)
    convs_per_block = 3 if bottleneck else 2
    if number > convs_per_block:
        if kind == "norm" and number == convs_per_block + 1:
            return None
        raise ValueError(f"unexpected encoder key {rest!r}")
    return f"{block}.convnormrelu{number}.{0 if kind == 'conv' else 1}.{tail}"


def _map_update_key(rest: str) -> str:
    """Rename one key of the original update block (``update_block.`` removed)."""
    part, _, tail = rest.partition(".")
    if part == "encoder":
        name, _, leaf = tail.partition(".")
        if name not in _MOTION_ENCODER:
            raise ValueError(f"unexpected motion-encoder key {rest!r}")
        return f"update_block.motion_encoder.{_MOTION_ENCODER[name]}.{leaf}"
    if part == "gru":
        match = _GRU_PART.match(tail)
        if match is None:
            raise ValueError(f"unexpected GRU key {rest!r}")
        gate, which, leaf = match.groups()
        return f"update_block.recurrent_block.convgru{which or '1'}.conv{gate}.{leaf}"
    if part == "flow_head":
        return f"update_block.flow_head.{tail}"
    if part == "mask":
        index, _, leaf = tail.partition(".")
        target = {"0": "convrelu.0", "2": "conv"}.get(index)
        if target is None:
            raise ValueError(f"unexpected mask-head key {rest!r}")
        return f"mask_predictor.{target}.{leaf}"
    raise ValueError(f"unexpected update-block key {rest!r}")


def is_original_raft_layout(names: Iterable[str]) -> bool:
    """True when state-dict ``names`` follow the original RAFT layout (``[module.]fnet...``)."""
    return any(re.match(r"^(module\.)?fnet\.", name) for name in names)


def map_original_raft_keys(names: Iterable[str]) -> dict[str, str]:
    """Map original princeton-vl/RAFT state-dict names onto torchvision's RAFT names.

    Pure function of the names (no torch, no torchvision). Returns ``{original: torchvision}``
    for every name that carries a tensor of its own; the duplicated alias of each downsample
    norm (stored by the original under two names) is left out. Raises ``ValueError`` on a name
    that has no counterpart (not an original RAFT checkpoint).
    """
    names = list(names)
    stripped = [name[len("module."):] if name.startswith("module.") else name for name in names]
    bottleneck = any(re.match(r"^[fc]net\.layer1\.0\.conv3\.", name) for name in stripped)
    mapping: dict[str, str] = {}
    for original, name in zip(names, stripped):
        head, _, rest = name.partition(".")
        if head in _ENCODERS:
            target = _map_encoder_key(rest, bottleneck)
            if target is None:
                continue
            mapping[original] = f"{_ENCODERS[head]}.{target}"
        elif head == "update_block":
            mapping[original] = _map_update_key(rest)
        else:
            raise ValueError(f"unexpected key {original!r}: not an original RAFT checkpoint")
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise ValueError("original RAFT keys map onto duplicate torchvision names")
    return mapping


def original_checkpoint_variant(state_dict: dict[str, Any]) -> str:
    """``"small"`` or ``"large"`` for a state dict in either layout (from the block type:
    RAFT-small's encoders use bottleneck blocks with three convolutions)."""
    names = list(state_dict)
    if any(re.search(r"layer1\.0\.(conv3|convnormrelu3)\.", name) for name in names):
        return "small"
    return "large"


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; checks an explicit ``"cuda"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("flow.device=cuda was asked for but torch sees no CUDA device",
                             "use --set flow.device=auto (or cpu), or install a CUDA build of torch")
    return device


def _import_torchvision_raft():
    try:
        from torchvision.models import optical_flow
    except Exception as error:  # ImportError, or a RuntimeError from a torch/torchvision mismatch
        raise ModelUnavailableError(f"the RAFT flow backend needs torchvision, which cannot be imported here ({error})",
                                    INSTALL_HINT) from error
    return optical_flow


def load_raft(model: str, device: str) -> Any:
    """A torchvision RAFT module in eval mode on ``device``.

    ``model``: ``"small"``/``"large"`` (torchvision's default weights, downloaded once into
    torch's hub cache) or a path to a checkpoint, either torchvision's layout or the original
    RAFT layout (``module.fnet.conv1.weight`` ...), whose keys are renamed on load.
    """
    import torch

    optical_flow = _import_torchvision_raft()
    builders = {"small": (optical_flow.raft_small, optical_flow.Raft_Small_Weights),
                "large": (optical_flow.raft_large, optical_flow.Raft_Large_Weights)}
    if model in builders:
        build, weights_enum = builders[model]
        weights = weights_enum.DEFAULT
        try:
            network = build(weights=weights, progress=False)
        except Exception as error:  # no network, blocked host, corrupt cache
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise ModelUnavailableError(
                f"cannot load torchvision's RAFT-{model} weights ({weights.url}; looked in {cache}): {error}",
                f"put the checkpoint there, pass a local file with --set flow.raft_model=/path/to/raft-{model}.pth, "
                "or use the weights-free backend: --set flow.backend=dis") from error
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(f"RAFT checkpoint {path} does not exist",
                                        "set flow.raft_model to small, large or an existing .pth file, "
                                        "or use the weights-free backend: --set flow.backend=dis")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelUnavailableError(f"cannot read RAFT checkpoint {path}: {error}",
                                        "pass a RAFT state dict saved with torch.save") from error
        if not isinstance(state_dict, dict):
            raise ModelUnavailableError(f"RAFT checkpoint {path} holds no state dict",
                                        "pass a RAFT state dict saved with torch.save")
        if is_original_raft_layout(state_dict):
            try:
                mapping = map_original_raft_keys(state_dict)
            except ValueError as error:
                raise ModelUnavailableError(f"RAFT checkpoint {path} has an unknown layout: {error}",
                                            "pass an original RAFT or a torchvision RAFT checkpoint") from error
            state_dict = {target: state_dict[source] for source, target in mapping.items()}
        variant = original_checkpoint_variant(state_dict)
        network = builders[variant][0](weights=None)
        try:
            network.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ModelUnavailableError(f"RAFT checkpoint {path} does not fit torchvision's raft_{variant}: {error}",
                                        "pass an original RAFT or a torchvision RAFT checkpoint") from error
        logger.info("loaded RAFT-%s weights from %s", variant, path)
    return network.eval().to(device)


def raft_flow(network: Any, first: np.ndarray, second: np.ndarray, device: str, iterations: int = 12) -> np.ndarray:
    """Flow from ``first`` to ``second``: both ``(B, H, W, 3)`` uint8 RGB; returns ``(B, H, W, 2)``
    float32 pixels (x, y). Frames are padded (edge replication) to multiples of 8 and the result
    cropped back."""
    import torch
    import torch.nn.functional as F

    height, width = first.shape[1:3]
    pad_h, pad_w = (-height) % 8, (-width) % 8

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
        tensor = tensor / 127.5 - 1.0  # RAFT's input range [-1, 1]
        return F.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate")

    with torch.inference_mode():
        predictions = network(to_tensor(first), to_tensor(second), num_flow_updates=iterations)
    flow = predictions[-1][:, :, :height, :width]
    return flow.permute(0, 2, 3, 1).float().cpu().numpy()
