"""Speed and accuracy of the DIS flow backend per preset on the synthetic scene.

For each DIS preset, at the preset's own finest pyramid level and at the level the stage's
auto rule picks for this frame size (when they differ), prints milliseconds per pair
(forward + backward flow, both directions timed together, no file writing), the mean EPE of
the forward flow on pixels that pass the forward-backward check, the valid fraction, and
the share of ground-truth-occluded pixels the check flags. Writes the figures as JSON with --json.

    python benchmarks/flow_speed.py                    # ci preset (192x144), generated in a temp dir
    python benchmarks/flow_speed.py --preset bench --scene /tmp/bench_scene   # reuse / keep a scene
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mono4d.data import synthetic
from mono4d.stages import flow


def load_or_generate(preset: str, scene_dir: str) -> synthetic.SyntheticScene:
    """The synthetic scene in ``scene_dir`` (generated there when absent; a temp dir when "")."""
    root = Path(scene_dir) if scene_dir else Path(tempfile.mkdtemp(prefix="flow_speed_")) / "scene"
    if (root / "scene.json").is_file():
        return synthetic.load(root)
    return synthetic.generate(root, preset=preset, seed=0)


def measure(scene: synthetic.SyntheticScene, preset: str, finest_scale: int, repeats: int) -> dict:
    """Figures of one DIS configuration over all consecutive pairs of ``scene``."""
    engine = flow.DisFlow(preset, finest_scale=finest_scale)
    grey = [engine.prepare(image) for image in scene.images]
    pairs = [(grey[t], grey[t + 1]) for t in range(scene.num_frames - 1)]
    engine(pairs[:1])  # warm-up
    best = np.inf
    for _ in range(repeats):
        began = time.perf_counter()
        flows = engine(pairs)
        best = min(best, time.perf_counter() - began)
    epe, valid_fraction, flagged, occluded = [], [], 0, 0
    for t, (forward, backward) in enumerate(flows):
        valid = flow.consistency_mask(forward, backward, flow.Params().fb_threshold, flow.Params().fb_relative)
        epe.append(float(np.linalg.norm(forward - scene.flow[t], axis=-1)[valid].mean()))
        valid_fraction.append(float(valid.mean()))
        occluded += int(scene.flow_occluded[t].sum())
        flagged += int((scene.flow_occluded[t] & ~valid).sum())
    return {"preset": preset, "finest_level": engine.finest_level(scene.height, scene.width),
            "ms_per_pair": round(1000.0 * best / len(pairs), 2), "epe_valid_px": round(float(np.mean(epe)), 4),
            "valid_fraction": round(float(np.mean(valid_fraction)), 4),
            "occlusion_recall": round(flagged / max(occluded, 1), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ci", choices=sorted(synthetic.PRESETS), help="synthetic scene preset")
    parser.add_argument("--scene", default="", help="folder of the scene (reused if present, else generated there)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is kept)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    scene = load_or_generate(args.preset, args.scene)
    print(f"scene: {args.preset} {scene.width}x{scene.height}, {scene.num_frames - 1} consecutive pairs")
    print(f"{'preset':>10} {'level':>5} {'ms/pair':>8} {'EPE px':>7} {'valid':>6} {'occl. recall':>12}")
    results = []
    for preset in flow.DIS_PRESETS:
        engine = flow.DisFlow(preset)
        levels = {engine.preset_finest_scale, engine.finest_level(scene.height, scene.width)}
        for level in sorted(levels):
            row = measure(scene, preset, level, args.repeats)
            results.append(row)
            print(f"{preset:>10} {row['finest_level']:>5} {row['ms_per_pair']:>8.2f} {row['epe_valid_px']:>7.3f} "
                  f"{row['valid_fraction']:>6.3f} {row['occlusion_recall']:>12.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"scene": args.preset, "width": scene.width, "height": scene.height,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
