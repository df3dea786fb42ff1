"""Call plans (``ops.CallPlan``): a forward or backward signature is decided once, and everything
the decisions depend on is in its key, so a changed override, store, index width or alignment
gets a new plan; and ``TRITONBN_BACKEND`` forces the dispatch."""

from __future__ import annotations

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
