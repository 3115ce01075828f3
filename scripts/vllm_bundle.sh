#!/bin/bash
# vLLM 0.24.0 for a GPU machine without network access that already has Python 3.12 and
# torch 2.11.0 (vLLM 0.24 pins torch==2.11.0), transformers, triton, numpy, aiohttp and pillow.
#
#   bash scripts/vllm_bundle.sh build OUT_DIR            # where a package index is reachable
#   bash scripts/vllm_bundle.sh install OUT_DIR TARGET   # on the GPU machine; then PYTHONPATH=TARGET
#
# build writes OUT_DIR/vllm.part.NN (the wheel's files, tar + zstd, in parts of at most 48 MB so
# that each can travel on its own) and OUT_DIR/deps/ (the wheels vLLM imports on the engine path
# of an offline AsyncLLM, at the versions vLLM 0.24.0 pins). Left out of the parts: the
# FlashAttention-2 kernels (Hopper GPUs use FlashAttention-3) and DeepGEMM builds for other
# Pythons. install needs every part in OUT_DIR and unpacks with the `zstandard` wheel of deps/.
set -euo pipefail
cmd=${1:?build or install}; out=${2:?OUT_DIR}
version=0.24.0
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Pinned where vLLM 0.24.0 pins (its METADATA), except llguidance (1.7 is not published; 1.6.1 imports, and
# structured output is not used here), xgrammar (0.2.3: the newest that works with the pinned tvm-ffi) and openai
# (2.8.0: 3.x needs httpx2, which is not there).
deps=(msgspec pybase64 cachetools cbor2 llguidance==1.6.1 openai==2.8.0 openai-harmony pyzmq xgrammar==0.2.3
      apache-tvm-ffi==0.1.9 "fastapi>=0.133,<0.137" "starlette>=1.0.1" partial-json-parser pydantic==2.14.4
      pydantic-core==2.50.5 annotated-types typing-inspection distro jiter sniffio setproctitle blake3 gguf
      diskcache==5.6.3 lark==1.2.2 python-json-logger ijson compressed-tensors==0.17.0 depyf==0.20.0 astor dill
      watchfiles prometheus-fastapi-instrumentator outlines_core==0.2.14 lm-format-enforcer==0.11.3 interegular
      flashinfer-python==0.6.12 nvidia-cudnn-frontend zstandard)
if [[ $cmd == build ]]; then
  mkdir -p "$out/deps"; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps "${platform[@]}" -d "$tmp" "vllm==$version"
  mkdir "$tmp/site" && (cd "$tmp/site" && unzip -q "$tmp"/vllm-*.whl)
  rm -f "$tmp/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
  find "$tmp/site/vllm/third_party" -name '_C.cpython-3*' ! -name '*cpython-312*' -delete
  tar -C "$tmp/site" -cf - vllm "$(cd "$tmp/site" && ls -d vllm-*.dist-info)" \
    | zstd -q -19 -T0 | split -b 48M -d - "$out/vllm.part."
  python3 -m pip download -q --no-deps "${platform[@]}" -d "$out/deps" "${deps[@]}"
  rm -rf "$tmp"; ls -la "$out" "$out/deps"
elif [[ $cmd == install ]]; then
  target=${3:?TARGET}; mkdir -p "$target"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$out"/deps/*.whl
  cat "$out"/vllm.part.* | PYTHONPATH="$target" python3 -c \
    "import sys, zstandard; zstandard.ZstdDecompressor().copy_stream(sys.stdin.buffer, sys.stdout.buffer)" \
    | tar -x -C "$target"
  PYTHONPATH="$target" python3 -c "import vllm; print('vllm', vllm.__version__)"
else
  echo "usage: $0 build OUT_DIR | install OUT_DIR TARGET" >&2; exit 2
fi
