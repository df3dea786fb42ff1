#!/usr/bin/env bash
# Prepares a Python that can run tritonbn and prints its path; idempotent, safe to re-run.
#
# - A machine whose python3 already has torch with CUDA and Triton (the lent GPU machines: no
#   network there) uses that python3 as it is.
# - Anywhere else a virtual environment .venv is created once. torch is pinned to 2.13.0: on
#   this project's CPU machines pip takes the CPU wheel that lies on disk, never a multi-GB
#   CUDA build. Elsewhere set TRITONBN_TORCH to the pip requirement you want (for example a
#   CPU wheel URL) before running.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if python3 -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    command -v python3
    exit 0
fi

py="$root/.venv/bin/python"
if [ ! -x "$py" ]; then
    python3 -m venv "$root/.venv" >&2
fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m pip install -q --disable-pip-version-check "${TRITONBN_TORCH:-torch==2.13.0}" >&2
fi
if ! "$py" -c "import triton, numpy, pytest, hypothesis, matplotlib, tqdm" >/dev/null 2>&1; then
    "$py" -m pip install -q --disable-pip-version-check -r "$root/scripts/requirements-cpu.txt" >&2
fi
echo "$py"
