#!/usr/bin/env bash
# The GPU checks and measurements of the training (#5) and performance (#7) issues,
# prepared here and run in one or two short calls on a GPU machine.
#
#   scripts/gpu_check.sh prepare              # here: wheels for the GPU machine into .whl/
#   scripts/gpu_check.sh run [STEP...]        # there, in the repository root
#
# STEPs, in this order by default (each under its own time limit, so that a slow
# step cannot eat the others' time): env train infer worker e2e tests explain.
# Within the device tool's 10-minute calls: `run env train infer`, then at once (the
# machine stays warm) `run worker e2e tests explain alerts`.
#   env      nvidia-smi, the torch build, the installed packages
#   train    ResNeXt-101 32x8d at 512x512, bf16 + channels-last, batch 32, on phantoms:
#            about 300 optimiser steps; training slices/s per epoch (docs/training.md)
#   infer    benchmarks/inference.py: worker path vs raw model, eager and compiled
#   worker   benchmarks/worker.py: 8 studies of 40 slices, one at a time vs the pipeline
#   e2e      benchmarks/end_to_end.py: last instance acknowledged to results at the PACS,
#            ResNeXt-101 at 512, 40 slices (pynetdicom as the PACS: no DCMTK there)
#   tests    pytest -m gpu (tests/test_gpu.py, tests/test_predict.py)
#   explain  benchmarks/explain.py: heatmap cost per explained slice
#   alerts   benchmarks/alerts.py: last instance acknowledged to the HL7 alert at the RIS
#   twostage the RSNA winners' recipe, short (#17): context phantoms (24 + 8 held out,
#            28 slices, 256 px), ResNeXt-101 32x8d with 2.5D context (--context 1) at
#            256 px for 6 epochs, then `fit-sequence` (embeddings extracted once, 3
#            augmented passes, bi-GRU 30 epochs), then `evaluate` of both stages side
#            by side on the held-out studies (REPORT.md: CNN vs CNN + sequence).
#            Not in the default list: `run twostage` (about 3-4 minutes).
# Output: $OUT (the device tool's folder) or ./gpu-results: gpu_check.log, one JSON per
# benchmark and the training run's metrics.jsonl (7 files; the device tool returns 8).
#
# The GPU machine has torch, torchvision, numpy, opencv, pillow, pyyaml, safetensors,
# tqdm, prometheus-client, pytest and hypothesis (its Python is 3.12); `prepare`
# fetches the rest, at the versions this checkout's venv tested, as cp312 wheels
# (grad-cam publishes no wheel: it is built here). `.whl/` is git-ignored locally
# (.git/info/exclude) and travels with the device tool's `carry: [".whl"]`.
set -uo pipefail
cd "$(dirname "$0")/.."

NEEDED="pydicom pynetdicom highdicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg
pylibjpeg-rle pyjpegls pydantic pydantic-core annotated-types typing-inspection structlog
ttach hl7"

prepare() {
    local venv_pip=.venv/bin/pip pins=() name version
    [ -x "$venv_pip" ] || { echo "no .venv: run 'make venv' first" >&2; return 2; }
    for name in $NEEDED grad-cam; do
        version=$("$venv_pip" show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
        [ -n "$version" ] || { echo "$name is not installed in .venv" >&2; return 2; }
        [ "$name" = grad-cam ] && gradcam="grad-cam==$version" || pins+=("$name==$version")
    done
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${pins[@]}" || return 1
    python3 -m pip wheel --quiet --no-deps -w .whl "$gradcam" || return 1
    ls .whl && du -sh .whl
}

OUT=${OUT:-$PWD/gpu-results}
LOG=$OUT/gpu_check.log

# step NAME SECONDS COMMAND...: run under a time limit, log everything, never abort the rest.
step() {
    local name=$1 limit=$2 started rc
    shift 2
    started=$(date +%s)
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - started)) s" | tee -a "$LOG"
    tail -n 12 "$LOG" | grep -v '^===' || true
}

run() {
    local steps=("$@")
    [ ${#steps[@]} -gt 0 ] || steps=(env train infer worker e2e tests explain)
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "wheel install failed" | tee -a "$LOG"; return 1; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    local s
    for s in "${steps[@]}"; do
        case $s in
        env)
            step nvidia_smi 30 nvidia-smi
            step env 60 python3 -c "import torch, torchvision, pydicom, pynetdicom, highdicom, \
pytorch_grad_cam, pydantic, structlog; print(torch.__version__, torchvision.__version__, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))" ;;
        train)
            step train_data 60 python3 -m training phantom --out /tmp/gpu-phantoms \
                --studies 24 --matrix 512 --slices 28 28
            step train 200 python3 -m training fit --images /tmp/gpu-phantoms/images \
                --labels /tmp/gpu-phantoms/stage_2_train.csv --out /tmp/gpu-train \
                --arch resnext101_32x8d --image-size 512 --batch-size 32 --epochs 16 \
                --eval-every 8 --workers 8 --device cuda --amp --channels-last --no-progress
            cp /tmp/gpu-train/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null ;;
        infer)
            step infer 200 python3 benchmarks/inference.py --device cuda --slices 256 \
                --batch-size 32 --compile --json "$OUT/inference_gpu.json" ;;
        worker)
            step worker 150 python3 benchmarks/worker.py --device cuda --batch-size 32 \
                --studies 8 --slices 40 --json "$OUT/worker_gpu.json" ;;
        e2e)
            step e2e 150 python3 benchmarks/end_to_end.py --device cuda --batch-size 32 \
                --models resnext101_32x8d:512 --peers pynetdicom --json "$OUT/end_to_end_gpu.json" ;;
        tests)
            step tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
                tests/test_predict.py ;;
        twostage)
            step twostage_data 90 python3 -c "from training.phantom import write_dataset; \
write_dataset('/tmp/gpu-ctx', 24, seed=21, n_slices=28, matrix=256, context=True); \
write_dataset('/tmp/gpu-ctx-test', 8, seed=22, n_slices=28, matrix=256, context=True)"
            step twostage_cnn 200 python3 -m training fit --images /tmp/gpu-ctx/images \
                --labels /tmp/gpu-ctx/stage_2_train.csv --out /tmp/gpu-2s-cnn \
                --arch resnext101_32x8d --image-size 256 --context 1 --batch-size 32 \
                --epochs 6 --val-fraction 0.25 --workers 8 --device cuda --amp \
                --channels-last --no-progress
            step twostage_seq 120 python3 -m training fit-sequence --run /tmp/gpu-2s-cnn \
                --out /tmp/gpu-2s --epochs 30 --embed-passes 3 --device cuda --workers 8
            step twostage_eval 90 python3 -m training evaluate --bundle /tmp/gpu-2s/model.safetensors \
                --images /tmp/gpu-ctx-test/images --labels /tmp/gpu-ctx-test/stage_2_train.csv \
                --out "$OUT/twostage_report.json" --device cuda
            cp /tmp/gpu-2s-cnn/metrics.jsonl "$OUT/twostage_cnn_metrics.jsonl" 2>/dev/null
            cp /tmp/gpu-2s/metrics.jsonl "$OUT/twostage_seq_metrics.jsonl" 2>/dev/null ;;
        explain)
            step explain 90 python3 benchmarks/explain.py --device cuda --precision bf16 \
                --json "$OUT/explain_gpu.json" ;;
        alerts)
            step alerts 150 python3 benchmarks/alerts.py --device cuda --peers pynetdicom \
                --json "$OUT/alerts_gpu.json" ;;
        *) echo "unknown step: $s" >&2; return 2 ;;
        esac
    done
}

case ${1:-} in
prepare) prepare ;;
run) shift; run "$@" ;;
*) sed -n '2,35p' "$0"; exit 2 ;;
esac
