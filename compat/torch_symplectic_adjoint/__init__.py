"""Drop-in for ``torch_symplectic_adjoint``, the package of Matsubara, Miyatake & Yaguchi, "Symplectic Adjoint
Method for Exact Gradient of Neural ODE with Minimal Memory" (NeurIPS 2021), provided by symadj-plugins.

Same functions, argument names, defaults and method names as the original::

    from torch_symplectic_adjoint import odeint_symplectic_adjoint
    y = odeint_symplectic_adjoint(func, y0, t, rtol=1e-7, atol=1e-9, method="dopri5")

but the solvers are torchdiffeq's (installed version) and the symplectic adjoint is symadj-plugins'. Where the
result cannot be the original's, a ``UserWarning`` says what differs (once per call site); where it would
silently be something else, an error. See MIGRATION.md for the list, and for moving to
``symadj_plugins.torchdiffeq`` (torchdiffeq's own method names and options).
"""

from ._api import odeint, odeint_adjoint, odeint_checkpoint, odeint_onecheckpoint, odeint_symplectic_adjoint
from ._methods import METHODS

__version__ = "0.0.1"
"""The version of the original package whose API this shim provides."""

PROVIDED_BY = "symadj-plugins"

__all__ = ["odeint", "odeint_adjoint", "odeint_checkpoint", "odeint_onecheckpoint", "odeint_symplectic_adjoint",
           "METHODS"]
