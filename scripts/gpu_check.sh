#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: install what is missing into .venv (keeping the image's
# CUDA torch), run the gpu-marked tests and both benchmarks on a bigger tiny model, write one JSON report.
#
#   scripts/gpu_check.sh [REPORT.json]        (default: gpu_check_report.json; also $OUT/ if set)
#
# Offline machines: put wheels in .whl/ at the repo root (e.g. `pip download -d .whl trl==1.16.*
# bitsandbytes==0.50.* "mistral-common[sentencepiece]==1.13.*" tiktoken hydra-core omegaconf datasets
# pytest liger-kernel` on a machine with the same Python/platform; flash-attn as a prebuilt wheel):
# they are installed with --no-index --find-links .whl; anything not found there comes from the
# registry where it is reachable. Environment knobs: GPU_CHECK_SKIP_BENCH=1, BENCH_ROUNDS (default 3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
REPORT=${1:-gpu_check_report.json}
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
log() { echo "[gpu_check] $*" >&2; }

command -v nvidia-smi >/dev/null || { log "no nvidia-smi: this needs a CUDA GPU"; exit 2; }
PY=${PYTHON:-python3}

# 1. A venv that sees the image's packages (CUDA torch, transformers, accelerate, peft).
if [ ! -x .venv/bin/python ]; then
    $PY -m venv --system-site-packages .venv || { log "cannot create .venv"; exit 2; }
fi
VPY=$ROOT/.venv/bin/python
$VPY -c "import torch, sys; assert torch.cuda.is_available(), 'torch has no CUDA'; print(torch.__version__)" \
    || { log "the .venv's torch cannot see the GPU"; exit 2; }

# Never replace what the image brings: pin it as constraints.
$VPY -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|triton|nvidia-[a-z0-9-]+)==' > "$WORK/constraints.txt"
PIP_SRC=()
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then PIP_SRC=(--no-index --find-links "$ROOT/.whl"); fi

pip_install() {  # try the wheel folder first, then the registry; never fatal (the report says what is missing)
    local spec=("$@")
    if [ ${#PIP_SRC[@]} -gt 0 ] && $VPY -m pip install -q "${PIP_SRC[@]}" -c "$WORK/constraints.txt" "${spec[@]}" 2>>"$WORK/pip.log"; then return 0; fi
    $VPY -m pip install -q -c "$WORK/constraints.txt" "${spec[@]}" 2>>"$WORK/pip.log" && return 0
    # A dependency pin clashing with the image (e.g. transformers): install the package alone.
    if [ ${#PIP_SRC[@]} -gt 0 ] && $VPY -m pip install -q --no-deps "${PIP_SRC[@]}" "${spec[@]}" 2>>"$WORK/pip.log"; then return 0; fi
    $VPY -m pip install -q --no-deps "${spec[@]}" 2>>"$WORK/pip.log"
}

# Our package without its pins (they name CPU versions of torch/transformers), then what the image lacks.
$VPY -m pip install -q --no-deps -e . 2>>"$WORK/pip.log" || log "editable install failed (see $WORK/pip.log)"
for spec in "mistral-common[sentencepiece]>=1.13.1,<1.14" "sentencepiece>=0.2,<0.3" "tiktoken>=0.14,<0.15" \
            "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "datasets>=5.2,<5.3" "safetensors>=0.8" \
            "bitsandbytes>=0.50,<0.51" "trl>=1.16,<1.17" "pytest>=9,<10" "hypothesis>=6.170,<7" \
            "tqdm" "pyarrow>=20" "matplotlib" "liger-kernel" "flash-attn"; do
    $VPY -c "import importlib.metadata as m, re, sys; m.version(re.split(r'[\[<>=]', sys.argv[1])[0])" "$spec" 2>/dev/null \
        && continue
    pip_install "$spec" || log "could not install $spec"
done

# 2. The gpu-marked tests (and the CPU padding-free equality test, which also runs here).
$VPY -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_sharded_save.py --junitxml="$WORK/gpu_tests.xml" -rs >"$WORK/gpu_tests.txt" 2>&1
GPU_RC=$?
$VPY -m pytest -q tests/test_dpo_padding_free.py --junitxml="$WORK/pf_tests.xml" >"$WORK/pf_tests.txt" 2>&1
PF_RC=$?

# 3. Both benchmarks on a bigger tiny model (8 layers x 1024, NF4 + LoRA), sdpa and, if installed, FA2.
ROUNDS=${BENCH_ROUNDS:-3}
if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
    BIG=(--layers 8 --hidden 1024 --quant nf4 --rounds "$ROUNDS")
    $VPY scripts/bench_sft.py "${BIG[@]}" --rows 1024 --max-length 2048 --packed-batch 4 --json "$WORK/bench_sft.json" >"$WORK/bench_sft.txt" 2>&1
    $VPY scripts/bench_dpo.py "${BIG[@]}" --pairs 512 --batch 8 --json "$WORK/bench_dpo.json" >"$WORK/bench_dpo.txt" 2>&1
    if $VPY -c "import flash_attn" 2>/dev/null; then
        BENCH_ATTN=flash_attention_2 $VPY scripts/bench_dpo.py "${BIG[@]}" --pairs 512 --batch 8 \
            --contenders trl,ours-padded,ours-pf --json "$WORK/bench_dpo_fa2.json" >"$WORK/bench_dpo_fa2.txt" 2>&1
    fi
fi

# 4. One JSON report.
$VPY - "$WORK" "$REPORT" "$GPU_RC" "$PF_RC" <<'EOF'
import importlib.metadata as md, json, subprocess, sys
from pathlib import Path
work, report, gpu_rc, pf_rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def read(name, n=6000):
    p = work / name
    return p.read_text()[-n:] if p.exists() else None
def load(name):
    p = work / name
    return json.loads(p.read_text())["summary"] if p.exists() else None
versions = {}
for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "mistral-common", "datasets",
            "flash-attn", "liger-kernel", "mistral-align"):
    try:
        versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        versions[pkg] = None
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
out = {
    "gpu": gpu, "versions": versions,
    "gpu_tests": {"rc": gpu_rc, "tail": read("gpu_tests.txt", 4000)},
    "padding_free_tests": {"rc": pf_rc, "tail": read("pf_tests.txt", 2000)},
    "bench_sft": load("bench_sft.json"), "bench_dpo": load("bench_dpo.json"), "bench_dpo_fa2": load("bench_dpo_fa2.json"),
    "bench_text": {k: read(f"{k}.txt", 3000) for k in ("bench_sft", "bench_dpo", "bench_dpo_fa2")},
    "pip_log_tail": read("pip.log", 3000),
}
report.write_text(json.dumps(out, indent=1))
print(json.dumps({k: out[k] for k in ("gpu", "versions")}, indent=1))
print("gpu tests rc", gpu_rc, "| padding-free tests rc", pf_rc, "| report:", report)
EOF
[ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/" 2>/dev/null
cp -r "$WORK" "${REPORT%.json}_files" 2>/dev/null
exit $(( GPU_RC != 0 && GPU_RC != 5 ))
