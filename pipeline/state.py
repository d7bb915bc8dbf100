"""Is a stage done, stale (and why) or missing? Fingerprints of what a stage's result depends on.

A stage's fingerprint covers four parts, each recorded in its manifest so staleness can be
explained part by part:

- ``params``: its effective parameters;
- ``inputs``: content hashes of the files it reads from outside the workspace (the input video
  or image folder for ``frames``; any parameter naming an existing file or folder, such as a
  folder of user depth maps);
- ``upstream``: the hashes of its upstream stages' manifests (a recomputed upstream changes them);
- ``code``: the hash of the stage's source files (``stages/<name>.py`` and ``stages/<name>_*.py``).

A stage is done when its manifest's fingerprint equals the current one *and* all its upstream
stages are done; Luigi only walks down from the requested task until it finds a complete one,
so completeness must include the upstream check.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import dag
from pipeline.config import REPO_ROOT, Config
from pipeline.workspace import FingerprintCache, Workspace, sha256_bytes, sha256_json


@dataclass
class StageState:
    stage: str
    status: str  # "done" | "stale" | "missing"
    reasons: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None


def code_hash(stage: str) -> str:
    """Hash of the stage's own source files."""
    files = [REPO_ROOT / "stages" / f"{stage}.py", *sorted((REPO_ROOT / "stages").glob(f"{stage}_*.py"))]
    return sha256_bytes(b"".join(p.read_bytes() for p in files if p.is_file()))


class RunState:
    """Evaluates stage states for one workspace under one run configuration (``config.json``)."""

    def __init__(self, workspace: Workspace, run_config: dict[str, Any]) -> None:
        self.workspace = workspace
        self.run_config = run_config
        self.config = Config.from_json(run_config["config"])
        self.input = Path(run_config["input"])
        self.force = set(run_config.get("force", []))
        self.run_id = run_config.get("run_id", "")
        self.fingerprints = FingerprintCache(workspace)

    def upstream(self, stage: str) -> list[str]:
        return dag.upstream(stage, self.config)

    def external_inputs(self, stage: str) -> dict[str, Path]:
        """Files and folders outside the workspace that the stage reads."""
        inputs = {"source": self.input} if stage == "frames" else {}
        for name, value in dataclasses.asdict(self.config.params[stage]).items():
            if isinstance(value, str) and value and Path(value).exists():
                inputs[name] = Path(value)
        return inputs

    def stage_inputs(self, stage: str) -> dict[str, Path]:
        """What the stage function receives: upstream output folders and external inputs."""
        inputs = {name: self.workspace.stage_dir(name) for name in self.upstream(stage)}
        if stage == "frames":
            inputs["source"] = self.input
        return inputs

    def fingerprint_parts(self, stage: str) -> dict[str, Any]:
        inputs = {}
        for name, path in self.external_inputs(stage).items():
            inputs[name] = {"path": str(path.resolve()),
                            "sha256": self.fingerprints.path_fingerprint(path) if path.exists() else None}
        self.fingerprints.save()
        return {
            "params": dataclasses.asdict(self.config.params[stage]),
            "inputs": inputs,
            "upstream": {name: self.workspace.manifest_hash(name) for name in self.upstream(stage)},
            "code": code_hash(stage),
        }

    @staticmethod
    def fingerprint(parts: dict[str, Any]) -> str:
        """One hash of the parts; input paths are left out so a moved but identical input still matches."""
        comparable = dict(parts, inputs={k: v["sha256"] for k, v in parts["inputs"].items()})
        return sha256_json(comparable)

    def state(self, stage: str) -> StageState:
        manifest = self.workspace.read_manifest(stage)
        reasons = []
        for name in self.upstream(stage):
            up = self.state(name)
            if up.status != "done":
                reasons.append(f"upstream {name} is {up.status}")
        if manifest is None:
            return StageState(stage, "missing", reasons)
        parts = self.fingerprint_parts(stage)
        if manifest.get("fingerprint") != self.fingerprint(parts):
            reasons += explain_difference(manifest, parts)
            reasons = reasons or ["fingerprint differs"]
        if stage in self.force and manifest.get("run_id") != self.run_id:
            reasons.append("--rerun requested")
        return StageState(stage, "stale" if reasons else "done", reasons, manifest)


def explain_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable reasons why a recorded fingerprint differs from the current one."""
    reasons = []
    old_params, new_params = old.get("params", {}), new["params"]
    for key in sorted(set(old_params) | set(new_params)):
        if old_params.get(key) != new_params.get(key):
            reasons.append(f"parameter {key} changed: {old_params.get(key)!r} -> {new_params.get(key)!r}")
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if (old_inputs.get(key) or {}).get("sha256") != (new_inputs.get(key) or {}).get("sha256"):
            reasons.append(f"input {key} changed")
    old_up = old.get("upstream", {})
    for key, value in new["upstream"].items():
        if old_up.get(key) != value:
            reasons.append(f"upstream {key} was recomputed")
    if old.get("code") != new["code"]:
        reasons.append("stage code changed")
    return reasons
