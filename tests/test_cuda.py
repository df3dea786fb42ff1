"""What only a CUDA GPU can show: the compiled kernels under CUDA graphs, streams, several GPUs,
the sync debugger, torch.compile and NCCL.

Every test here is marked ``gpu``: it runs with ``TRITONBN_TEST_DEVICE=cuda`` on a machine with a
CUDA GPU (``scripts/test`` and ``scripts/gpu-check`` do that there) and is skipped elsewhere.  The
numerical tables of test_batch_norm.py and test_mxnet_conformance.py run on CUDA tensors in the
same mode (their ``cuda`` path); this file adds the exact steps of the compiled arithmetic and
the GPU-only behaviour.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch

import tritonbn
import helpers
from helpers import Inputs, assert_close, expected, make_inputs, split_path

pytestmark = pytest.mark.gpu

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def on_cuda(monkeypatch):
    """make_inputs builds CUDA tensors here."""
    monkeypatch.setattr(helpers, "DEVICE", "cuda")


# (shape, layout, forced split path): a single-pass NCHW call, a split NCHW call, channels_last.
STEPS = [
    pytest.param((4, 8, 16, 16), "contiguous", False, id="nchw-single-pass"),
    pytest.param((4, 8, 16, 16), "contiguous", True, id="nchw-split"),
    pytest.param((4, 8, 16, 16), "channels_last", True, id="channels_last-split"),
]


def _training_step(inp, dy, **kwargs):
    """Forward + backward of one training call: (y, dx, dgamma, dbeta); moving stats updated."""
    y = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False,
                            training=True, **kwargs)
    dx, dgamma, dbeta = torch.autograd.grad(y, (inp.x, inp.gamma, inp.beta), dy)
    return y, dx, dgamma, dbeta


def _inputs(shape, layout, dtype=F32, seed=0):
    inp = make_inputs(shape, 1, dtype, layout, seed=seed)
    inp.x.requires_grad_(True), inp.gamma.requires_grad_(True), inp.beta.requires_grad_(True)
    dy = helpers.apply_layout(torch.randn(shape, device="cuda", dtype=dtype), layout, 1)
    return inp, dy


@pytest.mark.parametrize("shape, layout, split", STEPS)
def test_cuda_graph_replay_equals_eager(shape, layout, split):
    """A captured training step, replayed, gives eager's outputs, gradients and moving
    statistics bit for bit (fixed-order merges: the kernels are deterministic)."""
    with split_path() if split else contextlib.nullcontext():
        inp, dy = _inputs(shape, layout)
        start = inp.clone_stats()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile every kernel outside the capture
            for _ in range(2):
                _training_step(inp, dy)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = _training_step(inp, dy)
        eager_stats = [s.clone() for s in start]
        eager = _training_step(type(inp)(inp.x, inp.gamma, inp.beta, *eager_stats), dy)
        inp.moving_mean.copy_(start[0]), inp.moving_var.copy_(start[1])
        graph.replay()
        torch.cuda.synchronize()
    for name, got, want in zip(("y", "dx", "dgamma", "dbeta"), static, eager):
        assert torch.equal(got, want), name
    assert torch.equal(inp.moving_mean, eager_stats[0]) and torch.equal(inp.moving_var, eager_stats[1])


def test_runs_on_the_current_stream():
    """The kernels run on torch's current stream: on a side stream that is still busy writing x,
    the op must see x's new values (a launch on the default stream would read the old ones)."""
    inp, _ = _inputs((8, 4, 32, 32), "contiguous")
    new_x = torch.randn_like(inp.x) * 2 + 1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the copy lands
        inp.x.copy_(new_x)
        y = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, *inp.clone_stats(), fix_gamma=False, training=True)
    side.synchronize()
    want = expected(Inputs(new_x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var), None)
    assert_close(y, want["y"], F32, "y")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_a_second_gpu_launch_there():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (the device guard),
    the results match the reference, and the caller's current device is left as it was."""
    torch.cuda.set_device(0)
    inp = make_inputs((4, 6, 8, 8), 1, F32)
    on_second = [t.to("cuda:1") for t in (inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var)]
    x = on_second[0].requires_grad_(True)
    y = tritonbn.batch_norm(x, *on_second[1:], fix_gamma=False, training=True)
    y.sum().backward()
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0 and y.device == x.grad.device == torch.device("cuda:1")
    assert_close(y, expected(inp, None)["y"], F32, "y")


MODULES = [
    pytest.param(lambda: tritonbn.nn.BatchNorm2d(8), id="BatchNorm2d"),
    pytest.param(lambda: tritonbn.nn.BatchNorm2d(8, momentum=None), id="BatchNorm2d-cumulative"),
    pytest.param(lambda: tritonbn.nn.BatchNorm(axis=1, in_channels=8), id="gluon-BatchNorm"),
]


@pytest.mark.parametrize("make_module", MODULES)
def test_training_step_makes_no_host_sync(make_module):
    """torch's sync debugger raises on any host-device synchronisation inside a training step."""
    module = make_module().cuda()
    x = torch.randn(4, 8, 16, 16, device="cuda", requires_grad=True)
    module(x).sum().backward()  # warm-up: compile and lazily initialise outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x).sum().backward()
        tritonbn.batch_norm(x, torch.ones(8, device="cuda"), torch.zeros(8, device="cuda"),
                            torch.zeros(8, device="cuda"), torch.ones(8, device="cuda"), training=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_torch_compile_on_cuda_matches_eager(memory_format):
    """A converted conv -> BN -> ReLU model through torch.compile(fullgraph=True) on CUDA against
    the same model in eager, forward and backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    model = tritonbn.convert(model).cuda().to(memory_format=memory_format)
    twin = tritonbn.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                                torch.nn.ReLU())).cuda().to(memory_format=memory_format)
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(4, 3, 16, 16, device="cuda").to(memory_format=memory_format)
    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(eager_x).square().sum().backward()
    compiled(compiled_x).square().sum().backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, atol=1e-4, rtol=1e-4)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, msg=key, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- exact steps

def test_constant_channel_with_eps_zero_is_exact_on_the_gpu():
    """SPEC: var == 0 and eps == 0 gives invstd = 0 exactly, out = beta exactly, dx = 0: the
    compiled spread, rescale and division steps must not leave a rounding residue."""
    x = torch.full((4, 3, 8, 8), 3.1, device="cuda").requires_grad_(True)
    gamma, beta = torch.rand(3, device="cuda") + 0.5, torch.randn(3, device="cuda")
    y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, torch.zeros(3, device="cuda"),
                                          torch.ones(3, device="cuda"), eps=0.0, fix_gamma=False,
                                          training=True, output_mean_var=True)
    y.sum().backward()
    assert torch.equal(invstd, torch.zeros_like(invstd))
    assert torch.equal(y, beta.view(1, 3, 1, 1).expand_as(y))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))
    assert torch.equal(mean, torch.full_like(mean, 3.1))


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-41], ids=["1e30", "1e-30", "subnormal-1e-41"])
@pytest.mark.parametrize("split", [False, True], ids=["single-pass", "split"])
def test_extreme_magnitudes_on_the_gpu(scale, split):
    """float32 data of 1e30, 1e-30 and subnormal 1e-41: the power-of-two rescaling is exact in
    the compiled code, so mean and invstd keep their float32 accuracy."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 2, 32, 32, generator=gen, dtype=torch.float64) + 2
    x = (base * scale).float()
    x64 = x.double()
    with split_path() if split else contextlib.nullcontext():
        _, mean, invstd = tritonbn.batch_norm(x.cuda(), torch.ones(2, device="cuda"), torch.zeros(2, device="cuda"),
                                              torch.zeros(2, device="cuda"), torch.ones(2, device="cuda"),
                                              eps=0.0, fix_gamma=False, training=True, output_mean_var=True)
    want_mean = x64.mean(dim=(0, 2, 3))
    want_invstd = 1 / x64.var(dim=(0, 2, 3), unbiased=False).sqrt()
    rtol = 1e-3 if scale < 1e-38 else 1e-5  # subnormals carry fewer significant bits
    torch.testing.assert_close(mean.cpu().double(), want_mean, rtol=rtol, atol=0)
    torch.testing.assert_close(invstd.cpu().double(), want_invstd, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- NCCL

SIZES = (3, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(sum(SIZES), 4, 6, 6, generator=gen) * 2 + 1).cuda()
        upstream = torch.randn(x.shape, generator=gen).cuda()
        theirs = torch.nn.BatchNorm2d(4).cuda()
        ours = tritonbn.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), sync=True)[0].cuda()
        lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
        x_all, x_mine = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
        y_all, y_mine = theirs(x_all), ours(x_mine)
        (y_all * upstream).sum().backward()
        (y_mine * upstream[lo:hi]).sum().backward()
        torch.testing.assert_close(y_mine, y_all[lo:hi], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(x_mine.grad, x_all.grad[lo:hi], atol=2e-5, rtol=2e-5)
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], atol=2e-5, rtol=2e-5)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL SyncBatchNorm needs two GPUs")
def test_sync_batch_norm_over_nccl_unequal_batches():
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(len(SIZES), _free_port()), nprocs=len(SIZES), join=True)
