"""The ``tritonbn`` command: one subcommand per module, imported only when it runs.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; a new
subcommand is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("tritonbn.demo", "run the operator on a few shapes and layouts and check it against the reference"),
    "bench": ("tritonbn.perf.bench", "performance sweep: timed on CUDA, bytes counted under the interpreter on CPU"),
    "cpu-speed": ("tritonbn.perf.cpu_speed", "time the torch path on CPU against torch's F.batch_norm: a table of ratios"),
    "traffic": ("tritonbn.perf.traffic", "count the global-memory bytes and launches of each op (Triton interpreter)"),
    "tune": ("tritonbn.autotune.tune", "autotune launch configs per GPU model: measured on a GPU, modelled without one"),
    "gpu-check": ("tritonbn.perf.gpu_check", "the lent GPU machine's check: CUDA tests, a measured bench subset, a measured tune, time-boxed"),
    "capacities": ("tritonbn.perf.capacities", "probe the largest spill-free single-pass tile per class (no GPU needed)"),
    "overhead": ("tritonbn.perf.overhead", "host µs per call and per layer of the call, beside torch's (GPU wall clock, or CPU with a no-op CUDA launcher)"),
    "inspect": ("tritonbn.inspect", "compile every kernel variant for sm_80/sm_90 (no GPU needed): registers, spills, widest accesses"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand's arguments."""
    parser = argparse.ArgumentParser(prog="tritonbn", description="MXNet BatchNorm as Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
