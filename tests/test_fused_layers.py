"""The fused layers (issue 15, item 4): BatchNormReLU1d/2d/3d, BatchNormAddReLU1d/2d/3d, the Gluon
layer's ``fuse_relu`` / BatchNormReLU and SyncBatchNormReLU/AddReLU without a process group, each
against torch's unfused chain (its BatchNorm, then ``+ addend``, then ``relu``) step by step:
outputs, the input's, the addend's and every parameter's gradient, every buffer.  Then the same
layers under ``torch.compile(fullgraph=True)`` (the fused custom op: forward, backward, buffers,
dynamic shapes), the custom op's opcheck, and the eager, custom-op and compiled runs bitwise equal
(the bit mask included).  SyncBatchNorm across processes: tests/test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tritonbn import library
from tritonbn import nn as tnn
from tritonbn import trace
from tritonbn.plan import empty_like_layout
from test_nn import F32_TOL, _input, _randomise, assert_same_state, torch_layer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TorchChain(torch.nn.Module):
    """torch's unfused chain: relu(bn(x) [+ addend]) with torch's own batch norm ``bn``."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(x)
        return torch.relu(y if addend is None else y + addend)


def _addend(shape, seed: int, memory_format=torch.contiguous_format) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed)).contiguous(
        memory_format=memory_format)


def _step(layer: torch.nn.Module, x: torch.Tensor, addend: torch.Tensor | None, seed: int) -> dict:
    """One forward/backward: y, the gradients of x, addend and every parameter, every buffer."""
    x = x.clone().requires_grad_()
    a = None if addend is None else addend.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x) if a is None else layer(x, a)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * upstream).sum().backward()
    out = {"y": y.detach(), "x.grad": x.grad} | ({} if a is None else {"addend.grad": a.grad})
    out |= {f"{n.split('.')[-1]}.grad": p.grad for n, p in layer.named_parameters() if p.grad is not None}
    out |= {n.split(".")[-1]: b.clone() for n, b in layer.named_buffers()}
    return out


def _assert_steps_close(actual: dict, expected: dict, what: str, **tol) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=lambda m, k=key: f"{what}: {k}: {m}", **(tol or F32_TOL))


# (id, fused class name, torch class name, input shape, memory format, kwargs)
TORCH_STYLE = [
    ("relu-1d-NC", "BatchNormReLU1d", "BatchNorm1d", (6, 4), torch.contiguous_format, {}),
    ("relu-1d-NCL-momentum-None", "BatchNormReLU1d", "BatchNorm1d", (3, 4, 5), torch.contiguous_format,
     {"momentum": None}),
    ("relu-2d", "BatchNormReLU2d", "BatchNorm2d", (2, 3, 4, 5), torch.contiguous_format, {}),
    ("relu-2d-channels_last-affine-False", "BatchNormReLU2d", "BatchNorm2d", (2, 3, 4, 5), torch.channels_last,
     {"affine": False}),
    ("relu-3d-untracked", "BatchNormReLU3d", "BatchNorm3d", (2, 3, 2, 3, 4), torch.contiguous_format,
     {"track_running_stats": False}),
    ("add-relu-1d-NC-no-bias", "BatchNormAddReLU1d", "BatchNorm1d", (6, 4), torch.contiguous_format, {"bias": False}),
    ("add-relu-2d", "BatchNormAddReLU2d", "BatchNorm2d", (2, 3, 4, 5), torch.contiguous_format, {}),
    ("add-relu-2d-channels_last-momentum-None", "BatchNormAddReLU2d", "BatchNorm2d", (2, 3, 4, 5),
     torch.channels_last, {"momentum": None}),
    ("add-relu-3d-channels_last_3d", "BatchNormAddReLU3d", "BatchNorm3d", (2, 3, 2, 3, 4), torch.channels_last_3d,
     {"momentum": 0.3}),
]


def _pair(fused: str, plain: str, channels: int, kwargs: dict) -> tuple[torch.nn.Module, TorchChain]:
    """(tritonbn's fused layer, torch's chain) with the same randomised state."""
    theirs = TorchChain(torch_layer(plain, channels, **kwargs))
    _randomise(theirs.bn)
    ours = getattr(tnn, fused)(channels, **kwargs)
    ours.load_state_dict(theirs.bn.state_dict())
    return ours, theirs


@pytest.mark.parametrize("label,fused,plain,shape,memory_format,kwargs", TORCH_STYLE, ids=[c[0] for c in TORCH_STYLE])
def test_fused_layer_trains_and_evaluates_like_torchs_chain(path, label, fused, plain, shape, memory_format, kwargs):
    ours, theirs = _pair(fused, plain, shape[1], kwargs)
    assert isinstance(ours, getattr(torch.nn, plain)) and isinstance(ours, getattr(tnn, plain))
    assert list(ours.state_dict()) == list(theirs.bn.state_dict())
    with_addend = "AddReLU" in fused
    with trace.capture() as t:
        for step, training in enumerate([True, True, True, False]):
            ours.train(training), theirs.train(training)
            x = _input(shape, step, memory_format)
            addend = _addend(shape, step, memory_format) if with_addend else None
            expected = _step(theirs, x, addend, step)
            actual = _step(ours, x, addend, step)
            assert actual["y"].stride() == expected["y"].stride()
            _assert_steps_close(actual, expected, f"step {step}")
            assert (actual["y"] >= 0).all()
    assert set(t.paths) == {path}
    assert_same_state(ours, theirs.bn)


def test_fused_layer_needs_its_addend_and_checks_it(path):
    layer = tnn.BatchNormAddReLU2d(3)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError):
        layer(x)
    with pytest.raises(ValueError, match="addend"):
        layer(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="addend"):
        layer(x, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert torch.equal(layer.running_mean, torch.zeros(3))  # nothing was modified
    assert int(layer.num_batches_tracked) == 0


# ----------------------------------------------------------------------------- Gluon, Sync (local)


@pytest.mark.parametrize("kwargs,shape", [
    ({"axis": 1}, (4, 3, 5)),
    ({"axis": -1, "momentum": 0.8, "scale": False}, (4, 5, 3)),
    ({"axis": 1, "use_global_stats": True, "in_channels": 3}, (2, 3, 2, 2)),
], ids=["axis1", "axis-1-fixed-gamma", "global-stats"])
def test_gluon_fuse_relu_is_relu_of_the_plain_layer(path, kwargs, shape):
    """``BatchNorm(fuse_relu=True)`` and ``BatchNormReLU`` against relu of the plain Gluon layer
    (itself checked against MXNet's formulas in test_nn.py), lazy channels included."""
    plain = tnn.BatchNorm(**kwargs)
    plain(_input(shape, 0))
    _randomise(plain)
    fused, gluon_class = tnn.BatchNorm(fuse_relu=True, **kwargs), tnn.BatchNormReLU(**kwargs)
    for layer in (fused, gluon_class):
        layer(_input(shape, 0))
        layer.load_state_dict(plain.state_dict())
    assert "fuse_relu=True" in repr(fused) and gluon_class.fuse_relu
    reference = TorchChain(plain)
    for step, training in enumerate([True, False]):
        for layer in (fused, gluon_class, plain):
            layer.train(training)
        x = _input(shape, step + 1)
        expected = _step(reference, x, None, step)
        for name, layer in (("fuse_relu", fused), ("BatchNormReLU", gluon_class)):
            _assert_steps_close(_step(layer, x, None, step), expected, f"{name}, step {step}")


@pytest.mark.parametrize("fused,plain", [("SyncBatchNormReLU", "BatchNormReLU2d"),
                                         ("SyncBatchNormAddReLU", "BatchNormAddReLU2d")])
def test_sync_fused_layers_without_a_process_group_are_the_local_fused_layers(path, fused, plain):
    sync, local = getattr(tnn, fused)(3, momentum=None), getattr(tnn, plain)(3, momentum=None)
    _randomise(local)
    sync.load_state_dict(local.state_dict())
    assert isinstance(sync, tnn.SyncBatchNorm)
    shape = (2, 3, 4, 4)
    for step in range(2):
        addend = _addend(shape, step) if "Add" in fused else None
        x = _input(shape, step)
        _assert_steps_close(_step(sync, x, addend, step), _step(local, x, addend, step), f"step {step}")


# ----------------------------------------------------------------------------- torch.compile

# (id, layer factory, input shape, memory format, with an addend)
COMPILED = [
    ("relu-2d", lambda: tnn.BatchNormReLU2d(3), (2, 3, 4, 4), torch.contiguous_format, False),
    ("relu-1d-momentum-None", lambda: tnn.BatchNormReLU1d(3, momentum=None), (5, 3), torch.contiguous_format, False),
    ("add-relu-2d-channels_last", lambda: tnn.BatchNormAddReLU2d(3), (2, 3, 4, 4), torch.channels_last, True),
    ("add-relu-3d-momentum-None", lambda: tnn.BatchNormAddReLU3d(3, momentum=None), (2, 3, 2, 2, 3),
     torch.contiguous_format, True),
    ("sync-add-relu-local", lambda: tnn.SyncBatchNormAddReLU(3), (2, 3, 4, 4), torch.contiguous_format, True),
    ("gluon-fuse-relu-axis-1", lambda: tnn.BatchNorm(axis=-1, in_channels=3, fuse_relu=True), (4, 2, 3),
     torch.contiguous_format, False),
]


@pytest.mark.parametrize("label,factory,shape,memory_format,with_addend", COMPILED, ids=[c[0] for c in COMPILED])
def test_fused_layers_compile_fullgraph_like_eager(path, label, factory, shape, memory_format, with_addend):
    """Two training steps and an evaluation through ``torch.compile(fullgraph=True)`` (the fused
    custom op), close to the eager layer (tests below: bitwise), on both paths."""
    eager = factory()
    _randomise(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with trace.capture() as t:
        for step, training in enumerate([True, True, False]):
            eager.train(training), model.train(training)
            x = _input(shape, step, memory_format)
            addend = _addend(shape, step, memory_format) if with_addend else None
            expected = _step(eager, x, addend, step)
            actual = _step(compiled, x, addend, step)
            _assert_steps_close(actual, expected, f"step {step}")
            assert_same_state(model, eager)
    assert path in t.paths


def test_fused_layer_compiles_with_dynamic_batch_sizes():
    torch.manual_seed(0)
    eager = tnn.BatchNormAddReLU2d(3, momentum=None)
    _randomise(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for step, shape in enumerate([(3, 3, 4, 4), (5, 3, 4, 4), (4, 3, 3, 5)]):
        x, addend = _input(shape, step, torch.channels_last), _addend(shape, step)
        _assert_steps_close(_step(compiled, x, addend, step), _step(eager, x, addend, step), f"step {step}")
        assert_same_state(model, eager)


def _run_through_custom_op(layer: torch.nn.Module, monkeypatch):
    def run(*args):
        with monkeypatch.context() as patch:
            patch.setattr(library, "_runs_eagerly", lambda *a: False)
            return layer(*args)
    return run


@pytest.mark.parametrize("label,factory,shape,memory_format,with_addend", COMPILED[:4], ids=[c[0] for c in COMPILED[:4]])
def test_fused_eager_custom_op_and_compiled_are_bitwise_equal(path, monkeypatch, label, factory, shape, memory_format,
                                                              with_addend):
    """The eager layer (``ops.apply_fused_forward``), the fused custom op run eagerly and the
    compiled graph run the same kernels on the same arguments: the same bits, gradients too."""
    eager = factory()
    _randomise(eager)
    holders = {name: copy.deepcopy(eager) for name in ("custom op", "compiled")}
    runs = {"custom op": _run_through_custom_op(holders["custom op"], monkeypatch),
            "compiled": torch.compile(holders["compiled"], fullgraph=True, backend="aot_eager")}
    for step, training in enumerate([True, True, False]):
        for layer in (eager, *holders.values()):
            layer.train(training)
        x = _input(shape, step, memory_format)
        addend = _addend(shape, step, memory_format) if with_addend else None
        expected = _step(eager, x, addend, step)
        for name, run in runs.items():
            actual = _step(_Callable(run, holders[name]), x, addend, step)
            assert actual.keys() == expected.keys()
            for key, value in expected.items():
                assert actual[key].stride() == value.stride() and torch.equal(actual[key], value), \
                    f"{name}, step {step}: {key}"


class _Callable(torch.nn.Module):
    """``run`` (a layer's call through some path) with ``layer``'s parameters and buffers."""

    def __init__(self, run, layer: torch.nn.Module) -> None:
        super().__init__()
        self.run, self.layer = run, layer

    def forward(self, *args):
        return self.run(*args)


FORWARD = torch.ops.tritonbn.batch_norm_forward.default
BACKWARD = torch.ops.tritonbn.batch_norm_backward.default


@pytest.mark.parametrize("case", ["relu-train", "add-relu-train-channels_last", "add-train-average",
                                  "add-relu-infer", "relu-untracked"])
def test_opcheck_fused_forward_and_backward(path, case):
    """torch.library.opcheck of the fused custom ops (schema, fake impl against the real one,
    autograd registration); the mask is kept only where the backend keeps one."""
    gen = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if "channels_last" in case else torch.contiguous_format
    x = torch.randn(3, 4, 3, 5, generator=gen).contiguous(memory_format=memory_format).requires_grad_()
    gamma = (torch.rand(4, generator=gen) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=gen).requires_grad_()
    moving = (None, None) if "untracked" in case else (torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 1)
    addend = torch.randn(3, 4, 3, 5, generator=gen).requires_grad_() if "add" in case else None
    relu, training = "relu" in case, "train" in case or "untracked" in case
    count = torch.tensor(3) if "average" in case else None
    args = (x, gamma, beta, *moving, count, 1, 1e-5, 0.9, False, training, True, addend, relu, True)
    torch.library.opcheck(FORWARD, args)
    y, mean, invstd, center, new_mean, new_var, mask = FORWARD(*args)
    assert y.stride() == empty_like_layout(x).stride()
    backend_keeps = relu and (addend is not None or path == "reference")
    assert (mask.numel() > 0) == backend_keeps
    if relu:
        assert (y >= 0).all()
    dy = torch.randn(x.shape, generator=gen)
    backward_args = (dy, x.detach(), gamma.detach(), center, invstd, 1, False, training, mask, relu, addend is not None)
    torch.library.opcheck(BACKWARD, backward_args)
    dx, dgamma, dbeta, daddend = BACKWARD(*backward_args)
    assert dx.stride() == x.stride()
    assert daddend.shape == (x.shape if relu and addend is not None else (0,))
