"""Shared fixtures: both execution paths (helpers.py has the input builders and tolerances).

TRITON_INTERPRET=1 is set before anything imports Triton, so the kernels are built as
interpreted functions and CPU tensors run them.  The ``path`` fixture switches the dispatch
between the Triton kernels ("triton") and the plain-torch reference ("reference") per test.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels are built interpreted

import pytest  # noqa: E402


PATHS = ("triton", "reference")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """Run the test once through the interpreted Triton kernels and once through the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


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
