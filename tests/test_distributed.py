"""tritonbn.nn.SyncBatchNorm over 2 gloo processes on CPU against one process on the whole batch.

The ranks hold 3 and 5 samples (unequal: averaging per-rank moments would be wrong).  Each rank
also runs torch's own BatchNorm2d on the concatenated batch and checks, over three training
steps (momentum 0.1, then a cumulative-average layer) and an eval step: its slice of the output
and of the input gradient, the all-reduced weight/bias gradients, and the running statistics.
The workers run through the interpreted Triton kernels or the reference (TRITON_INTERPRET is
set in the child before anything imports Triton).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tritonbn.distributed import chan_merge

SIZES = (3, 5)
TOL = dict(atol=2e-5, rtol=2e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_rank(rank: int, momentum, memory_format) -> None:
    import torch.distributed as dist

    import tritonbn
    from tritonbn import nn as tnn

    gen = torch.Generator().manual_seed(1)
    channels, total = 3, sum(SIZES)
    theirs = torch.nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        theirs.bias.copy_(torch.randn(channels, generator=gen))
        theirs.running_mean.copy_(torch.randn(channels, generator=gen))
    ours = tritonbn.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(channels, momentum=momentum)), sync=True)[0]
    assert isinstance(ours, tnn.SyncBatchNorm)
    ours.load_state_dict(theirs.state_dict())
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    for step in range(4):
        training = step < 3
        ours.train(training), theirs.train(training)
        x = (torch.randn(total, channels, 4, 5, generator=gen) * 2 + 1).contiguous(memory_format=memory_format)
        upstream = torch.randn(x.shape, generator=gen)
        x_all, x_mine = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
        y_all, y_mine = theirs(x_all), ours(x_mine)
        (y_all * upstream).sum().backward()
        (y_mine * upstream[lo:hi]).sum().backward()
        torch.testing.assert_close(y_mine, y_all[lo:hi], **TOL)
        assert y_mine.stride() == x_mine.stride()
        torch.testing.assert_close(x_mine.grad, x_all.grad[lo:hi], **TOL)
        for name in ("weight", "bias"):  # local gradients; their sum is the whole batch's
            grad = getattr(ours, name).grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, getattr(theirs, name).grad, msg=name, **TOL)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, msg=key, **TOL)
        ours.zero_grad(), theirs.zero_grad()


def _worker(rank: int, world: int, port: int, interpret: str, cases) -> None:
    os.environ["TRITON_INTERPRET"] = interpret  # before anything imports Triton
    import torch.distributed as dist

    from tritonbn import trace

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with trace.capture() as t:
            for momentum, memory_format in cases:
                _check_rank(rank, momentum, memory_format)
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

    cases = [(0.1, torch.contiguous_format), (None, torch.channels_last)]
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
