"""symadj-plugins: exact, low-memory gradients for neural ODEs by the symplectic adjoint method
(Matsubara, Miyatake & Yaguchi, NeurIPS 2021), as a plugin for torchdiffeq and torchdyn.

- ``symadj_plugins.torchdiffeq.odeint_symplectic_adjoint(func, y0, t, ...)``: torchdiffeq's ``odeint``
  signature, exact gradients of its discrete solution with memory of one network evaluation plus one stored
  state per step.
- ``symadj_plugins.register()``: afterwards ``torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic")``
  (and torchdyn's ``sensitivity="symplectic_adjoint"``) select it; ``unregister()`` undoes it.
- ``symadj_plugins.SymplecticAdjoint(memory_budget=...)`` and ``with symadj_plugins.options(...)``: the method's
  options (how much memory to spend for speed), for every entry point.

Importing the package patches nothing in torchdiffeq and one thing in torchdyn: its sensitivity dispatch
(``ODEProblem._autograd_func``, now or when torchdyn is imported) is guarded so that
``sensitivity="symplectic_adjoint"`` before ``register()`` raises an error saying to call it, instead of torchdyn's
"'NoneType' object is not callable". ``unregister()`` removes that guard too.
"""

from ._registry import is_registered, register, unregister
from ._torchdyn_guard import install_guard as _install_guard
from .options import SymplecticAdjoint, options

_install_guard()  # before register(), sensitivity="symplectic_adjoint" in torchdyn says to call it

__version__ = "0.1.0"
__all__ = ["SymplecticAdjoint", "register", "unregister", "is_registered", "options", "__version__"]
