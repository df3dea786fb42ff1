"""tritonbn.nn against torch.nn: the torch-style layers, convert(), the Gluon-style layer, autocast,
and the eager path (no custom op, no copies of the moving statistics).

Every numerical test runs through both paths (interpreted Triton kernels and the reference) and
compares with torch's own modules step by step: outputs, input and parameter gradients, and
every buffer (running statistics, num_batches_tracked) after each training step.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tritonbn
from tritonbn import library
from tritonbn import nn as tnn
from tritonbn import trace
from tritonbn.plan import empty_like_layout

F32_TOL = dict(atol=2e-5, rtol=2e-5)


def torch_layer(cls: str, num_features: int, **kwargs) -> torch.nn.Module:
    """torch's ``cls`` layer; ``bias=False`` also on a torch without the keyword (< 2.13), where
    dropping the bias parameter gives the layer torch 2.13 builds."""
    bias = kwargs.pop("bias", True)
    layer = getattr(torch.nn, cls)(num_features, **kwargs, **({"bias": bias} if tnn.TORCH_HAS_BIAS else {}))
    if not bias:
        layer.register_parameter("bias", None)
    return layer


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weight, bias and running statistics (torch's defaults are ones/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or t.dim() != 1:
                continue
            if name.endswith(("weight", "running_var")):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen))


def assert_same_state(ours: torch.nn.Module, theirs: torch.nn.Module, **tol) -> None:
    """Same state_dict keys, and the same values (buffers included)."""
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    for key, value in ref.items():
        torch.testing.assert_close(mine[key], value, msg=lambda m, k=key: f"{k}: {m}", **(tol or F32_TOL))


def step_both(ours, theirs, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward of each on the same input and upstream gradient: (y_ours, y_theirs)."""
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    weight = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(seed), dtype=y_theirs.dtype)
    (y_ours * weight).sum().backward()
    (y_theirs * weight).sum().backward()
    torch.testing.assert_close(y_ours, y_theirs, **F32_TOL)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **F32_TOL)
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, msg=lambda m, n=name: f"grad {n}: {m}", **F32_TOL)
    return y_ours, y_theirs


def _input(shape, seed, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2 + 1).contiguous(memory_format=memory_format)


# (label, class name, input shape, kwargs)
CONFIGS = [
    ("1d-NC", "BatchNorm1d", (6, 4), {}),
    ("1d-NCL-momentum-None", "BatchNorm1d", (3, 4, 5), {"momentum": None}),
    ("2d", "BatchNorm2d", (2, 3, 4, 5), {}),
    ("2d-affine-False", "BatchNorm2d", (2, 3, 4, 5), {"affine": False}),
    ("2d-untracked", "BatchNorm2d", (2, 3, 4, 5), {"track_running_stats": False}),
    ("2d-momentum-None-no-bias", "BatchNorm2d", (2, 3, 4, 5), {"momentum": None, "bias": False}),
    ("2d-affine-False-momentum-None-eps", "BatchNorm2d", (2, 3, 3, 3),
     {"affine": False, "momentum": None, "eps": 1e-3}),
    ("3d-momentum-0.3", "BatchNorm3d", (2, 3, 2, 3, 4), {"momentum": 0.3}),
]


@pytest.mark.parametrize("label,cls,shape,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_layer_trains_and_evaluates_like_torch(path, label, cls, shape, kwargs):
    theirs = torch_layer(cls, shape[1], **kwargs)
    _randomise(theirs)
    ours = getattr(tnn, cls)(shape[1], **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, getattr(torch.nn, cls)) and isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    with trace.capture() as t:
        for step in range(3):
            step_both(ours, theirs, _input(shape, step), seed=step)
            assert_same_state(ours, theirs)
    assert set(t.paths) == {path}
    ours.eval(), theirs.eval()
    step_both(ours, theirs, _input(shape, 9), seed=9)
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("cls,shape,memory_format", [
    ("BatchNorm2d", (2, 3, 4, 5), torch.channels_last),
    ("BatchNorm3d", (2, 3, 2, 3, 4), torch.channels_last_3d),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_memory_format_in_is_memory_format_out(path, cls, shape, memory_format, training):
    theirs = getattr(torch.nn, cls)(3)
    _randomise(theirs)
    ours = getattr(tnn, cls)(3)
    ours.load_state_dict(theirs.state_dict())
    ours.train(training), theirs.train(training)
    x = _input(shape, 0, memory_format)
    y_ours, y_theirs = step_both(ours, theirs, x, seed=0)
    assert y_ours.is_contiguous(memory_format=memory_format)
    assert y_ours.stride() == y_theirs.stride()
    assert_same_state(ours, theirs)


def test_input_checks_match_torch():
    for cls, bad in [("BatchNorm1d", (2, 3, 4, 5)), ("BatchNorm2d", (2, 3, 4)), ("BatchNorm3d", (2, 3, 4, 5))]:
        with pytest.raises(ValueError, match="expected"):
            getattr(tnn, cls)(3)(torch.randn(bad))
        with pytest.raises(ValueError, match="expected"):
            getattr(torch.nn, cls)(3)(torch.randn(bad))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tnn.BatchNorm1d(3)(torch.randn(1, 3))
    bn = tnn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="eps"):
        tnn.BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="gamma"):  # wrong channel count: the operator's check
        bn(torch.randn(4, 5))
    bn.eval()
    torch.testing.assert_close(bn(torch.randn(1, 3)).shape, torch.Size([1, 3]))  # eval: m = 1 is fine


def test_empty_batch_like_torch():
    theirs, ours = torch.nn.BatchNorm2d(3), tnn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape and y.shape == theirs(x).shape
    y.sum().backward()
    assert torch.equal(ours.running_mean, theirs.running_mean)


def test_state_dict_and_repr_match_torch():
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"bias": False}):
        theirs, ours = torch_layer("BatchNorm2d", 5, **kwargs), tnn.BatchNorm2d(5, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
        assert repr(ours) == repr(theirs)
    ours = tnn.BatchNorm1d(4, dtype=torch.float64)
    assert ours.weight.dtype == ours.running_var.dtype == torch.float64
    assert ours.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"])
def test_bias_false_on_every_torch(cls):
    """``bias=False`` is accepted also where torch's layers lack the keyword (torch < 2.13)."""
    ours = getattr(tnn, cls)(4, bias=False)
    assert ours.bias is None and ours.weight is not None and "bias" not in ours.state_dict()
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(4))
    theirs = torch_layer("BatchNorm2d" if cls == "SyncBatchNorm" else cls, 4, bias=False)
    converted = tritonbn.convert(theirs, sync=cls == "SyncBatchNorm")
    assert type(converted) is getattr(tnn, cls) and converted.bias is None and converted.weight is theirs.weight


# ----------------------------------------------------------------------------- convert


class Block(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ConvNet(torch.nn.Module):
    """A small torchvision-style net: nested blocks, affine=False and momentum=None layers."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=None))
        self.layers = torch.nn.ModuleList([Block(4, 4), Block(4, 6)])
        self.norm = torch.nn.BatchNorm2d(6, affine=False)
        self.head = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean((2, 3)))


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_convert_keeps_parameters_buffers_and_mode():
    torch.manual_seed(0)
    model = ConvNet().double()
    for bn in _batch_norms(model):
        _randomise(bn)
    model.layers[1].eval()
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    state = copy.deepcopy(model.state_dict())
    converted = tritonbn.convert(model)
    assert converted is model
    kinds = [type(m) for m in _batch_norms(model)]
    assert kinds == [tnn.BatchNorm2d, tnn.BatchNorm2d, tnn.BatchNorm2d, tnn.BatchNorm2d, tnn.BatchNorm1d]
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)  # same objects
    assert all(t.dtype == torch.float64 for k, t in after.items() if "num_batches" not in k)
    assert list(model.state_dict()) == list(state)
    assert not model.layers[1].bn.training and model.layers[0].bn.training and model.training
    assert model.norm.weight is None and model.stem[1].momentum is None
    assert tritonbn.convert(model) is model and type(model.stem[1]) is tnn.BatchNorm2d  # idempotent

    single = tritonbn.convert(torch.nn.BatchNorm1d(3))
    assert type(single) is tnn.BatchNorm1d
    synced = tritonbn.convert(ConvNet(), sync=True)
    assert {type(m) for m in _batch_norms(synced)} == {tnn.SyncBatchNorm}
    torch_sync = tritonbn.convert(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)))
    assert type(torch_sync[0]) is tnn.SyncBatchNorm
    with pytest.warns(UserWarning, match="not initialised"):
        lazy = tritonbn.convert(torch.nn.Sequential(torch.nn.LazyBatchNorm2d()))
    assert isinstance(lazy[0], torch.nn.LazyBatchNorm2d)


def test_converted_model_trains_like_torch_and_loads_torch_checkpoints(path):
    torch.manual_seed(0)
    theirs = ConvNet()
    for bn in _batch_norms(theirs):
        _randomise(bn)
    checkpoint = copy.deepcopy(theirs.state_dict())
    ours = tritonbn.convert(ConvNet())
    ours.load_state_dict(checkpoint)  # a torch checkpoint, strict
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step in range(3):
        x = _input((4, 3, 5, 5), step, torch.channels_last if step == 2 else torch.contiguous_format)
        opt_ours.zero_grad(), opt_theirs.zero_grad()
        step_both(ours, theirs, x, seed=step)
        opt_ours.step(), opt_theirs.step()
        assert_same_state(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(_input((2, 3, 5, 5), 7)), theirs(_input((2, 3, 5, 5), 7)), **F32_TOL)


# ----------------------------------------------------------------------------- Gluon-style layer


def _mxnet_step(layer_kwargs, x, gamma, beta, running_mean, running_var, training):
    """What MXNet's Gluon BatchNorm computes, through the functional operator (SPEC semantics)."""
    kw = dict(axis=1, momentum=0.9, epsilon=1e-5, center=True, scale=True, use_global_stats=False) | layer_kwargs
    x = x.clone().requires_grad_()
    gamma = gamma.clone().requires_grad_()
    beta = beta.clone().requires_grad_(kw["center"])
    beta_used = beta if kw["center"] else torch.zeros_like(beta)
    y = tritonbn.batch_norm(x, gamma, beta_used, running_mean, running_var, eps=kw["epsilon"],
                            momentum=kw["momentum"], fix_gamma=not kw["scale"],
                            use_global_stats=kw["use_global_stats"], axis=kw["axis"], training=training)
    return x, gamma, beta, y


@pytest.mark.parametrize("kwargs", [
    {"axis": -1},
    {"axis": 1, "momentum": 0.5, "epsilon": 1e-3},
    {"axis": 1, "scale": False, "center": False},
    {"axis": -1, "use_global_stats": True, "in_channels": 3},
], ids=["axis-1", "axis1-momentum", "fixed-gamma-beta", "global-stats"])
def test_gluon_layer(path, kwargs):
    shape = (4, 3, 5) if kwargs["axis"] == 1 else (4, 5, 3)
    layer = tnn.BatchNorm(**kwargs)
    assert layer.has_uninitialized_params() == ("in_channels" not in kwargs)
    x0 = _input(shape, 0)
    layer(x0)  # lazy shape inference on the first call
    assert layer.gamma.shape == (3,) and layer.running_var.dtype == torch.float32
    assert list(layer.state_dict()) == ["gamma", "beta", "running_mean", "running_var"]
    _randomise(layer)
    running = (layer.running_mean.clone(), layer.running_var.clone())
    for training in (True, False):
        layer.train(training)
        x = _input(shape, 1)
        gamma, beta = layer.gamma.detach().clone(), layer.beta.detach().clone()
        xr, gr, br, y_ref = _mxnet_step(kwargs, x, gamma, beta, *running, training)
        x_ours = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(x_ours)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * w).sum().backward()
        (y_ref * w).sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x_ours.grad, xr.grad)
        torch.testing.assert_close(layer.running_mean, running[0])
        torch.testing.assert_close(layer.running_var, running[1])
        if kwargs.get("scale", True):
            torch.testing.assert_close(layer.gamma.grad, gr.grad)
        else:
            assert layer.gamma.grad is None and not layer.gamma.requires_grad
        if kwargs.get("center", True):
            torch.testing.assert_close(layer.beta.grad, br.grad)
        else:
            assert layer.beta.grad is None
    layer.train()
    moving_before = layer.running_mean.clone()
    layer(_input(shape, 2))
    assert torch.equal(layer.running_mean, moving_before) == bool(kwargs.get("use_global_stats"))


def test_gluon_layer_float64_and_checkpoint():
    layer = tnn.BatchNorm(axis=2)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    layer(x)
    assert layer.gamma.dtype == torch.float64 and layer.in_channels == 4
    fresh = tnn.BatchNorm(axis=2)
    fresh.load_state_dict(layer.state_dict())  # materialises the lazy parameters
    assert not fresh.has_uninitialized_params() and fresh.running_mean.shape == (4,)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x))
    assert "axis=2" in repr(layer)
    with pytest.raises(ValueError, match="initializer"):
        tnn.BatchNorm(gamma_initializer="xavier")
    assert torch.equal(tnn.BatchNorm(in_channels=2, gamma_initializer=2.0).gamma.detach(), torch.full((2,), 2.0))


# ----------------------------------------------------------------------------- autocast, SyncBatchNorm


def test_autocast_bfloat16_like_torch(path):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ours = tritonbn.convert(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.dtype == y_theirs.dtype == torch.bfloat16  # input dtype, float32 parameters
        x4 = torch.randn(2, 4, 3, 3)
        assert ours[1](x4).dtype == theirs[1](x4).dtype == torch.float32
    assert ours[1].weight.dtype == ours[1].running_mean.dtype == torch.float32
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), atol=3e-2, rtol=3e-2)
    y_ours.float().sum().backward(), y_theirs.float().sum().backward()
    torch.testing.assert_close(ours[1].bias.grad, theirs[1].bias.grad, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, atol=1e-2, rtol=1e-2)


def test_sync_batch_norm_without_process_group_is_local(path):
    theirs = torch.nn.BatchNorm2d(3, momentum=None)
    _randomise(theirs)
    ours = tnn.SyncBatchNorm(3, momentum=None)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(torch.nn.SyncBatchNorm(3).state_dict())
    for step in range(2):
        step_both(ours, theirs, _input((2, 3, 4, 4), step), seed=step)
    assert_same_state(ours, theirs)
    with pytest.raises(ValueError, match="at least 2D"):
        ours(torch.randn(3))


# ----------------------------------------------------------------------------- eager path


# Where a tritonbn custom op's implementation runs from inside a mode (CPU tensors: these tests').
_BELOW_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class OpLog(TorchDispatchMode):
    """Records every op dispatched while active as (op, shapes of its tensor arguments).

    A tritonbn custom op is recorded, then run below the Python key with the mode on again, so
    the aten ops of its implementation (the clones of the moving statistics) are recorded too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[torch._ops.OpOverload, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        if func.namespace == "tritonbn":
            with self:
                return func.redispatch(_BELOW_PYTHON, *args, **kwargs)
        return func(*args, **kwargs)

    def custom_ops(self) -> list[str]:
        return [str(func) for func, _ in self.ops if func.namespace == "tritonbn"]

    def on_vectors(self, packet, channels: int) -> list[str]:
        """The recorded ``packet`` ops (e.g. ``aten.clone``) with a [channels] tensor argument."""
        return [f"{func}{shapes}" for func, shapes in self.ops
                if func.overloadpacket is packet and (channels,) in shapes]


# (id, layer factory, input shape, training)
EAGER_LAYERS = [
    ("1d-momentum-0.3", lambda: tnn.BatchNorm1d(3, momentum=0.3), (4, 3, 5), True),
    ("2d-momentum-None", lambda: tnn.BatchNorm2d(3, momentum=None), (2, 3, 4, 4), True),
    ("3d-affine-False", lambda: tnn.BatchNorm3d(3, affine=False), (2, 3, 2, 2, 3), True),
    ("2d-untracked", lambda: tnn.BatchNorm2d(3, track_running_stats=False), (2, 3, 4, 4), True),
    ("2d-eval", lambda: tnn.BatchNorm2d(3), (2, 3, 4, 4), False),
    ("gluon-axis-1", lambda: tnn.BatchNorm(axis=-1, in_channels=3), (4, 5, 3), True),
    ("gluon-global-stats", lambda: tnn.BatchNorm(use_global_stats=True, in_channels=3), (4, 3, 5), True),
    ("sync-local-momentum-None", lambda: tnn.SyncBatchNorm(3, momentum=None), (2, 3, 4, 4), True),
]
EAGER_IDS = [case[0] for case in EAGER_LAYERS]


def _eager_layer(factory: Callable[[], torch.nn.Module], training: bool) -> torch.nn.Module:
    layer = factory()
    _randomise(layer)
    return layer.train(training)


def _train_step(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward with a gradient to the input and every parameter."""
    y = layer(x.clone().requires_grad_())
    (y * y).sum().backward()
    return y


@pytest.fixture
def custom_op_calls(monkeypatch) -> list[tuple]:
    """Every call of ``library.batch_norm_forward`` (the custom op) from ``batch_norm_op``."""
    calls: list[tuple] = []
    op = library.batch_norm_forward

    def counted(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(library, "batch_norm_forward", counted)
    return calls


@pytest.mark.parametrize("label,factory,shape,training", EAGER_LAYERS, ids=EAGER_IDS)
def test_eager_layer_call_skips_the_custom_op(path, custom_op_calls, label, factory, shape, training):
    layer = _eager_layer(factory, training)
    with trace.capture() as t, OpLog() as log:
        _train_step(layer, _input(shape, 0))
    assert custom_op_calls == [] and log.custom_ops() == []
    assert set(t.paths) == {path} and bool(t.launches) == (path == "triton")


def test_eager_layout_needing_a_copy_keeps_the_custom_op(path, custom_op_calls):
    """A rank-6 view with five stepped reduced dimensions (more than four groups) is copied
    anyway: it keeps the custom op's copy and relayout, so eager stays bitwise the compiled."""
    layer = tnn.BatchNorm(in_channels=3)
    x = _input((3, 3, 3, 3, 3, 3), 0)[::2, :, ::2, ::2, ::2, ::2]  # (a clone would be dense)
    with trace.capture() as t:
        y = layer(x)
    assert len(custom_op_calls) == 1 and any("reduced groups" in note for note in t.copies)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=layer.epsilon)
    torch.testing.assert_close(y, expected, **F32_TOL)
    assert y.stride() == empty_like_layout(x).stride()


@pytest.mark.parametrize("tracing_mode", ["real", "fake"])
def test_make_fx_traces_the_custom_op(tracing_mode):
    """make_fx/AOTAutograd see aten ops, not the kernels' writes: a traced call stays the custom op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = tnn.BatchNorm2d(3, momentum=None)
    state = dict(layer.named_parameters()) | dict(layer.named_buffers())

    def forward(state: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, state, (x,))

    graph = make_fx(forward, tracing_mode=tracing_mode)(state, _input((2, 3, 4, 4), 0)).graph
    targets = [node.target for node in graph.nodes]
    assert torch.ops.tritonbn.batch_norm_forward.default in targets


def _moving_copies_of_the_backend(training: bool, channels: int) -> int:
    """[C] copy_ ops of the backend's own update in ``tritonbn.batch_norm`` (the functional op):
    none in the kernels, one per statistic in the CPU backend, which writes its float64 result."""
    gamma, beta = torch.ones(channels), torch.zeros(channels)
    with OpLog() as log:
        tritonbn.batch_norm(_input((4, channels, 5), 1), gamma, beta, torch.zeros(channels), torch.ones(channels),
                            training=training)
    return len(log.on_vectors(torch.ops.aten.copy_, channels))


@pytest.mark.parametrize("label,factory,shape,training", EAGER_LAYERS, ids=EAGER_IDS)
def test_eager_step_neither_clones_nor_copies_the_moving_statistics(path, label, factory, shape, training):
    layer = _eager_layer(factory, training)
    _train_step(layer, _input(shape, 0))  # a first step (the cumulative average then has count 2)
    buffers = {name: (t, t.data_ptr()) for name, t in layer.named_buffers() if t.dim() == 1}
    with OpLog() as log:
        _train_step(layer, _input(shape, 1))
    aten = torch.ops.aten
    assert log.on_vectors(aten.clone, 3) == []
    copies = log.on_vectors(aten.copy_, 3)
    batch_stats = training and not getattr(layer, "use_global_stats", False)
    assert len(copies) == _moving_copies_of_the_backend(batch_stats, 3), copies
    if path == "triton":
        assert copies == []  # the kernels update the buffers where they are
    for name, (tensor, ptr) in buffers.items():
        assert getattr(layer, name) is tensor and tensor.data_ptr() == ptr, name
