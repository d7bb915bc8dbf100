#!/usr/bin/env bash
# GPU readiness check of mono4d's rasterizers, prepared for ONE call of the device tool (under 8 min).
#
# It (1) installs gsplat and the pipeline's missing packages there from carried wheels and builds
# gsplat's CUDA extension for the machine's GPU, (2) runs the gsplat parity tests (`pytest -m gpu`),
# (3) runs benchmarks/rasterizer_speed.py on CUDA (torch and gsplat on the GPU, numba on its CPU),
# (4) trains teddy.mp4 with `--preset gpu` twice, train.backend=torch and train.backend=gsplat, on
# the same upstream stages, and prints both runs' train times and held-out PSNR.
# Every step has its own time limit, so a failing step is reported and the next one still runs.
#
# Two modes:
#   bash benchmarks/gpu_check.sh prepare
#       HERE (with network): downloads Python 3.12 x86-64 wheels of the packages the device image
#       lacks into .whl/ and copies teddy.mp4 into .gpu_data/ (both ignored by git, carried).
#   bash benchmarks/gpu_check.sh device
#       ON THE DEVICE: the device tool's run(command="bash benchmarks/gpu_check.sh device",
#       carry=[".whl", ".gpu_data"], timeout_s=480). Every step ends by 450 s; logs and JSON come
#       back in $OUT: gpu.txt, steps.log (every step's full output), rasterizer_speed.json, teddy.txt.
#
# The device image has python3 3.12 with torch (CUDA), numba, numpy, scipy, opencv, transformers,
# pytest, ninja and nvcc; nothing can be downloaded there. Its steps use `--preset gpu` with
# weights-free flow and depth (flow.backend=dis, depth.backend=sfm) because no model weights travel.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
WHEELS=.whl
DATA=.gpu_data
GSPLAT_VERSION=1.5.3
# Packages the device image lacks (pinned to what this project is tested with), their own needs included.
PACKAGES=("gsplat==$GSPLAT_VERSION" "jaxtyping" "luigi==3.8.1" "python-daemon" "lockfile" "tenacity" "tornado"
          "kornia==0.9.0" "kornia-rs" "pycolmap==4.2.1" "segment-anything==1.0")

prepare() {
    mkdir -p "$WHEELS" "$DATA"
    grep -qxF "/$WHEELS/" .git/info/exclude || echo "/$WHEELS/" >>.git/info/exclude
    grep -qxF "/$DATA/" .git/info/exclude || echo "/$DATA/" >>.git/info/exclude
    local platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
               manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$tag")
    done
    for package in "${PACKAGES[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$WHEELS" "$package" || { echo "could not download $package"; exit 1; }
    done
    # gsplat's source too: the fallback ahead-of-time build when its just-in-time build fails.
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$WHEELS" "gsplat==$GSPLAT_VERSION" \
        || echo "gsplat's sdist could not be downloaded: the device falls back to nothing if JIT fails"
    cp /work/shared/data/videos/teddy.mp4 "$DATA/teddy.mp4" || exit 1
    du -sh "$WHEELS" "$DATA"
    echo "carry [\"$WHEELS\", \"$DATA\"] (64 MiB at most with the working tree)"
}

DEADLINE=450  # seconds after the start of device mode by which every step has ended (one call: under 8 min)

step() {  # step NAME SECONDS COMMAND...: run with a time limit (cut to the DEADLINE), log to $OUT/steps.log
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS remaining=$((DEADLINE - SECONDS))
    if [ "$remaining" -lt 15 ]; then
        echo "=== $name: skipped, ${remaining}s left before the ${DEADLINE}s deadline"
        return 124
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "=== $name (limit ${limit}s)"
    local log="/tmp/gpu_check_$name.log"
    timeout "$limit" "$@" >"$log" 2>&1
    local status=$?
    { echo "=== $name"; cat "$log"; } >>"$OUT/steps.log"
    tail -n 25 "$log"
    echo "=== $name: exit $status after $((SECONDS - started))s"
    return $status
}

train_summary() {  # train_summary WORKSPACE: the train stage's figures (PSNR, time) as one JSON line
    python3 - "$1" <<'EOF'
import json, sys
from pathlib import Path
found = sorted(Path(sys.argv[1]).rglob("train/*.json"))
for path in found:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        continue
    if isinstance(data, dict):
        keys = {k: v for k, v in data.items() if any(w in k for w in ("psnr", "ssim", "seconds", "time", "iter"))}
        if keys:
            print(path.name, json.dumps(keys))
EOF
}

device() {
    : "${OUT:?OUT is set by the device tool: run this mode there}"
    SECONDS=0
    export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$ROOT"
    python3 -c "import torch, gsplat; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gsplat', gsplat.__version__)"

    # 1. gsplat's CUDA extension: just-in-time build (what `import gsplat` does), else from source.
    local status_py="from mono4d.models.rasterizer import gsplat_cuda_status; ok, why = gsplat_cuda_status(); print(why); raise SystemExit(0 if ok else 1)"
    if ! step gsplat_jit_build 210 python3 -c "$status_py"; then
        local sdist
        sdist=$(ls "$WHEELS"/gsplat-*.tar.gz 2>/dev/null | head -n 1)
        if [ -n "$sdist" ]; then
            step gsplat_source_build 180 python3 -m pip install --no-build-isolation --no-index --no-deps \
                --target /tmp/site --upgrade "$sdist"
            step gsplat_status 60 python3 -c "$status_py"
        fi
    fi

    # 2. Parity of the torch (and so numba) rasterizer with gsplat's kernels.
    step pytest_gpu 60 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider

    # 3. Rasterizer speeds: torch and gsplat on CUDA, numba on this machine's CPU.
    step rasterizer_speed 90 python3 benchmarks/rasterizer_speed.py --repeats 3 --backends numba \
        --json "$OUT/rasterizer_speed.json"

    # 4. teddy with --preset gpu: torch rasterizer, then gsplat on a copy of the same upstream stages.
    local common=(--preset gpu --set flow.backend=dis --set depth.backend=sfm --set train.iterations=1000
                  --set train.make_videos=false --until train)
    local started=$SECONDS
    step teddy_torch 150 python3 -m mono4d.pipeline.cli run "$DATA/teddy.mp4" --work /tmp/teddy_torch "${common[@]}" \
        --set train.backend=torch
    echo "teddy torch: $((SECONDS - started))s" | tee -a "$OUT/teddy.txt"
    train_summary /tmp/teddy_torch | tee -a "$OUT/teddy.txt"
    cp -r /tmp/teddy_torch /tmp/teddy_gsplat
    started=$SECONDS
    step teddy_gsplat 60 python3 -m mono4d.pipeline.cli run "$DATA/teddy.mp4" --work /tmp/teddy_gsplat "${common[@]}" \
        --set train.backend=gsplat
    echo "teddy gsplat (train only, upstream reused): $((SECONDS - started))s" | tee -a "$OUT/teddy.txt"
    train_summary /tmp/teddy_gsplat | tee -a "$OUT/teddy.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    device) device ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
esac
