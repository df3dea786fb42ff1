"""SPEC.md "Bad input" and "Dtypes": every bad call raises before anything runs or is written.

Each row of ``BAD_CALLS`` turns a good training call (which, unmutated, launches kernels and
updates the moving statistics in place) into a bad one.  For every row, on both paths:

* the exception type is the expected ``TypeError`` / ``ValueError``;
* the message names the argument (``match=``), and that argument is the first one it names;
* no kernel was launched (``tritonbn.trace``);
* nothing was modified: data, gamma, beta, moving_mean, moving_var and out (and the base of any
  view among them) are bitwise equal to clones taken before the call (NaN and -0.0 safe).

``ACCEPTED_CALLS`` are the boundaries that must still work (eps = 0, momentum 0 and 1,
axis = -ndim, half data with half or float32 parameters, ``out=``, ...); their results are
checked against the SPEC formulas in float64.

Last, ``validation.validate``'s signature cache (issue 13): after a good call cached its
signature, every value-dependent bad call still raises exactly what it raises on an empty cache,
other values get their own Settings, calls a key cannot describe are never cached, and the cache
is bounded, holds no tensor and is bypassed while Dynamo traces.
"""

from __future__ import annotations

import gc
import re
import weakref
from typing import Callable

import numpy as np
import pytest
import torch

import tritonbn
from helpers import TOLERANCES, assert_close, make_inputs
from tritonbn import ops, validation
from tritonbn.validation import Settings

SHAPE = (2, 3, 4)
AXIS = 1
C = SHAPE[AXIS]
PARAMS = ("gamma", "beta", "moving_mean", "moving_var")
ARG_NAMES = (
    "data", "gamma", "beta", "moving_mean", "moving_var", "eps", "momentum", "fix_gamma",
    "use_global_stats", "output_mean_var", "axis", "cudnn_off", "out", "training", "unbiased_update",
)
_ARG_RE = re.compile(r"\b(" + "|".join(sorted(ARG_NAMES, key=len, reverse=True)) + r")\b")

Mutation = Callable[[dict], None]


# ----------------------------------------------------------------------------- building calls


def good_kwargs(
    shape: tuple[int, ...] = SHAPE,
    axis: int = AXIS,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype | None = None,
) -> dict:
    """A valid training call that uses gamma and updates the moving statistics."""
    inputs = make_inputs(shape, axis, dtype, param_dtype=param_dtype)
    return dict(
        data=inputs.x, gamma=inputs.gamma, beta=inputs.beta,
        moving_mean=inputs.moving_mean, moving_var=inputs.moving_var,
        eps=1e-3, momentum=0.9, fix_gamma=False, axis=axis, training=True,
    )


def set_(**changes) -> Mutation:
    """Set keyword arguments to fixed values."""
    return lambda kw: kw.update(changes)


def with_(name: str, fn: Callable) -> Mutation:
    """Replace ``kw[name]`` by ``fn(kw[name], kw)``."""
    def mutate(kw: dict) -> None:
        kw[name] = fn(kw.get(name), kw)
    return mutate


def rebuild(shape, axis, dtype=torch.float32, param_dtype=None, **changes) -> Mutation:
    """Fresh tensors of another shape/axis/dtype (parameters of the matching length)."""
    def mutate(kw: dict) -> None:
        kw.update(good_kwargs(shape, axis, dtype, param_dtype))
        kw.update(changes)
    return mutate


def chain(*mutations: Mutation) -> Mutation:
    def mutate(kw: dict) -> None:
        for m in mutations:
            m(kw)
    return mutate


def one_param_dtype(data_dtype, name, bad_dtype) -> Mutation:
    """Data of ``data_dtype`` with valid parameters, except ``name`` in ``bad_dtype``."""
    good = torch.float64 if data_dtype == torch.float64 else torch.float32
    return chain(rebuild(SHAPE, AXIS, data_dtype, good), with_(name, lambda t, kw: t.to(bad_dtype)))


def overlapping_out(kw: dict) -> None:
    """data and out: two (2, 3, 4) windows of one (3, 3, 4) buffer that share a (1, 3, 4) slab."""
    big = torch.randn(3, *SHAPE[1:])
    kw["data"], kw["out"] = big[:2], big[1:]


def grad_leaf(name: str) -> Mutation:
    return with_(name, lambda t, kw: t.detach().clone().requires_grad_(True))


# ----------------------------------------------------------------------------- the bad calls


def _bad(mutate: Mutation, exc: type[Exception], name: str, id_: str):
    return pytest.param(mutate, exc, name, id=id_)


def _param_rows():
    for n in PARAMS:
        yield _bad(with_(n, lambda t, kw: t[: C - 1]), ValueError, n, f"{n}-too-short")
        yield _bad(with_(n, lambda t, kw: torch.cat([t, t[:1]])), ValueError, n, f"{n}-too-long")
        yield _bad(with_(n, lambda t, kw: torch.empty(0, dtype=t.dtype)), ValueError, n, f"{n}-empty")
        yield _bad(with_(n, lambda t, kw: t.reshape(1, C)), ValueError, n, f"{n}-2d-1xC")
        yield _bad(with_(n, lambda t, kw: t.reshape(C, 1)), ValueError, n, f"{n}-2d-Cx1")
        yield _bad(with_(n, lambda t, kw: t[0]), ValueError, n, f"{n}-0d")
        yield _bad(with_(n, lambda t, kw: t.double()), TypeError, n, f"{n}-float64-with-float32-data")
        yield _bad(with_(n, lambda t, kw: t.half()), TypeError, n, f"{n}-float16-with-float32-data")
        yield _bad(with_(n, lambda t, kw: t.bfloat16()), TypeError, n, f"{n}-bfloat16-with-float32-data")
        yield _bad(with_(n, lambda t, kw: t.to(torch.int32)), TypeError, n, f"{n}-int32")
        yield _bad(with_(n, lambda t, kw: t.to(torch.int64)), TypeError, n, f"{n}-int64")
        yield _bad(with_(n, lambda t, kw: t > 0), TypeError, n, f"{n}-bool")
        yield _bad(with_(n, lambda t, kw: t.to(torch.complex64)), TypeError, n, f"{n}-complex64")
        yield _bad(one_param_dtype(torch.float16, n, torch.bfloat16), TypeError, n, f"{n}-bfloat16-with-float16-data")
        yield _bad(one_param_dtype(torch.bfloat16, n, torch.float16), TypeError, n, f"{n}-float16-with-bfloat16-data")
        yield _bad(one_param_dtype(torch.float16, n, torch.float64), TypeError, n, f"{n}-float64-with-float16-data")
        yield _bad(one_param_dtype(torch.float64, n, torch.float32), TypeError, n, f"{n}-float32-with-float64-data")
        yield _bad(with_(n, lambda t, kw: t.tolist()), TypeError, n, f"{n}-list")
        yield _bad(with_(n, lambda t, kw: t.numpy()), TypeError, n, f"{n}-numpy")
        yield _bad(set_(**{n: None}), TypeError, n, f"{n}-None")
        yield _bad(with_(n, lambda t, kw: torch.empty(C, dtype=t.dtype, device="meta")), ValueError, n,
                   f"{n}-on-meta-device")


BAD_CALLS = [
    # axis
    _bad(set_(axis=3), ValueError, "axis", "axis-equals-ndim"),
    _bad(set_(axis=10), ValueError, "axis", "axis-far-too-large"),
    _bad(set_(axis=-4), ValueError, "axis", "axis-below-minus-ndim"),
    _bad(set_(axis=-10), ValueError, "axis", "axis-far-too-negative"),
    _bad(chain(rebuild((5,), 0), set_(axis=1)), ValueError, "axis", "axis-1-on-1d-data"),
    _bad(set_(axis=1.0), TypeError, "axis", "axis-float"),
    _bad(set_(axis=True), TypeError, "axis", "axis-bool-true"),
    _bad(set_(axis=False), TypeError, "axis", "axis-bool-false"),
    _bad(set_(axis="1"), TypeError, "axis", "axis-str"),
    _bad(set_(axis=None), TypeError, "axis", "axis-None"),
    # data
    _bad(with_("data", lambda t, kw: t.tolist()), TypeError, "data", "data-list"),
    _bad(with_("data", lambda t, kw: t.numpy()), TypeError, "data", "data-numpy"),
    _bad(set_(data=None), TypeError, "data", "data-None"),
    _bad(with_("data", lambda t, kw: t.to(torch.int32)), TypeError, "data", "data-int32"),
    _bad(with_("data", lambda t, kw: t.to(torch.int64)), TypeError, "data", "data-int64"),
    _bad(with_("data", lambda t, kw: t.to(torch.uint8)), TypeError, "data", "data-uint8"),
    _bad(with_("data", lambda t, kw: t > 0), TypeError, "data", "data-bool"),
    _bad(with_("data", lambda t, kw: t.to(torch.complex64)), TypeError, "data", "data-complex64"),
    _bad(with_("data", lambda t, kw: t.to(torch.complex128)), TypeError, "data", "data-complex128"),
    _bad(set_(data=torch.tensor(1.5), axis=0), ValueError, "data", "data-0d"),
    _bad(set_(data=torch.tensor(1.5), axis=-1), ValueError, "data", "data-0d-axis-minus-1"),
    # gamma / beta / moving_mean / moving_var: length, rank, dtype, kind, device
    *_param_rows(),
    # eps
    _bad(set_(eps=float("nan")), ValueError, "eps", "eps-nan"),
    _bad(set_(eps=float("inf")), ValueError, "eps", "eps-inf"),
    _bad(set_(eps=float("-inf")), ValueError, "eps", "eps-minus-inf"),
    _bad(set_(eps=-1e-5), ValueError, "eps", "eps-negative"),
    _bad(set_(eps=-1), ValueError, "eps", "eps-negative-int"),
    _bad(set_(eps=np.float32("nan")), ValueError, "eps", "eps-numpy-nan"),
    _bad(set_(eps="1e-3"), TypeError, "eps", "eps-str"),
    _bad(set_(eps=None), TypeError, "eps", "eps-None"),
    _bad(set_(eps=1e-3 + 0j), TypeError, "eps", "eps-complex"),
    _bad(set_(eps=True), TypeError, "eps", "eps-bool"),
    # momentum
    _bad(set_(momentum=float("nan")), ValueError, "momentum", "momentum-nan"),
    _bad(set_(momentum=float("inf")), ValueError, "momentum", "momentum-inf"),
    _bad(set_(momentum=float("-inf")), ValueError, "momentum", "momentum-minus-inf"),
    _bad(set_(momentum="0.9"), TypeError, "momentum", "momentum-str"),
    _bad(set_(momentum=None), TypeError, "momentum", "momentum-None"),
    _bad(set_(momentum=True), TypeError, "momentum", "momentum-bool"),
    # out
    _bad(set_(out=torch.empty(2, 3, 5)), ValueError, "out", "out-wrong-shape"),
    _bad(set_(out=torch.empty(24)), ValueError, "out", "out-flat-same-numel"),
    _bad(set_(out=torch.empty(4, 3, 2)), ValueError, "out", "out-permuted-shape"),
    _bad(set_(out=torch.empty(SHAPE, dtype=torch.float64)), TypeError, "out", "out-float64-for-float32-data"),
    _bad(set_(out=torch.empty(SHAPE, dtype=torch.float16)), TypeError, "out", "out-float16-for-float32-data"),
    _bad(chain(rebuild(SHAPE, AXIS, torch.float16), set_(out=torch.empty(SHAPE))), TypeError, "out",
         "out-float32-for-float16-data"),
    _bad(set_(out=torch.empty(SHAPE, dtype=torch.int32)), TypeError, "out", "out-int32"),
    _bad(set_(out=torch.empty(SHAPE, device="meta")), ValueError, "out", "out-on-meta-device"),
    _bad(with_("out", lambda t, kw: kw["data"]), ValueError, "out", "out-is-data"),
    _bad(with_("out", lambda t, kw: kw["data"][:]), ValueError, "out", "out-full-view-of-data"),
    _bad(with_("out", lambda t, kw: kw["data"].view(SHAPE)), ValueError, "out", "out-view-of-data"),
    _bad(overlapping_out, ValueError, "out", "out-partially-overlaps-data"),
    _bad(set_(out=torch.empty(1, C, 1).expand(SHAPE)), ValueError, "out", "out-expanded-elements-share-memory"),
    _bad(with_("moving_mean", lambda t, kw: t[:1].expand(C)), ValueError, "moving_mean", "moving_mean-expanded"),
    _bad(with_("moving_var", lambda t, kw: t[:1].expand(C)), ValueError, "moving_var", "moving_var-expanded"),
    _bad(with_("out", lambda t, kw: kw["data"].tolist()), TypeError, "out", "out-list"),
    _bad(with_("out", lambda t, kw: kw["data"].numpy().copy()), TypeError, "out", "out-numpy"),
    _bad(chain(set_(out=torch.empty(SHAPE)), grad_leaf("data")), ValueError, "out", "out-with-data-requiring-grad"),
    _bad(chain(set_(out=torch.empty(SHAPE)), grad_leaf("gamma")), ValueError, "out", "out-with-gamma-requiring-grad"),
    _bad(chain(set_(out=torch.empty(SHAPE)), grad_leaf("beta")), ValueError, "out", "out-with-beta-requiring-grad"),
    # no elements per channel in training; unbiased update with one element per channel
    _bad(rebuild((0, 3), 1), ValueError, "data", "m0-training-shape-0x3"),
    _bad(rebuild((0, 3), -1), ValueError, "data", "m0-training-axis-minus-1"),
    _bad(rebuild((2, 3, 0), 1), ValueError, "data", "m0-training-trailing-zero"),
    _bad(rebuild((0, 3, 4), 1, fix_gamma=True), ValueError, "data", "m0-training-fix-gamma"),
    _bad(rebuild((1, 3), 1, unbiased_update=True), ValueError, "unbiased_update", "unbiased-m1-shape-1x3"),
    _bad(rebuild((1, 3, 1), 1, unbiased_update=True), ValueError, "unbiased_update", "unbiased-m1-shape-1x3x1"),
    _bad(rebuild((3,), 0, unbiased_update=True), ValueError, "unbiased_update", "unbiased-m1-1d-data"),
]


# ----------------------------------------------------------------------------- snapshots


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as raw bytes in logical order (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(kw: dict) -> list[tuple[str, torch.Tensor, torch.Tensor | None, tuple, tuple]]:
    """(name, tensor, clone, shape, stride) for every tensor argument and the base of every view."""
    snaps = []
    for name, value in kw.items():
        if not isinstance(value, torch.Tensor):
            continue
        tensors = [(name, value)]
        if value._base is not None:
            tensors.append((f"{name}._base", value._base))
        for label, t in tensors:
            clone = None if t.is_meta else t.detach().clone()
            snaps.append((label, t, clone, tuple(t.shape), t.stride()))
    return snaps


def assert_unchanged(snaps) -> None:
    for label, t, clone, shape, stride in snaps:
        assert tuple(t.shape) == shape and t.stride() == stride, f"{label}: shape/stride changed"
        if clone is not None:
            assert torch.equal(_bits(t), _bits(clone)), f"{label} was modified by a call that raised"


def first_named_argument(message: str) -> str | None:
    found = _ARG_RE.search(message)
    return found.group(1) if found else None


# ----------------------------------------------------------------------------- tests


def test_unmutated_call_runs_and_updates_moving_stats(path):
    """The rows below mutate this call, so it must run and write (else 'nothing changed' is vacuous)."""
    kw = good_kwargs()
    before = snapshot(kw)
    with tritonbn.trace.capture() as t:
        y = tritonbn.batch_norm(**kw)
    assert t.path == path
    assert y.shape == SHAPE
    assert not torch.equal(kw["moving_mean"], dict((s[0], s[2]) for s in before)["moving_mean"])
    if path == "triton":
        assert t.launches, "the Triton path launched no kernel"


@pytest.mark.parametrize("mutate, exc, name", BAD_CALLS)
def test_bad_call_raises_before_anything_runs(path, mutate, exc, name):
    kw = good_kwargs()
    mutate(kw)
    snaps = snapshot(kw)
    with tritonbn.trace.capture() as t:
        with pytest.raises(exc, match=rf"\b{name}\b") as info:
            tritonbn.batch_norm(**kw)
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    assert first_named_argument(str(info.value)) == name, f"message names another argument first: {info.value}"
    assert t.launches == [], f"kernels launched before the error: {t.kernels()}"
    assert t.copies == []
    assert_unchanged(snaps)


# ----------------------------------------------------------------------------- accepted boundaries


def expected_forward(kw: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC "Forward" in float64: (out, new moving_mean, new moving_var)."""
    x = kw["data"].detach().double()
    axis = kw.get("axis", 1) % x.dim()
    eps, momentum = float(kw.get("eps", 1e-3)), float(kw.get("momentum", 0.9))
    mm, mv = kw["moving_mean"].double(), kw["moving_var"].double()
    gamma = kw["gamma"].detach().double()
    beta = kw["beta"].detach().double()
    xc = x.movedim(axis, -1).reshape(-1, x.shape[axis])
    batch_stats = kw.get("training", False) and not kw.get("use_global_stats", False)
    if batch_stats:
        m = xc.shape[0]
        mean = xc.mean(0)
        var = ((xc - mean) ** 2).mean(0)
        invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), 1 / torch.sqrt(var + eps))
        var_upd = var * m / (m - 1) if kw.get("unbiased_update", False) else var
        new_mm = mm * momentum + mean * (1 - momentum)
        new_mv = mv * momentum + var_upd * (1 - momentum)
    else:
        mean, invstd = mm, 1 / torch.sqrt(mv + eps)
        new_mm, new_mv = mm, mv
    g = torch.ones_like(gamma) if kw.get("fix_gamma", True) else gamma
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    y = (x - mean.reshape(shape)) * (invstd * g).reshape(shape) + beta.reshape(shape)
    return y, new_mm, new_mv


def _ok(mutate: Mutation, id_: str):
    return pytest.param(mutate, id=id_)


def _disjoint_view_out(kw: dict) -> None:
    """data and out are disjoint halves of one buffer: same storage, no overlap."""
    big = torch.randn(2, *SHAPE)
    kw["data"], kw["out"] = big[0], big[1]


ACCEPTED_CALLS = [
    _ok(set_(), "baseline"),
    _ok(set_(eps=0), "eps-0-int"),
    _ok(set_(eps=0.0), "eps-0-float"),
    _ok(set_(eps=np.float32(1e-3)), "eps-numpy-float32"),
    _ok(set_(momentum=0), "momentum-0"),
    _ok(set_(momentum=1), "momentum-1"),
    _ok(set_(momentum=1.0, training=False), "momentum-1-inference"),
    _ok(rebuild(SHAPE, -3), "axis-minus-ndim"),
    _ok(rebuild(SHAPE, -1), "axis-minus-1"),
    _ok(rebuild(SHAPE, 2), "axis-ndim-minus-1"),
    _ok(rebuild((5,), 0), "1d-data-axis-0"),
    _ok(set_(axis=np.int64(1)), "axis-numpy-int"),
    _ok(rebuild(SHAPE, AXIS, torch.float16, torch.float32), "float16-data-float32-params"),
    _ok(rebuild(SHAPE, AXIS, torch.float16, torch.float16), "float16-data-float16-params"),
    _ok(rebuild(SHAPE, AXIS, torch.bfloat16, torch.bfloat16), "bfloat16-data-bfloat16-params"),
    _ok(rebuild(SHAPE, AXIS, torch.bfloat16, torch.float32), "bfloat16-data-float32-params"),
    _ok(rebuild(SHAPE, AXIS, torch.float64, torch.float64), "float64-data-float64-params"),
    _ok(chain(rebuild(SHAPE, AXIS, torch.float16, torch.float32),
              with_("gamma", lambda t, kw: t.half())), "float16-data-mixed-float16-float32-params"),
    _ok(set_(cudnn_off=True), "cudnn_off-true"),
    _ok(set_(cudnn_off=True, training=False), "cudnn_off-true-inference"),
    _ok(set_(out=torch.full(SHAPE, float("nan"))), "out-fresh"),
    _ok(set_(out=torch.full(SHAPE, float("nan")).transpose(0, 2).contiguous().transpose(0, 2)),
        "out-fresh-other-layout"),
    _ok(_disjoint_view_out, "out-disjoint-view-of-data-storage"),
    _ok(set_(out=torch.empty(SHAPE), training=False), "out-fresh-inference"),
    _ok(rebuild((0, 3), 1, training=False), "m0-inference-accepted"),
    _ok(rebuild((1, 3), 1), "m1-training-biased"),
    _ok(rebuild((1, 3), 1, unbiased_update=True, training=False), "unbiased-m1-inference"),
    _ok(rebuild((1, 3), 1, unbiased_update=True, use_global_stats=True), "unbiased-m1-use_global_stats"),
    _ok(rebuild((2, 3), 1, unbiased_update=True), "unbiased-m2-training"),
    _ok(set_(use_global_stats=True), "use_global_stats"),
]


@pytest.mark.parametrize("mutate", ACCEPTED_CALLS)
def test_accepted_call(path, mutate):
    kw = good_kwargs()
    mutate(kw)
    want_y, want_mm, want_mv = expected_forward(kw)
    out = kw.get("out")
    with tritonbn.trace.capture() as t:
        y = tritonbn.batch_norm(**kw)
    assert t.path == path
    if out is not None:
        assert y is out, "out= must be returned as the same object"
    assert y.shape == kw["data"].shape and y.dtype == kw["data"].dtype
    assert_close(y, want_y, kw["data"].dtype, "out")
    for name, want in (("moving_mean", want_mm), ("moving_var", want_mv)):
        assert_close(kw[name], want, kw[name].dtype, name)
        assert torch.isfinite(kw[name]).all(), f"{name} not finite"


def test_out_is_written_and_equals_the_result_without_out(path):
    kw = good_kwargs()
    kw_plain = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = torch.full(SHAPE, float("nan"))
    y = tritonbn.batch_norm(**kw, out=out)
    y_plain = tritonbn.batch_norm(**kw_plain)
    assert y is out
    assert torch.equal(out, y_plain)
    assert torch.equal(kw["moving_mean"], kw_plain["moving_mean"])
    assert torch.equal(kw["moving_var"], kw_plain["moving_var"])


def test_out_with_grad_inputs_is_accepted_under_no_grad(path):
    kw = good_kwargs()
    kw["data"].requires_grad_(True)
    kw["gamma"].requires_grad_(True)
    out = torch.empty(SHAPE)
    with torch.no_grad():
        y = tritonbn.batch_norm(**kw, out=out)
    assert y is out
    assert torch.isfinite(out).all()


def test_float16_data_with_float16_params_matches_float32_params(path):
    """SPEC Dtypes: half parameters are accepted and computed in float32."""
    kw16 = good_kwargs(dtype=torch.float16, param_dtype=torch.float16)
    kw32 = {k: (v.float() if k in PARAMS else v) for k, v in kw16.items()}
    kw32["data"] = kw16["data"].clone()
    y16 = tritonbn.batch_norm(**kw16)
    y32 = tritonbn.batch_norm(**kw32)
    assert y16.dtype == torch.float16
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(y16.float(), y32.float(), atol=atol, rtol=rtol)
    for name in ("moving_mean", "moving_var"):
        assert kw16[name].dtype == torch.float16
        torch.testing.assert_close(kw16[name].float(), kw32[name], atol=atol, rtol=rtol)


def test_every_bad_row_has_a_unique_id():
    ids = [p.id for p in BAD_CALLS] + [p.id for p in ACCEPTED_CALLS]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- strided parameters


@pytest.mark.parametrize("name", PARAMS)
def test_strided_param_is_handled(path, name):
    """A 1-D parameter of length C that is a strided view (``base[::2]``) is "1-D of length C":
    it gives the SPEC result and nothing outside the view is written."""
    kw = good_kwargs()
    sentinel = 123.0
    base = torch.full((2 * C,), sentinel, dtype=kw[name].dtype)
    base[::2] = kw[name]
    kw[name] = base[::2]
    want_y, want_mm, want_mv = expected_forward(kw)
    y = tritonbn.batch_norm(**kw)
    assert torch.equal(base[1::2], torch.full((C,), sentinel)), f"wrote outside the {name} view: {base}"
    assert_close(y, want_y, torch.float32, "out")
    assert_close(kw["moving_mean"], want_mm, torch.float32, "moving_mean")
    assert_close(kw["moving_var"], want_mv, torch.float32, "moving_var")


# ----------------------------------------------------------------------------- the signature cache
#
# validation.validate remembers the Settings of each accepted call signature (issue 13).  What
# depends on values -- devices, eps and momentum, where out lies in memory, the exact Python types
# behind equal keys (True == 1 == 1.0) -- must still be checked on every call.


@pytest.fixture
def fresh_cache(monkeypatch) -> dict:
    """An empty signature cache for this test (the module's own is left as it was)."""
    cache: dict = {}
    monkeypatch.setattr(validation, "_signatures", cache)
    return cache


def validate_call(kw: dict) -> Settings:
    """``validation.validate`` on batch_norm keyword arguments, with batch_norm's defaults."""
    return validation.validate(
        kw["data"], tuple(kw[n] for n in PARAMS), eps=kw.get("eps", 1e-3), momentum=kw.get("momentum", 0.9),
        fix_gamma=kw.get("fix_gamma", True), use_global_stats=kw.get("use_global_stats", False),
        axis=kw.get("axis", 1), out=kw.get("out"), training=kw.get("training", False),
        unbiased_update=kw.get("unbiased_update", False),
    )


def _full_args(kw: dict) -> tuple:
    """validate_call's arguments, positionally, as ``validation._validate_fully`` takes them."""
    return (kw["data"], tuple(kw[n] for n in PARAMS), kw.get("eps", 1e-3), kw.get("momentum", 0.9),
            kw.get("fix_gamma", True), kw.get("use_global_stats", False), kw.get("axis", 1), kw.get("out"),
            kw.get("training", False), kw.get("unbiased_update", False))


def mutated(mutate: Mutation) -> dict:
    """A fresh good call (same signature every time: same seed and shapes), then ``mutate``."""
    kw = good_kwargs()
    mutate(kw)
    return kw


def error_of(kw: dict) -> Exception:
    with pytest.raises((TypeError, ValueError)) as info:
        validate_call(kw)
    return info.value


def _disjoint_windows(kw: dict) -> None:
    """data and out: two disjoint (2, 3, 4) windows of a (4, 3, 4) buffer (overlapping_out's strides)."""
    big = torch.randn(4, *SHAPE[1:])
    kw["data"], kw["out"] = big[:2], big[2:]


def _on_meta(name: str) -> Mutation:
    return with_(name, lambda t, kw: torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _cached_then(good: Mutation, bad: Mutation, exc: type[Exception], name: str, id_: str):
    return pytest.param(good, bad, exc, name, id=id_)


_OUT = set_(out=torch.empty(SHAPE))
CACHED_THEN_BAD = [
    # where out lies: the one check the key cannot decide
    _cached_then(_disjoint_windows, overlapping_out, ValueError, "out", "out-partially-overlaps-data"),
    _cached_then(_OUT, with_("out", lambda t, kw: kw["data"]), ValueError, "out", "out-is-data"),
    _cached_then(_OUT, with_("out", lambda t, kw: kw["data"][:]), ValueError, "out", "out-full-view-of-data"),
    # devices
    _cached_then(set_(), _on_meta("gamma"), ValueError, "gamma", "gamma-on-meta"),
    _cached_then(set_(), _on_meta("moving_var"), ValueError, "moving_var", "moving_var-on-meta"),
    _cached_then(set_(), _on_meta("data"), ValueError, "gamma", "data-on-meta-params-on-cpu"),
    _cached_then(_OUT, set_(out=torch.empty(SHAPE, device="meta")), ValueError, "out", "out-on-meta"),
    # eps and momentum values
    _cached_then(set_(), set_(eps=float("nan")), ValueError, "eps", "eps-nan"),
    _cached_then(set_(), set_(eps=float("inf")), ValueError, "eps", "eps-inf"),
    _cached_then(set_(), set_(eps=-1e-3), ValueError, "eps", "eps-negative"),
    _cached_then(set_(), set_(eps=np.float32("nan")), ValueError, "eps", "eps-numpy-nan"),
    _cached_then(set_(), set_(eps="1e-3"), TypeError, "eps", "eps-str"),
    _cached_then(set_(), set_(momentum=float("nan")), ValueError, "momentum", "momentum-nan"),
    _cached_then(set_(), set_(momentum=float("-inf")), ValueError, "momentum", "momentum-minus-inf"),
    # equal as dict keys, but a TypeError: True == 1 == 1.0
    _cached_then(set_(eps=1), set_(eps=True), TypeError, "eps", "eps-true-after-eps-1"),
    _cached_then(set_(momentum=1), set_(momentum=True), TypeError, "momentum", "momentum-true-after-momentum-1"),
    _cached_then(set_(), set_(axis=True), TypeError, "axis", "axis-true-after-axis-1"),
    _cached_then(set_(), set_(axis=1.0), TypeError, "axis", "axis-float-after-axis-1"),
    # kinds and strides
    _cached_then(set_(), with_("gamma", lambda t, kw: t.numpy()), TypeError, "gamma", "gamma-numpy"),
    _cached_then(set_(), with_("data", lambda t, kw: t.numpy()), TypeError, "data", "data-numpy"),
    _cached_then(set_(), with_("moving_mean", lambda t, kw: t[:1].expand(C)), ValueError, "moving_mean",
                 "moving_mean-expanded"),
    _cached_then(_OUT, set_(out=torch.empty(1, C, 1).expand(SHAPE)), ValueError, "out", "out-expanded"),
    # flags: the same tensors, a check that only some flags make
    _cached_then(rebuild((1, 3), 1), rebuild((1, 3), 1, unbiased_update=True), ValueError, "unbiased_update",
                 "unbiased-m1-after-biased"),
    _cached_then(rebuild((0, 3), 1, training=False), rebuild((0, 3), 1), ValueError, "data",
                 "m0-training-after-inference"),
]


@pytest.mark.parametrize("good, bad, exc, name", CACHED_THEN_BAD)
def test_cached_signature_still_raises_value_errors(fresh_cache, good, bad, exc, name):
    """After a good call cached its signature, a bad call raises exactly what it raises on an
    empty cache (type and message), on every repeat, and caches nothing."""
    want = error_of(mutated(bad))
    assert type(want) is exc and first_named_argument(str(want)) == name, want
    validate_call(mutated(good))
    assert len(fresh_cache) == 1, "the good call was not cached, so this row tests nothing"
    for _ in range(2):
        got = error_of(mutated(bad))
        assert (type(got), str(got)) == (type(want), str(want))
    assert len(fresh_cache) == 1


def op_error_of(kw: dict) -> Exception:
    with pytest.raises((TypeError, ValueError)) as info:
        tritonbn.batch_norm(**kw)
    return info.value


@pytest.mark.parametrize("good, bad, exc, name", CACHED_THEN_BAD)
def test_a_cached_op_entry_still_raises_what_validate_raises(fresh_cache, monkeypatch, good, bad, exc, name):
    """The op's own entries (``ops.op_entry``: a repeated call runs no check but out's overlap)
    keep that guarantee: after a good call through the op, the bad call raises what ``validate``
    raises, on every repeat, and adds no entry."""
    entries: dict = {}
    monkeypatch.setattr(ops, "_op_entries", entries)
    want = error_of(mutated(bad))
    tritonbn.batch_norm(**mutated(good))
    assert len(entries) == 1, "the good call made no op entry, so this row tests nothing"
    for _ in range(2):
        got = op_error_of(mutated(bad))
        assert (type(got), str(got)) == (type(want), str(want))
    assert len(entries) == 1


def _cached_then_ok(first: Mutation, then: Mutation, id_: str):
    return pytest.param(first, then, id=id_)


CACHED_THEN_OTHER_VALUES = [
    _cached_then_ok(set_(), set_(eps=1e-5), "eps-other"),
    _cached_then_ok(set_(eps=0.0), set_(eps=-0.0), "eps-minus-zero-after-zero"),
    _cached_then_ok(set_(momentum=0.0), set_(momentum=-0.0), "momentum-minus-zero-after-zero"),
    _cached_then_ok(set_(), set_(momentum=0.25), "momentum-other"),
    _cached_then_ok(set_(eps=1.0), set_(eps=1), "eps-int-after-equal-float"),
    _cached_then_ok(set_(), set_(fix_gamma=True), "fix_gamma"),
    _cached_then_ok(set_(), set_(fix_gamma=1), "fix_gamma-int"),
    _cached_then_ok(set_(), set_(training=False), "inference"),
    _cached_then_ok(set_(), set_(use_global_stats=True), "use_global_stats"),
    _cached_then_ok(set_(), set_(unbiased_update=True), "unbiased_update"),
    _cached_then_ok(set_(), set_(axis=-2), "axis-negative-same-dim"),
    _cached_then_ok(set_(), _OUT, "out-after-none"),
    _cached_then_ok(_disjoint_windows, _disjoint_view_out, "out-other-disjoint-window"),
    _cached_then_ok(set_(), with_("data", lambda t, kw: t.transpose(0, 2).contiguous().transpose(0, 2)),
                    "data-other-strides"),
    _cached_then_ok(set_(), with_("gamma", lambda t, kw: torch.stack([t, t], 1)[:, 0]),
                    "gamma-strided-view"),
    _cached_then_ok(set_(), with_("gamma", lambda t, kw: torch.nn.Parameter(t)), "gamma-parameter"),
]


@pytest.mark.parametrize("first, then", CACHED_THEN_OTHER_VALUES)
def test_cached_signature_with_other_values_gets_their_settings(fresh_cache, first, then):
    """A call after a cached one returns the Settings the full checks give it (repr: -0.0 kept)."""
    want = repr(validation._validate_fully(*_full_args(mutated(then))))
    validate_call(mutated(first))
    assert fresh_cache, "the first call was not cached"
    for _ in range(2):
        assert repr(validate_call(mutated(then))) == want


class _Subclass(torch.Tensor):
    pass


NOT_CACHED = [
    pytest.param(set_(eps=np.float32(1e-3)), id="eps-numpy-float32"),
    pytest.param(set_(eps=-0.0), id="eps-minus-zero"),
    pytest.param(set_(axis=np.int64(1)), id="axis-numpy-int"),
    pytest.param(set_(training=torch.tensor(True)), id="training-tensor"),
    pytest.param(set_(fix_gamma=np.bool_(True)), id="fix_gamma-numpy-bool"),
    pytest.param(with_("data", lambda t, kw: t.as_subclass(_Subclass)), id="data-tensor-subclass"),
    pytest.param(with_("moving_var", lambda t, kw: t.to_sparse()), id="moving_var-sparse"),
]


@pytest.mark.parametrize("mutate", NOT_CACHED)
def test_calls_the_key_cannot_describe_are_checked_in_full(fresh_cache, mutate):
    """Arguments whose exact type or sign a key would lose take the full checks every time
    (a sparse tensor has no strides to key on; the full checks decide what it gets)."""
    kw = mutated(mutate)
    try:
        want = repr(validation._validate_fully(*_full_args(kw)))
    except Exception as e:  # noqa: BLE001 - whatever the full checks raise, validate raises too
        with pytest.raises(type(e), match=re.escape(str(e))):
            validate_call(kw)
    else:
        assert repr(validate_call(kw)) == want
    assert fresh_cache == {}


def test_cache_is_bounded(fresh_cache):
    """More signatures than MAX_SIGNATURES never make the cache grow past it (it starts over)."""
    base = torch.empty(1, C)
    params = tuple(torch.ones(C) for _ in PARAMS)
    sizes = []
    for n in range(1, validation.MAX_SIGNATURES + 50):
        validation.validate(base.expand(n, C), params, eps=1e-3, momentum=0.9, fix_gamma=False,
                            use_global_stats=False, axis=1, out=None, training=True, unbiased_update=False)
        sizes.append(len(fresh_cache))
    assert max(sizes) == validation.MAX_SIGNATURES
    assert sizes[-1] < validation.MAX_SIGNATURES


def test_cache_holds_no_tensor(fresh_cache):
    """The cache keeps dtypes, sizes, devices and scalars: every tensor of a call can be freed."""
    kw = good_kwargs()
    kw["out"] = torch.empty(SHAPE)
    kw["gamma"] = torch.nn.Parameter(kw["gamma"])
    validate_call(kw)
    assert len(fresh_cache) == 1
    for key in fresh_cache:
        assert not [e for e in key if isinstance(e, torch.Tensor)], key
    refs = [weakref.ref(v) for v in kw.values() if isinstance(v, torch.Tensor)]
    del kw
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_dynamo_trace_bypasses_the_cache(fresh_cache):
    """Dynamo traces symbolic sizes, which no key can hold: a fullgraph trace with dynamic shapes
    runs the full checks (no graph break) and leaves the cache alone."""
    def settings_eps(x, *params):
        settings = validation.validate(x, params, eps=1e-3, momentum=0.9, fix_gamma=False, use_global_stats=False,
                                       axis=1, out=None, training=True, unbiased_update=False)
        return x * settings.eps

    compiled = torch.compile(settings_eps, fullgraph=True, backend="eager", dynamic=True)
    params = [torch.ones(C) for _ in PARAMS]
    for n in (2, 5):
        x = torch.randn(n, C, 4)
        assert torch.equal(compiled(x, *params), x * 1e-3)
    assert fresh_cache == {}
