"""@triton.jit code only, one module per phase.

- ``stats``: training statistics partials and, by each channel's last program, their finalize
  (mean, invstd, moving-stat update)
- ``elementwise``: normalisation (forward, inference) and dx
- ``backward``: S/D partials and their finalize (dgamma, dbeta, dx coefficients)
- ``persistent``: single-pass training forward and backward when a channel's slice fits a program
- ``common``: helpers shared by the phases (Welford, Chan merge, offsets, tickets)

Whether these are compiled kernels or interpreted ones is decided when this package is first
imported (Triton reads TRITON_INTERPRET then).
"""

from . import backward, elementwise, persistent, stats

__all__ = ["stats", "elementwise", "backward", "persistent"]
