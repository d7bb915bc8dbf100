"""Prompted masks for the masks stage: segment-anything (``sam``) and transformers SAM2 video (``sam2``).

Prompts name what to segment on one or more key frames; each prompt belongs to a label (id
and name, e.g. 1 "object", 2 "hand"), so egocentric clips can separate hands from the held
object with one prompt each.

Prompt string (``masks.prompts``), entries separated by ``;``::

    FRAME:x,y[,LABEL]              positive point (pixels of the frames stage images)
    FRAME:neg:x,y[,LABEL]          negative point (not this)
    FRAME:box:x0,y0,x1,y1[,LABEL]  box (corners, pixels)

``LABEL`` is a name ("hand"; names get ids 1, 2, ... in order of appearance, skipping ids given
as numbers) or an integer id (named "object" for 1, "object<k>" otherwise); the default is
label 1 "object". Entries of one label on one frame are combined (e.g. a box plus points).

Prompts JSON file (``masks.prompts=/path/prompts.json``): ``{"prompts": [{"frame": 0,
"label": 2, "name": "hand", "points": [[x, y], ...], "negative_points": [[x, y]], "box":
[x0, y0, x1, y1]}, ...]}`` (or the bare list); ``label`` or ``name`` may be left out.

``sam``: a per-frame ``SamPredictor``; :func:`propagate_prompts` carries each label from its
key frames to the others, re-prompting every frame with the box of the flow-warped previous
mask and the flow-tracked positive points. ``sam2``: ``Sam2VideoModel`` with its own memory
propagation; frames are resized and normalised here (its processors need torchvision).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mono4d.data.errors import InputError, ModelUnavailableError, ParameterError
from mono4d.stages import flow as flow_stage
from mono4d.stages import masks_common

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("pos", "neg", "box")
DEFAULT_LABEL = 1
PROMPT_SYNTAX = ("write prompts as 'FRAME:x,y[,LABEL]; FRAME:neg:x,y[,LABEL]; FRAME:box:x0,y0,x1,y1[,LABEL]' "
                 "(e.g. '0:320,240,object;0:box:50,60,200,220,hand') or give a prompts JSON file")
WEIGHTS_FREE_HINT = "or use a weights-free backend: --set masks.backend=motion (or file with masks.mask_path)"
# Re-prompt box: bounding box of the warped mask grown by this fraction of its size per side.
_BOX_MARGIN = 0.1
# A prediction that overlaps its flow-warped previous mask less than this is replaced by it.
_MIN_AGREEMENT_IOU = 0.3
# At most this many flow-tracked positive points per re-prompt (plus the mask's inner point).
_MAX_TRACKED_POINTS = 4
# ImageNet statistics SAM2 normalises with (RGB, [0, 1] scale).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass
class Prompt:
    """What to segment for one label on one key frame (pixel coordinates, x right, y down).

    points / negative_points: ``(x, y)`` pairs; box: ``(x0, y0, x1, y1)`` or None."""

    frame: int
    label: int
    name: str
    points: list[tuple[float, float]] = field(default_factory=list)
    negative_points: list[tuple[float, float]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None

    def point_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 2) float32`` coordinates and ``(N,) int32`` labels (1 positive, 0 negative)."""
        coords = list(self.points) + list(self.negative_points)
        labels = [1] * len(self.points) + [0] * len(self.negative_points)
        return np.array(coords, np.float32).reshape(-1, 2), np.array(labels, np.int32)


def _default_name(label: int) -> str:
    return "object" if label == DEFAULT_LABEL else f"object{label}"


def _parse_number(text: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ParameterError(f"masks.prompts: {text!r} in {entry!r} is not a number", PROMPT_SYNTAX) from None
    if not np.isfinite(value):
        raise ParameterError(f"masks.prompts: {text!r} in {entry!r} is not finite", PROMPT_SYNTAX)
    return value


class _LabelIds:
    """Assigns label ids to names (1, 2, ... in order of appearance, skipping numeric ids)."""

    def __init__(self, numeric_ids: set[int], default_used: bool) -> None:
        # unlabelled prompts are label 1 "object": the name "object" then means that label too
        self.by_name: dict[str, int] = {_default_name(DEFAULT_LABEL): DEFAULT_LABEL} if default_used else {}
        self.taken = set(numeric_ids) | ({DEFAULT_LABEL} if default_used else set())

    def resolve(self, token: str | int | None, name: str | None = None) -> tuple[int, str]:
        if isinstance(token, int):
            if name is not None:
                self.by_name.setdefault(name, token)
            return token, name or self._name_of(token)
        if token is None and name is None:
            return DEFAULT_LABEL, self._name_of(DEFAULT_LABEL)
        key = name if token is None else token
        if key not in self.by_name:
            label = 1
            while label in self.taken:
                label += 1
            self.by_name[key] = label
            self.taken.add(label)
        return self.by_name[key], key

    def _name_of(self, label: int) -> str:
        for name, known in self.by_name.items():
            if known == label:
                return name
        return _default_name(label)


def _label_token(text: str, entry: str) -> str | int:
    text = text.strip()
    if not text:
        raise ParameterError(f"masks.prompts: empty label in {entry!r}", PROMPT_SYNTAX)
    if text.lstrip("-").isdigit():
        label = int(text)
        if not 1 <= label <= 255:
            raise ParameterError(f"masks.prompts: label id {label} in {entry!r} is not in 1..255",
                                 "label ids are 1..255 (0 is the static background)")
        return label
    return text


def parse_prompt_string(text: str) -> list[Prompt]:
    """Parse the prompt string (module docstring) into one :class:`Prompt` per (frame, label),
    in order of first appearance. Raises :class:`ParameterError` on malformed entries."""
    parsed: list[tuple[int, str, list[float], str | int | None, str]] = []
    for raw in text.split(";"):
        entry = raw.strip()
        if not entry:
            continue
        parts = [part.strip() for part in entry.split(":")]
        if len(parts) == 2:
            frame_text, kind, body = parts[0], "pos", parts[1]
        elif len(parts) == 3:
            frame_text, kind, body = parts
        else:
            raise ParameterError(f"masks.prompts: cannot read entry {entry!r}", PROMPT_SYNTAX)
        if kind not in PROMPT_KINDS:
            raise ParameterError(f"masks.prompts: unknown prompt kind {kind!r} in {entry!r} "
                                 f"(one of {', '.join(PROMPT_KINDS)})", PROMPT_SYNTAX)
        if not frame_text.isdigit():
            raise ParameterError(f"masks.prompts: frame {frame_text!r} in {entry!r} is not a frame number", PROMPT_SYNTAX)
        tokens = [token.strip() for token in body.split(",")]
        count = 4 if kind == "box" else 2
        if len(tokens) not in (count, count + 1):
            raise ParameterError(f"masks.prompts: {entry!r} needs {count} numbers"
                                 f"{' (x0,y0,x1,y1)' if kind == 'box' else ' (x,y)'} and an optional label", PROMPT_SYNTAX)
        numbers = [_parse_number(token, entry) for token in tokens[:count]]
        label = _label_token(tokens[count], entry) if len(tokens) > count else None
        parsed.append((int(frame_text), kind, numbers, label, entry))

    ids = _LabelIds({label for *_, label, _ in parsed if isinstance(label, int)},
                    default_used=any(label is None for *_, label, _ in parsed))
    prompts: dict[tuple[int, int], Prompt] = {}
    for frame, kind, numbers, token, entry in parsed:
        label, name = ids.resolve(token)
        prompt = prompts.setdefault((frame, label), Prompt(frame, label, name))
        if kind == "pos":
            prompt.points.append((numbers[0], numbers[1]))
        elif kind == "neg":
            prompt.negative_points.append((numbers[0], numbers[1]))
        else:
            if prompt.box is not None:
                raise ParameterError(f"masks.prompts: two boxes for label {name!r} on frame {frame}",
                                     "give one box per label and frame (add points to refine it)")
            prompt.box = _ordered_box(numbers, entry)
    return _checked(list(prompts.values()))


def _ordered_box(numbers: Sequence[float], where: str) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(value) for value in numbers)
    if x1 <= x0 or y1 <= y0:
        raise ParameterError(f"masks.prompts: box {list(numbers)} in {where!r} has no area (need x0 < x1, y0 < y1)",
                             PROMPT_SYNTAX)
    return x0, y0, x1, y1


def _pairs(value: object, key: str, where: str) -> list[tuple[float, float]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(point, list) and len(point) == 2 for point in value):
        raise ParameterError(f"prompts file: {key} of {where} must be a list of [x, y]", PROMPT_SYNTAX)
    return [(_parse_number(str(x), where), _parse_number(str(y), where)) for x, y in value]


def load_prompt_file(path: Path) -> list[Prompt]:
    """Read a prompts JSON file (module docstring). Raises :class:`InputError` when unreadable
    and :class:`ParameterError` when malformed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read the prompts file {path} ({error})", PROMPT_SYNTAX) from error
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ParameterError(f"prompts file {path} holds no prompts list", PROMPT_SYNTAX)
    ids = _LabelIds({item["label"] for item in items if isinstance(item, dict) and isinstance(item.get("label"), int)},
                    default_used=any(isinstance(item, dict) and item.get("label") is None and item.get("name") is None
                                     for item in items))
    prompts: dict[tuple[int, int], Prompt] = {}
    for number, item in enumerate(items):
        where = f"prompt {number} of {path.name}"
        if not isinstance(item, dict) or not isinstance(item.get("frame"), int) or item["frame"] < 0:
            raise ParameterError(f"{where} needs a non-negative integer 'frame'", PROMPT_SYNTAX)
        label_value, name = item.get("label"), item.get("name")
        if label_value is not None and (not isinstance(label_value, int) or not 1 <= label_value <= 255):
            raise ParameterError(f"{where}: label must be an integer in 1..255", "0 is the static background")
        if name is not None and not isinstance(name, str):
            raise ParameterError(f"{where}: name must be a string", PROMPT_SYNTAX)
        label, name = ids.resolve(label_value, name)
        prompt = prompts.setdefault((item["frame"], label), Prompt(item["frame"], label, name))
        prompt.points += _pairs(item.get("points"), "points", where)
        prompt.negative_points += _pairs(item.get("negative_points"), "negative_points", where)
        if item.get("box") is not None:
            box = item["box"]
            if not isinstance(box, list) or len(box) != 4:
                raise ParameterError(f"{where}: box must be [x0, y0, x1, y1]", PROMPT_SYNTAX)
            prompt.box = _ordered_box([_parse_number(str(value), where) for value in box], where)
    return _checked(list(prompts.values()))


def _checked(prompts: list[Prompt]) -> list[Prompt]:
    if not prompts:
        raise ParameterError("masks.prompts holds no prompt", PROMPT_SYNTAX)
    names: dict[int, str] = {}
    for prompt in prompts:
        if not prompt.points and prompt.box is None:
            raise ParameterError(f"masks.prompts: label {prompt.name!r} on frame {prompt.frame} has only negative "
                                 "points", "add a positive point or a box for it")
        if names.setdefault(prompt.label, prompt.name) != prompt.name:
            raise ParameterError(f"masks.prompts: label id {prompt.label} is named both {names[prompt.label]!r} "
                                 f"and {prompt.name!r}", "use one name per label id")
    return prompts


def load_prompts(spec: str) -> list[Prompt]:
    """Prompts from ``masks.prompts``: the path of a JSON file when it names one (or ends in
    .json), else the prompt string."""
    spec = spec.strip()
    if spec.lower().endswith(".json") or (len(spec) < 4096 and Path(spec).expanduser().is_file()):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"the prompts file {path} does not exist", PROMPT_SYNTAX)
        return load_prompt_file(path)
    return parse_prompt_string(spec)


def check_prompts(prompts: list[Prompt], num_frames: int, height: int, width: int) -> None:
    """Raise :class:`ParameterError` for prompts outside the clip or the image."""
    for prompt in prompts:
        if prompt.frame >= num_frames:
            raise ParameterError(f"masks.prompts: frame {prompt.frame} ({prompt.name!r}) is beyond the last frame "
                                 f"{num_frames - 1}", "prompt frames are numbered like frames/images/ (from 0)")
        corners = [] if prompt.box is None else [prompt.box[:2], prompt.box[2:]]
        for x, y in list(prompt.points) + list(prompt.negative_points) + corners:
            if not (0 <= x <= width and 0 <= y <= height):
                raise ParameterError(f"masks.prompts: ({x:g}, {y:g}) of {prompt.name!r} on frame {prompt.frame} is "
                                     f"outside the {width}x{height} frames",
                                     "give pixel coordinates of the frames stage images (frames/images/), "
                                     "which may be resized from the source video (frames.max_side)")


def label_names(prompts: list[Prompt]) -> dict[int, str]:
    """Label id -> name of the prompts."""
    return {prompt.label: prompt.name for prompt in prompts}


# ---------------------------------------------------------------------------------------------
# Flow-guided re-prompting (the ``sam`` backend's propagation)


class DisFlowSource:
    """Consecutive-frame flow computed on demand with OpenCV DIS when no flow stage output is
    given: ``flow(a, b)`` ``(H, W, 2)`` float32 pixels maps frame a to frame b."""

    def __init__(self, frame_at: Callable[[int], np.ndarray]) -> None:
        self.frame_at = frame_at
        self.engine = flow_stage.DisFlow("medium")
        self._cached: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, a: int, b: int) -> np.ndarray:
        if (a, b) not in self._cached:
            forward, backward = self.engine([(self.engine.prepare(self.frame_at(a)),
                                              self.engine.prepare(self.frame_at(b)))])[0]
            self._cached = {(a, b): forward, (b, a): backward}
        return self._cached[(a, b)]


def inner_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel ``(x, y)`` of a non-empty ``(H, W) bool`` mask farthest from its boundary."""
    distance = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(col), float(row)


def padded_box(mask: np.ndarray, margin: float = _BOX_MARGIN) -> np.ndarray:
    """``(4,) float32`` box ``x0, y0, x1, y1`` around a non-empty mask, grown by ``margin`` of
    its size per side and clipped to the image."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    return np.array([max(0.0, x0 - pad_x), max(0.0, y0 - pad_y), min(float(width), x1 + pad_x),
                     min(float(height), y1 + pad_y)], np.float32)


def track_points(points: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Move ``points (N, 2)`` (x, y) along ``flow (H, W, 2)`` sampled bilinearly at them."""
    if len(points) == 0:
        return points
    moved = flow_stage.sample_bilinear(flow, points[:, 0], points[:, 1], outside=np.nan)
    return (points + moved).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclass
class _Track:
    """State of one label while sweeping: its last mask and flow-tracked positive points."""

    mask: np.ndarray
    points: np.ndarray


def _reprompt(predict: Predictor, frame: np.ndarray, track: _Track, flow_to_previous: np.ndarray,
              flow_from_previous: np.ndarray) -> tuple[_Track | None, bool]:
    """One propagation step of one label; returns the new state (None when the object left
    the view) and whether the prediction was replaced by the warped mask."""
    warped, _ = masks_common.warp_backward(track.mask.astype(np.float32), flow_to_previous)
    warped = warped >= 0.5
    if not warped.any():
        return None, False
    height, width = warped.shape
    points = track_points(track.points, flow_from_previous)
    cols = np.clip(np.nan_to_num(points[:, 0], nan=-1).round().astype(int), -1, width)
    rows = np.clip(np.nan_to_num(points[:, 1], nan=-1).round().astype(int), -1, height)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    inside[inside] = warped[rows[inside], cols[inside]]
    points = points[inside][:_MAX_TRACKED_POINTS]
    prompt_points = np.concatenate([points, np.array([inner_point(warped)], np.float32)])
    predicted = predict(frame, prompt_points, np.ones(len(prompt_points), np.int32), padded_box(warped)).astype(bool)
    if _iou(predicted, warped) < _MIN_AGREEMENT_IOU:
        return _Track(warped, points), True
    return _Track(predicted, points), False


def _from_prompt(predict: Predictor, frame: np.ndarray, prompt: Prompt) -> _Track | None:
    """Predict a key frame's mask from the user's prompt; None when it comes out empty."""
    coords, point_labels = prompt.point_arrays()
    box = None if prompt.box is None else np.array(prompt.box, np.float32)
    mask = predict(frame, coords, point_labels, box).astype(bool)
    return _Track(mask, np.array(prompt.points, np.float32).reshape(-1, 2)) if mask.any() else None


def propagate_prompts(num_frames: int, frame_at: Callable[[int], np.ndarray], prompts: list[Prompt],
                      predict: Predictor, flow: masks_common.FlowFn) -> tuple[np.ndarray, int]:
    """Masks of every prompted label in every frame, ``(T, H, W) uint8``.

    ``predict(frame (H, W, 3) uint8, points (N, 2) float32 (x, y), point_labels (N,) int32 (1
    positive, 0 negative), box (4,) float32 x0, y0, x1, y1 or None) -> (H, W) bool``;
    ``flow(a, b) -> (H, W, 2)`` float32 maps frame a to b. On a label's key frames its prompts
    are used as given; from there the label is carried forward to the end (re-anchored at each
    later key frame) and backward from its first key frame to the start, each frame re-prompted
    with the box of the previous mask warped along the flow and the flow-tracked positive
    points that stay inside it (plus the warped mask's innermost point). A prediction that
    disagrees with the warped mask (IoU < 0.3) is replaced by the warped mask; an object whose
    warped mask is empty has left the view and stays empty until its next key frame. Where
    labels overlap the higher id wins. Returns the masks and how many predictions were replaced."""
    by_label: dict[int, dict[int, Prompt]] = {}
    for prompt in prompts:
        by_label.setdefault(prompt.label, {})[prompt.frame] = prompt
    first_key = {label: min(keys) for label, keys in by_label.items()}
    shape = frame_at(min(first_key.values())).shape[:2]
    label_masks = {label: np.zeros((num_frames,) + shape, bool) for label in by_label}
    replaced = 0

    tracks: dict[int, _Track | None] = {}
    for t in tqdm(range(min(first_key.values()), num_frames), desc="masks: prompted, forward", unit="frame",
                  leave=False):
        frame = frame_at(t)
        for label, keys in sorted(by_label.items()):
            if t in keys:
                tracks[label] = _from_prompt(predict, frame, keys[t])
            elif tracks.get(label) is not None:
                tracks[label], fallback = _reprompt(predict, frame, tracks[label], flow(t, t - 1), flow(t - 1, t))
                replaced += int(fallback)
            if tracks.get(label) is not None:
                label_masks[label][t] = tracks[label].mask

    tracks = {}
    for t in tqdm(range(max(first_key.values()) - 1, -1, -1), desc="masks: prompted, backward", unit="frame",
                  leave=False):
        frame = frame_at(t)
        for label, keys in sorted(by_label.items()):
            key_frame = first_key[label]
            if t >= key_frame:
                continue
            if t == key_frame - 1:
                start = label_masks[label][key_frame]
                seeds = np.array(keys[key_frame].points, np.float32).reshape(-1, 2)
                tracks[label] = _Track(start, seeds) if start.any() else None
            if tracks.get(label) is not None:
                tracks[label], fallback = _reprompt(predict, frame, tracks[label], flow(t, t + 1), flow(t + 1, t))
                replaced += int(fallback)
            if tracks.get(label) is not None:
                label_masks[label][t] = tracks[label].mask

    masks = np.zeros((num_frames,) + shape, np.uint8)
    for label in sorted(label_masks):
        masks[label_masks[label]] = label
    return masks, replaced


# ---------------------------------------------------------------------------------------------
# Models


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other values unchanged."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"masks.device={device} but torch sees no CUDA device", "use --set masks.device=auto or cpu")
    return device


class SamPointPredictor:
    """segment-anything ``SamPredictor`` as a :data:`Predictor`: the image embedding is computed
    once per frame (the last frame object is remembered) and the best of SAM's three candidate
    masks (highest predicted IoU) is returned."""

    def __init__(self, checkpoint: str, model_type: str, device: str) -> None:
        try:
            from segment_anything import SamPredictor, sam_model_registry
        except ImportError as error:
            raise ModelUnavailableError(
                f"masks.backend=sam needs the segment-anything package, which failed to import here ({error})",
                "segment-anything imports torchvision: install it with a torchvision build matching your torch "
                f"(pip install segment-anything torchvision) where that is possible, use --set masks.backend=sam2 "
                f"(transformers, no torchvision), {WEIGHTS_FREE_HINT}") from error
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(
                f"segment-anything checkpoint {path} not found (masks.sam_checkpoint)",
                "download the checkpoint for masks.sam_model_type (e.g. sam_vit_b_01ec64.pth from the "
                f"segment-anything README) and point masks.sam_checkpoint to it, {WEIGHTS_FREE_HINT}")
        try:
            model = sam_model_registry[model_type](checkpoint=str(path))
        except (RuntimeError, KeyError, OSError, ValueError) as error:
            raise ModelUnavailableError(
                f"cannot load {path} as a segment-anything {model_type} model ({str(error).splitlines()[0]})",
                "check that masks.sam_model_type (vit_b/vit_l/vit_h) matches the checkpoint") from error
        model.to(resolve_device(device))
        self.predictor = SamPredictor(model)
        self._frame: np.ndarray | None = None

    def __call__(self, frame: np.ndarray, points: np.ndarray, point_labels: np.ndarray,
                 box: np.ndarray | None) -> np.ndarray:
        if frame is not self._frame:
            self.predictor.set_image(frame)
            self._frame = frame
        candidates, quality, _ = self.predictor.predict(
            point_coords=points if len(points) else None, point_labels=point_labels if len(points) else None,
            box=box, multimask_output=True)
        return candidates[int(np.argmax(quality))].astype(bool)


def load_sam2_video_model(model: str, device: str):
    """A transformers ``Sam2VideoModel`` (Hugging Face id or local folder), in eval mode on
    ``device``. Raises :class:`ModelUnavailableError` when it cannot be loaded."""
    try:
        from transformers import Sam2VideoModel
    except ImportError as error:
        raise ModelUnavailableError(f"transformers has no Sam2VideoModel here ({error})",
                                    f"install transformers >= 4.56, {WEIGHTS_FREE_HINT}") from error
    try:
        network = Sam2VideoModel.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(
            f"cannot load the SAM2 video model {model!r} (masks.sam2_model) as a Hugging Face id or local folder "
            f"({str(error).splitlines()[0]})",
            "download it once where there is internet (e.g. huggingface-cli download facebook/sam2.1-hiera-tiny) "
            f"or point masks.sam2_model to a local copy, {WEIGHTS_FREE_HINT}") from error
    return network.to(device).eval()


def sam2_pixels(frame: np.ndarray, size: int):
    """``(H, W, 3)`` uint8 RGB -> ``(3, size, size)`` float32 tensor, resized (bilinear,
    antialiased, aspect not kept, as SAM2's own processor does) and ImageNet-normalised."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
    tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return ((tensor - mean) / std)[0]


def _sam2_point_inputs(prompt: Prompt, size: int, height: int, width: int) -> dict:
    """A prompt as SAM2 point inputs in model pixels (box corners first, labels 2 and 3)."""
    import torch

    coords, labels = prompt.point_arrays()
    if prompt.box is not None:
        corners = np.array(prompt.box, np.float32).reshape(2, 2)
        coords = np.concatenate([corners, coords])
        labels = np.concatenate([np.array([2, 3], np.int32), labels])
    scaled = coords * np.array([size / width, size / height], np.float32)
    return {"point_coords": torch.from_numpy(scaled)[None, None],
            "point_labels": torch.from_numpy(labels.astype(np.int32))[None, None]}


def sam2_video_masks(frames: np.ndarray, prompts: list[Prompt], model: str, device: str) -> np.ndarray:
    """Masks ``(T, H, W) uint8`` of the prompted labels from the SAM2 video model: the key
    frames are segmented from their prompts, then the model's memory carries every label
    forward from the first key frame to the end and backward to the start. Where labels
    overlap the higher id wins."""
    import torch
    import torch.nn.functional as F
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    device = resolve_device(device)
    network = load_sam2_video_model(model, device)
    size = network.config.image_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    num_frames, height, width = frames.shape[:3]
    session = Sam2VideoInferenceSession(video_height=height, video_width=width, inference_device=device,
                                        inference_state_device=device, video_storage_device="cpu",
                                        dtype=torch.float32)
    for t, frame in enumerate(tqdm(frames, desc="masks: sam2 preprocessing", unit="frame", leave=False)):
        session.add_new_frame(sam2_pixels(frame, size), frame_idx=t)
    logits: dict[int, dict[int, torch.Tensor]] = {}

    def collect(output) -> None:
        for index, label in enumerate(output.object_ids):
            logits.setdefault(int(label), {})[int(output.frame_idx)] = output.pred_masks[index:index + 1].float().cpu()

    with torch.inference_mode():
        for key_frame in sorted({prompt.frame for prompt in prompts}):
            prompted = [prompt for prompt in prompts if prompt.frame == key_frame]
            for prompt in prompted:
                session.add_point_inputs(session.obj_id_to_idx(prompt.label), key_frame,
                                         _sam2_point_inputs(prompt, size, height, width))
                session.remove_mask_inputs(session.obj_id_to_idx(prompt.label), key_frame)
            session.obj_with_new_inputs = [prompt.label for prompt in prompted]
            collect(network(inference_session=session, frame_idx=key_frame))
        start = min(prompt.frame for prompt in prompts)
        for output in tqdm(network.propagate_in_video_iterator(session, start_frame_idx=start), total=num_frames - start,
                           desc="masks: sam2 forward", unit="frame", leave=False):
            collect(output)
        if start > 0:
            for output in tqdm(network.propagate_in_video_iterator(session, start_frame_idx=start, reverse=True),
                               total=start + 1, desc="masks: sam2 backward", unit="frame", leave=False):
                collect(output)

    masks = np.zeros((num_frames, height, width), np.uint8)
    for label in sorted(logits):
        for t, low_res in logits[label].items():
            full = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            masks[t][(full > 0).numpy()] = label
    return masks


def run_prompted(frames: np.ndarray, flow_dir: Path | None, params) -> tuple[np.ndarray, dict[int, str], list[str]]:
    """The ``sam``/``sam2`` backends on ``frames (T, H, W, 3)`` uint8 with ``params``
    (:class:`mono4d.stages.masks.Params`). The ``sam`` propagation uses the flow stage's consecutive
    pairs when ``flow_dir`` has them, else OpenCV DIS. Returns ``(T, H, W) uint8`` masks (small
    regions dropped, holes filled), label names and notes."""
    prompts = load_prompts(params.prompts)
    num_frames, height, width = frames.shape[:3]
    check_prompts(prompts, num_frames, height, width)
    notes: list[str] = []
    if params.backend == "sam":
        predictor = SamPointPredictor(params.sam_checkpoint, params.sam_model_type, params.device)
        flows: masks_common.FlowFn = DisFlowSource(lambda t: frames[t])
        if flow_dir is not None:
            stage_flows = masks_common.StageFlow(flow_dir)
            if all(stage_flows.has(t, t + 1) for t in range(num_frames - 1)):
                flows = stage_flows
        masks, replaced = propagate_prompts(num_frames, lambda t: frames[t], prompts, predictor, flows)
        if replaced:
            notes.append(f"{replaced} SAM prediction(s) disagreed with the flow-warped previous mask and were "
                         "replaced by it; add prompts on more key frames if objects are lost")
    else:
        masks = sam2_video_masks(frames, prompts, params.sam2_model, params.device)
    min_area = int(round(params.min_area_fraction * height * width))
    masks = np.stack([masks_common.clean_labels(mask, 0, min_area) for mask in masks])
    return masks, label_names(prompts), notes

