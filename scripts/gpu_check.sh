#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (prepared for the lent H200: offline, ~15 minutes of
# device time, 10 at most per command). Installs what its image lacks from .whl/, then runs the
# steps in order of value, each under its own time limit and a shared deadline, each writing its
# result as soon as it ends:
#
#   bash scripts/gpu_wheels.sh    # here, first: the wheels into .whl/ (carry .whl with the tree)
#   bash scripts/gpu_check.sh     # there: results in $OUT (default ./gpu_check_out)
#
# Planned minutes on one H200 (a plan, not a measurement; nothing here has run on a GPU yet):
#   install   0.5  (limit 1.5)  pip install --no-deps .whl/*.whl into the image's own Python
#   bench7b   5.75 (limit 6.7)  scripts/bench_7b.py: random bf16 7B folder + NF4 load ~1, SFT pair at 2048
#                               (ours vs TRL packing) 2 rounds ~2.5, DPO pair at 2048 (ours padding-free vs
#                               plain DPOTrainer) 2 rounds ~2.5; the SFT pair at 4096 only if its rounds
#                               still fit (they do not by default: GPU_CHECK_STEPS=bench7b BENCH_PAIRS=sft:4096)
#   then, all at once (the 7B numbers are taken by then; these measure correctness and memory):
#   fsdp      1    (limit 2.2)  FSDP-QLoRA SFT -> DPO, the generation eval refused (tests/test_gpu_fsdp_qlora.py)
#   sharded   1.5  (limit 2.2)  saves under FSDP and ZeRO-3 vs one process (tests/test_gpu_sharded_save.py)
#   resume    1.25 (limit 2.2)  SIGTERM, SIGKILL, resume on the GPU (test_faults.py::test_sft_killed_then_resumed...)
#   gputests  1.5  (limit 2.2)  tests/test_gpu.py (4-bit on CUDA, torch.compile, padding-free DPO, Liger)
#   mixtral   1.5  (limit 2.2)  scripts/measure_mixtral_memory.py: 8x7B NF4 weights vs `estimate`, one step's peak
#   total     ~8.5 (0.5 + 5.75 + 2); the shared deadline GPU_CHECK_TOTAL_S (default 550 s) cuts every
#             limit to what is left, so the command ends inside the device's 10 minutes per command.
#
# $OUT gets at most 4 files: gpu_check.json (each step's rc, seconds, limit, log tail; rewritten as each
# ends), gpu_check.log (every step's whole output, appended as each ends), bench_7b.json (rewritten
# after every contender round), mixtral_memory.json. Knobs: GPU_CHECK_STEPS (default all of the
# above), GPU_CHECK_TOTAL_S, BENCH_PAIRS, BENCH_ROUNDS (2), BENCH_SECONDS (30), BENCH_BUDGET_S (370).
# GPU_CHECK_DRY_RUN=1: the CPU path of every step, here: the tiny 2 x 128 shapes through the same
# scripts (pairs sft:256,dpo:256,sft:512, 10 s rounds), the GPU-only tests skipping themselves.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
mkdir -p "$OUT"
T0=$(date +%s)
STEPS=" ${GPU_CHECK_STEPS:-install bench7b fsdp sharded resume gputests mixtral} "
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
    BENCH_SHAPE=(--shape tiny --sft-rows 200 --dpo-pairs 80) MIXTRAL_SHAPE=(--shape tiny-mixtral --length 128)
    : "${BENCH_PAIRS:=sft:256,dpo:256,sft:512}" "${BENCH_SECONDS:=10}" "${BENCH_BUDGET_S:=1500}"
    SCALE=8  # a loaded 2-core CPU is that much slower than the limits planned for the GPU
else
    BENCH_SHAPE=() MIXTRAL_SHAPE=() SCALE=1
fi
TOTAL=${GPU_CHECK_TOTAL_S:-$((550 * SCALE))}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    WANDB_MODE=disabled TQDM_DISABLE=1 DS_ACCELERATOR=cuda
log() { echo "[gpu_check $(($(date +%s) - T0))s] $*" >&2; }
wants() { [[ "$STEPS" == *" $1 "* ]]; }
limit() { local want=$(($1 * SCALE)) left=$((TOTAL - ($(date +%s) - T0) - 5)); echo $(( want < left ? want : (left > 0 ? left : 1) )); }

# record STEP RC SECONDS LIMIT: the step's log appended to $OUT/gpu_check.log, gpu_check.json rewritten
# (under a lock: the last steps end side by side).
record() {
    exec 9>"$WORK/record.lock"
    command -v flock >/dev/null && flock 9
    { echo "===== $1: rc $2, $3 s (limit $4 s)"; cat "$WORK/$1.log" 2>/dev/null; } >>"$OUT/gpu_check.log"
    echo "{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3, \"limit_s\": $4}" >>"$WORK/steps.jsonl"
    "$PY" - "$WORK" "$OUT/gpu_check.json" <<'EOF'
import json, subprocess, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
for s in steps:
    s["timed_out"] = s["rc"] in (124, 137)
    log = work / f"{s['step']}.log"
    s["tail"] = log.read_text(errors="replace")[-2500:] if log.exists() else None
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = None  # no NVIDIA driver here (the CPU dry run)
versions = work / "versions.json"
out.write_text(json.dumps({"gpu": gpu, "versions": json.loads(versions.read_text()) if versions.exists() else None,
                           "steps": steps}, indent=1))
EOF
    exec 9>&-
}

# step NAME LIMIT CMD...: runs CMD under `timeout` with the limit cut to the deadline; log in $WORK/NAME.log.
step() {
    local name=$1 lim t rc
    lim=$(limit "$2")
    shift 2
    log "$name: start (limit ${lim} s)"
    t=$(date +%s)
    timeout -k 10 "$lim" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    record "$name" "$rc" $(($(date +%s) - t)) "$lim"
    log "$name: rc $rc after $(($(date +%s) - t)) s"
    tail -4 "$WORK/$name.log" >&2
}

command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || log "no nvidia-smi: the GPU steps will say so"

# 1. Packages: the wheels go into the image's own Python, so that every process the steps start
#    (accelerate launch, the recipes the tests start with their own PYTHONPATH) sees them; where that
#    environment is read-only, into a folder on PYTHONPATH instead (then the resume test cannot see them).
install() {
    set -o pipefail
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/: using the packages already installed (bash scripts/gpu_wheels.sh makes the wheels)"
    elif [ "$DRY" = 1 ]; then
        # The wheels are for the device's Python 3.12: here pip only checks that they would install there.
        local plat=() n
        for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
        "$PY" -m pip install --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${plat[@]}" --platform manylinux2014_x86_64 --target /tmp/gpu_check_dry_site .whl/*.whl | tail -3 || return 1
    elif ! "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade -q .whl/*.whl; then
        echo "the image's Python is read-only: installing into /tmp/gpu_check_site"
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir -q --target /tmp/gpu_check_site .whl/*.whl \
            || return 1
        echo "/tmp/gpu_check_site" >"$WORK/site"
    fi
    [ -f "$WORK/site" ] && export PYTHONPATH="$(cat "$WORK/site"):$PYTHONPATH"
    "$PY" - "$WORK/versions.json" "$DRY" <<'EOF'
import importlib.metadata as md, json, sys
names = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "mistral-common", "hydra-core",
         "omegaconf", "pydantic", "deepspeed", "liger-kernel", "flash-attn", "pyarrow", "huggingface-hub", "tokenizers", "pytest")
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
json.dump(versions, open(sys.argv[1], "w"))
print(versions)
import torch, bitsandbytes, trl, peft, datasets, hydra, mistral_common, mistral_align  # noqa: E401,F401
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
else:
    assert sys.argv[2] == "1", "torch sees no CUDA GPU"
EOF
}
if wants install; then
    step install 90 bash -c "$(declare -f install); WORK=$WORK PY=$PY DRY=$DRY install"
    [ -f "$WORK/site" ] && export PYTHONPATH="$(cat "$WORK/site"):$PYTHONPATH"
fi

# 2. The 7B-shaped pairs: alone on the GPU, nothing else running.
if wants bench7b; then
    budget=$(limit "$(( ${BENCH_BUDGET_S:-370} / SCALE ))")
    step bench7b 400 "$PY" scripts/bench_7b.py "${BENCH_SHAPE[@]}" --pairs "${BENCH_PAIRS:-sft:2048,dpo:2048,sft:4096}" \
        --rounds "${BENCH_ROUNDS:-2}" --seconds "${BENCH_SECONDS:-30}" --budget-s "$budget" --json "$OUT/bench_7b.json"
fi

# 3. Correctness and memory, all at once: each its own process, limit and log.
pids=()
wants fsdp && { step fsdp 130 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu_fsdp_qlora.py & pids+=($!); }
wants sharded && { step sharded 130 "$PY" -m pytest -q -p no:cacheprovider -rs -s tests/test_gpu_sharded_save.py & pids+=($!); }
wants resume && { step resume 130 "$PY" -m pytest -q -p no:cacheprovider -rs -s \
    "tests/test_faults.py::test_sft_killed_then_resumed_equals_uninterrupted_and_sigterm_stops_cleanly" & pids+=($!); }
wants gputests && { step gputests 130 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_gpu.py & pids+=($!); }
wants mixtral && { step mixtral 130 "$PY" scripts/measure_mixtral_memory.py "${MIXTRAL_SHAPE[@]}" --json "$OUT/mixtral_memory.json" & pids+=($!); }
for p in "${pids[@]}"; do wait "$p"; done

log "done in $(($(date +%s) - T0)) s; results in $OUT"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for s in json.loads((out / "gpu_check.json").read_text())["steps"]:
    print(f"{s['step']:<9} rc {s['rc']:>3} {s['seconds']:>4} s (limit {s['limit_s']} s){'  TIMED OUT' if s['timed_out'] else ''}")
EOF
