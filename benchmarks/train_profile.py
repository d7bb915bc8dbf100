"""Where the time of a training step goes, on a workspace whose init stage is done.

    python benchmarks/train_profile.py --work runs/teddy [--steps 100] [--set train.param=value ...]

Runs the train stage's own loop (:func:`mono4d.models.trainer.optimize`) for ``--steps`` iterations with
the workspace's recorded train parameters (``--set`` overrides them; the schedule is relative, so
densification runs at the same fractions of the shorter run) under cProfile, and prints one JSON
document: seconds per step and the share of each phase — deformation (the dynamic Gaussians moved
by the deformation field), rasterizer forward, losses forward (photometric, ordinal, ...),
backward (all of autograd), optimizer steps, densification (gsplat's strategy) and the rest —
followed by the backward's heaviest autograd nodes (torch profiler, CPU time per step).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

PHASES = {
    # phase -> (file suffix, function name) whose cumulative time it is
    "deformation": ("models/gaussians.py", "gaussians_at"),
    "rasterizer_forward": ("models/rasterizer.py", "rasterization"),
    "render_and_losses_forward": ("models/trainer.py", "training_loss"),
    "backward": ("torch/_tensor.py", "backward"),
    "densification_pre": ("gsplat/strategy/default.py", "step_pre_backward"),
    "densification": ("gsplat/strategy/default.py", "step_post_backward"),
    "optimizer": ("torch/optim/optimizer.py", "wrapper"),
}


def cumulative_seconds(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of the function ``name`` defined in a file ending with ``suffix``
    (summed over every such function, not counting recursive calls twice)."""
    total = 0.0
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        if function == name and filename.replace("\\", "/").endswith(suffix):
            total += cumulative
    return total


def load_training(work: Path, overrides: list[str]):
    """The init model, training data and train Params of the workspace ``work``."""
    import dataclasses

    from mono4d.pipeline.config import Config, _field_types, check_key, parse_assignment, parse_value
    from mono4d.pipeline.workspace import Workspace
    from mono4d.stages import init as init_stage
    from mono4d.stages import train

    workspace = Workspace(work)
    config = Config.from_json(workspace.read_config()["config"])
    params = config.params["train"]
    for text in overrides:
        stage, name, value = parse_assignment(text)
        check_key(stage, name)
        if stage != "train":
            raise SystemExit(f"--set {text}: only train.* parameters can be changed here")
        params = dataclasses.replace(params, **{name: parse_value(value, _field_types(type(params))[name], text)})
    params.validate()
    device = init_stage.resolve_device(params.device)
    inputs = {name: workspace.stage_dir(name) for name in ("init", "frames", "cameras", "align", "masks", "tracks")}
    model = init_stage.load_init(inputs["init"], device)
    data = train.load_training_data(inputs, params, model.meta, device, [])
    return model, data, params, device


def backward_nodes(model, data, params, device, steps: int, top: int = 12) -> list[dict]:
    """The heaviest autograd nodes of ``steps`` further training steps (torch profiler)."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from mono4d.models.trainer import optimize

    short = dataclasses.replace(params, iterations=steps)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        optimize(model, data, short, device)
    nodes = [event for event in profiler.key_averages()
             if event.key.startswith("autograd::engine::evaluate_function")]
    nodes.sort(key=lambda event: event.cpu_time_total, reverse=True)
    return [{"node": event.key.split(": ", 1)[-1], "ms_per_step": round(event.cpu_time_total / 1e3 / steps, 2)}
            for event in nodes[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="workspace with the init stage done")
    parser.add_argument("--steps", type=int, default=100, help="training steps profiled")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.PARAM=VALUE")
    args = parser.parse_args()

    import dataclasses

    from mono4d.models.trainer import optimize

    model, data, params, device = load_training(args.work, args.overrides)
    profiled = dataclasses.replace(params, iterations=args.steps)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    optimize(model, data, profiled, device)
    profiler.disable()
    elapsed = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    seconds = {phase: cumulative_seconds(stats, *where) for phase, where in PHASES.items()}
    seconds["densification"] += seconds.pop("densification_pre")
    seconds["losses_forward"] = (seconds.pop("render_and_losses_forward") - seconds["deformation"]
                                 - seconds["rasterizer_forward"])
    seconds["other"] = elapsed - sum(seconds.values())
    report = {
        "work": str(args.work), "steps": args.steps, "width": data.width, "height": data.height,
        "gaussians_at_end": model.num_gaussians, "backend": params.backend,
        "seconds_per_step": round(elapsed / args.steps, 4),
        "share": {phase: round(value / elapsed, 3) for phase, value in seconds.items()},
        "backward_nodes": backward_nodes(model, data, params, device, max(args.steps // 5, 5)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
