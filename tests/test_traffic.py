"""The traffic counter: exact counts on tiny kernels of known traffic, then tritonbn's ops.

Runs under TRITON_INTERPRET=1 (conftest.py).  Shapes are tiny: every program is interpreted.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder

import tritonbn
from tritonbn.perf import traffic
from tritonbn.perf.traffic import count_traffic, measure


@triton.jit
def _masked_copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def _unmasked_copy(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets))


@triton.jit
def _scalar_sum(src_ptr, out_ptr, n):
    # one scalar load per element, one scalar store: n + 1 accesses of one element each
    acc = tl.load(src_ptr).to(tl.float32)
    for i in range(1, n):
        acc += tl.load(src_ptr + i).to(tl.float32)
    tl.store(out_ptr, acc)


@triton.jit
def _atomic_count(counter_ptr):
    tl.atomic_add(counter_ptr, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_masked_copy_counts_exactly_active_lanes(dtype):
    n, block = 1000, 256  # 4 programs, the last one 232 lanes active
    src = torch.randn(n).to(dtype)
    dst = torch.empty_like(src)
    with count_traffic() as counter:
        _masked_copy[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
    assert torch.equal(dst, src)
    size = src.element_size()
    assert counter.total() == 2 * n * size
    assert counter.total("load") == counter.total("store") == n * size
    assert counter.attribute({"src": src, "dst": dst}) == {"src": {"load": n * size}, "dst": {"store": n * size}}
    assert counter.launches == 1
    assert counter.per_launch() == [{"load": n * size, "store": n * size}]


def test_unmasked_loads_count_every_lane():
    src = torch.arange(512, dtype=torch.int32)
    dst = torch.empty_like(src)
    with count_traffic() as counter:
        _unmasked_copy[(4,)](src, dst, BLOCK=128)
    assert counter.total("load") == counter.total("store") == 512 * 4
    assert counter.launches == 1


def test_scalar_accesses_and_other_memory():
    src = torch.ones(10, dtype=torch.float16)
    out = torch.empty(1, dtype=torch.float32)
    with count_traffic() as counter:
        _scalar_sum[(1,)](src, out, 10)
    assert out.item() == 10.0
    assert counter.total("load") == 10 * 2 and counter.total("store") == 4
    assert counter.attribute({"src": src}) == {"src": {"load": 20}, "other": {"store": 4}}


def test_atomics_count_a_read_and_a_write():
    cell = torch.zeros(1, dtype=torch.int32)
    with count_traffic() as counter:
        _atomic_count[(3,)](cell)
    assert cell.item() == 3
    assert counter.total("atomic") == 3 * 2 * 4


def test_counters_nest_and_hooks_come_off():
    original = InterpreterBuilder.create_masked_load
    src = torch.randn(64)
    dst = torch.empty_like(src)
    with count_traffic() as outer:
        _masked_copy[(1,)](src, dst, 64, BLOCK=64)
        with count_traffic() as inner:
            _masked_copy[(1,)](src, dst, 32, BLOCK=64)
        assert InterpreterBuilder.create_masked_load is not original
    assert InterpreterBuilder.create_masked_load is original
    assert inner.total() == 2 * 32 * 4 and inner.launches == 1
    assert outer.total() == 2 * 96 * 4 and outer.launches == 2
    assert [a.launch for a in inner.accesses] == [0, 0]
    with count_traffic() as after:
        pass
    assert after.total() == 0


def test_missing_hook_point_fails_loudly(monkeypatch):
    monkeypatch.delattr(InterpreterBuilder, "create_masked_store")
    with pytest.raises(RuntimeError, match="create_masked_store"):
        with count_traffic():
            pass


# ----------------------------------------------------------------------------- tritonbn ops


def test_inference_nchw_moves_two_s_plus_per_channel_bytes():
    shape = (4, 8, 16, 16)
    result = measure("inference", shape, "contiguous", torch.float32, axis=1)
    s = 4 * 8 * 16 * 16 * 4
    assert result.data_bytes == s
    assert result.tensors["x"] == {"load": s} and result.tensors["y"] == {"store": s}
    assert result.data_per_s == 2.0
    # per-channel parameters and statistics: O(C) bytes per program at most, no pass over the data
    assert 0 < result.other_total <= 64 * (8 + sum(result.programs))
    assert result.total == sum(launch.loaded + launch.stored for launch in result.launches)
    assert result.n_launches == 1


@pytest.mark.parametrize("shape, layout, axis", [
    ((4, 8, 16, 16), "contiguous", 1),
    ((4, 8, 6, 6), "channels_last", 1),
    ((2, 24, 32), "contiguous", -1),
    ((2, 6, 3000), "contiguous", 1),
])
def test_training_ops_move_at_least_the_minimal_bytes(shape, layout, axis):
    results = measure("all", shape, layout, torch.bfloat16, axis=axis)
    forward, backward, both = results["forward"], results["backward"], results["forward_backward"]
    s = forward.data_bytes
    assert forward.tensors["y"]["store"] == s and forward.tensors["x"]["load"] >= s
    assert 2.0 <= forward.data_per_s <= 3.1
    assert backward.tensors["dx"]["store"] == s and backward.tensors["dy"]["load"] >= s
    assert 3.0 <= backward.data_per_s <= 5.1
    assert both.total == forward.total + backward.total
    assert both.launches == forward.launches + backward.launches
    for result in results.values():
        assert result.total == sum(launch.loaded + launch.stored for launch in result.launches)


def test_launches_and_programs_come_from_the_trace():
    x = traffic.make_data((2, 8, 16, 16), "contiguous", torch.float32)
    params = [torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8)]
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(x, *params, fix_gamma=False, training=True)
    result = measure("forward", (2, 8, 16, 16), "contiguous", torch.float32, axis=1)
    assert [(launch.kernel, launch.programs) for launch in result.launches] == \
        [(launch.kernel, launch.programs) for launch in trace.launches]


def test_make_data_layouts():
    assert traffic.make_data((2, 3, 4, 5), "channels_last", torch.float32).is_contiguous(
        memory_format=torch.channels_last)
    assert traffic.make_data((2, 3, 2, 4, 5), "channels_last", torch.float32).is_contiguous(
        memory_format=torch.channels_last_3d)
    assert traffic.make_data((2, 3, 7), "channels_last", torch.float32).stride() == (21, 1, 3)
    with pytest.raises(ValueError, match="layout"):
        traffic.make_data((2, 3), "channels_last_3d", torch.float32)


def test_bad_op_is_rejected():
    with pytest.raises(ValueError, match="op must be"):
        measure("sideways", (2, 3), "contiguous", torch.float32)


def test_traffic_subcommand(capsys):
    from tritonbn.cli import main

    assert main(["traffic", "--shape", "2,4,8,8", "--dtype", "bf16", "--op", "inference"]) == 0
    out = capsys.readouterr().out
    assert "S = 1024 bytes" in out and "inference" in out and "channel_major" in out
