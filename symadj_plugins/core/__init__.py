"""Library-agnostic core: tableaux, the trajectory of accepted steps, and the symplectic adjoint sweep."""

from .adjoint import HostSolver, backward_sweep, odeint_symplectic, time_gradient
from .tableau import ButcherTableau, StagePlan
from .trajectory import StageCall, Trajectory

__all__ = [
    "ButcherTableau",
    "HostSolver",
    "StageCall",
    "StagePlan",
    "Trajectory",
    "backward_sweep",
    "odeint_symplectic",
    "time_gradient",
]
