"""Method names of the paper's package ``torch_symplectic_adjoint`` and torchdiffeq's names for the same methods.

One table for the two places that translate them: the ``torch_symplectic_adjoint`` compat package (which runs
the paper's names on torchdiffeq's solvers) and the codemod ``python -m symadj_plugins.migrate`` (which rewrites
``method=`` when it moves a call from the paper's package to torchdiffeq). The paper's ``rk38`` (the 3/8 rule)
is torchdiffeq's ``rk4``; the paper's ``rk4`` is the classical Runge–Kutta method, which torchdiffeq lacks.
"""

from __future__ import annotations

__all__ = ["TSA_TO_TORCHDIFFEQ"]

TSA_TO_TORCHDIFFEQ: dict[str, str | None] = {
    "dopri8": "dopri8", "dopri5": "dopri5", "bosh3": "bosh3", "fehlberg2": "fehlberg2",
    "adaptive_heun": "adaptive_heun", "rk38": "rk4", "rk4": None, "midpoint": "midpoint", "euler": "euler",
}
"""``torch_symplectic_adjoint`` method name -> torchdiffeq method name, ``None`` where torchdiffeq has none."""
