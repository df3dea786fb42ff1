"""What a compiled kernel's SASS says about instruction issue, read without a GPU.

``tritonbn inspect`` disassembles every cubin with the ``nvdisasm`` in Triton's wheel and derives,
per launch:

- the *hot loop*: the innermost loop (a backward branch) with the most global loads, or the whole
  kernel body (before its subroutines) for loop-free kernels;
- instructions per element: the hot region's SASS instructions x threads / elements it handles
  (a loop iteration the elements its data loads bring in, a loop-free program its tile);
- barriers (``BAR.*``) per tile of the hot loop (per program when loop-free), MUFU per element;
- widest global load and store (``LDG``/``STG`` width suffixes);
- CTAs per SM (registers, threads, shared memory, CTA slots of the arch), waves over the GPU and
  the fill of the last wave;
- the active-lane fraction of the tiles over the call's extents (masked lanes issue too);
- the issue-rate ceiling: the bandwidth instruction issue alone allows, with no stalls, as issue 14
  models it: SMs x clock x 4 warp-instructions per clock, the integer/logic/compare and float64
  pipes at half rate, shuffles at a quarter, MUFU and conversions at an eighth (CUDA programming
  guide throughput table, compute capability 8.x/9.0).  It is a *model* of the hardware, with its
  constants in ``GPUS``; the instruction counts under it are counted from the code.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+):")
BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass(frozen=True)
class Gpu:
    """The issue model's constants of one target (modelled, not measured)."""

    name: str
    sms: int
    clock_ghz: float
    shared_per_sm: int  # bytes a CTA may get, summed over the SM's CTAs
    dram_tbs: float  # the memory's peak bandwidth (vendor specification), the bar a ceiling is read against
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32
    reserved_shared_per_cta: int = 1024


GPUS = {"sm_90": Gpu("H100/H200 SXM", sms=132, clock_ghz=1.98, shared_per_sm=233472, dram_tbs=4.8),  # H200's
        "sm_80": Gpu("A100", sms=108, clock_ghz=1.41, shared_per_sm=167936, dram_tbs=2.04)}

# Root opcodes by issue rate (lanes per clock per SM: full 128, half 64, quarter 32, eighth 16).
HALF_RATE = frozenset({
    "IADD3", "IADD", "IMAD", "IMNMX", "VIMNMX", "VIADD", "VIADDMNMX", "IABS", "ISCADD", "LEA", "LOP3", "LOP", "SHF",
    "SHL", "SHR", "SEL", "ISETP", "FSETP", "FSEL", "FMNMX", "PRMT", "PLOP3", "P2R", "R2P", "SGXT", "BMSK", "MOV",
    "DADD", "DMUL", "DFMA", "DSETP", "DMNMX",
})
QUARTER_RATE = frozenset({"SHFL"})
EIGHTH_RATE = frozenset({"MUFU", "F2F", "F2I", "I2F", "I2FP", "F2FP", "I2I", "FRND", "FLO", "POPC", "BREV"})
NOT_ISSUED = frozenset({"NOP"})


@dataclass(frozen=True)
class Sass:
    """A kernel's disassembly: (address, opcode) per instruction of its body (its subroutines,
    such as a division's slow path, excluded), labels -> address, (address, target) branches."""

    instructions: tuple[tuple[int, str], ...]
    labels: dict
    branches: tuple[tuple[int, str], ...]


def parse(text: str) -> Sass:
    """Parse ``nvdisasm -c`` output of one kernel."""
    instructions, labels, branches = [], {}, []
    next_address = 0
    for line in text.splitlines():
        label = LABEL.match(line)
        if label:
            if label.group(1).startswith("$"):  # a subroutine: the kernel body ended before it
                break
            labels[label.group(1)] = next_address
            continue
        match = INSTRUCTION.search(line)
        if not match:
            continue
        address, opcode = int(match.group(1), 16), match.group(2)
        next_address = address + 16
        if opcode in NOT_ISSUED:
            continue
        instructions.append((address, opcode))
        target = BRANCH_TARGET.search(line)
        if target and opcode.startswith("BRA"):
            branches.append((address, target.group(1)))
    return Sass(tuple(instructions), labels, tuple(branches))


def loops(sass: Sass) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop: a branch back to a label at or before it (the
    trailing ``BRA`` to itself that pads a kernel is no loop)."""
    found = []
    for address, target in sass.branches:
        start = sass.labels.get(target)
        if start is not None and start < address:
            found.append((start, address))
    return found


def _in(region: tuple[int, int], sass: Sass) -> list[str]:
    return [op for address, op in sass.instructions if region[0] <= address <= region[1]]


def hot_loop(sass: Sass) -> tuple[int, int] | None:
    """The innermost loop that loads the most bits of data (``_load_bits``; ties: the first),
    None without one.  By bits, not loads: a finalize tail's loop over channels issues more
    loads (scalar parameters) than the data loop's few vector ones; the first of equals: a
    statistics kernel's rare second pass over its split comes after the streaming one."""
    found = loops(sass)
    innermost = [r for r in found if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in found)]
    loads = {r: _load_bits(_in(r, sass)) for r in innermost}
    streaming = [r for r in innermost if loads[r]]
    if not streaming:
        return None
    return max(streaming, key=lambda r: (loads[r], -r[0]))


def hot_region(sass: Sass) -> tuple[tuple[int, int] | None, list[str]]:
    """(the hot loop or None, the opcodes the facts count): the hot loop's body, or the whole
    kernel body where there is no loop."""
    loop = hot_loop(sass)
    return loop, (_in(loop, sass) if loop else [op for _, op in sass.instructions])


def access_bits(opcode: str) -> int:
    """Width in bits of an ``LDG``/``STG`` (``.128``, ``.64``, ``.U16`` ...; plain: 32)."""
    for part in opcode.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
    return 32


def _widest(opcodes: list[str], prefix: str) -> int:
    return max((access_bits(op) for op in opcodes if op.split(".")[0] == prefix), default=0)


@functools.lru_cache(maxsize=None)
def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} is missing from Triton's wheel ({path})")
    return path


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (Triton's bundled nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        result = subprocess.run([_tool("nvdisasm"), "-c", handle.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    return result.stdout


def ctas_per_sm(gpu: Gpu, registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM: registers (8 a thread, 256 a warp, allocation granules), threads,
    shared memory (plus the per-CTA reservation) and CTA slots."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (gpu.registers_per_sm // per_warp) // num_warps
    by_threads = gpu.threads_per_sm // (32 * num_warps)
    by_shared = gpu.shared_per_sm // (shared + gpu.reserved_shared_per_cta)
    return max(0, min(by_registers, by_threads, by_shared, gpu.ctas_per_sm))


def waves(gpu: Gpu, programs: int, resident: int) -> tuple[float, float]:
    """(waves, fill of the last wave) of ``programs`` CTAs at ``resident`` per SM."""
    per_wave = max(resident, 1) * gpu.sms
    full, rest = divmod(programs, per_wave)
    return programs / per_wave, (rest / per_wave if rest else 1.0) if programs else 0.0


@dataclass(frozen=True)
class IssueFacts:
    """The compiled-code facts of one launch (see the module docstring)."""

    in_loop: bool  # the counts are a hot loop iteration's (else the whole kernel body's)
    instructions: int  # SASS instructions a thread issues per iteration (per program when loop-free)
    elements: int  # elements a SASS loop iteration (a loop-free program) handles
    instructions_per_element: float
    barriers: float  # BAR per tile of the hot loop (a SASS iteration may span several), per program loop-free
    mufu_per_element: float
    widest_load_bits: int
    widest_store_bits: int
    ctas_per_sm: int
    waves: float
    last_wave_fill: float
    active_lanes: float
    issue_ceiling_tbs: float  # modelled: the bandwidth instruction issue alone allows


def issue_ceiling(gpu: Gpu, opcodes: list[str], threads: int, elements: int, bytes_per_element: int) -> float:
    """TB/s of data the issue model allows for ``opcodes`` run by ``threads`` per ``elements``."""
    def per_element(ops: list[str]) -> float:  # warp-instructions per element
        return len(ops) * threads / 32 / max(elements, 1)

    roots = [op.split(".")[0] for op in opcodes]
    cycles = max(per_element(roots) / 4, per_element([r for r in roots if r in HALF_RATE]) / 2,
                 per_element([r for r in roots if r in QUARTER_RATE]) / 1,
                 per_element([r for r in roots if r in EIGHTH_RATE]) / 0.5)
    if cycles == 0:
        return float("inf")
    return gpu.sms * gpu.clock_ghz * 1e9 / cycles * bytes_per_element / 1e12


def _load_bits(opcodes: list[str]) -> int:
    """Bits a thread loads from global memory in ``opcodes`` (strong loads, which read other
    programs' partials, excluded: the data streams through plain ones)."""
    return sum(access_bits(op) for op in opcodes if op.split(".")[0] == "LDG" and ".STRONG" not in op)


def issue_facts(sass: Sass, arch: str, *, num_warps: int, registers: int, shared: int, programs: int,
                tile_elements: int, element_size: int, reads: int, writes: int, active_lanes: float) -> IssueFacts:
    """The facts of one launch from its disassembly and launch shape.

    ``tile_elements``: elements a loop-free program handles; ``reads``, ``writes``: full-size
    tensors of ``element_size`` bytes it reads and writes per element.  A hot-loop iteration
    handles the elements its data loads bring in (ptxas may unroll a tile loop: one SASS
    iteration then spans several tiles).
    """
    gpu = GPUS[arch]
    loop, region = hot_region(sass)
    threads = 32 * num_warps
    elements = tile_elements
    if loop is not None and _load_bits(region):
        elements = threads * _load_bits(region) // (8 * element_size * max(reads, 1))
    resident = ctas_per_sm(gpu, registers, num_warps, shared)
    wave_count, fill = waves(gpu, programs, resident)
    all_ops = [op for _, op in sass.instructions]
    return IssueFacts(
        in_loop=loop is not None, instructions=len(region), elements=elements,
        instructions_per_element=len(region) * threads / elements,
        barriers=sum(op.startswith("BAR") for op in region) * tile_elements / elements,
        mufu_per_element=sum(op.startswith("MUFU") for op in region) * threads / elements,
        widest_load_bits=_widest(all_ops, "LDG"), widest_store_bits=_widest(all_ops, "STG"),
        ctas_per_sm=resident, waves=wave_count, last_wave_fill=fill, active_lanes=active_lanes,
        issue_ceiling_tbs=issue_ceiling(gpu, region, threads, elements, (reads + writes) * element_size))
