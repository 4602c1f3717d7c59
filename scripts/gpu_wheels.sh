#!/usr/bin/env bash
# The wheels an offline GPU machine (Python 3.12, x86-64, its own CUDA torch) needs beyond its
# image, downloaded into .whl/ (gitignored) for scripts/gpu_check.sh to install there.
#
#   bash scripts/gpu_wheels.sh            # then carry .whl with the working tree (64 MiB in all)
#
# Exactly one version of each package (the ones this project's .venv runs; a second version of one
# stops the install there). Built here: antlr4-python3-runtime (a source archive only) and
# deepspeed (a source archive; built with DS_BUILD_OPS=0, pure Python, its CUDA ops compile on the
# GPU machine at first use). Trimmed here: bitsandbytes keeps only its CPU and CUDA 13.0 libraries
# (the device's torch is 2.11+cu130; the wheel carries 20 libraries, 129 MB unpacked).
# Not carried, already on the image (KINDS.md): torch, accelerate 1.15, safetensors, tokenizers,
# huggingface-hub, sentencepiece, tiktoken, pyarrow, pandas, numpy, jinja2, xxhash, fsspec,
# pytest, hypothesis, tensorboard, einops, msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py.
# Never: flash-attn (no wheel for torch 2.11 + CUDA 13 on PyPI; a source build takes hours).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}   # builds the two source archives; needs torch and setuptools
DEST=${WHL_DIR:-.whl}
CUDA_LIB=${BNB_CUDA:-130}

WHEELS=(
    transformers==5.23.0 trl==1.16.0 peft==0.21.2
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    mistral-common==1.13.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing-extensions==4.16.0 pydantic-extra-types==2.11.1 pycountry==26.2.16
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    hydra-core==1.3.8 omegaconf==2.3.1
    bitsandbytes==0.50.2 liger-kernel==0.8.5 hjson==3.1.0
)
SOURCES=(antlr4-python3-runtime==4.9.3 deepspeed==0.19.8)

rm -rf "$DEST" && mkdir -p "$DEST"
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary=:all: -d "$work/src" "${SOURCES[@]}"
for archive in "$work"/src/*; do
    DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$archive" \
        >"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; exit 1; }
done

# bitsandbytes: every library but the CPU one and CUDA $CUDA_LIB's out of the wheel, RECORD to match.
bnb=$(ls "$DEST"/bitsandbytes-*.whl)
"$PY" - "$bnb" "$CUDA_LIB" <<'EOF'
import re, sys, zipfile
from pathlib import Path
path, cuda = Path(sys.argv[1]), sys.argv[2]
keep = lambda n: not re.search(r"libbitsandbytes_[a-z]+\d*\.(so|dll|dylib)$", n) or n.endswith(
    ("libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so"))
tmp = path.with_suffix(".tmp")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not keep(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if keep(l.split(b",")[0].decode()))
        dst.writestr(info, data)
tmp.replace(path)
with zipfile.ZipFile(path) as z:
    libs = [n for n in z.namelist() if ".so" in n]
assert any(f"cuda{cuda}" in n for n in libs), f"no CUDA {cuda} library in {path.name}: {libs}"
print(f"bitsandbytes trimmed to {libs}")
EOF

# One version of each package, and the total that travels.
dupes=$(ls "$DEST" | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "error: two versions of: $dupes" >&2; exit 1; }
ls -l "$DEST" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total %.1f MiB in %s (the tree that travels may hold 64 MiB)\n", $1 / 1048576, "'"$DEST"'"}'
