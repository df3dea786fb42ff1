"""Call plans (``ops.CallPlan``): a forward or backward signature is decided once, and everything
the decisions depend on is in its key, so a changed override, store, index width or alignment
gets a new plan; and ``TRITONBN_BACKEND`` forces the dispatch."""

from __future__ import annotations

import contextlib

import pytest
import torch

import tritonbn
from tritonbn import ops, trace
from tritonbn.autotune.config import PERSISTENT_OFF, KernelConfig, override_configs
from tritonbn.plan import force_int64_indexing

C = 4


def _args(shape=(2, C, 6, 6)):
    x = torch.randn(shape)
    return x, torch.rand(C) + 0.5, torch.randn(C), torch.zeros(C), torch.ones(C)


def _kernels(x, *params, **kwargs):
    with trace.capture() as t:
        tritonbn.batch_norm(x, *params, training=True, fix_gamma=False, **kwargs)
    return t.kernels(), t.launches


@pytest.fixture(autouse=True)
def _fresh_plans():
    ops.clear_call_plans()
    yield
    ops.clear_call_plans()


def test_a_repeated_signature_reuses_its_plan():
    x, *params = _args()
    _kernels(x, *params)
    plans = dict(ops._call_plans)
    _kernels(x.clone(), *params)
    assert len(plans) == 1 and dict(ops._call_plans) == plans  # same key, same plan object


CONTEXTS = [  # (id, context manager factory, what the launches must show)
    ("split-path-override", lambda: override_configs(persistent=PERSISTENT_OFF),
     lambda kernels, launches: kernels[0] == "channel_major_stats"),
    ("forced-elementwise-config", lambda: override_configs(persistent=PERSISTENT_OFF,
                                                           elementwise=KernelConfig(2, 8, num_warps=1)),
     lambda kernels, launches: launches[-1].config == KernelConfig(2, 8, num_warps=1)),
    ("int64-indexing", lambda: force_int64_indexing(),
     lambda kernels, launches: all(launch.flags["INT64"] for launch in launches)),
]


@pytest.mark.parametrize("make_context,check", [c[1:] for c in CONTEXTS], ids=[c[0] for c in CONTEXTS])
def test_a_changed_decision_context_gets_a_new_plan(make_context, check):
    x, *params = _args()
    before, _ = _kernels(x, *params)
    assert before == ["channel_major_persistent_forward"]
    with make_context():
        kernels, launches = _kernels(x, *params)
    assert check(kernels, launches)
    assert _kernels(x, *params)[0] == before  # and the old plan again outside the context
    assert len(ops._call_plans) == 2


def test_pointer_alignment_is_part_of_the_key():
    x, *params = _args()
    _kernels(x, *params)
    shifted = torch.randn(2 * C * 36 + 1)[1:].view(2, C, 6, 6)  # 4 bytes past an aligned start
    assert shifted.data_ptr() % 16 != 0
    _kernels(shifted, *params)
    assert len(ops._call_plans) == 2


BACKENDS = [("auto", "triton"), ("triton", "triton"), ("reference", "reference")]


@pytest.mark.parametrize("forced,path", BACKENDS, ids=[f"{f}->{p}" for f, p in BACKENDS])
def test_backend_environment_forces_the_dispatch(monkeypatch, forced, path):
    monkeypatch.setenv(ops.BACKEND_ENV, forced)
    x, *params = _args()
    with trace.capture() as t:
        y = tritonbn.batch_norm(x, *params, training=True, fix_gamma=False)
    assert t.path == path
    assert ops.backend_for(x.device).name == path
    assert torch.isfinite(y).all()


def test_backend_environment_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "cudnn")
    with pytest.raises(ValueError, match="TRITONBN_BACKEND must be auto, triton or reference"):
        ops.backend_for(torch.device("cpu"))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        ops.backend_for(torch.device("cpu"))


# ----------------------------------------------------------------------------- op entries
#
# ``ops.op_entry``: a repeated call of ``batch_norm`` finds its settings, backend and plan under
# one key, without validate, backend_for or the backend's own plan lookup.


def _entry_of(x, *params, **kwargs):
    tritonbn.batch_norm(x, *params, training=True, fix_gamma=False, **kwargs)
    return list(ops._op_entries.values())[-1]


def test_a_repeated_call_runs_its_op_entry(monkeypatch):
    x, *params = _args()
    entry = _entry_of(x, *params)
    assert entry.backend is ops._TRITON and entry.call in ops._call_plans.values()

    def no_checks(*args, **kwargs):
        raise AssertionError("a repeated call ran validate")

    monkeypatch.setattr(ops, "validate", no_checks)
    kernels, _ = _kernels(x.clone(), *params)
    assert kernels == ["channel_major_persistent_forward"] and len(ops._op_entries) == 1


def _strided(t):
    return torch.stack([t, t], 1)[:, 0]



NO_CONTEXT = contextlib.nullcontext


def _unaligned(x):
    return torch.randn(x.numel() + 1)[1:].view(x.shape)


ENTRY_CHANGES = [  # (id, the second call: (x, params) -> (x, params, context, kwargs), whether it runs a plan directly)
    ("override", lambda x, p: (x, p, override_configs(persistent=PERSISTENT_OFF), {}), True),
    ("int64-indexing", lambda x, p: (x, p, force_int64_indexing(), {}), True),
    ("unaligned-data", lambda x, p: (_unaligned(x), p, NO_CONTEXT(), {}), True),
    ("strided-gamma", lambda x, p: (x, [_strided(p[0]), *p[1:]], NO_CONTEXT(), {}), False),
    ("host-momentum", lambda x, p: (x, p, NO_CONTEXT(), {"momentum": 1.5}), False),
]


@pytest.mark.parametrize("change,direct", [c[1:] for c in ENTRY_CHANGES], ids=[c[0] for c in ENTRY_CHANGES])
def test_what_the_plan_depends_on_gets_a_new_op_entry(change, direct):
    """Each change the plan depends on beyond validation's signature is in the entry's key; where
    the backend must decide per call (strided parameters, a host-side moving update) the entry
    holds no plan; and y is bitwise what a call without entries gives."""
    x, *params = _args()
    _entry_of(x, *params)
    x2, params2, context, kwargs = change(x, params)
    with context:
        entry = _entry_of(x2, *params2, **kwargs)
        assert len(ops._op_entries) == 2
        assert (entry.call is not None) == direct
        repeat = tritonbn.batch_norm(x2, *params2, training=True, fix_gamma=False, **kwargs)
        ops._op_entries.clear()
        fresh = tritonbn.batch_norm(x2, *params2, training=True, fix_gamma=False, **kwargs)
    assert torch.equal(repeat, fresh)


@pytest.mark.parametrize("output_mean_var", [False, True], ids=["y-only", "output-mean-var"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_unrequested_statistics_change_nothing_but_allocations(output_mean_var, grad):
    """Split path: without output_mean_var the mean goes to scratch (autograd keeps invstd and the
    center; without autograd the coefficients come from the per-stream workspace): y, the moving
    statistics and the gradients are bitwise those of a call that returns every statistic."""
    x, gamma, beta, mm, mv = _args((2, C, 6, 6))

    def run(keep):
        xs, g = x.clone().requires_grad_(grad), gamma.clone().requires_grad_(grad)
        stats = (mm.clone(), mv.clone())
        with override_configs(persistent=PERSISTENT_OFF), trace.capture() as t:
            out = tritonbn.batch_norm(xs, g, beta, *stats, training=True, fix_gamma=False, output_mean_var=keep)
        y = out[0] if keep else out
        assert t.kernels()[0] == "channel_major_stats"
        grads = torch.autograd.grad(y, (xs, g), torch.ones_like(y)) if grad else ()
        return (y, *stats, *grads), out

    got, out = run(output_mean_var)
    want, full = run(True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if output_mean_var:
        assert torch.equal(out[1], full[1]) and torch.equal(out[2], full[2])
