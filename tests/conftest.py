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
