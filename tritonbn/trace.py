"""What a call did: which path ran, which kernels launched with which configs, what was copied.

Tests assert on it (``with tritonbn.trace.capture() as t: ...; assert t.path == "triton"``);
the traffic counter and the reports read the launches.  Recording is off (one ContextVar
lookup per event) unless a ``capture`` is active in the calling context.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Launch", "Trace", "capture", "record_path", "record_launch", "record_copy", "record_note"]

log = logging.getLogger("tritonbn")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel name, number of programs, the config and constexpr flags."""

    kernel: str
    programs: int
    config: Any
    flags: dict[str, Any]


@dataclass
class Trace:
    """Events recorded while a ``capture`` was active."""

    paths: list[str] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # work done outside the kernels, e.g. a host update

    @property
    def path(self) -> str | None:
        """The path of the last op ("triton" or "reference"), None if no op ran."""
        return self.paths[-1] if self.paths else None

    def kernels(self) -> list[str]:
        """Names of the launched kernels, in order."""
        return [launch.kernel for launch in self.launches]


_active: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("tritonbn_trace", default=None)


@contextlib.contextmanager
def capture() -> Iterator[Trace]:
    """Record the events of the ops run in this context."""
    trace = Trace()
    token = _active.set(trace)
    try:
        yield trace
    finally:
        _active.reset(token)


def record_path(path: str) -> None:
    """Note which implementation ran an op."""
    trace = _active.get()
    if trace is not None:
        trace.paths.append(path)


def record_launch(kernel: str, programs: int, config: Any, flags: dict[str, Any]) -> None:
    """Note a kernel launch with its constexpr ``flags`` (copied: the caller may keep its dict)."""
    trace = _active.get()
    if trace is not None:
        trace.launches.append(Launch(kernel, programs, config, dict(flags)))


def record_copy(reason: str) -> None:
    """Note (and log at debug level) that an input was copied to a dense layout."""
    log.debug("tritonbn copied an input: %s", reason)
    trace = _active.get()
    if trace is not None:
        trace.copies.append(reason)


def record_note(text: str) -> None:
    """Note work a Triton-path op did outside its kernels (on the host, in torch)."""
    trace = _active.get()
    if trace is not None:
        trace.notes.append(text)
