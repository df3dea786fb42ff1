"""torch.compile and torch.library: the custom ops, opcheck, fullgraph compilation of every layer
configuration (forward, backward, buffers) against torch's eager modules, dynamic shapes,
channels_last, autocast, one run through Inductor, and the eager path (no custom op) bitwise
against the compiled layer, the custom op run eagerly and the functional op."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional

import pytest
import torch

import tritonbn
from tritonbn import library
from tritonbn import nn as tnn
from tritonbn import trace
from tritonbn.plan import empty_like_layout, layout_strides
from helpers import apply_layout
from test_nn import ConvNet, F32_TOL, OpLog, _batch_norms, _input, _randomise, assert_same_state, torch_layer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (shared forward code objects would pile up guards)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- opcheck

FORWARD = torch.ops.tritonbn.batch_norm_forward.default
BACKWARD = torch.ops.tritonbn.batch_norm_backward.default


def _op_inputs(shape=(3, 4, 3, 5), memory_format=torch.contiguous_format, requires_grad=True, axis=1):
    gen = torch.Generator().manual_seed(0)
    channels = shape[axis]
    x = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    gamma = (torch.rand(channels, generator=gen) + 0.5).requires_grad_(requires_grad)
    beta = torch.randn(channels, generator=gen).requires_grad_(requires_grad)
    return x, gamma, beta, torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5


@pytest.mark.parametrize("case", ["train", "train-channels_last", "train-untracked", "train-average",
                                  "infer-channels_last", "infer-fixgamma-axis-1"])
def test_opcheck_forward(path, case):
    memory_format = torch.channels_last if "channels_last" in case else torch.contiguous_format
    axis = 3 if "axis-1" in case else 1
    x, gamma, beta, mm, mv = _op_inputs(memory_format=memory_format, axis=axis)
    if "untracked" in case:
        mm = mv = None
    count = torch.tensor(3) if "average" in case else None
    args = (x, gamma, beta, mm, mv, count, axis, 1e-5, 0.9, "fixgamma" in case, case.startswith("train"), True)
    torch.library.opcheck(FORWARD, args)
    with trace.capture() as t:
        y, mean, invstd, center, new_mean, new_var, mask = FORWARD(*args)
    assert mask.numel() == 0  # no ReLU: no mask
    assert t.path == path
    assert y.stride() == empty_like_layout(x).stride()
    if mm is not None:  # functional: the inputs are untouched, the update is returned
        assert (not torch.equal(new_mean, mm)) == case.startswith("train")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "infer"])
def test_opcheck_backward(path, batch_stats):
    x, gamma, *_ = _op_inputs(memory_format=torch.channels_last, requires_grad=False)
    dy = torch.randn(x.shape)  # contiguous while x is channels_last
    center = torch.stack([torch.randn(4), torch.zeros(4)])
    args = (dy, x, gamma, center, torch.rand(4) + 0.5, 1, False, batch_stats)
    torch.library.opcheck(BACKWARD, args)
    dx, _, _, daddend = BACKWARD(*args)
    assert daddend.numel() == 0  # not fused: no addend gradient
    assert dx.stride() == x.stride()


# ----------------------------------------------------------------------------- fullgraph compile

# (label, factory of (torch layer or None, tritonbn layer), input shape, memory format)
LAYERS = [
    ("2d", lambda: (torch.nn.BatchNorm2d(3), tnn.BatchNorm2d(3)), (2, 3, 4, 4), torch.contiguous_format),
    ("2d-momentum-None-channels_last",
     lambda: (torch.nn.BatchNorm2d(3, momentum=None), tnn.BatchNorm2d(3, momentum=None)),
     (2, 3, 4, 4), torch.channels_last),
    ("2d-affine-False-momentum-None", lambda: (torch.nn.BatchNorm2d(3, affine=False, momentum=None),
                                               tnn.BatchNorm2d(3, affine=False, momentum=None)),
     (2, 3, 4, 4), torch.contiguous_format),
    ("2d-untracked-no-bias", lambda: (torch_layer("BatchNorm2d", 3, track_running_stats=False, bias=False),
                                      tnn.BatchNorm2d(3, track_running_stats=False, bias=False)),
     (2, 3, 4, 4), torch.contiguous_format),
    ("1d", lambda: (torch.nn.BatchNorm1d(3, momentum=0.3), tnn.BatchNorm1d(3, momentum=0.3)),
     (5, 3), torch.contiguous_format),
    ("3d-channels_last_3d", lambda: (torch.nn.BatchNorm3d(3), tnn.BatchNorm3d(3)),
     (2, 3, 2, 2, 3), torch.channels_last_3d),
    ("sync-local", lambda: (torch.nn.BatchNorm2d(3, momentum=None), tnn.SyncBatchNorm(3, momentum=None)),
     (2, 3, 4, 4), torch.contiguous_format),
    ("gluon-axis-1", lambda: (None, tnn.BatchNorm(axis=-1, in_channels=3)), (4, 2, 3), torch.contiguous_format),
    ("gluon-fixed", lambda: (None, tnn.BatchNorm(scale=False, center=False, in_channels=3)),
     (4, 3, 2), torch.contiguous_format),
]


def _check_compiled_against(eager, model, shapes, memory_format, steps=2):
    """Train ``steps`` steps then evaluate, compiled ``model`` against ``eager``: outputs, grads, state."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step, shape in enumerate(shapes * steps):
        x = _input(shape, step, memory_format)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        assert yc.stride() == ye.stride()
        torch.testing.assert_close(yc, ye, **F32_TOL)
        (ye * ye).sum().backward()
        (yc * yc).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, **F32_TOL)
        for (name, pc), pe in zip(model.named_parameters(), eager.parameters()):
            if pe.grad is not None or pc.grad is not None:
                torch.testing.assert_close(pc.grad, pe.grad, msg=lambda m, n=name: f"grad {n}: {m}", **F32_TOL)
        assert_same_state(model, eager)
    eager.eval(), model.eval()
    x = _input(shapes[0], 99, memory_format)
    torch.testing.assert_close(compiled(x), eager(x), **F32_TOL)


@pytest.mark.parametrize("label,factory,shape,memory_format", LAYERS, ids=[c[0] for c in LAYERS])
def test_fullgraph_compile_matches_eager(path, label, factory, shape, memory_format):
    theirs, ours = factory()
    _randomise(ours)
    if theirs is not None:
        theirs.load_state_dict(ours.state_dict())
    else:  # the Gluon layer: its own eager run is the reference
        theirs = copy.deepcopy(ours)
    with trace.capture() as t:
        _check_compiled_against(theirs, ours, [shape], memory_format)
    assert path in t.paths


def test_fullgraph_compile_dynamic_batch_sizes():
    """Symbolic shapes through the fake impls (interpreted kernels at run time)."""
    torch.manual_seed(0)
    model = tritonbn.convert(ConvNet())
    eager = copy.deepcopy(model)
    shapes = [(3, 3, 4, 4), (5, 3, 4, 4), (4, 3, 3, 5)]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for step, shape in enumerate(shapes):
        x = _input(shape, step, torch.channels_last)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.square().sum().backward(), yc.square().sum().backward()
        torch.testing.assert_close(yc, ye, **F32_TOL)
        torch.testing.assert_close(xc.grad, xe.grad, **F32_TOL)
        assert_same_state(model, eager)


def test_fullgraph_compile_under_autocast():
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ours = tritonbn.convert(copy.deepcopy(theirs))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_theirs = compiled(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), atol=3e-2, rtol=3e-2)
    y_ours.float().sum().backward()
    assert ours[1].weight.grad is not None and ours[0].weight.grad.dtype == torch.float32


def test_inductor_convnet_channels_last():
    """The default backend (Inductor) on a converted net: forward, backward, buffers, eval."""
    torch.manual_seed(0)
    theirs = ConvNet()
    for bn in _batch_norms(theirs):
        _randomise(bn)
    ours = tritonbn.convert(copy.deepcopy(theirs))
    compiled = torch.compile(ours, fullgraph=True)
    for step in range(2):
        x = _input((4, 3, 5, 5), step, torch.channels_last)
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yo = theirs(xt), compiled(xo)
        yt.square().sum().backward(), yo.square().sum().backward()
        torch.testing.assert_close(yo, yt, **F32_TOL)
        torch.testing.assert_close(xo.grad, xt.grad, **F32_TOL)
        for (name, po), pt in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(po.grad, pt.grad, msg=lambda m, n=name: f"grad {n}: {m}", **F32_TOL)
        assert_same_state(ours, theirs)
    ours.eval(), theirs.eval()
    x = _input((2, 3, 5, 5), 5, torch.channels_last)
    torch.testing.assert_close(compiled(x), theirs(x), **F32_TOL)


# ----------------------------------------------------------------------------- eager path, bitwise


def _functional(layer: torch.nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``layer``'s forward as one ``tritonbn.batch_norm`` call on ``layer``'s own tensors, or None
    where the functional op has no equivalent (the cumulative average of ``momentum=None``)."""
    if isinstance(layer, tnn.BatchNorm):
        def gluon(x):
            beta = layer.beta if layer.center else torch.zeros_like(layer.beta)
            return tritonbn.batch_norm(x, layer.gamma, beta, layer.running_mean, layer.running_var,
                                       eps=layer.epsilon, momentum=layer.momentum, fix_gamma=not layer.scale,
                                       use_global_stats=layer.use_global_stats, axis=layer.axis,
                                       training=layer.training)
        return gluon
    if layer.momentum is None:
        return None

    def torch_style(x):
        channels, tracked = layer.num_features, layer.track_running_stats
        gamma = layer.weight if layer.weight is not None else torch.ones(channels)
        beta = layer.bias if layer.bias is not None else torch.zeros(channels)
        moving = (layer.running_mean, layer.running_var) if tracked else (torch.zeros(channels), torch.ones(channels))
        return tritonbn.batch_norm(x, gamma, beta, *moving, eps=layer.eps, momentum=1.0 - layer.momentum,
                                   fix_gamma=layer.weight is None, training=layer.training or not tracked,
                                   unbiased_update=tracked)
    return torch_style


def _custom_op_eagerly(layer: torch.nn.Module, monkeypatch) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer`` through ``tritonbn::batch_norm_forward`` in eager mode (the path before the eager
    one; what a compiled graph runs)."""
    def run(x):
        with monkeypatch.context() as patch:
            patch.setattr(library, "_runs_eagerly", lambda *args: False)
            return layer(x)
    return run


def _step(run: Callable[[torch.Tensor], torch.Tensor], holder: torch.nn.Module, x: torch.Tensor,
          autocast: bool) -> dict[str, torch.Tensor]:
    """One forward/backward: y, the input's and every parameter's gradient, every float buffer."""
    x = x.clone().requires_grad_()
    holder.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        y = run(x)
    (y.float() * y.float()).sum().backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out |= {f"{name}.grad": p.grad for name, p in holder.named_parameters() if p.grad is not None}
    out |= {name: b.clone() for name, b in holder.named_buffers() if b.is_floating_point()}
    return out


def _assert_bitwise(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert actual[key].stride() == value.stride() and torch.equal(actual[key], value), f"{what}: {key}"


# (id, layer factory, input shape, memory format, under autocast)
BITWISE = [
    ("2d-momentum-0.1", lambda: tnn.BatchNorm2d(3), (2, 3, 4, 4), "contiguous", False),
    ("2d-momentum-None-channels_last", lambda: tnn.BatchNorm2d(3, momentum=None), (2, 3, 4, 4), "channels_last",
     False),
    ("1d-affine-False-momentum-0.3", lambda: tnn.BatchNorm1d(3, affine=False, momentum=0.3), (4, 3, 5),
     "contiguous", False),
    ("3d-untracked", lambda: tnn.BatchNorm3d(3, track_running_stats=False), (2, 3, 2, 2, 3), "stepped", False),
    ("gluon-axis-1", lambda: tnn.BatchNorm(axis=-1, in_channels=3, momentum=0.8), (4, 5, 3), "permuted", False),
    ("2d-autocast-bfloat16", lambda: tnn.BatchNorm2d(3, momentum=None), (2, 3, 4, 4), "contiguous", True),
]


@pytest.mark.parametrize("label,factory,shape,layout,autocast", BITWISE, ids=[b[0] for b in BITWISE])
def test_eager_matches_compiled_custom_op_and_functional_bitwise(path, monkeypatch, label, factory, shape, layout,
                                                                  autocast):
    """Two training steps and one evaluation: the eager layer, the compiled one (fullgraph), the
    custom op run eagerly and (float momentum) ``tritonbn.batch_norm`` give the same bits."""
    eager = factory()
    _randomise(eager)
    if getattr(eager, "num_batches_tracked", None) is not None:
        eager.num_batches_tracked.fill_(6)  # cumulative average factors 1/7, 1/8: inexact in binary
    holders = {name: copy.deepcopy(eager) for name in ("compiled", "custom op", "functional")}
    runs = {"compiled": torch.compile(holders["compiled"], fullgraph=True, backend="aot_eager"),
            "custom op": _custom_op_eagerly(holders["custom op"], monkeypatch),
            "functional": _functional(holders["functional"])}
    for step, training in enumerate([True, True, False]):
        for layer in (eager, *holders.values()):
            layer.train(training)
        x = apply_layout(_input(shape, step), layout, -1 if "axis-1" in label else 1)
        expected = _step(eager, eager, x, autocast)
        for name, run in runs.items():
            if run is None:
                continue
            actual = _step(run, holders[name], x, autocast)
            if name == "functional":  # it counts no batches
                expected_here = {k: v for k, v in expected.items() if k in actual}
                _assert_bitwise(actual, expected_here, f"{name}, step {step}")
            else:
                _assert_bitwise(actual, expected, f"{name}, step {step}")


# (id, tensor factory): dense and non-dense layouts, size-1 dimensions with arbitrary strides
LAYOUTS = [
    ("contiguous", lambda: torch.empty(2, 3, 4, 5)),
    ("channels_last", lambda: torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),
    ("channels_last_3d", lambda: torch.empty(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d)),
    ("permuted", lambda: torch.empty(5, 4, 3, 2).permute(3, 2, 1, 0)),
    ("sliced", lambda: torch.empty(2, 3, 4, 11)[..., 1::2]),
    ("stepped-rank-6", lambda: torch.empty(3, 3, 3, 3, 3, 3)[::2, :, ::2, ::2, ::2, ::2]),
    ("expanded", lambda: torch.empty(3, 1, 5).expand(3, 4, 5)),
    ("size-1-odd-strides", lambda: torch.empty_strided((2, 1, 3, 1), (3, 7, 1, 100))),
    ("transposed-sliced", lambda: torch.empty(6, 8).t()[::2]),
]


@pytest.mark.parametrize("label,make", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_layout_strides_are_empty_like_layouts_without_allocating(label, make):
    t = make()
    with OpLog() as log:
        strides = layout_strides(tuple(t.shape), t.stride())
    assert log.ops == []  # no tensor made, not even a meta one
    assert strides == empty_like_layout(t).stride()
