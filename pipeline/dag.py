"""Who needs whom: the stage graph as plain functions of the configuration (no Luigi here).

The graph follows ../shared/DESIGN.md "What flows where". Some edges depend on parameters
(e.g. the motion masks need flow, prompted SAM masks do not), so ``upstream`` takes the
effective configuration.
"""
from __future__ import annotations

from pipeline.config import STAGE_MODULES, Config


def upstream(stage: str, config: Config) -> list[str]:
    """Names of the stages whose outputs ``stage`` reads, for this configuration."""
    params = config.params.get(stage)
    if stage == "frames":
        return []
    if stage == "flow":
        return ["frames"]
    if stage == "masks":
        return ["frames", "flow"] if params.needs_flow() else ["frames"]
    if stage == "cameras":
        return ["frames", "masks"] if params.mode == "colmap" and params.use_masks else ["frames"]
    if stage == "depth":
        return ["frames", "cameras"] if params.backend == "sfm" else ["frames"]
    if stage == "align":
        return ["depth", "cameras", "masks"] if params.use_masks else ["depth", "cameras"]
    if stage == "tracks":
        return ["frames", "flow", "cameras", "align"]
    if stage == "init":
        return ["frames", "cameras", "align", "masks", "tracks"]
    if stage == "train":
        needed = ["init", "frames", "cameras", "align", "masks"]
        return needed + ["tracks"] if params.reprojection_weight > 0 else needed
    raise KeyError(stage)


def final_stage() -> str:
    """The last stage of the pipeline: what `mono4d run` builds when no --until is given."""
    return list(STAGE_MODULES)[-1]


def closure(stage: str, config: Config) -> list[str]:
    """``stage`` and everything it depends on, in pipeline order."""
    needed: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(upstream(name, config))
    return [name for name in STAGE_MODULES if name in needed]


def downstream(stage: str, config: Config, within: list[str]) -> list[str]:
    """Stages among ``within`` that depend on ``stage``, directly or not (``stage`` excluded)."""
    return [name for name in within if name != stage and stage in closure(name, config)]
