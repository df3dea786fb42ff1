"""No host synchronisation in a training step, and kernels launched on the data's CUDA device.

Host sync: a ``.item()`` / ``int()`` / ``float()`` / ``bool()`` of a tensor (``aten::_local_scalar_dense``),
and ops whose result the host must wait for (``is_nonzero``, ``equal``, ``allclose``, ``nonzero``...),
stall a GPU stream every step and break CUDA-graph capture.  ``ScalarReads`` (a
``TorchDispatchMode``) counts them over a training step (forward, backward, buffer updates) of
every layer configuration, the Gluon-style layer, the functional op and SyncBatchNorm's
synchronised function over a one-rank gloo group, on both paths; every count must be zero.
(On CPU tensors a device-to-host copy is no sync and cannot be seen: the counted ops are the
ones that read a value on the host whatever the device.)

Device guard: Triton launches on the current CUDA device; ``ops.on_data_device`` makes the
data's device current for every ``TritonBackend`` method.  Checked here with a fake current
device (the real multi-GPU runs are in test_cuda.py).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import tritonbn
from tritonbn import nn as tnn
from tritonbn import ops
from tritonbn.distributed import sync_batch_norm
from test_distributed import _free_port

aten = torch.ops.aten

# Ops that read a tensor's value on the host.
SCALAR_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose,
                aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive}

# Where a tritonbn custom op is run from inside the mode (CPU tensors only: these tests' data).
_BELOW_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class ScalarReads(TorchDispatchMode):
    """Records every op of ``SCALAR_READS`` dispatched while active.

    The mode is switched off inside its own handler, so a tritonbn custom op would hide the
    aten ops of its implementation: those are run below the Python key with the mode on again.
    Interpreted kernel launches are counted too: the interpreters of Triton 3.6 and 3.8 read no
    tensor value through the dispatcher (were one to, ``Launch.__call__`` is where to stop counting).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SCALAR_READS:
            self.reads.append(str(func))
        if func.namespace == "tritonbn":
            with self:
                return func.redispatch(_BELOW_PYTHON, *args, **kwargs)
        return func(*args, **kwargs)


@pytest.fixture
def scalar_reads() -> ScalarReads:
    """A fresh ``ScalarReads`` (enter it around the step to check)."""
    return ScalarReads()


def _train_step(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward with a gradient to the input and every parameter."""
    x = x.clone().requires_grad_()
    y = module(x)
    y.square().sum().backward()
    return y


def _data(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _assert_no_reads(mode: ScalarReads) -> None:
    assert mode.reads == [], f"host reads of device values: {mode.reads}"


# ----------------------------------------------------------------------------- torch-style layers

SHAPES = {"BatchNorm1d": (4, 3, 5), "BatchNorm2d": (2, 3, 4, 5), "BatchNorm3d": (2, 3, 2, 3, 4)}
# (cls, momentum, affine, track_running_stats, training): every combination
LAYERS = list(itertools.product(SHAPES, (0.1, None), (True, False), (True, False), (True, False)))


def _layer_id(case) -> str:
    cls, momentum, affine, tracked, training = case
    return "-".join([cls[-2:], f"momentum-{momentum}", "affine" if affine else "no-affine",
                     "tracked" if tracked else "untracked", "train" if training else "eval"])


@pytest.mark.parametrize("case", LAYERS, ids=[_layer_id(c) for c in LAYERS])
def test_layer_step_reads_nothing_on_the_host(path, scalar_reads, case):
    cls, momentum, affine, tracked, training = case
    layer = getattr(tnn, cls)(3, momentum=momentum, affine=affine, track_running_stats=tracked)
    layer.train(training)
    x = _data(SHAPES[cls])
    _train_step(layer, x)  # a first step (the cumulative average's count is 1 there)
    with scalar_reads:
        _train_step(layer, x)
    _assert_no_reads(scalar_reads)


def test_converted_model_and_sync_layer_without_group_read_nothing(path, scalar_reads):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 9, 5), torch.nn.BatchNorm1d(5))
    tritonbn.convert(model)
    sync = tnn.SyncBatchNorm(3, momentum=None)  # no process group: the local layer
    with scalar_reads:
        _train_step(model, _data((4, 3, 3, 3)))
        _train_step(sync, _data((2, 3, 4, 4)))
    _assert_no_reads(scalar_reads)


# ----------------------------------------------------------------------------- Gluon layer, functional op

# (id, Gluon layer kwargs, input shape)
GLUON = [
    ("axis1", {"in_channels": 3}, (4, 3, 5)),
    ("axis-1-lazy", {"axis": -1}, (4, 5, 3)),
    ("fixed-gamma-beta", {"scale": False, "center": False, "in_channels": 3}, (4, 3, 5)),
    ("global-stats", {"use_global_stats": True, "in_channels": 3}, (4, 3, 5)),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label,kwargs,shape", GLUON, ids=[g[0] for g in GLUON])
def test_gluon_layer_step_reads_nothing_on_the_host(path, scalar_reads, label, kwargs, shape, training):
    layer = tnn.BatchNorm(**kwargs)
    layer.train(training)
    with scalar_reads:  # the lazy layer's first call (shape inference) included
        _train_step(layer, _data(shape))
    _assert_no_reads(scalar_reads)


# (id, tritonbn.batch_norm keyword arguments)
FUNCTIONAL = [
    ("train", {"training": True}),
    ("train-gamma-unbiased-update", {"training": True, "fix_gamma": False, "unbiased_update": True}),
    ("train-momentum-outside-0-1", {"training": True, "momentum": 1.5}),  # the moving update on the host side
    ("train-output-mean-var-axis-1", {"training": True, "output_mean_var": True, "axis": -1}),
    ("use-global-stats", {"training": True, "use_global_stats": True}),
    ("inference", {}),
]


@pytest.mark.parametrize("label,kwargs", FUNCTIONAL, ids=[f[0] for f in FUNCTIONAL])
def test_functional_op_reads_nothing_on_the_host(path, scalar_reads, label, kwargs):
    x = _data((4, 5, 3) if kwargs.get("axis") == -1 else (4, 3, 5)).requires_grad_()
    gamma, beta = torch.rand(3).requires_grad_(), torch.randn(3).requires_grad_()
    moving = (torch.randn(3), torch.rand(3) + 0.5)
    with scalar_reads:
        result = tritonbn.batch_norm(x, gamma, beta, *moving, **kwargs)
        y = result[0] if isinstance(result, tuple) else result
        y.square().sum().backward()
        with torch.no_grad():  # out=: no autograd
            tritonbn.batch_norm(x, gamma, beta, *moving, out=torch.empty_like(x), **kwargs)
    _assert_no_reads(scalar_reads)


# ----------------------------------------------------------------------------- SyncBatchNorm

@pytest.fixture(scope="module")
def one_rank_group():
    """The default process group: gloo, this process alone (world size 1)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# (id, momentum, affine, track_running_stats)
SYNC = [
    ("momentum-0.1", 0.1, True, True),
    ("momentum-None", None, True, True),
    ("no-affine", 0.1, False, True),
    ("untracked", None, True, False),
]


@pytest.mark.parametrize("label,momentum,affine,tracked", SYNC, ids=[s[0] for s in SYNC])
def test_synchronised_function_reads_nothing_on_the_host(path, scalar_reads, one_rank_group, label, momentum,
                                                         affine, tracked):
    """``sync_batch_norm`` itself (its collectives over the one-rank group), as a layer's step
    calls it: the running statistics and ``num_batches_tracked`` updated on the device."""
    layer = tnn.SyncBatchNorm(3, momentum=momentum, affine=affine, track_running_stats=tracked)
    x = _data((2, 3, 4, 4)).requires_grad_()
    with scalar_reads:
        running_mean, running_var, _, momentum, average_count = layer._batch_norm_args()
        y = sync_batch_norm(x, running_mean, running_var, layer.weight, layer.bias, momentum, layer.eps,
                            one_rank_group, average_count=average_count)
        y.square().sum().backward()
        _train_step(layer, x.detach())  # the layer with a one-rank group: the local path
    _assert_no_reads(scalar_reads)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(
        x.detach(), None, None, layer.weight, layer.bias, training=True, eps=layer.eps), atol=2e-5, rtol=2e-5)


def test_synchronised_function_one_value_per_channel_raises(one_rank_group):
    """With one rank the group's count is this rank's, known from the shape: torch's error."""
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync_batch_norm(torch.randn(1, 3), running_mean, running_var, None, None, 0.1, 1e-5, one_rank_group)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


# ----------------------------------------------------------------------------- device guard


class _FakeCuda:
    """What the guard reads of a tensor on cuda:``index``."""

    is_cuda = True

    def __init__(self, index: int) -> None:
        self.index = index

    def get_device(self) -> int:
        return self.index


@pytest.fixture
def fake_devices(monkeypatch) -> dict:
    """torch.cuda's current device as a variable (``current``), ``entered`` counts device switches."""
    state = {"current": 0, "entered": 0}

    @contextlib.contextmanager
    def device(index: int):
        previous, state["current"] = state["current"], index
        state["entered"] += 1
        try:
            yield
        finally:
            state["current"] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(ops, "_current_cuda_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


class _Probe:
    @ops.on_data_device
    def current(self, data, *args, **kwargs) -> int:
        return torch.cuda.current_device()


# (id, data's device, current device before, switch expected)
GUARD = [
    ("other-device-becomes-current", 1, 0, True),
    ("current-device-no-switch", 1, 1, False),
    ("device-0-from-2", 0, 2, True),
]


@pytest.mark.parametrize("label,data_device,current,switches", GUARD, ids=[g[0] for g in GUARD])
def test_launch_guard_makes_the_data_device_current(fake_devices, label, data_device, current, switches):
    fake_devices["current"] = current
    assert _Probe().current(_FakeCuda(data_device), "args", kw=1) == data_device
    assert fake_devices["current"] == current  # restored
    assert fake_devices["entered"] == int(switches)


def test_launch_guard_does_nothing_for_cpu_tensors(monkeypatch):
    """The interpreted kernels' path (conftest's default) asks torch.cuda nothing."""
    def no_cuda(*args):
        raise AssertionError("the guard asked torch.cuda about a CPU tensor")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(ops, "_current_cuda_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    with tritonbn.trace.capture() as t:
        tritonbn.batch_norm(torch.randn(4, 3), torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3),
                            training=True)
        _train_step(tnn.BatchNorm1d(3, momentum=None), _data((4, 3)))
    assert set(t.paths) == {"triton"} and t.launches


def test_every_triton_backend_method_is_guarded():
    """The public methods are where every launch path enters the kernels (but the static
    ``fused_state_like``: the shapes of a fused forward's saved state for fake tensors, no launch)."""
    public = [name for name, value in vars(ops.TritonBackend).items()
              if callable(value) and not name.startswith("_") and name != "fused_state_like"]
    assert set(public) >= {"forward", "backward", "moments", "normalize", "gradient_sums", "input_grad"}
    unguarded = [name for name in public
                 if getattr(getattr(ops.TritonBackend, name), "__wrapped__", None) is None]
    assert unguarded == []

