"""tritonbn.batch_norm against the float64 reference: ranks 1-5, every axis, layouts, dtypes, flags.

The table (``test_forward_backward_match_reference``) runs one training or inference step per
case through ``helpers.run_and_compare`` -- forward with output_mean_var, backward for data, gamma
and beta -- and checks y, mean, invstd, the moving statistics after the step, dx, dgamma and dbeta
against ``tritonbn.reference`` in float64, on every path: the Triton kernels as dispatched
(single-pass at these sizes), the Triton split path, the torch path, and in CUDA mode the
compiled kernels both ways.  The rest: half parameters, the moving-variance convention, ``out``,
views needing four reduced groups (in place) or five (copied once), gradients in other layouts,
what is returned, gradcheck.  The torch path's tiers (forced one by one) are tests/test_cpu_backend.py.
"""

from __future__ import annotations

import pytest
import torch

import tritonbn
from tritonbn import reference
from tritonbn.plan import MAX_REDUCED_GROUPS, is_dense, plan_view
from helpers import (FLAGS, GEOMETRIES, KERNEL_PATHS, apply_layout, assert_close, backend_name, expected,
                     make_inputs, on_device, on_every_path, run_and_compare)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = {"f16": F16, "bf16": BF16, "f32": F32, "f64": F64}

RUNS_ON_CUDA = True  # tensors come from helpers (make_inputs, on_device): conftest's cuda path

# The Triton paths (interpreted here, compiled in CUDA mode: a compile per geometry) run these
# geometries in float32 and ROTATING in the other dtypes; the torch path runs every geometry of
# helpers.GEOMETRIES in every dtype.
KERNEL_GEOMETRIES = [
    "rank1", "rank1-axis-1", "2d-5x3", "2d-5x3-axis0", "2d-permuted", "3d-axis0", "3d-4x3x5-middle", "3d-last",
    "3d-sliced-axis-2", "nchw", "nhwc", "4d-axis-1", "nhwc-axis2", "4d-permuted-axis0", "4d-sliced", "ncdhw",
    "ndhwc", "5d-axis-2", "5d-permuted-axis4",
]
# (geometry, flags) of the other dtypes on the Triton paths: both families and every flag set.
ROTATING = [("rank1-axis-1", "train"), ("2d-5x3-axis0", "train-fix-gamma"), ("3d-axis0", "infer"),
            ("3d-last", "global-stats"), ("nchw", "train"), ("4d-axis-1", "train-fix-gamma"),
            ("4d-permuted-axis0", "infer"), ("ncdhw", "global-stats"), ("5d-axis-2", "train")]


def _table():
    for path in KERNEL_PATHS:
        if path == "reference":
            cases = [(g, d, f) for g in GEOMETRIES for d in DTYPES for f in FLAGS]
        else:
            cases = [(g, "f32", f) for g in KERNEL_GEOMETRIES for f in FLAGS] + [
                (g, d, f) for d in ("f16", "bf16", "f64") for g, f in ROTATING]
        for geometry, dtype, flag_id in cases:
            yield pytest.param(path, geometry, dtype, flag_id, id=f"{path}-{geometry}-{dtype}-{flag_id}")


@pytest.mark.parametrize("path, geometry, dtype_id, flag_id", list(_table()), indirect=["path"])
def test_forward_backward_match_reference(path, geometry, dtype_id, flag_id):
    shape, axis, layout = GEOMETRIES[geometry]
    dtype = DTYPES[dtype_id]
    inp = make_inputs(shape, axis, dtype, layout)
    # autograd hands the backward a gradient laid out like y, i.e. like x
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    dy = apply_layout(on_device(dy), layout, axis % len(shape))
    family = plan_view(inp.x.shape, axis % len(shape), [inp.x.stride()]).family
    got, _, trace = run_and_compare(inp, dy, path=path, axis=axis, **FLAGS[flag_id])
    if path != "reference":
        assert all(k.startswith(family) for k in trace.kernels()), trace.kernels()
        assert trace.copies == [], "no layout of this table needs a copy of the input"
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert got["mean"].dtype == reference.stat_dtype(dtype) == got["invstd"].dtype
    if is_dense(inp.x):
        assert got["y"].stride() == inp.x.stride() == got["dx"].stride(), "a dense input's strides carry over"


@on_every_path
@pytest.mark.parametrize(
    "dtype, param_dtype",
    [pytest.param(F16, F16, id="f16-data-f16-params"), pytest.param(BF16, BF16, id="bf16-data-bf16-params")],
)
def test_half_parameters_compute_in_float32(dtype, param_dtype, path):
    inp = make_inputs((3, 4, 5), 1, dtype, param_dtype=param_dtype)
    dy = on_device(torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(2)).to(dtype))
    got, _, _ = run_and_compare(inp, dy, path=path, scale=4.0)
    assert got["moving_mean"].dtype == param_dtype and got["dgamma"].dtype == param_dtype


@on_every_path
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


@on_every_path
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_out_argument_is_written_and_returned(layout, path):
    inp = make_inputs((2, 3, 4, 5), 1, F32, layout)
    out = torch.full_like(inp.x, float("nan"))
    result = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, out=out)
    assert result is out
    assert_close(out, expected(inp, None, **FLAGS["infer"])["y"], F32, "out")


@on_every_path
def test_out_with_another_layout_is_written_in_place(path):
    inp = make_inputs((2, 3, 4, 5), 1, F32)
    base = on_device(torch.full((2, 3, 4, 11), float("nan")))
    out = base[:, :, :, 1:10:2]  # the step breaks the H*W merge that contiguous data has
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, out=out)
    assert_close(out, expected(inp, None, **FLAGS["infer"])["y"], F32, "out")
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


@on_every_path
@pytest.mark.parametrize("groups", STEPPED)
def test_data_needing_four_groups_runs_in_place_five_are_copied_once(groups, path):
    x = _stepped_view(groups)
    inp = make_inputs(x.shape, 1, F32)
    inp.x = x
    dy = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    _, _, trace = run_and_compare(inp, dy, path=path, scale=4.0)
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
    for name, got, value in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), want):
        assert_close(got, value, F32, name, scale=4.0)
    assert t.copies == _copies(groups, DATA_COPY)


@on_every_path
@pytest.mark.parametrize("groups", STEPPED)
def test_out_needing_four_groups_is_written_in_place_five_through_a_temporary(groups, path):
    shape = STEPPED[groups][0]
    inp = make_inputs(shape, 1, F32)
    out = _stepped_view(groups)
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, out=out)
    assert_close(out, expected(inp, None, **FLAGS["infer"])["y"], F32, "out")
    if path != "reference":
        assert len(trace.copies) == (groups == "five-groups")
        assert all("out layout" in copy for copy in trace.copies)


@on_every_path
@pytest.mark.parametrize("groups", STEPPED)
def test_grad_needing_four_groups_runs_in_place_five_are_copied_once(groups, path):
    shape = STEPPED[groups][0]
    inp = make_inputs(shape, 1, F32)
    dy = _stepped_view(groups)
    _, _, trace = run_and_compare(inp, dy, path=path, scale=4.0)
    if path != "reference":
        assert trace.copies == _copies(groups, "grad_out layout does not share a view plan with data")


@on_every_path
def test_grad_in_another_layout_runs_without_copy(path):
    inp = make_inputs((2, 3, 4, 5), 2, F32, "channels_last")
    dy = on_device(torch.randn((2, 3, 4, 5), generator=torch.Generator().manual_seed(3)))  # contiguous, unlike x
    _, _, trace = run_and_compare(inp, dy, path=path, axis=2, scale=4.0)
    assert trace.copies == []


@on_every_path
def test_returns_only_out_without_output_mean_var(path):
    inp = make_inputs((4, 3), 1, F32)
    y = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, training=True)
    assert isinstance(y, torch.Tensor) and y.shape == inp.x.shape


@on_every_path
def test_no_gradient_flows_through_mean_and_invstd(path):
    inp = make_inputs((4, 3), 1, F32)
    x = inp.x.clone().requires_grad_(True)
    _, mean, invstd = tritonbn.batch_norm(x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                                          training=True, output_mean_var=True)
    assert not mean.requires_grad and not invstd.requires_grad


@on_every_path
@pytest.mark.parametrize("dtype", [F32, torch.float64], ids=["float32", "float64"])
def test_inference_mean_is_a_new_tensor_not_the_moving_mean(dtype, path):
    """The returned mean equals moving_mean in inference but never aliases it: a later moving
    update must not change a mean the caller already holds."""
    inp = make_inputs((4, 3, 2), 1, dtype)
    _, mean, _ = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                                     output_mean_var=True)
    assert torch.equal(mean, inp.moving_mean.to(mean.dtype))
    assert mean.untyped_storage().data_ptr() != inp.moving_mean.untyped_storage().data_ptr()


@on_every_path
def test_fix_gamma_leaves_gamma_untouched_and_gives_zero_grad(path):
    inp = make_inputs((4, 3, 2), 1, F32)
    gamma = inp.gamma.clone().requires_grad_(True)
    before = gamma.detach().clone()
    y = tritonbn.batch_norm(inp.x, gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=True, training=True)
    y.sum().backward()
    assert torch.equal(gamma.detach(), before)
    assert torch.equal(gamma.grad, torch.zeros_like(before))


@on_every_path
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
