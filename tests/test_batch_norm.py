"""tritonbn.batch_norm against the float64 reference: ranks 1-5, every axis, layouts, dtypes, flags.

Each case runs forward (with output_mean_var) and backward through both paths (interpreted
Triton kernels and the plain-torch reference), and checks y, mean, invstd, the moving statistics
after the step, dx, dgamma and dbeta against ``tritonbn.reference`` evaluated in float64.
"""

from __future__ import annotations

import pytest
import torch

import tritonbn
from tritonbn import reference
from tritonbn.autotune import PERSISTENT_OFF, override_configs
from tritonbn.plan import MAX_REDUCED_GROUPS, is_dense, plan_view
from helpers import apply_layout, assert_close, backend_name, make_inputs, on_device, select_path

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


RUNS_ON_CUDA = True  # tensors come from helpers (make_inputs, on_device): conftest's cuda path


@pytest.fixture(params=["triton", "triton-split", "reference", "cuda", "cuda-split"])
def path(request, monkeypatch):
    """This module runs every test three ways on the CPU: the Triton kernels as dispatched
    (single-pass for these small slices), the Triton split path (persistent kernels off), the
    reference; in CUDA mode, the compiled kernels both ways on CUDA tensors."""
    base, _, variant = request.param.partition("-")
    select_path(base, monkeypatch)
    split_only = {"persistent": PERSISTENT_OFF} if variant == "split" else {}
    with override_configs(**split_only):
        yield base

# (shape, axis, layout): every rank 1-5, every axis (negative ones too), every layout family.
GEOMETRIES = [
    ((7,), 0, "contiguous"),
    ((7,), -1, "contiguous"),
    ((5, 3), 1, "contiguous"),
    ((5, 3), 0, "contiguous"),
    ((5, 3), -1, "permuted"),
    ((4, 3, 5), 0, "contiguous"),
    ((4, 3, 5), 1, "contiguous"),
    ((4, 3, 5), 2, "contiguous"),
    ((4, 3, 5), -2, "sliced"),
    ((2, 3, 4, 5), 1, "contiguous"),
    ((2, 3, 4, 5), 1, "channels_last"),
    ((2, 3, 4, 5), -1, "contiguous"),
    ((2, 3, 4, 5), 2, "channels_last"),
    ((2, 3, 4, 5), 0, "permuted"),
    ((2, 3, 4, 5), 1, "sliced"),
    ((2, 3, 2, 3, 4), 1, "contiguous"),
    ((2, 3, 2, 3, 4), 1, "channels_last_3d"),
    ((2, 3, 2, 3, 4), -2, "contiguous"),
    ((2, 3, 2, 3, 4), 4, "permuted"),
]

# (training, fix_gamma, use_global_stats)
FLAGS = {
    "train": (True, False, False),
    "train-fixgamma": (True, True, False),
    "infer": (False, False, False),
    "train-globalstats": (True, False, True),
}


def _cases():
    for shape, axis, layout in GEOMETRIES:
        for flag_id in FLAGS:
            yield pytest.param(shape, axis, layout, F32, flag_id,
                               id=f"{'x'.join(map(str, shape))}-ax{axis}-{layout}-f32-{flag_id}")
    # Other dtypes: a rotating subset that still reaches both families and every flag set.
    flag_ids = list(FLAGS)
    for dtype, name in ((F16, "f16"), (BF16, "bf16"), (F64, "f64")):
        for k, (shape, axis, layout) in enumerate(GEOMETRIES[1::2]):
            flag_id = flag_ids[k % len(flag_ids)]
            yield pytest.param(shape, axis, layout, dtype, flag_id,
                               id=f"{'x'.join(map(str, shape))}-ax{axis}-{layout}-{name}-{flag_id}")


def _expected(inp, dy, axis, flags, eps=1e-3, momentum=0.9):
    training, fix_gamma, use_global_stats = flags
    batch_stats = training and not use_global_stats
    mm, mv = inp.moving_mean.double().clone(), inp.moving_var.double().clone()
    y, mean, invstd = reference.forward(
        inp.x.double(), inp.gamma.double(), inp.beta.double(), mm, mv, axis=axis, eps=eps,
        momentum=momentum, fix_gamma=fix_gamma, batch_stats=batch_stats, update_moving=batch_stats)
    dx, dgamma, dbeta = reference.backward(
        dy.double(), inp.x.double(), inp.gamma.double(), mean, invstd, axis=axis,
        fix_gamma=fix_gamma, batch_stats=batch_stats)
    return dict(y=y, mean=mean, invstd=invstd, moving_mean=mm, moving_var=mv, dx=dx, dgamma=dgamma, dbeta=dbeta)


def _run(inp, dy, axis, flags, **kwargs):
    training, fix_gamma, use_global_stats = flags
    x = inp.x.requires_grad_(True)
    gamma = inp.gamma.clone().requires_grad_(True)
    beta = inp.beta.clone().requires_grad_(True)
    with tritonbn.trace.capture() as trace:
        y, mean, invstd = tritonbn.batch_norm(
            x, gamma, beta, inp.moving_mean, inp.moving_var, fix_gamma=fix_gamma,
            use_global_stats=use_global_stats, output_mean_var=True, axis=axis, training=training, **kwargs)
        y.backward(dy)
    got = dict(y=y.detach(), mean=mean, invstd=invstd, moving_mean=inp.moving_mean, moving_var=inp.moving_var,
               dx=x.grad, dgamma=gamma.grad, dbeta=beta.grad)
    return got, trace


@pytest.mark.parametrize("shape, axis, layout, dtype, flag_id", list(_cases()))
def test_forward_backward_match_reference(shape, axis, layout, dtype, flag_id, path):
    flags = FLAGS[flag_id]
    inp = make_inputs(shape, axis, dtype, layout)
    # autograd hands the backward a gradient laid out like y, i.e. like x
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    dy = apply_layout(on_device(dy), layout, axis % len(shape))
    expected = _expected(inp, dy, axis % len(shape), flags)
    got, trace = _run(inp, dy, axis, flags)

    assert trace.paths == [backend_name(path)] * 2, "forward and backward must both run on the requested path"
    if path != "reference":
        family = plan_view(inp.x.shape, axis % len(shape), [inp.x.stride()]).family
        assert trace.kernels() and all(
            k.startswith(family) or k.startswith("finalize") for k in trace.kernels()), trace.kernels()
        assert trace.copies == [], "no layout of this table needs a copy of the input"
    for name in expected:
        # dx, dgamma, dbeta accumulate over m elements of values of order 1: scale the tolerance.
        scale = 4.0 if name in ("dgamma", "dbeta") else 1.0
        assert_close(got[name], expected[name], dtype, f"{name} ({path})", scale=scale)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert got["mean"].dtype == reference.stat_dtype(dtype) == got["invstd"].dtype
    if is_dense(inp.x):
        assert got["y"].stride() == inp.x.stride(), "a dense input's strides carry over to the output"


@pytest.mark.parametrize(
    "dtype, param_dtype",
    [pytest.param(F16, F16, id="f16-data-f16-params"), pytest.param(BF16, BF16, id="bf16-data-bf16-params")],
)
def test_half_parameters_compute_in_float32(dtype, param_dtype, path):
    inp = make_inputs((3, 4, 5), 1, dtype, param_dtype=param_dtype)
    dy = on_device(torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(2)).to(dtype))
    expected = _expected(inp, dy, 1, FLAGS["train"])
    got, _ = _run(inp, dy, 1, FLAGS["train"])
    for name in expected:
        assert_close(got[name], expected[name], dtype, name, scale=4.0)
    assert got["moving_mean"].dtype == param_dtype and got["dgamma"].dtype == param_dtype


@pytest.mark.parametrize(
    "unbiased", [pytest.param(False, id="biased-update"), pytest.param(True, id="unbiased-update")]
)
def test_moving_var_update_convention(unbiased, path):
    inp = make_inputs((4, 3, 5), 1, F32)
    mv_before = inp.moving_var.double().clone()
    tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                        momentum=0.75, training=True, unbiased_update=unbiased)
    var = inp.x.double().var(dim=(0, 2), unbiased=unbiased)
    assert_close(inp.moving_var, mv_before * 0.75 + var * 0.25, F32, "moving_var")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_out_argument_is_written_and_returned(layout, path):
    inp = make_inputs((2, 3, 4, 5), 1, F32, layout)
    out = torch.full_like(inp.x, float("nan"))
    result = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, out=out)
    expected = _expected(inp, torch.zeros_like(inp.x), 1, FLAGS["infer"])["y"]
    assert result is out
    assert_close(out, expected, F32, "out")


def test_out_with_another_layout_is_written_in_place(path):
    inp = make_inputs((2, 3, 4, 5), 1, F32)
    base = on_device(torch.full((2, 3, 4, 11), float("nan")))
    out = base[:, :, :, 1:10:2]  # the step breaks the H*W merge that contiguous data has
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, out=out)
    assert_close(out, _expected(inp, torch.zeros_like(inp.x), 1, FLAGS["infer"])["y"], F32, "out")
    assert torch.isnan(base[..., 0::2]).all(), "nothing outside out was written"
    assert trace.copies == [], "three reduced groups are one plan: no temporary"


# Step-sliced views by the reduced groups they need: four plan as one view (no copy), five (rank 6,
# steps in four dimensions) are copied once.  (shape of the view, steps per non-channel dim)
STEPPED = {
    "four-groups": ((2, 3, 2, 3, 2), (1, 2, 1, 2)),
    "five-groups": ((2, 3, 2, 2, 2, 2), (1, 2, 2, 2, 2)),
}
DATA_COPY = f"data layout needs more than {MAX_REDUCED_GROUPS} reduced groups; copied to a dense tensor"


def _stepped_view(groups, seed=4):
    """A view needing ``groups`` reduced groups: every step > 1 dimension is sliced from one twice
    its size plus one (the odd extent keeps neighbouring dimensions from merging)."""
    shape, steps = STEPPED[groups]
    base_shape = [shape[0], shape[1]] + [size * step + 1 if step > 1 else size
                                          for size, step in zip(shape[2:], steps[1:])]
    base = on_device(torch.randn(base_shape, generator=torch.Generator().manual_seed(seed)))
    view = base[(slice(None), slice(None)) + tuple(slice(1, None, step) if step > 1 else slice(None)
                                                   for step in steps[1:])]
    plan = plan_view(view.shape, 1, [view.stride()])
    assert (plan is None) == (groups == "five-groups")
    assert plan is None or plan.outer_mid > 1, "four groups: the middle outer group is in use"
    return view


def _copies(groups, message):
    return [] if groups == "four-groups" else [message]


@pytest.mark.parametrize("groups", STEPPED)
def test_data_needing_four_groups_runs_in_place_five_are_copied_once(groups, path):
    x = _stepped_view(groups)
    inp = make_inputs(x.shape, 1, F32)
    inp.x = x
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    expected = _expected(inp, dy, 1, FLAGS["train"])
    got, trace = _run(inp, dy, 1, FLAGS["train"])
    for name in expected:
        assert_close(got[name], expected[name], F32, name, scale=4.0)
    if path != "reference":
        assert trace.copies == _copies(groups, DATA_COPY)


@pytest.mark.parametrize("groups", STEPPED)
def test_backward_given_stepped_data_directly(groups):
    """The Triton backend's backward called with the stepped view itself (a caller that did not
    keep the forward's dense copy, e.g. the torch.library op): in place up to four groups, one
    copy of x beyond; exact either way."""
    from tritonbn import ops, trace as tb_trace
    from tritonbn.validation import validate
    x = _stepped_view(groups)
    inp = make_inputs(x.shape, 1, F32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    settings = validate(x, (inp.gamma, inp.beta, inp.moving_mean, inp.moving_var), eps=1e-3, momentum=0.9,
                        fix_gamma=False, use_global_stats=False, axis=1, out=None, training=True,
                        unbiased_update=False)
    reduced = [d for d in range(x.dim()) if d != 1]
    mean = x.double().mean(dim=reduced)
    invstd = 1 / (x.double().var(dim=reduced, unbiased=False) + 1e-3).sqrt()
    center = torch.stack([mean.float(), (mean - mean.float().double()).float()])
    with tb_trace.capture() as t:
        dx, dgamma, dbeta = ops.TritonBackend().backward(dy, x, inp.gamma, center, invstd.float(), settings,
                                                         inp.beta.dtype)
    want = reference.backward(dy.double(), x.double(), inp.gamma.double(), mean, invstd, axis=1, fix_gamma=False,
                              batch_stats=True)
    for name, got, expected in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), want):
        assert_close(got, expected, F32, name, scale=4.0)
    assert t.copies == _copies(groups, DATA_COPY)


@pytest.mark.parametrize("groups", STEPPED)
def test_out_needing_four_groups_is_written_in_place_five_through_a_temporary(groups, path):
    shape = STEPPED[groups][0]
    inp = make_inputs(shape, 1, F32)
    out = _stepped_view(groups)
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, out=out)
    assert_close(out, _expected(inp, torch.zeros_like(inp.x), 1, FLAGS["infer"])["y"], F32, "out")
    if path != "reference":
        assert len(trace.copies) == (groups == "five-groups")
        assert all("out layout" in copy for copy in trace.copies)


@pytest.mark.parametrize("groups", STEPPED)
def test_grad_needing_four_groups_runs_in_place_five_are_copied_once(groups, path):
    shape = STEPPED[groups][0]
    inp = make_inputs(shape, 1, F32)
    dy = _stepped_view(groups)
    expected = _expected(inp, dy, 1, FLAGS["train"])
    got, trace = _run(inp, dy, 1, FLAGS["train"])
    for name in expected:
        assert_close(got[name], expected[name], F32, name, scale=4.0)
    if path != "reference":
        assert trace.copies == _copies(groups, "grad_out layout does not share a view plan with data")


def test_grad_in_another_layout_runs_without_copy(path):
    inp = make_inputs((2, 3, 4, 5), 2, F32, "channels_last")
    dy = on_device(torch.randn((2, 3, 4, 5), generator=torch.Generator().manual_seed(3)))  # contiguous, unlike x
    expected = _expected(inp, dy, 2, FLAGS["train"])
    got, trace = _run(inp, dy, 2, FLAGS["train"])
    for name in expected:
        assert_close(got[name], expected[name], F32, name, scale=4.0)
    assert trace.copies == []


def test_returns_only_out_without_output_mean_var(path):
    inp = make_inputs((4, 3), 1, F32)
    y = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, training=True)
    assert isinstance(y, torch.Tensor) and y.shape == inp.x.shape


def test_no_gradient_flows_through_mean_and_invstd(path):
    inp = make_inputs((4, 3), 1, F32)
    x = inp.x.clone().requires_grad_(True)
    _, mean, invstd = tritonbn.batch_norm(x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                                          training=True, output_mean_var=True)
    assert not mean.requires_grad and not invstd.requires_grad


@pytest.mark.parametrize("dtype", [F32, torch.float64], ids=["float32", "float64"])
def test_inference_mean_is_a_new_tensor_not_the_moving_mean(dtype, path):
    """The returned mean equals moving_mean in inference but never aliases it: a later moving
    update must not change a mean the caller already holds."""
    inp = make_inputs((4, 3, 2), 1, dtype)
    _, mean, _ = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                                     output_mean_var=True)
    assert torch.equal(mean, inp.moving_mean.to(mean.dtype))
    assert mean.untyped_storage().data_ptr() != inp.moving_mean.untyped_storage().data_ptr()


def test_fix_gamma_leaves_gamma_untouched_and_gives_zero_grad(path):
    inp = make_inputs((4, 3, 2), 1, F32)
    gamma = inp.gamma.clone().requires_grad_(True)
    before = gamma.detach().clone()
    y = tritonbn.batch_norm(inp.x, gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=True, training=True)
    y.sum().backward()
    assert torch.equal(gamma.detach(), before)
    assert torch.equal(gamma.grad, torch.zeros_like(before))


@pytest.mark.parametrize(
    "shape, axis, training, use_global_stats",
    [
        pytest.param((3, 2, 4), 1, True, False, id="train-channel-major"),
        pytest.param((3, 4, 2), -1, True, False, id="train-channel-minor"),
        pytest.param((3, 2, 4), 1, False, False, id="inference"),
        pytest.param((3, 2, 4), 1, True, True, id="global-stats"),
    ],
)
def test_gradcheck_float64(shape, axis, training, use_global_stats, path):
    inp = make_inputs(shape, axis, F64)
    x = inp.x.clone().requires_grad_(True)
    gamma = inp.gamma.clone().requires_grad_(True)
    beta = inp.beta.clone().requires_grad_(True)

    def fn(x, gamma, beta):
        return tritonbn.batch_norm(x, gamma, beta, inp.moving_mean.clone(), inp.moving_var.clone(),
                                   fix_gamma=False, use_global_stats=use_global_stats, axis=axis, training=training)

    with tritonbn.trace.capture() as trace:
        assert torch.autograd.gradcheck(fn, (x, gamma, beta), eps=1e-6, atol=1e-6)
    assert set(trace.paths) == {backend_name(path)}
