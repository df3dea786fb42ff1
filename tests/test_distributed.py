"""tritonbn.nn.SyncBatchNorm over 2 gloo processes on CPU against one process on the whole batch.

The ranks hold 3 and 5 samples (unequal: averaging per-rank moments would be wrong).  Each rank
also runs torch's own BatchNorm2d on the concatenated batch and checks, over three training
steps (momentum 0.1, then a cumulative-average layer) and an eval step: its slice of the output
and of the input gradient, the all-reduced weight/bias gradients, and the running statistics.
The fused layers (SyncBatchNormReLU, SyncBatchNormAddReLU, from tritonbn.convert(sync=True) of
BatchNormReLU2d / BatchNormAddReLU2d) are checked likewise against relu(bn(x) [+ addend]), the
addend's gradient included.  A last step checks a group that holds one value per channel in all
(no error, running statistics unchanged).  The workers run through the interpreted Triton kernels or the reference (TRITON_INTERPRET is
set in the child before anything imports Triton).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tritonbn.autotune import KernelConfig
from tritonbn.distributed import chan_merge
from helpers import assert_close, split_path

SIZES = (3, 5)
TOL = dict(atol=2e-5, rtol=2e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layers(channels: int, momentum, fusion):
    """(tritonbn's layer converted with sync=True, the class it must be, torch's whole-batch chain
    as a function of (layer, x, addend)) for ``fusion``: None, "relu" or "add_relu"."""
    import tritonbn
    from tritonbn import nn as tnn

    local, synced = {None: (torch.nn.BatchNorm2d, tnn.SyncBatchNorm),
                     "relu": (tnn.BatchNormReLU2d, tnn.SyncBatchNormReLU),
                     "add_relu": (tnn.BatchNormAddReLU2d, tnn.SyncBatchNormAddReLU)}[fusion]
    ours = tritonbn.convert(torch.nn.Sequential(local(channels, momentum=momentum)), sync=True)[0]
    chains = {None: lambda bn, x, a: bn(x), "relu": lambda bn, x, a: torch.relu(bn(x)),
              "add_relu": lambda bn, x, a: torch.relu(bn(x) + a)}
    return ours, synced, chains[fusion]


def _check_rank(rank: int, momentum, memory_format, fusion=None) -> None:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(1)
    channels, total = 3, sum(SIZES)
    theirs = torch.nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        theirs.bias.copy_(torch.randn(channels, generator=gen))
        theirs.running_mean.copy_(torch.randn(channels, generator=gen))
    ours, synced, chain = _layers(channels, momentum, fusion)
    assert type(ours) is synced
    ours.load_state_dict(theirs.state_dict())
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    for step in range(4):
        training = step < 3
        ours.train(training), theirs.train(training)
        x = (torch.randn(total, channels, 4, 5, generator=gen) * 2 + 1).contiguous(memory_format=memory_format)
        addend = torch.randn(x.shape, generator=gen)
        upstream = torch.randn(x.shape, generator=gen)
        x_all, x_mine = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
        a_all, a_mine = addend.clone().requires_grad_(), addend[lo:hi].clone().requires_grad_()
        y_all = chain(theirs, x_all, a_all)
        y_mine = ours(x_mine, a_mine) if fusion == "add_relu" else ours(x_mine)
        (y_all * upstream).sum().backward()
        (y_mine * upstream[lo:hi]).sum().backward()
        torch.testing.assert_close(y_mine, y_all[lo:hi], **TOL)
        assert y_mine.stride() == x_mine.stride()
        torch.testing.assert_close(x_mine.grad, x_all.grad[lo:hi], **TOL)
        if fusion == "add_relu":
            torch.testing.assert_close(a_mine.grad, a_all.grad[lo:hi], **TOL)
        for name in ("weight", "bias"):  # local gradients; their sum is the whole batch's
            grad = getattr(ours, name).grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, getattr(theirs, name).grad, msg=name, **TOL)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, msg=key, **TOL)
        ours.zero_grad(), theirs.zero_grad()


def _check_group_of_one_value(rank: int) -> None:
    """One value per channel in the whole group (rank 0: one sample, the others none): no rank
    can tell without a host sync, so none raises; y = beta, and the running statistics stay as
    they were (an unbiased variance of one value is undefined)."""
    from tritonbn.distributed import sync_batch_norm

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1 if rank == 0 else 0, 3, generator=gen).requires_grad_()
    weight, bias = (torch.rand(3, generator=gen) + 0.5).requires_grad_(), torch.randn(3, generator=gen)
    running = (torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5)
    before = tuple(t.clone() for t in running)
    y = sync_batch_norm(x, *running, weight, bias.requires_grad_(), 0.1, 1e-5, None)
    y.sum().backward()
    torch.testing.assert_close(y, bias.detach().expand_as(y), **TOL)
    assert all(torch.equal(t, b) for t, b in zip(running, before)), (running, before)
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()


def _worker(rank: int, world: int, port: int, interpret: str, cases) -> None:
    os.environ["TRITON_INTERPRET"] = interpret  # before anything imports Triton
    import torch.distributed as dist

    from tritonbn import trace

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with trace.capture() as t:
            for case in cases:
                _check_rank(rank, *case)
            _check_group_of_one_value(rank)
        assert set(t.paths) == {"triton" if interpret == "1" else "reference"}, t.paths
        # Both ranks reach here before either tears gloo down: a rank that destroys the group
        # while its peer's last collective is still in flight aborts the peer (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without Python's finalisation: gloo's worker threads, torn down by C++ static
    # destructors at exit, sometimes abort the process ("terminate called without an active
    # exception") after every check has passed.  A failed check raised above instead.
    os._exit(0)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton", "reference"])
def test_sync_batch_norm_two_gloo_ranks_unequal_batches(interpret):
    import torch.multiprocessing as mp

    cases = [(0.1, torch.contiguous_format), (None, torch.channels_last), (0.1, torch.channels_last, "relu"),
             (None, torch.contiguous_format, "add_relu")]
    mp.spawn(_worker, args=(len(SIZES), _free_port(), interpret, cases), nprocs=len(SIZES), join=True)


def test_chan_merge_is_exact_for_unequal_and_empty_parts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64) * 3 + 100
    parts = [x[:0], x[:1], x[1:4], x[4:]]
    moments = torch.stack([
        torch.stack([torch.full((4,), float(p.shape[0]), dtype=torch.float64),
                     p.mean(0) if p.shape[0] else torch.zeros(4, dtype=torch.float64),
                     ((p - p.mean(0)) ** 2).sum(0) if p.shape[0] else torch.zeros(4, dtype=torch.float64)])
        for p in parts])
    count, mean, m2 = chan_merge(moments)
    torch.testing.assert_close(count, torch.full((4,), 12.0, dtype=torch.float64))
    torch.testing.assert_close(mean, x.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m2, ((x - x.mean(0)) ** 2).sum(0), atol=1e-10, rtol=1e-12)


# ----------------------------------------------------------------------------- SyncBatchNorm's parts

# (layout id, builder): the backend parts read every layout in place (4 groups: a stepped 5-D view)
PART_LAYOUTS = {
    "nchw": lambda x: x,
    "channels-last": lambda x: x.contiguous(memory_format=torch.channels_last_3d),
    "stepped-4-groups": lambda x: _stepped(x),
}


def _stepped(x):
    big = torch.full([2 * s + 1 if d in (2, 4) else s for d, s in enumerate(x.shape)], float("nan"), dtype=x.dtype)
    view = big[:, :, 1::2, :, 1::2]
    view.copy_(x)
    return view


# (dtype, mean, std): float32 at mean 1e4, std 1e-2 (a float32 mean alone would be off by 5% of
# the std); float16 (float32 accumulation, half output)
PART_DATA = {
    "float32-offset": (torch.float32, 1e4, 1e-2),
    "float16": (torch.float16, 3.0, 1.0),
}


def _part_data(layout, data, seed=0):
    dtype, mean, std = PART_DATA[data]
    gen = torch.Generator().manual_seed(seed)
    x = (mean + std * torch.randn(4, 3, 2, 3, 4, generator=gen, dtype=torch.float64)).to(dtype)
    return PART_LAYOUTS[layout](x), torch.randn(x.shape, generator=gen).to(dtype)


SPLIT_REDUCE = KernelConfig(2, 4, split_rows=3)  # on the split path: three programs per channel


@pytest.mark.parametrize("data", PART_DATA)
@pytest.mark.parametrize("layout", PART_LAYOUTS)
def test_backend_parts_match_the_reference_in_float64(layout, data, path):
    """moments, normalize, gradient_sums and input_grad (what SyncBatchNorm runs besides its
    collectives) against float64 math on offset data; the Triton path with split reductions
    (partials merged on the host) and no copy."""
    from tritonbn import ops, reference, trace
    from tritonbn.validation import Settings

    x, dy = _part_data(layout, data)
    dtype, _, std = PART_DATA[data]
    gamma, beta = torch.rand(3, dtype=torch.float32) + 0.5, torch.randn(3, dtype=torch.float32)
    backend = ops.backend_for(x.device)
    x64 = x.double()
    mean64, var64 = reference.batch_statistics(x64, 1)
    invstd64 = reference.inverse_std(var64, 1e-5)
    with split_path(reduce=SPLIT_REDUCE), trace.capture() as t:
        moments = backend.moments(x, 1)
        y, x_read, center, invstd = backend.normalize(x, moments[1], invstd64, gamma, beta, 1)
        sums = backend.gradient_sums(dy, x_read, center, 1)
        settings = Settings(axis=1, eps=0.0, momentum=0.0, fix_gamma=False, batch_stats=True, unbiased_update=False)
        dx = backend.input_grad(dy, x_read, gamma, center, invstd, settings, sums, 72)
    m = x.numel() // 3
    torch.testing.assert_close(moments, torch.stack([torch.full_like(mean64, m), mean64, var64 * m]),
                               rtol=1e-5, atol=1e-9)
    mean_error = (center[0].double() + center[1].double() - mean64).abs().max().item()
    assert mean_error <= 1e-4 * std, f"mean as (pilot, shift) off by {mean_error}"
    y_ref = reference.normalize(x64, mean64, invstd64, gamma.double(), beta.double(), axis=1)
    assert_close(y, y_ref, dtype, "y")
    sums_ref = torch.stack(reference.gradient_sums(dy.double(), x64, mean64, 1))
    torch.testing.assert_close(sums, sums_ref, rtol=1e-4, atol=1e-4)
    dx_ref = reference.input_grad(dy.double(), x64, mean64, invstd64, gamma.double(), axis=1,
                                  sums=tuple(sums_ref), count=72)
    assert_close(dx, dx_ref, dtype, "dx", scale=4.0)
    assert y.stride() == ops.empty_like_layout(x).stride() and t.copies == []
    if path == "triton":
        family = ops.plan_view(x.shape, 1, [x.stride()]).family
        assert t.kernels() == [f"{family}_{kernel}" for kernel in
                               ("stats", "elementwise", "backward_reduce", "elementwise")]
        assert t.launches[0].config == SPLIT_REDUCE, "three splits per channel: partials merged on the host"
