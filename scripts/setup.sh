#!/usr/bin/env bash
# Prepares a Python that can run tritonbn and prints its path; idempotent, safe to re-run.
#
#   scripts/setup.sh [ENV]
#
# ENV is one row of the support matrix (scripts/matrix.txt); without it, "pinned":
#
# - A machine whose python3 already has torch with CUDA and Triton (the lent GPU machines: no
#   network there) uses that python3 as it is for "pinned".
# - Anywhere else a virtual environment is created once: .venv for "pinned", .venvs/ENV for the
#   other rows. torch 2.13.0 is the CPU wheel that lies on this project's CPU machines (never a
#   multi-GB CUDA build); torch 2.11.0 is PyPI's wheel (about 5 GB with its CUDA libraries; it
#   runs on a CPU). Elsewhere set TRITONBN_TORCH to the pip requirement you want (for example a
#   CPU wheel URL) before running; it replaces the pinned row's torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
env_name="${1:-pinned}"

row="$(awk -v name="$env_name" '$1 == name {print $2, $3}' "$root/scripts/matrix.txt")"
if [ -z "$row" ]; then
    echo "setup.sh: unknown environment '$env_name' (see scripts/matrix.txt)" >&2
    exit 2
fi
read -r torch_req triton_req <<<"$row"

if [ "$env_name" = pinned ]; then
    if python3 -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        command -v python3
        exit 0
    fi
    venv="$root/.venv"
    torch_req="${TRITONBN_TORCH:-$torch_req}"
else
    venv="$root/.venvs/$env_name"
fi

py="$venv/bin/python"
if [ ! -x "$py" ]; then
    python3 -m venv "$venv" >&2
fi
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@" >&2; }
# torch first: its own Triton requirement (torch 2.11 wants triton 3.6.0) is then overridden by
# the row's pin, never the other way round.
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    pip_install "$torch_req"
fi
if ! "$py" - "$triton_req" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import triton, numpy, pytest, hypothesis, matplotlib, tqdm  # noqa: F401
assert version("triton") == sys.argv[1].split("==")[1]
EOF
then
    pip_install "$triton_req" -r "$root/scripts/requirements-cpu.txt"
fi
echo "$py"
