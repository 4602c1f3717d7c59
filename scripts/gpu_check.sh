#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: install what is missing (keeping the image's CUDA
# torch), run the gpu-marked tests and both benchmarks on a bigger tiny model, write one JSON report.
#
#   scripts/gpu_check.sh [REPORT.json]        (default: gpu_check_report.json; also $OUT/ if set)
#
# Offline machines: put wheels in .whl/ at the repo root, downloaded for the GPU machine's Python
# (e.g. `pip download -d .whl --no-deps --python-version 3.12 --platform manylinux2014_x86_64
# trl==1.16.0 peft==0.21.2 transformers==5.23.0 "mistral-common==1.13.1" hydra-core omegaconf datasets ...`,
# plus liger-kernel, hjson and deepspeed's source archive, which installs as pure Python: its CUDA ops
# build on first use), and bitsandbytes unpacked into .whl/bnb_site/); they are unpacked as they are, next to the image's
# CUDA torch. Without .whl/ the registry is used. Environment knobs: GPU_CHECK_STEPS (default
# "tests sft dpo"), BENCH_ROUNDS (default 3), BENCH_SFT_ROWS (512), BENCH_DPO_PAIRS (128).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
REPORT=${1:-gpu_check_report.json}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXX)}  # every log and result lands here as it is made
mkdir -p "$WORK"
log() { echo "[gpu_check] $*" >&2; }

command -v nvidia-smi >/dev/null || { log "no nvidia-smi: this needs a CUDA GPU"; exit 2; }
PY=${PYTHON:-python3}

# 1. Python packages. Two routes:
#  - .whl/ present (offline machines): every wheel there is unpacked into $SITE without dependency
#    resolution, beside the image's own CUDA torch; .whl/bnb_site/ may hold an unpacked bitsandbytes.
#  - otherwise: a venv that sees the image's packages, topped up from the registry with the image's
#    torch/transformers/accelerate pinned as constraints (never replaced by CPU builds).
# Either way our package is used from src/ (an editable install needs a build backend offline).
export PYTHONPATH="$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    VPY=$PY
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    if [ ! -f "$SITE/.done" ]; then
        $VPY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
            --target "$SITE" .whl/*.whl $(ls .whl/*.tar.gz 2>/dev/null) 2>>"$WORK/pip.log" \
            && touch "$SITE/.done" || log "installing .whl/ failed (see $WORK/pip.log)"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    [ -d .whl/bnb_site ] && export PYTHONPATH="$ROOT/.whl/bnb_site:$PYTHONPATH"
else
    if [ ! -x .venv/bin/python ]; then
        $PY -m venv --system-site-packages .venv || { log "cannot create .venv"; exit 2; }
    fi
    VPY=$ROOT/.venv/bin/python
    $VPY -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|triton|nvidia-[a-z0-9-]+)==' > "$WORK/constraints.txt"
    for spec in "mistral-common[sentencepiece]>=1.13.1,<1.14" "sentencepiece>=0.2,<0.3" "tiktoken>=0.14,<0.15" \
                "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "datasets>=5.2,<5.3" "safetensors>=0.8" \
                "bitsandbytes>=0.50,<0.51" "trl>=1.16,<1.17" "peft>=0.21,<0.22" "pytest>=9,<10" \
                "hypothesis>=6.170,<7" "tqdm" "pyarrow>=20" "matplotlib" "liger-kernel" "flash-attn"; do
        $VPY -c "import importlib.metadata as m, re, sys; m.version(re.split(r'[\[<>=]', sys.argv[1])[0])" "$spec" 2>/dev/null \
            && continue
        # A pin clashing with the image (e.g. transformers): install the package alone.
        $VPY -m pip install -q -c "$WORK/constraints.txt" "$spec" 2>>"$WORK/pip.log" \
            || $VPY -m pip install -q --no-deps "$spec" 2>>"$WORK/pip.log" || log "could not install $spec"
    done
fi
$VPY -c "import torch, sys; assert torch.cuda.is_available(), 'torch has no CUDA'" \
    || { log "this Python's torch cannot see the GPU"; exit 2; }
$VPY -c "import mistral_align, trl, peft, bitsandbytes, mistral_common, hydra" 2>>"$WORK/pip.log" \
    || { log "packages missing after install (see $WORK/pip.log)"; tail -5 "$WORK/pip.log" >&2; exit 2; }
STEPS=${GPU_CHECK_STEPS:-tests sft dpo}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

# 2. The gpu-marked tests (and the CPU padding-free equality test, which also runs here).
GPU_RC=5; PF_RC=5  # pytest's "no tests ran", when the step is not asked for
if has_step tests; then
    $VPY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_sharded_save.py -rs >"$WORK/gpu_tests.txt" 2>&1
    GPU_RC=$?
    $VPY -m pytest -q -p no:cacheprovider tests/test_dpo_padding_free.py >"$WORK/pf_tests.txt" 2>&1
    PF_RC=$?
    log "gpu tests rc $GPU_RC, padding-free tests rc $PF_RC"; tail -3 "$WORK/gpu_tests.txt" >&2
fi

# 3. Both benchmarks on a bigger tiny model (8 layers x 1024, NF4 + LoRA), sdpa and, if installed, FA2.
ROUNDS=${BENCH_ROUNDS:-3}
BIG=(--layers 8 --hidden 1024 --quant nf4 --rounds "$ROUNDS")
if has_step sft; then
    $VPY scripts/bench_sft.py "${BIG[@]}" --rows "${BENCH_SFT_ROWS:-512}" --max-length 2048 --packed-batch 4 \
        --json "$WORK/bench_sft.json" >"$WORK/bench_sft.txt" 2>&1 || log "bench_sft failed"
    tail -25 "$WORK/bench_sft.txt" >&2
fi
if has_step dpo; then
    $VPY scripts/bench_dpo.py "${BIG[@]}" --pairs "${BENCH_DPO_PAIRS:-128}" --batch 8 \
        --json "$WORK/bench_dpo.json" >"$WORK/bench_dpo.txt" 2>&1 || log "bench_dpo failed"
    tail -25 "$WORK/bench_dpo.txt" >&2
    if $VPY -c "import flash_attn" 2>/dev/null; then
        BENCH_ATTN=flash_attention_2 $VPY scripts/bench_dpo.py "${BIG[@]}" --pairs "${BENCH_DPO_PAIRS:-128}" --batch 8 \
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
[ "$WORK" != "${REPORT%.json}_files" ] && cp -r "$WORK" "${REPORT%.json}_files" 2>/dev/null
exit $(( GPU_RC != 0 && GPU_RC != 5 ))
