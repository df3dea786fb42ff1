"""``tritonbn inspect``: compile every kernel variant ahead of time and report the code's quality.

No GPU is needed: Triton compiles for a ``GPUTarget`` (sm_80, sm_90) and its bundled ptxas
reports registers and spills.  The launches to compile are the ones the library would make:
representative calls run through the Triton backend in *dry-run* mode (``ops.dry_run``: the
launchers record kernel, arguments and config instead of launching), on ``meta`` tensors, with
launch decisions made for an H100.  Arguments are specialised as Triton's JIT does on a real
call (ints equal to 1 become constants; pointers and ints divisible by 16 carry
``tt.divisibility``), so the PTX is what a GPU would run.

Per compiled kernel: kernel, role, dtype, layout, op, config, arch, registers, spills (bytes of
local memory spilled), shared (bytes), max_load_bits, max_store_bits (widest global access),
approximate (PTX instructions that are not correctly rounded, by opcode: ``approximate_ops``),
programs, and ``sass``: the facts of its SASS for instruction issue (``perf/sass.py``: hot-loop
instructions, barriers and MUFU per element, widest SASS accesses, CTAs per SM, waves, active
lanes, the modelled issue-rate ceiling).  ``--calls streaming`` reports them per launch of the
streaming calls of issue 14 (``STREAMING_CALLS``); ``--cubin-dir DIR`` writes every cubin and an
``index.json`` with a row per launch.

ptxas is the one Triton itself runs for the arch (``_ptxas``): Triton 3.9 emits PTX for sm_90 at
a ``.version`` only its ``ptxas-blackwell`` reads.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

ARCHS = {"sm_80": 80, "sm_90": 90}
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.uint8: "u8"}  # int32: the split path's tickets; uint8: a fused ReLU's bits
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
DEFAULT_DTYPES = ["fp16", "bf16", "fp32"]  # fp64 (float64 accumulation) on request: --dtype fp64

# layout -> [(shape, axis, memory format)]: a large shape (split path) and shapes whose single-pass
# tiles sit at the capacities of config.SINGLE_PASS_CAPACITY (derived from every supported
# Triton's compiled code: `tritonbn capacities`): vector-aligned (NCHW: slices of 32768 elements
# for the forward and 16384 for the backward; channel-minor: [256 rows, 64 channels] = 16384 for
# both, and a tile one 32-byte sector of channels wide) and scalar-load layouts (7x7 images:
# [64, 64] for half data, [128, 64] = 8192 for float32 (and the split path of half data); small-C
# channels_last, C=6: co-resident programs of [8192 rows, 1 channel]).  "stepped-5d" views step D
# and W of NCDHW data, or N, D and W of NDHWC data (four reduced groups: the kernels divide outer
# rows into three groups there), channel-major and channel-minor: [256, 16] and [1024, 16] = 16384
# channel-major tiles, [1024 rows, 1 channel] channel-minor ones for half data.
# memory format markers -> (base memory format, dims stepped by 2 from offset 1)
STEPPED = {"stepped": (None, (2, 4)), "stepped_channels_last_3d": (torch.channels_last_3d, (0, 2, 4))}
LAYOUTS = {
    "nchw": [((32, 64, 56, 56), 1, None), ((32, 64, 32, 32), 1, None), ((16, 64, 32, 32), 1, None),
             ((128, 4, 7, 7), 1, None), ((64, 4, 7, 7), 1, None)],
    "channels_last": [((32, 64, 56, 56), 1, torch.channels_last), ((1, 64, 16, 16), 1, torch.channels_last),
                      ((4, 64, 16, 16), 1, torch.channels_last), ((8, 6, 32, 32), 1, torch.channels_last)],
    "axis-1": [((64, 512, 768), -1, None), ((2, 128, 64), -1, None), ((8, 128, 64), -1, None)],
    "stepped-5d": [((16, 64, 8, 28, 28), 1, "stepped"), ((4, 64, 4, 16, 16), 1, "stepped"),
                   ((16, 64, 4, 16, 16), 1, "stepped"),
                   ((16, 64, 8, 28, 28), 1, "stepped_channels_last_3d"),
                   ((2, 64, 4, 8, 16), 1, "stepped_channels_last_3d")],
}
OPS = ("inference", "training_forward", "backward")
# The streaming calls whose compiled code issue 14 budgets: ResNet-50 at N = 32 (64@56, 256@28,
# 2048@7) NCHW and channels_last, a small-C long-row call and a transformer-style axis=-1 call.
STREAMING_CALLS = {
    "nchw": [((32, 64, 56, 56), 1, None), ((32, 256, 28, 28), 1, None), ((32, 2048, 7, 7), 1, None),
             ((20, 6, 65536), 1, None)],
    "channels_last": [((32, 64, 56, 56), 1, torch.channels_last), ((32, 256, 28, 28), 1, torch.channels_last),
                      ((32, 2048, 7, 7), 1, torch.channels_last)],
    "axis-1": [((8, 2048, 1024), -1, None)],
}
STREAMING_DTYPES = ["bf16", "fp32"]
# Issue 14's budget for every streaming launch: (what, which launches it applies to, the test).
ISSUE_BUDGET = (
    ("issue-rate ceiling >= 9.6 TB/s", lambda r: True, lambda r: r.sass["issue_ceiling_tbs"] >= 9.6),
    ("no barrier in a hot-loop iteration", lambda r: r.sass["in_loop"], lambda r: r.sass["barriers"] == 0),
    ("active lanes >= 95%", lambda r: True, lambda r: r.sass["active_lanes"] >= 0.95),
    (">= 2 CTAs per SM (split-path launches)", lambda r: r.role != "persistent", lambda r: r.sass["ctas_per_sm"] >= 2),
    ("last wave >= 75% full (launches of 1-4 waves)", lambda r: 1 <= r.sass["waves"] <= 4,
     lambda r: r.sass["last_wave_fill"] >= 0.75),
)
CALL_SETS = {"representative": LAYOUTS, "streaming": STREAMING_CALLS}

# PTX instructions whose result is not the correctly rounded one (PTX ISA): div.full.f32 (what a
# plain float32 `/` compiles to) and div.approx.f32 are within 2 ulp; rcp, rsqrt, sqrt, ex2, lg2,
# sin, cos and tanh .approx are fast approximations.  Inside inline PTX (written on purpose in a
# kernel) they count as "<opcode> (inline asm)".
APPROXIMATE_OP = re.compile(r"\b(?:div\.full|(?:div|rcp|rsqrt|sqrt|ex2|lg2|sin|cos|tanh)\.approx)"
                            r"(?:\.ftz)?\.(?:f16x2|bf16x2|f16|bf16|f32|f64)\b")
INLINE_ASM = re.compile(r"// begin inline asm(.*?)// end inline asm", re.S)
# The approximations the kernels make on purpose, per kernel; any other is a bug (the numerics
# rely on exact steps: common.exact_div, common.divide_by_count, common.unscale, common.safe_invstd).
ALLOWED_APPROXIMATE: dict[str, set[str]] = {}


@dataclass
class CompiledKernel:
    """One row of the inspect report."""

    kernel: str
    role: str
    dtype: str
    layout: str
    op: str
    config: dict
    arch: str
    registers: int
    spills: int
    shared: int
    max_load_bits: int
    max_store_bits: int
    shape: tuple = ()  # the representative call's data shape
    vector_aligned: bool = True  # its rows provably 16-element aligned (128-bit accesses possible)
    approximate: dict = field(default_factory=dict)  # approximate PTX instructions: {opcode: count}
    programs: int = 0  # the launch's grid
    sass: dict = field(default_factory=dict)  # perf.sass.IssueFacts of the launch
    fusion: str = "none"  # the call's fusion: "none" or a key of FUSIONS

    def unexpected_approximations(self) -> dict:
        """The approximate instructions of this kernel that ``ALLOWED_APPROXIMATE`` does not allow."""
        allowed = ALLOWED_APPROXIMATE.get(self.kernel, set())
        return {op: n for op, n in self.approximate.items() if op not in allowed}


def _role(kernel: str, op: str) -> str:
    if "persistent" in kernel:
        return "persistent"
    if kernel.endswith("_stats"):
        return "stats"
    if kernel.endswith("_elementwise") and op != "backward":
        return "apply"
    return "backward"


FUSIONS = {"relu": ("relu", False), "add": (None, True), "add_relu": ("relu", True)}  # (act_type, addend)
FUSION_CHOICES = ("none", *FUSIONS)


def captured_launches(shape, axis, memory_format, dtype: torch.dtype, op: str, fusion: str | None = None,
                      strides: tuple | None = None, keep_mask: bool | None = None) -> list[Any]:
    """The launches tritonbn would make for one call (dry run on meta tensors), fused with
    ``fusion`` (a key of ``FUSIONS``: the addend in the data's layout) when given; ``strides``:
    the data's, instead of ``memory_format``'s; ``keep_mask``: whether a fused training forward
    writes the ReLU's bits for a backward (default: only when the backward runs too, op
    "backward"; autograd's forward keeps them)."""
    from . import ops
    from .autotune.config import H100_PROFILE, override_profile
    from .validation import validate, validate_fusion

    x = (_meta_data(shape, memory_format, dtype) if strides is None
         else torch.empty_strided(shape, strides, dtype=dtype, device="meta"))
    channels = shape[axis]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.empty(channels, dtype=param_dtype, device="meta") for _ in range(4)]
    training = op != "inference"
    settings = validate(x, tuple(params), eps=1e-5, momentum=0.9, fix_gamma=False, use_global_stats=False,
                        axis=axis, out=None, training=training, unbiased_update=False)
    backend = ops.TritonBackend()
    with override_profile(H100_PROFILE), ops.dry_run() as launches:
        if fusion is None:
            y, _, invstd, center, x_read = backend.forward(x, *params, settings, None)
            mask = None
        else:
            act_type, with_addend = FUSIONS[fusion]
            addend = torch.empty_like(x) if with_addend else None
            settings = validate_fusion(settings, x, act_type, addend, None)
            y, _, invstd, center, x_read, mask = backend.fused_forward(x, *params, settings, None, addend,
                                                                       keep_mask=op == "backward" if keep_mask is None
                                                                       else keep_mask)
        if op == "backward":
            launches.clear()
            run = backend.backward if fusion is None else backend.fused_backward
            run(torch.empty_like(y), x_read, params[0], center, invstd, settings, params[1].dtype,
                *(() if fusion is None else (mask,)))
    return launches


def _meta_data(shape, memory_format, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The representative call's data on the meta device, in its layout's memory format, or one
    of the step-sliced rank-5 views of ``STEPPED``."""
    if memory_format in STEPPED:
        base_format, dims = STEPPED[memory_format]
        base = torch.empty([2 * size + 1 if d in dims else size for d, size in enumerate(shape)], dtype=dtype,
                           device="meta")
        if base_format is not None:
            base = base.contiguous(memory_format=base_format)
        return base[tuple(slice(1, None, 2) if d in dims else slice(None) for d in range(len(shape)))]
    x = torch.empty(shape, dtype=dtype, device="meta")
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def _specialise(fn, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes of a call, as Triton's JIT specialises them."""
    names = [p.name for p in fn.params if not p.is_constexpr]
    defaults = {p.name: p.default for p in fn.params
                if p.is_constexpr and p.name not in constexprs and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}  # the constexprs a launch leaves at their defaults too
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, (name, value) in enumerate(zip(names, args)):
        position = fn.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPES[value.dtype]
            attrs[(position,)] = [["tt.divisibility", 16]]  # fresh allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constants[name] = 1
                continue
            signature[name] = "i64" if not -(2**31) <= value < 2**31 else "i32"
            if value % 16 == 0:
                attrs[(position,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot specialise argument {name}={value!r}")
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constants, attrs


@functools.lru_cache(maxsize=None)
def _ptxas(arch: str) -> str:
    """The ptxas binary Triton itself runs for ``arch``.

    Triton's NVIDIA backend picks it per arch with ``get_ptxas(capability)`` (3.6-3.9: the
    bundled ``ptxas``, or ``ptxas-blackwell`` from sm_100 on 3.6-3.8 and from sm_90 on 3.9, whose
    PTX ``.version`` the older one rejects); ``TRITON_PTXAS_PATH`` and friends apply as in Triton.
    Without that function, the bundled ``bin/ptxas``.
    """
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        get_ptxas = None
    if get_ptxas is not None:
        path = get_ptxas(ARCHS[arch]).path
    else:
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not path or not os.path.exists(path):
        raise RuntimeError(f"the ptxas Triton uses for {arch} is missing ({path})")
    return path


def _ptxas_report(ptx: str, arch: str, fmad: bool = True) -> tuple[int, int]:
    """(registers, spilled bytes) of the PTX's kernel, from ptxas -v; ``fmad=False`` passes
    ``--fmad=false`` as Triton does for a kernel compiled without FP fusion."""
    gpu = "sm_90a" if arch == "sm_90" else arch
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        result = subprocess.run([_ptxas(arch), "-v", *([] if fmad else ["--fmad=false"]), f"--gpu-name={gpu}",
                                 handle.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr))
    stack = sum(int(n) for n in re.findall(r"(\d+) bytes stack frame", result.stderr))
    return registers, max(spills, stack)


def _widest_access(ptx: str, op: str) -> int:
    """Widest global load (op="ld") or store (op="st") in bits."""
    widest = 0
    for vector, bits in re.findall(rf"\b{op}\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        widest = max(widest, int(vector or 1) * int(bits))
    return widest


def approximate_ops(ptx: str) -> dict[str, int]:
    """{opcode: count} of the PTX's approximate instructions (``APPROXIMATE_OP``); those inside
    inline PTX as "<opcode> (inline asm)"."""
    counts: dict[str, int] = {}
    for text, suffix in ((INLINE_ASM.sub("", ptx), ""), ("".join(INLINE_ASM.findall(ptx)), " (inline asm)")):
        for op in APPROXIMATE_OP.findall(text):
            counts[op + suffix] = counts.get(op + suffix, 0) + 1
    return counts


def compile_kernel(launch, arch: str):
    """Triton's compiled kernel of one captured launch for ``arch`` (``.asm["ptx"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _specialise(launch.kernel, launch.args, launch.constexprs)
    source = ASTSource(launch.kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32),
                          options={"num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages})


def compile_launch(launch, arch: str, compiled=None) -> dict:
    """Compile one captured launch for ``arch`` (or read ``compiled``, its compiled kernel):
    registers, spills, shared, widest accesses, approximate instructions."""
    compiled = compiled or compile_kernel(launch, arch)
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_report(ptx, arch, fmad=getattr(compiled.metadata, "enable_fp_fusion", True))
    return dict(registers=registers, spills=spills, shared=int(compiled.metadata.shared),
                max_load_bits=_widest_access(ptx, "ld"), max_store_bits=_widest_access(ptx, "st"),
                approximate=approximate_ops(ptx))


def _covered(extent: int, per_split: int, block: int) -> int:
    """Lanes that tiles of ``block`` span over ``extent`` walked in splits of ``per_split``."""
    full, rest = divmod(extent, per_split)
    return full * -(-per_split // block) * block + (-(-rest // block) * block if rest else 0)


def launch_geometry(launch, plan) -> tuple[int, float, int, int]:
    """(elements of a program's tile, active-lane fraction of the launch's tiles over the view's
    extents, full-size tensors it reads, full-size tensors it writes) of a captured launch on
    ``plan``, from the kernel's tiling (``config.launch_programs``' roles)."""
    from .ops import _split_extents
    from .plan import CHANNEL_MAJOR

    cfg, flags, kind = launch.config, launch.constexprs, launch.name.split("_", 2)[2]
    tile = cfg.block_rows * cfg.block_cols
    major = plan.family == CHANNEL_MAJOR
    rows, cols = (plan.outer, plan.inner) if major else (plan.m, plan.channels)
    reads_x = flags.get("BATCH_STATS", True) or not flags.get("FIX_GAMMA", False)
    if kind in ("stats", "backward_reduce"):
        rows_per_split, cols_per_split = _split_extents(plan, cfg)
        lanes = _covered(rows, rows_per_split, cfg.block_rows) * (
            _covered(cols, cols_per_split, cfg.block_cols) if major else _covered(cols, cols, cfg.block_cols))
        reads, writes = (1 if kind == "stats" else 1 + reads_x), 0
    elif kind == "elementwise":
        row_block = cfg.block_rows * (1 if major else cfg.row_tiles)
        lanes = _covered(rows, rows, row_block) * _covered(cols, cols, cfg.block_cols)
        reads, writes = flags["HAS_X"] + flags["HAS_DY"], 1
    else:  # persistent: one tile covers a channel's (channel-major) or a channel block's rows
        lanes = cfg.block_rows * (cfg.block_cols if major else _covered(cols, cols, cfg.block_cols))
        reads, writes = (1 if kind == "persistent_forward" else 1 + reads_x), 1
    return tile, rows * cols / lanes, reads, writes


def inspect_launch(launch, arch: str, plan, element_size: int) -> tuple[dict, bytes]:
    """(``compile_launch``'s report plus ``programs`` and ``sass``, the cubin) of one captured launch."""
    from .perf import sass

    compiled = compile_kernel(launch, arch)
    stats = compile_launch(launch, arch, compiled)
    tile, lanes, reads, writes = launch_geometry(launch, plan)
    cubin = compiled.asm["cubin"]
    # a loop-free program handles one tile (the channel-minor elementwise loop over row_tiles
    # tiles is gone only where row_tiles is 1, a compile-time constant then)
    facts = sass.issue_facts(sass.parse(sass.disassemble(cubin)), arch, num_warps=launch.config.num_warps,
                             registers=stats["registers"], shared=stats["shared"], programs=launch.programs,
                             tile_elements=tile, element_size=element_size, reads=reads, writes=writes,
                             active_lanes=lanes)
    return dict(stats, programs=launch.programs, sass=asdict(facts)), cubin


def call_issue_facts(calls: Iterable[dict], arch: str = "sm_90") -> list[dict]:
    """For each call (a dict of shape, axis, strides, dtype: a ``DTYPES`` name, ops: ``OPS``
    entries, fusion: "none" or a key of ``FUSIONS``, keep_mask: as ``captured_launches``), the SASS facts of its binding launch, the
    one with the lowest issue-rate ceiling over the call's ops: kernel, instructions per element
    and ceiling (TB/s, modelled: ``perf/sass.py``), and the lowest active-lane fraction of the
    call's launches.  Launches that compile alike are compiled once (their per-element facts
    depend on the compiled code and the tile only)."""
    from .plan import plan_view

    compiled: dict = {}
    out = []
    for call in calls:
        shape, axis, strides, dtype = tuple(call["shape"]), call["axis"], tuple(call["strides"]), DTYPES[call["dtype"]]
        fusion = None if call.get("fusion", "none") == "none" else call["fusion"]
        plan = plan_view(shape, axis, [strides, strides])
        launches = [launch for op in call["ops"]
                    for launch in captured_launches(shape, axis, None, dtype, op, fusion, strides=strides,
                                                    keep_mask=call.get("keep_mask"))]
        facts = []
        for launch in launches:
            key = (launch.name, launch.config, repr(_specialise(launch.kernel, launch.args, launch.constexprs)))
            if key not in compiled:
                compiled[key] = inspect_launch(launch, arch, plan, dtype.itemsize)[0]["sass"]
            facts.append((compiled[key], launch.name))
        binding, kernel = min(facts, key=lambda fact: fact[0]["issue_ceiling_tbs"])
        out.append(dict(kernel=kernel, arch=arch, instructions_per_element=binding["instructions_per_element"],
                        issue_ceiling_tbs=binding["issue_ceiling_tbs"],
                        active_lanes=min(launch_geometry(launch, plan)[1] for launch in launches)))
    return out


def inspect_kernels(archs: Iterable[str], dtypes: Iterable[str], layouts: Iterable[str],
                    progress=None, calls: dict | None = None, per_call: bool = False,
                    cubins: dict | None = None, fusions: Iterable[str] = ("none",)) -> list[CompiledKernel]:
    """Compile every distinct launch of the representative calls (``calls``: a table like
    ``LAYOUTS``) for each arch, plain and fused with each of ``fusions`` (``FUSION_CHOICES``; a
    fused call's kernels that are the plain ones are not compiled twice); ``per_call``: a row for
    every launch of every call, not only the first of each distinct kernel; ``cubins``: filled
    with row index -> cubin bytes."""
    from .plan import plan_view

    rows, seen = [], set()
    for dtype_name, layout, fusion in itertools.product(dtypes, layouts, fusions):
        for shape, axis, memory_format in (calls or LAYOUTS).get(layout, []):
            x = _meta_data(shape, memory_format)
            plan = plan_view(shape, axis, [x.stride(), x.stride()])
            for op in OPS:
                for launch in captured_launches(shape, axis, memory_format, DTYPES[dtype_name], op,
                                                None if fusion == "none" else fusion):
                    key = (launch.name, dtype_name, layout, launch.config, tuple(sorted(launch.constexprs.items())))
                    if key in seen and not per_call:
                        continue
                    seen.add(key)
                    for arch in archs:
                        if progress:
                            progress(f"{arch} {dtype_name} {layout} {op} {fusion} {launch.name}")
                        stats, cubin = inspect_launch(launch, arch, plan, DTYPES[dtype_name].itemsize)
                        if cubins is not None:
                            cubins[len(rows)] = cubin
                        rows.append(CompiledKernel(launch.name, _role(launch.name, op), dtype_name, layout, op,
                                                   asdict(launch.config), arch, **stats, shape=tuple(shape),
                                                   vector_aligned=_aligned(shape, axis, memory_format),
                                                   fusion=fusion))
    return rows


def _aligned(shape, axis, memory_format) -> bool:
    from .autotune.config import vector_aligned
    from .plan import plan_view

    x = _meta_data(shape, memory_format)
    return vector_aligned(plan_view(shape, axis, [x.stride(), x.stride()]))


def format_table(rows: list[CompiledKernel]) -> str:
    """A readable table of the report (a fusion column when some rows are of fused calls)."""
    fused = any(r.fusion != "none" for r in rows)
    header = f"{'arch':6s} {'dtype':5s} {'layout':13s} {'shape':16s} {'kernel':36s} {'role':10s} {'warps':>5s} " \
             f"{'regs':>4s} {'spill':>5s} {'smem':>6s} {'ld':>4s} {'st':>4s}" + ("  fusion" if fused else "")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r.shape)) + ("" if r.vector_aligned else "*")
        lines.append(f"{r.arch:6s} {r.dtype:5s} {r.layout:13s} {shape:16s} {r.kernel:36s} {r.role:10s} "
                     f"{r.config['num_warps']:5d} {r.registers:4d} {r.spills:5d} {r.shared:6d} "
                     f"{r.max_load_bits:4d} {r.max_store_bits:4d}" + (f"  {r.fusion}" if fused else ""))
    lines.append("* scalar-load layout (strides or the fast extent not multiples of 16)")
    return "\n".join(lines)


def format_sass_table(rows: list[CompiledKernel]) -> str:
    """The SASS facts of each row (``perf/sass.py``): per element of the hot loop (``loop``) or
    of a loop-free program's tile, and the launch's residency."""
    header = (f"{'arch':6s} {'dtype':5s} {'op':16s} {'layout':13s} {'shape':14s} {'kernel':34s} {'loop':>4s} "
              f"{'inst/el':>7s} {'bar':>3s} {'mufu/el':>7s} {'ld':>3s} {'st':>3s} {'cta/sm':>6s} {'waves':>5s} "
              f"{'last':>4s} {'lanes':>5s} {'ceiling TB/s':>12s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        f = r.sass
        lines.append(f"{r.arch:6s} {r.dtype:5s} {r.op:16s} {r.layout:13s} {'x'.join(map(str, r.shape)):14s} "
                     f"{r.kernel:34s} {'yes' if f['in_loop'] else 'no':>4s} {f['instructions_per_element']:7.2f} "
                     f"{f['barriers']:3g} {f['mufu_per_element']:7.2f} {f['widest_load_bits']:3d} "
                     f"{f['widest_store_bits']:3d} {f['ctas_per_sm']:6d} {f['waves']:5.2f} {f['last_wave_fill']:4.0%} "
                     f"{f['active_lanes']:5.0%} {f['issue_ceiling_tbs']:12.2f}")
    lines.append("inst/el, mufu/el: SASS instructions a thread issues x threads / elements, per hot-loop iteration "
                 "(loop: yes) or loop-free program; bar: barriers per tile of the hot loop (per program); last: fill of the "
                 "last wave; lanes: active-lane fraction of the tiles; ceiling: the bandwidth instruction issue "
                 "alone allows (modelled: perf/sass.py GPUS, no stalls)")
    return "\n".join(lines)


def format_budget(rows: list[CompiledKernel]) -> str:
    """How many of the launches each target of ``ISSUE_BUDGET`` applies to meet it."""
    lines = ["issue 14's budget:"]
    for what, applies, meets in ISSUE_BUDGET:
        counted = [r for r in rows if applies(r)]
        lines.append(f"  {what}: {sum(map(meets, counted))} of {len(counted)}")
    return "\n".join(lines)


def write_cubins(directory: str, rows: list[CompiledKernel], cubins: dict) -> str:
    """Write each distinct cubin once (named by kernel, arch and content hash) and ``index.json``
    with a row per launch: kernel, arch, dtype, layout, shape, op, config, programs, cubin."""
    import hashlib

    os.makedirs(directory, exist_ok=True)
    index = []
    for number, row in enumerate(rows):
        cubin = cubins[number]
        name = f"{row.kernel}-{row.arch}-{hashlib.sha256(cubin).hexdigest()[:12]}.cubin"
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            with open(path, "wb") as handle:
                handle.write(cubin)
        index.append(dict(kernel=row.kernel, arch=row.arch, dtype=row.dtype, layout=row.layout, shape=list(row.shape),
                          op=row.op, config=row.config, programs=row.programs, cubin=name))
    index_path = os.path.join(directory, "index.json")
    with open(index_path, "w") as handle:
        json.dump(index, handle, indent=1)
    return index_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="target (repeatable; default both)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="data dtype (repeatable; default fp16, bf16, fp32; bf16, fp32 with --calls streaming)")
    parser.add_argument("--layout", action="append", choices=sorted(LAYOUTS), help="layout (default all)")
    parser.add_argument("--calls", choices=sorted(CALL_SETS), default="representative",
                        help="representative: every distinct kernel of the representative calls (default); "
                             "streaming: every launch of issue 14's streaming calls, with the SASS facts table")
    parser.add_argument("--fusion", action="append", choices=FUSION_CHOICES,
                        help="the calls plain (none) or fused with a ReLU and/or an addend (repeatable; default none)")
    parser.add_argument("--json", metavar="FILE", help="write the report as a JSON list")
    parser.add_argument("--cubin-dir", metavar="DIR", help="write every cubin and index.json (a row per launch)")


def run(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("tritonbn inspect compiles kernels: unset TRITON_INTERPRET")
    streaming = args.calls == "streaming"
    calls = CALL_SETS[args.calls]
    cubins: dict | None = {} if args.cubin_dir else None
    rows = inspect_kernels(args.arch or sorted(ARCHS), args.dtype or (STREAMING_DTYPES if streaming else DEFAULT_DTYPES),
                           args.layout or list(calls), calls=calls, per_call=streaming, cubins=cubins,
                           fusions=args.fusion or ("none",),
                           progress=lambda text: print(f"compiling {text}", file=sys.stderr, flush=True))
    print(format_sass_table(rows) + "\n" + format_budget(rows) if streaming else format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=1)
        print(f"wrote {len(rows)} kernels to {args.json}")
    if args.cubin_dir:
        print(f"wrote {len(rows)} launches to {write_cubins(args.cubin_dir, rows, cubins)}")
    spilling = [r for r in rows if r.spills]
    approximating = [r for r in rows if r.unexpected_approximations()]
    for r in approximating:
        print(f"approximate math in {r.arch} {r.dtype} {r.layout} {r.kernel}: {r.unexpected_approximations()}")
    print(f"{len(rows)} compiled kernels, {len(spilling)} with spills, "
          f"{len(approximating)} with approximate math outside ALLOWED_APPROXIMATE")
    return 1 if spilling or approximating else 0
