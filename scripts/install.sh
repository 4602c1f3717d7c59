#!/usr/bin/env bash
# Creates .venv/ and installs mistral-align into it.
# torch is installed first and on its own: on a machine without an NVIDIA GPU we ask for the CPU
# build, because a plain `torch` requirement pulls a multi-GB CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  echo "torch $TORCH_VERSION already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
else
  echo "no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
  # The CPU build lives on PyTorch's own index; ask it only when it answers (pip's own configuration,
  # e.g. a local wheel directory, may also hold the CPU build).
  CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
  EXTRA=()
  if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$CPU_INDEX" 2>/dev/null; then
    EXTRA=(--extra-index-url "$CPU_INDEX")
  fi
  "${PIP[@]}" install -q "${EXTRA[@]}" "torch==$TORCH_VERSION+cpu" \
  || { echo "error: could not install the CPU build of torch $TORCH_VERSION. Point TORCH_CPU_INDEX at a" \
            "mirror of the PyTorch CPU wheel index, or install torch into .venv yourself first." >&2; exit 1; }
fi

"${PIP[@]}" install -q -e ".[dev]"
.venv/bin/python -c "import mistral_align, torch, transformers, trl, peft, mistral_common; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| mistral-common', mistral_common.__version__)"
