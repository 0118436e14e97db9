#!/usr/bin/env bash
# The GPU checks and measurements (#5, #7, #26), prepared here and run within one
# lease of a GPU machine (15 minutes, start-up included).
#
#   scripts/gpu_check.sh prepare                        # here: wheels for the GPU machine
#   scripts/gpu_check.sh run [OPTIONS] [STEP...]        # there, in the repository root
#
# OPTIONS
#   --deadline S   seconds for the whole run, summary included (default 480); each step
#                  gets what is left, at most its own limit, and a step that no longer
#                  fits is skipped and listed as such
#   --device D     cuda (default) or cpu: `run --device cpu --small` checks the deadline
#                  logic and every step's command on a machine without a GPU
#   --small        small sizes (resnet18 at 64 px, few slices): a rehearsal, not a figure
#
# STEPs, in this priority order by default (a short deadline keeps the first ones):
#   infer    benchmarks/inference.py: worker path vs raw model, bf16 channels-last,
#            eager and compiled (ResNeXt-101 32x8d at 512, 128 slices)
#   e2e      benchmarks/end_to_end.py: last instance acknowledged to the SR at the PACS,
#            40 slices, every slice explained (pynetdicom as the PACS: no DCMTK there)
#   tests    pytest -m gpu (device preprocessing and rendering equal to the CPU's,
#            compiled bf16, the worker on the GPU, predict)
#   explain  benchmarks/explain.py: heatmap cost per explained slice, rendering included
#   train    ResNeXt-101 32x8d at 512, bf16 + channels-last, batch 32, on phantoms
#   twostage the RSNA winners' recipe, short (#17): 2.5D CNN then the sequence stage,
#            evaluated side by side (REPORT)
#   worker   benchmarks/worker.py: studies one at a time vs the pipeline
#   env      nvidia-smi, the torch build (run first, in a few seconds, when named)
# Every benchmark prints each row the moment it is measured and stops at its --budget,
# so a step cut short still leaves its rows in the log. The run ends with a summary
# table: step, result (ok, failed, cut at its limit, skipped), seconds, headline figure.
# Output: $OUT (the device tool's folder) or ./gpu-results: gpu_check.log, one JSON per
# benchmark, the training runs' metrics.jsonl.
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
SUMMARY=()

# step NAME SECONDS COMMAND...: run under a time limit, log everything, never abort the rest.
step() {
    local name=$1 limit=$2 started rc result
    shift 2
    started=$(date +%s)
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    # Live: every row a benchmark prints shows at once (and stays in the log if cut).
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep --line-buffered -v '\[debug'
    rc=${PIPESTATUS[0]}
    case $rc in
    0) result=ok ;;
    124 | 137) result="cut at ${limit} s" ;;
    *) result="failed ($rc)" ;;
    esac
    echo "=== $name: $result after $(($(date +%s) - started)) s" | tee -a "$LOG"
    LAST_RESULT=$result
    LAST_SECONDS=$(($(date +%s) - started))
}

# budgeted NAME MIN MAX COMMAND...: a step under the run's deadline: skipped when fewer
# than MIN seconds are left, else limited to MAX or what is left. BUDGET in the command
# line is replaced by the benchmark's own budget (its limit less 15 s to write its JSON).
budgeted() {
    local name=$1 min=$2 max=$3 left limit args=() a
    shift 3
    left=$((DEADLINE_AT - $(date +%s) - 15))
    if [ "$left" -lt "$min" ]; then
        echo "=== $name: skipped (${left} s left, needs ${min})" | tee -a "$LOG"
        SUMMARY+=("$name|skipped (deadline)|0|")
        return
    fi
    limit=$((left < max ? left : max))
    for a in "$@"; do args+=("${a//BUDGET/$((limit > 30 ? limit - 15 : limit))}"); done
    step "$name" "$limit" "${args[@]}"
    SUMMARY+=("$name|$LAST_RESULT|$LAST_SECONDS|$(figure "$name")")
}

# figure NAME: the step's headline, read from its JSON (empty when there is none).
figure() {
    python3 - "$1" "$OUT" <<'PY' 2>/dev/null
import json, sys
from pathlib import Path
name, out = sys.argv[1], Path(sys.argv[2])
def rows(f):
    return json.loads((out / f).read_text()).get("rows", [])
try:
    if name == "infer":
        got = [f"{r['path'].split(' (')[0].replace('worker path, ', '')}"
               f" {r['slices/s']:.0f}/s" + (f" ({r['vs raw']:.2f} of raw)" if r.get("vs raw") else "")
               for r in rows("inference.json") if "raw" in r["path"] or "worker" in r["path"]]
        print("; ".join(got))
    elif name == "e2e":
        print("; ".join(f"{r['completion']} {r['seconds']:.2f} s (results {r['results s']} s)"
                        for r in rows("end_to_end.json")))
    elif name == "explain":
        print("; ".join(f"{r['path'].split(' (')[0]} {1000 * r['s/slice']:.2f} ms/slice"
                        for r in rows("explain.json")[-3:]))
    elif name == "worker":
        print("; ".join(f"{r['mode']} {r['slices/s']} slices/s" for r in rows("worker.json")))
    elif name in ("train", "twostage"):
        f = Path("/tmp/gpu-train" if name == "train" else "/tmp/gpu-2s-cnn") / "metrics.jsonl"
        last = json.loads(f.read_text().splitlines()[-1])
        print(f"epoch {last.get('epoch')}, {last.get('train_slices_per_s', 0):.0f} slices/s")
    elif name == "tests":
        text = (out / "gpu_check.log").read_text().splitlines()
        print(next(l for l in reversed(text) if " passed" in l or " skipped" in l or " failed" in l))
except Exception:
    pass
PY
}

run() {
    local deadline=480 device=cuda small=0 steps=()
    while [ $# -gt 0 ]; do
        case $1 in
        --deadline) deadline=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --small) small=1; shift ;;
        *) steps+=("$1"); shift ;;
        esac
    done
    [ ${#steps[@]} -gt 0 ] || steps=(infer e2e tests explain train twostage)
    DEADLINE_AT=$(($(date +%s) + deadline))
    mkdir -p "$OUT"
    : >"$LOG"
    export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "wheel install failed" | tee -a "$LOG"; return 1; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    local py=${PYTHON:-python3}  # PYTHON=.venv/bin/python for a rehearsal here
    # Sizes: the issue's on a GPU; --small rehearses every command in seconds.
    local arch=resnext101_32x8d size=512 slices=128 e2e_slices=40 matrix=512 train_size=512
    local studies=24 epochs=16 ctx_studies=24 ctx_epochs=6 ctx_size=256 batch=32 workers=8
    if [ "$small" = 1 ]; then
        arch=resnet18 size=64 slices=16 e2e_slices=12 matrix=128 train_size=64
        studies=4 epochs=2 ctx_studies=4 ctx_epochs=1 ctx_size=64 batch=8 workers=1
    fi
    local amp=--amp compile=--compile
    [ "$device" = cpu ] && amp=--no-amp && compile=
    local s
    for s in "${steps[@]}"; do
        case $s in
        env)
            [ "$device" = cuda ] && step nvidia_smi 30 nvidia-smi
            step env 60 "$py" -c "import torch, torchvision, pydicom, pynetdicom, highdicom, \
pytorch_grad_cam, pydantic, structlog; print(torch.__version__, torchvision.__version__, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))" ;;
        infer)
            budgeted infer 40 150 "$py" benchmarks/inference.py --device "$device" \
                --arch "$arch" --size "$size" --slices "$slices" --matrix "$matrix" \
                --batch-size "$batch" --precisions bf16 --memory cl $compile --budget BUDGET \
                --json "$OUT/inference.json" ;;
        e2e)
            budgeted e2e 40 120 "$py" benchmarks/end_to_end.py --device "$device" \
                --batch-size "$batch" --models "$arch:$size" --slices "$e2e_slices" \
                --matrix "$matrix" --stable-seconds 2 --peers pynetdicom --budget BUDGET \
                --json "$OUT/end_to_end.json" ;;
        tests)
            budgeted tests 30 150 "$py" -m pytest -q -m gpu -p no:cacheprovider \
                tests/test_gpu.py tests/test_tensors.py tests/test_heatmaps.py \
                tests/test_predict.py ;;
        explain)
            budgeted explain 30 90 "$py" benchmarks/explain.py --device "$device" \
                --arch "$arch" --size "$size" --precision bf16 --budget BUDGET \
                --json "$OUT/explain.json" ;;
        worker)
            budgeted worker 40 120 "$py" benchmarks/worker.py --device "$device" \
                --arch "$arch" --size "$size" --batch-size "$batch" --studies 4 \
                --slices "$e2e_slices" --budget BUDGET --json "$OUT/worker.json" ;;
        train)
            budgeted train_data 20 60 "$py" -m training phantom --out /tmp/gpu-phantoms \
                --studies "$studies" --matrix "$matrix" --slices 28 28
            budgeted train 60 200 "$py" -m training fit --images /tmp/gpu-phantoms/images \
                --labels /tmp/gpu-phantoms/stage_2_train.csv --out /tmp/gpu-train \
                --arch "$arch" --image-size "$train_size" --batch-size "$batch" \
                --epochs "$epochs" --eval-every 8 --workers "$workers" --device "$device" \
                $amp --channels-last --no-progress
            cp /tmp/gpu-train/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null ;;
        twostage)
            budgeted twostage_data 20 90 "$py" -c "from training.phantom import write_dataset; \
write_dataset('/tmp/gpu-ctx', $ctx_studies, seed=21, n_slices=28, matrix=$((matrix / 2)), context=True); \
write_dataset('/tmp/gpu-ctx-test', 8, seed=22, n_slices=28, matrix=$((matrix / 2)), context=True)"
            budgeted twostage 60 200 "$py" -m training fit --images /tmp/gpu-ctx/images \
                --labels /tmp/gpu-ctx/stage_2_train.csv --out /tmp/gpu-2s-cnn \
                --arch "$arch" --image-size "$ctx_size" --context 1 --batch-size "$batch" \
                --epochs "$ctx_epochs" --val-fraction 0.25 --workers "$workers" \
                --device "$device" $amp --channels-last --no-progress
            cp /tmp/gpu-2s-cnn/metrics.jsonl "$OUT/twostage_cnn_metrics.jsonl" 2>/dev/null
            budgeted twostage_seq 30 120 "$py" -m training fit-sequence --run /tmp/gpu-2s-cnn \
                --out /tmp/gpu-2s --epochs 30 --embed-passes 3 --device "$device" \
                --workers "$workers"
            budgeted twostage_eval 20 90 "$py" -m training evaluate \
                --bundle /tmp/gpu-2s/model.safetensors --images /tmp/gpu-ctx-test/images \
                --labels /tmp/gpu-ctx-test/stage_2_train.csv --out "$OUT/twostage_report.json" \
                --device "$device"
            cp /tmp/gpu-2s/metrics.jsonl "$OUT/twostage_seq_metrics.jsonl" 2>/dev/null ;;
        alerts)
            budgeted alerts 40 150 "$py" benchmarks/alerts.py --device "$device" \
                --peers pynetdicom --budget BUDGET --json "$OUT/alerts.json" ;;
        *) echo "unknown step: $s" >&2; return 2 ;;
        esac
    done
    {
        echo
        echo "## gpu_check summary: device $device$([ "$small" = 1 ] && echo ", small sizes"), deadline ${deadline} s, used $((deadline - DEADLINE_AT + $(date +%s))) s"
        echo
        echo "| step | result | seconds | figure |"
        echo "|---|---|---|---|"
        local line
        for line in "${SUMMARY[@]}"; do
            IFS='|' read -r n r t f <<<"$line"
            echo "| $n | $r | $t | $f |"
        done
    } | tee -a "$LOG"
}

case ${1:-} in
prepare) prepare ;;
run) shift; run "$@" ;;
*) sed -n '2,44p' "$0"; exit 2 ;;
esac
