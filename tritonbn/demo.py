"""``tritonbn demo``: run batch_norm over a few shapes and layouts and check it.

On CUDA it runs the compiled kernels; on CPU it runs them under the Triton interpreter
(TRITON_INTERPRET=1 is set by this command before Triton is imported) unless
``--reference`` asks for the plain-torch path.  Prints one line per case: the path that ran,
launches, and the worst error against the float64 reference.
"""

from __future__ import annotations

import argparse
import os

CASES = [
    # (name, shape, axis, layout)
    ("NCHW axis=1", (8, 16, 14, 14), 1, "contiguous"),
    ("channels_last axis=1", (8, 16, 14, 14), 1, "channels_last"),
    ("(B,T,C) axis=-1", (4, 32, 64), -1, "contiguous"),
    ("NCDHW channels_last_3d", (2, 8, 4, 6, 6), 1, "channels_last_3d"),
    ("(N,C) MLP axis=1", (64, 48), 1, "contiguous"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--reference", action="store_true", help="on CPU, run the plain-torch path")


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.reference:
        os.environ["TRITON_INTERPRET"] = "1"
    import tritonbn
    from tritonbn import reference

    worst = 0.0
    print(f"{'case':28s} {'dtype':9s} {'path':9s} {'launches':>8s} {'max |err| y, dx':>18s}")
    for name, shape, axis, layout in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen).to(dtype)
            if layout != "contiguous":
                x = x.contiguous(memory_format=getattr(torch, layout))
            x = x.to(device).requires_grad_(True)
            channels = shape[axis]
            gamma = torch.rand(channels, generator=gen).add(0.5).to(device)
            beta = torch.randn(channels, generator=gen).to(device)
            mm, mv = torch.zeros(channels, device=device), torch.ones(channels, device=device)
            dy = torch.randn(shape, generator=gen).to(dtype).to(device)
            with tritonbn.trace.capture() as trace:
                y = tritonbn.batch_norm(x, gamma, beta, mm, mv, fix_gamma=False, axis=axis, training=True)
                y.backward(dy)
            y_ref, mean, invstd = reference.forward(
                x.detach().double(), gamma.double(), beta.double(), torch.zeros(channels, dtype=torch.float64,
                device=device), torch.ones(channels, dtype=torch.float64, device=device), axis=axis % len(shape),
                eps=1e-3, momentum=0.9, fix_gamma=False, batch_stats=True, update_moving=True)
            dx_ref, _, _ = reference.backward(dy.double(), x.detach().double(), gamma.double(), mean, invstd,
                                              axis=axis % len(shape), fix_gamma=False, batch_stats=True)
            err_y = (y.detach().double() - y_ref).abs().max().item()
            err_dx = (x.grad.double() - dx_ref).abs().max().item()
            worst = max(worst, err_y if dtype == torch.float32 else 0.0)
            print(f"{name:28s} {str(dtype)[6:]:9s} {trace.path:9s} {len(trace.launches):8d} "
                  f"{err_y:9.2e},{err_dx:8.2e}")
    ok = worst < 1e-4
    print("demo:", "all float32 results within 1e-4 of float64 math" if ok else f"float32 error {worst:.2e}")
    return 0 if ok else 1
