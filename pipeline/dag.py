"""Who needs whom: the stage graph as plain functions of the configuration (no Luigi here).

Each stage's edges are declared in :data:`mono4d.pipeline.registry.STAGES` (``upstream(params)``);
some depend on parameters (e.g. the motion masks need flow, prompted SAM masks do not), so
these functions take the effective configuration.
"""
from __future__ import annotations

from mono4d.pipeline.config import Config
from mono4d.pipeline.registry import STAGES


def upstream(stage: str, config: Config) -> list[str]:
    """Names of the stages whose outputs ``stage`` reads, for this configuration."""
    return list(STAGES[stage].upstream(config.params[stage]))


def final_stage() -> str:
    """The last stage of the pipeline: what `mono4d run` builds when no --until is given."""
    return list(STAGES)[-1]


def closure(stage: str, config: Config) -> list[str]:
    """``stage`` and everything it depends on, in pipeline order."""
    needed: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(upstream(name, config))
    return [name for name in STAGES if name in needed]

