"""Shared fixtures: the execution paths (helpers.py has the input builders and tolerances).

Two modes, chosen before anything imports Triton:

- CPU (default): TRITON_INTERPRET=1 is set, so the kernels are built as interpreted functions
  and CPU tensors run them.  The ``path`` fixture switches the dispatch between the Triton
  kernels ("triton") and the plain-torch reference ("reference") per test; its "cuda" cases skip.
- CUDA (``TRITONBN_TEST_DEVICE=cuda``, on a machine with a CUDA GPU): the kernels are compiled,
  the ``path`` fixture runs only "cuda" (the same tests on CUDA tensors, built by helpers.py on
  ``helpers.DEVICE``), and the tests marked ``gpu`` (tests/test_cuda.py) run too; every other
  test is deselected, since it is about the interpreter or the CPU.

``--require-every-kernel`` fails the session unless every kernel variant of ``KERNEL_VARIANTS``
really ran (a launch, not a dry run): the matrix runs a subset of the suite per Triton version
and this proves that subset still reaches every kernel.
"""

from __future__ import annotations

import contextlib
import os

if os.environ.get("TRITONBN_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels are built interpreted
    # Build them now: a reference-path test (TRITON_INTERPRET=0) whose torch ops import Triton
    # first (torch's dispatch modes import torch._dynamo) would otherwise leave them compiled.
    import tritonbn.kernels  # noqa: E402,F401

import pytest  # noqa: E402

from helpers import CUDA_MODE, select_path, split_path  # noqa: E402

PATHS = ("triton", "reference", "cuda")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """Run the test through the interpreted Triton kernels and through the reference (CPU mode),
    or through the compiled kernels on CUDA tensors (CUDA mode).

    Parametrized indirectly with any of ``helpers.KERNEL_PATHS`` (``helpers.on_every_path``,
    ``helpers.on_both_triton_paths``), it also runs the Triton split path ("triton-split",
    "cuda-split": persistent kernels off for the whole test); the value is the path's name."""
    select_path(request.param, monkeypatch)
    with split_path() if request.param.endswith("-split") else contextlib.nullcontext():
        yield request.param


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; runs only with TRITONBN_TEST_DEVICE=cuda")


def pytest_collection_modifyitems(config, items) -> None:
    """CPU mode drops the cuda-path cases and skips the gpu-marked tests; CUDA mode keeps only the
    cuda-path cases of the modules that build their tensors on ``helpers.DEVICE``
    (``RUNS_ON_CUDA = True``) and the gpu-marked tests."""
    def on_cuda_path(item) -> bool:
        callspec = getattr(item, "callspec", None)
        return callspec is not None and str(callspec.params.get("path", "")).startswith("cuda")

    if CUDA_MODE and not _cuda_available():
        raise pytest.UsageError("TRITONBN_TEST_DEVICE=cuda but torch sees no CUDA GPU")
    keep, drop = [], []
    for item in items:
        if CUDA_MODE:
            wanted = item.get_closest_marker("gpu") or (
                on_cuda_path(item) and getattr(item.module, "RUNS_ON_CUDA", False))
        else:
            wanted = not on_cuda_path(item)
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs TRITONBN_TEST_DEVICE=cuda and a CUDA GPU"))
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------- kernel ledger

def pytest_addoption(parser) -> None:
    parser.addoption("--require-every-kernel", action="store_true",
                     help="fail unless every kernel variant (conftest.KERNEL_VARIANTS) was launched")


def _variant(name: str, flags: dict) -> str:
    """The ledger's name of a launch: the kernel, and for the elementwise kernels the role its
    flags select (inference, training apply, backward with batch or global statistics)."""
    if not name.endswith("_elementwise"):
        return name
    if flags.get("FROM_MOVING"):
        role = "inference"
    elif not flags.get("HAS_DY"):
        role = "apply"
    else:
        role = "dx" if flags.get("HAS_X") else "dx_global_stats"
    return f"{name}[{role}]"


def _kernel_variants() -> set[str]:
    from tritonbn import kernels

    names = {attr[: -len("_kernel")] for module in (kernels.stats, kernels.elementwise, kernels.backward,
                                                     kernels.persistent)
             for attr in dir(module) if attr.endswith("_kernel")}
    roles = ("inference", "apply", "dx", "dx_global_stats")
    return {f"{n}[{r}]" for n in names if n.endswith("_elementwise") for r in roles} | {
        n for n in names if not n.endswith("_elementwise")}


_launched: set[str] = set()


@pytest.fixture(autouse=True, scope="session")
def _kernel_ledger(request):
    """Wraps ``Launch.__call__`` for the session when ``--require-every-kernel`` is given."""
    if not request.config.getoption("--require-every-kernel"):
        yield
        return
    from tritonbn import launch

    original = launch.Launch.__call__

    def launch_and_note(self, *tensors):
        original(self, *tensors)
        if launch._dry_run.get() is None:
            _launched.add(_variant(self.name, self.constexprs))

    launch.Launch.__call__ = launch_and_note
    try:
        yield
    finally:
        launch.Launch.__call__ = original


def pytest_sessionfinish(session, exitstatus) -> None:
    if not session.config.getoption("--require-every-kernel") or exitstatus != 0:
        return
    missing = sorted(_kernel_variants() - _launched)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write("\n")
    reporter.write_sep("-", "kernel ledger (--require-every-kernel)")
    if missing:
        reporter.write_line(f"never launched: {', '.join(missing)}", red=True)
        session.exitstatus = 1
    else:
        reporter.write_line(f"all {len(_launched)} kernel variants launched")


# Hypothesis profiles (tests/test_properties.py): "ci" is the default, a bounded, derandomized
# run (the same examples every time, no example database written) that keeps the property
# tests within about a minute on two CPU cores; "long" (``--hypothesis-profile=long``) draws
# ten times as many random examples and remembers failures in .hypothesis/ for local runs.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; without it the property tests are skipped
    pass
else:
    settings.register_profile(
        "ci", max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "long", max_examples=250, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile("ci")
