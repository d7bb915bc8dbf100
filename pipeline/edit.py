"""``mono4d edit DIR --remove LAYER`` / ``--duplicate LAYER --offset x,y,z``: a new workspace whose
trained scene is DIR's with scene layers removed or duplicated (Dynamic 3D Gaussians'
compositional edits on the layers of :mod:`mono4d.models.layers`: ``static``, ``object_<k>``, ``hand``,
or a label name or id).

The result is a new workspace folder OUT (default: next to DIR, named after the edits, e.g.
``teddy-without-hand``), so everything that reads a workspace works on it unchanged
(``mono4d export OUT``, ``mono4d view OUT``, ``mono4d inspect OUT``, ``mono4d status OUT``):

- every stage folder of DIR except ``train`` is hard-linked into OUT (copied where the file
  system cannot link; stage outputs are never modified in place, a rerun replaces the folder),
  and DIR's ``config.json`` is copied;
- ``OUT/train`` holds the edited model and everything the train stage writes
  (:func:`mono4d.stages.train_outputs.write_all`: renders and per-layer renders of the held-out and
  training frames, scored against the input frames, videos, PLY files, trajectories), DIR's
  training curves, ``edit.json`` (``{"source": DIR, "edits": [...]}``) and ``log.txt``; its
  ``manifest.json`` is DIR's train manifest (so the stage counts as done while its inputs and
  code are unchanged) with the new figures, a note and the ``edit`` record.

Edits apply in order: every ``--remove``, then every ``--duplicate``. A duplicate is moved by its
``--offset`` (world units of the cameras stage: metres for metric cameras, SfM units otherwise) at
every time; the copy's Gaussians get new label ids, so the copy is a layer of its own. Rerunning
the train stage in OUT (``mono4d run --work OUT --rerun train``) replaces the edit with a fresh
training.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time as timer
import uuid
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

from mono4d.data.artifacts import MASKS_DIR
from mono4d.data.errors import InputError, ParameterError

logger = logging.getLogger(__name__)

EDIT_FILE = "edit.json"
#: Folders of a workspace that are not carried into an edited copy (they describe the source scene).
NOT_CARRIED = ("train", "export", "report")


def parse_offset(text: str) -> list[float]:
    """``"x,y,z"`` -> three floats; :class:`ParameterError` otherwise."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(abs(value) < float("inf") for value in values):
        raise ParameterError(f"offset {text!r} is not three numbers x,y,z", "write it as --offset 0.5,0,0 (world units)")
    return values


def default_out(work: Path, records: list[dict]) -> Path:
    """``<DIR>-without-<layer>-<layer>-copy...`` next to ``work``."""
    words = [f"without-{r['layer']}" if r["op"] == "remove" else f"{r['layer']}-copy" for r in records]
    return work.parent / f"{work.name}-{'-'.join(words)}"


def link_or_copy(source: str, target: str) -> None:
    """Hard-link ``source`` at ``target``; copy it where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def training_inputs(work: Path) -> dict[str, Path]:
    """The folders of workspace ``work`` the train stage reads, by their ``inputs`` key: ``init``,
    ``frames``, ``cameras``, ``align``, ``tracks`` (those present) and, as ``masks``, the refined
    masks (``masks_refine``, the final ones the train stage was given) or, where the workspace has
    none, the first-pass ``masks``."""
    inputs = {name: work / name for name in ("init", "frames", "cameras", "align", "tracks") if (work / name).is_dir()}
    for stage in ("masks_refine", "masks"):
        if (work / stage / MASKS_DIR).is_dir():
            inputs["masks"] = work / stage
            break
    return inputs


def train_params(meta: dict):
    """The :class:`mono4d.stages.train.Params` a model was trained with (fields this version does not
    know are left out, missing ones take their defaults)."""
    from mono4d.stages.train import Params

    known = {field.name for field in fields(Params)}
    return Params(**{key: value for key, value in meta.get("train_params", {}).items() if key in known})


def apply_edits(model, remove: list[str], duplicate: list[str], offsets: list[list[float]]):
    """The edited model and one record per edit (see :mod:`mono4d.models.layers`). ``offsets``: one per
    duplicate, or one for all of them."""
    from mono4d.models.layers import duplicate_layer, remove_layer

    if not remove and not duplicate:
        raise ParameterError("nothing to edit", "give --remove LAYER and/or --duplicate LAYER --offset x,y,z")
    if duplicate and len(offsets) not in (1, len(duplicate)):
        raise ParameterError(f"{len(duplicate)} --duplicate but {len(offsets)} --offset",
                             "give one --offset x,y,z per --duplicate (or one for all)")
    if offsets and not duplicate:
        raise ParameterError("--offset without --duplicate", "add --duplicate LAYER, or leave --offset out")
    records = []
    for selector in remove:
        model, record = remove_layer(model, selector)
        records.append(record)
    for k, selector in enumerate(duplicate):
        model, record = duplicate_layer(model, selector, offsets[k if len(offsets) > 1 else 0])
        records.append(record)
    return model, records


def edit_workspace(work: Path, remove: list[str] | None = None, duplicate: list[str] | None = None,
                   offsets: list[str] | None = None, out: Path | None = None) -> Path:
    """Write the edited copy of the workspace ``work`` (see the module docstring) and return its
    folder. ``remove`` / ``duplicate``: layer or label selectors; ``offsets``: ``"x,y,z"`` strings.
    Raises :class:`InputError` when ``work`` has no trained model and :class:`ParameterError` for
    unknown layers, bad offsets or an existing ``out``, before anything is written."""
    from mono4d.models.trainer import new_curves
    from mono4d.pipeline.export import stage_output
    from mono4d.pipeline.registry import STAGES
    from mono4d.pipeline.tasks import stage_log
    from mono4d.pipeline.workspace import MANIFEST, read_json, write_json_atomic
    from mono4d.stages import train, train_outputs
    from mono4d.stages.init import resolve_device

    work = Path(work)
    if not work.is_dir():
        raise InputError(f"workspace {work} does not exist", "run `mono4d run INPUT --work DIR` first")
    train_dir = stage_output(work, "train", train.MODEL_FILE)
    model = train.load_trained(train_dir, "cpu")
    model, records = apply_edits(model, list(remove or []), list(duplicate or []),
                                 [parse_offset(text) for text in offsets or []])
    out = Path(out) if out is not None else default_out(work, records)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ParameterError(f"{out} already exists", "choose a new folder with --out")
    params = train_params(model.meta)
    device = resolve_device(params.device)
    temporary = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    temporary.mkdir(parents=True)
    started = timer.perf_counter()
    try:
        for entry in sorted(work.iterdir()):
            if entry.is_dir() and entry.name in STAGES and entry.name not in NOT_CARRIED:
                shutil.copytree(entry, temporary / entry.name, symlinks=True, copy_function=link_or_copy)
        if (work / "config.json").is_file():
            shutil.copy2(work / "config.json", temporary / "config.json")
        edited_train = temporary / "train"
        edited_train.mkdir()
        with stage_log(edited_train / "log.txt"):
            logger.info("edit of %s: %s", work, "; ".join(json.dumps(record) for record in records))
            inputs = training_inputs(temporary)
            notes: list[str] = []
            model.meta = {**model.meta, "edit": records, "edited_from": str(work.resolve())}
            model.params = {name: value.to(device) for name, value in model.params.items()}
            model.variables = {name: value.to(device) for name, value in model.variables.items()}
            model.field = model.field.to(device)
            data = train.load_training_data(inputs, params, model.meta, device, notes)
            curves = read_json(train_dir / "curves.json") or new_curves()
            figures = train_outputs.write_all(edited_train, model, data, params, curves)
        (edited_train / EDIT_FILE).write_text(json.dumps({"source": str(work.resolve()), "edits": records}, indent=1))
        manifest = read_json(train_dir / MANIFEST) or {"stage": "train"}
        note = f"edited by mono4d edit from {work.resolve()}: " + "; ".join(
            f"{r['op']} {r['layer']} ({r['num_gaussians']} Gaussians)" for r in records)
        manifest.update({"figures": {**manifest.get("figures", {}), **figures},
                         "notes": list(manifest.get("notes", [])) + notes + [note], "edit": records,
                         "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "edit_wall_time_s": round(timer.perf_counter() - started, 3)})
        write_json_atomic(edited_train / MANIFEST, manifest)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("edited workspace written to %s (%d Gaussians)", out, model.num_gaussians)
    return out
