"""Configuration: stage parameters from ``luigi.cfg``, presets, and ``--set`` overrides.

Precedence, lowest first:

1. the ``Params`` dataclass defaults of each stage module (``stages/<name>.py``, declared in
   :data:`mono4d.pipeline.registry.STAGES`);
2. the stage sections of ``luigi.cfg`` files: the repository's own, then ``./luigi.cfg`` in the
   working directory, then any ``--config FILE`` given on the command line;
3. the chosen preset (``[preset.cpu]`` / ``[preset.gpu]`` sections, ``stage.param = value``);
4. what the input needs (:func:`input_settings`: a D-NeRF folder brings its own cameras, the
   silhouette initialisation and no depth or masks; a Panoptic folder its cameras, its ``seg/``
   masks, the multi-view initialisation and online training);
5. ``--set stage.param=value`` on the command line.

The effective configuration is validated as a whole before anything runs and written into
the workspace (``DIR/config.json``) so a run can be explained and repeated.
"""
from __future__ import annotations

import configparser
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mono4d.data.errors import ParameterError
from mono4d.pipeline.registry import STAGES, cuda_available

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_FILE = REPO_ROOT / "luigi.cfg"
PRESETS = ("cpu", "gpu")


def default_preset() -> str:
    """``gpu`` when CUDA is available, else ``cpu``."""
    return "gpu" if cuda_available() else "cpu"


def parse_value(text: str, kind: Any, name: str) -> Any:
    """Convert a config/CLI string to a parameter's declared type (int, float, bool or str)."""
    text = text.strip()
    if kind in (bool, "bool"):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ParameterError(f"{name}: expected true/false, got {text!r}", f"write e.g. {name}=true")
    if kind in (int, "int"):
        try:
            return int(text)
        except ValueError:
            raise ParameterError(f"{name}: expected an integer, got {text!r}", f"write e.g. {name}=4") from None
    if kind in (float, "float"):
        try:
            return float(text)
        except ValueError:
            raise ParameterError(f"{name}: expected a number, got {text!r}", f"write e.g. {name}=0.5") from None
    return text


def _field_types(params_cls: type) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(params_cls)}


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def parse_assignment(text: str) -> tuple[str, str, str]:
    """Split ``stage.param=value`` into its three parts, checking stage and parameter names."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ParameterError(f"cannot parse override {text!r}", "write it as --set stage.param=value, e.g. --set frames.max_side=480")
    key, value = text.split("=", 1)
    stage, param = key.strip().split(".", 1)
    check_key(stage, param)
    return stage, param, value


def check_key(stage: str, param: str) -> None:
    """Raise a ParameterError with a suggestion when ``stage.param`` does not exist."""
    if stage not in STAGES:
        raise ParameterError(f"unknown stage {stage!r}",
                             f"{_suggest(stage, list(STAGES))}stages are: {', '.join(STAGES)}")
    names = _field_types(STAGES[stage].params_class)
    if param not in names:
        raise ParameterError(f"stage {stage!r} has no parameter {param!r}",
                             f"{_suggest(param, list(names))}its parameters are: {', '.join(names)}")


@dataclass
class Config:
    """The effective configuration of one run: a validated ``Params`` per stage."""

    preset: str
    params: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # "stage.param" -> where its value came from

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset,
                "stages": {name: dataclasses.asdict(p) for name, p in self.params.items()},
                "sources": self.sources}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Config":
        params = {}
        for name, values in data["stages"].items():
            if name in STAGES:
                params_cls = STAGES[name].params_class
                known = {f.name for f in dataclasses.fields(params_cls)}
                params[name] = params_cls(**{k: v for k, v in values.items() if k in known})
        return cls(preset=data["preset"], params=params, sources=dict(data.get("sources", {})))


def read_config_files(paths: Sequence[Path]) -> configparser.ConfigParser:
    """Read ``luigi.cfg``-style files in order (later files win). Missing explicit files are errors."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep parameter names as written
    for path in paths:
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise ParameterError(f"cannot parse config file {path}: {exc}", "fix the syntax (INI: [section] then key = value)") from None
    return parser


def input_settings(source: str | Path | None) -> dict[str, str]:
    """``stage.param`` -> value that the run's input needs: for a D-NeRF folder,
    :data:`mono4d.data.dnerf.PIPELINE_SETTINGS` with ``cameras.known_path`` the folder; for a
    Panoptic folder (or its ``train_meta.json``), :data:`mono4d.data.panoptic.PIPELINE_SETTINGS`
    with ``cameras.known_path`` the folder and ``masks.mask_path`` its ``seg/``; nothing for videos
    and image folders (or no input)."""
    from mono4d.data import dnerf, panoptic

    if source is None:
        return {}
    if dnerf.is_dnerf_folder(source):
        return {**dnerf.PIPELINE_SETTINGS, "cameras.known_path": str(Path(source).resolve())}
    root = panoptic.panoptic_root(source)
    if root is not None:
        return {**panoptic.PIPELINE_SETTINGS, "cameras.known_path": str(root.resolve()),
                "masks.mask_path": str((root / panoptic.SEG_DIR).resolve())}
    return {}


def load_config(preset: str | None = None, overrides: Sequence[str] = (),
                config_files: Sequence[str | Path] = (), source: str | Path | None = None) -> Config:
    """Build and validate the effective configuration for the input ``source`` (see the module
    docstring for precedence)."""
    missing = [str(p) for p in config_files if not Path(p).is_file()]
    if missing:
        raise ParameterError(f"config file not found: {', '.join(missing)}", "give the path of an existing luigi.cfg-style file")
    files = [DEFAULT_CONFIG_FILE]
    if Path("luigi.cfg").resolve() != DEFAULT_CONFIG_FILE and Path("luigi.cfg").is_file():
        files.append(Path("luigi.cfg").resolve())
    files += [Path(p) for p in config_files]
    parser = read_config_files([f for f in files if f.is_file()])

    chosen = preset or default_preset()
    if chosen not in PRESETS:
        raise ParameterError(f"unknown preset {chosen!r}", f"choose one of: {', '.join(PRESETS)}")

    values: dict[str, dict[str, Any]] = {name: {} for name in STAGES}
    sources: dict[str, str] = {}

    def assign(stage: str, param: str, text: str, source: str) -> None:
        check_key(stage, param)
        kind = _field_types(STAGES[stage].params_class)[param]
        values[stage][param] = parse_value(text, kind, f"{stage}.{param}")
        sources[f"{stage}.{param}"] = source

    for stage in STAGES:
        if parser.has_section(stage):
            for param, text in parser.items(stage):
                assign(stage, param, text, "luigi.cfg")
    section = f"preset.{chosen}"
    if parser.has_section(section):
        for key, text in parser.items(section):
            stage, _, param = key.partition(".")
            assign(stage, param, text, f"preset {chosen}")
    for key, text in input_settings(source).items():
        stage, _, param = key.partition(".")
        assign(stage, param, text, "input")
    for text in overrides:
        stage, param, value = parse_assignment(text)
        assign(stage, param, value, "--set")

    params = {}
    for stage, stage_values in values.items():
        try:
            params[stage] = STAGES[stage].params_class(**stage_values)
        except TypeError as exc:  # a dataclass rejecting a value
            raise ParameterError(f"invalid parameters for stage {stage!r}: {exc}", "check luigi.cfg and --set values") from None
        params[stage].validate()
    return Config(preset=chosen, params=params, sources=sources)
