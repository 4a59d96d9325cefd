"""torchdiffeq adapter: the symplectic adjoint behind torchdiffeq's own solvers.

The forward pass is ``torchdiffeq``'s: its input normalisation (``_check_inputs``: tuple states, reversed
time, perturbed times, norms, callbacks), its solver classes and tableaux, its step-size controller. We
only listen to it (the official ``callback_accept_step`` / ``callback_step`` hooks) to record each accepted
step, and replace the backward pass by the core's exact reverse sweep.

Private torchdiffeq names this package depends on; only ``_internals.py`` imports them and lists them
(``private_names()``), and ``check_torchdiffeq_once()`` verifies them once, at the first use (a solve,
:func:`initial_step`, :func:`torchdiffeq_host` or ``register()``), and raises naming the installed version if they
differ; each is exercised by ``tests/test_torchdiffeq_internals.py``:

- ``torchdiffeq._impl.odeint.SOLVERS`` and ``torchdiffeq._impl.misc._check_inputs`` / ``_flat_to_shape`` /
  ``Perturb``: the entry points ``torchdiffeq.odeint`` itself uses; ``_PerturbFunc`` (its ``base_func`` and the time
  its ``forward`` passes on, restated in ``perturbed_time``): the replay calls the wrapped function directly.
- ``torchdiffeq._impl.adjoint.find_parameters``: the default ``adjoint_params``.
- ``torchdiffeq._impl.misc._select_initial_step`` and the adaptive solvers' ``first_step``, ``dtype``, ``func``,
  ``y0``, ``order``, ``rtol``, ``atol``, ``norm``: :func:`initial_step` computes the first step as
  ``_before_integrate`` does.
- ``RKAdaptiveStepsizeODESolver``: ``.tableau`` (``alpha``, ``beta``, ``c_sol``), ``.rk_state`` (``y1``, ``f1``,
  ``t0``, ``t1``, and ``interp_coeff`` for events) read at accepted steps, ``._interp_fit`` for dense output;
  ``interp._interp_evaluate`` (restated for many times at once in ``dense_output.py``, and called by event mode),
  ``integrate_until_event`` for events; ``rk_common._runge_kutta_step``: a step recomputed below one state per step.
- ``FixedGridODESolver``: ``.perturb``, ``.interp``, ``._linear_interp``, ``._cubic_hermite_interp`` (both restated in
  ``dense_output.py``, and called by event mode), ``._step_func`` (events, and a step recomputed) and
  ``integrate_until_event`` (events), and the stage times of ``Euler``, ``Midpoint``, ``RK4`` (3/8 rule), ``Heun2``,
  ``Heun3`` (``_FIXED_GRID`` in ``fixed_grid.py``).
- Patched by :func:`install` (undone by ``unregister()``): ``torchdiffeq.odeint_adjoint`` (public); the
  ``_check_inputs`` that ``torchdiffeq._impl.odeint.odeint`` and ``torchdiffeq._impl.adjoint.odeint_adjoint`` call,
  to refuse ``method="symplectic"`` with an explanation; ``torchdiffeq._impl.adjoint.odeint``, the solve of
  torchdiffeq's own adjoint backward pass, to explain ``adjoint_method="symplectic"`` reaching it.

One module per job, so that a torchdiffeq upgrade lands in one of them:

- ``_internals.py``: every import of torchdiffeq's private names, the adaptive solvers' tableau layout
  (``_adaptive_tableau``), the list of the names above and their check (``check_torchdiffeq_once``);
- ``fixed_grid.py``: :class:`FixedGridRule` and the rules of torchdiffeq's fixed-grid solvers (tableau, stage
  times, perturbation flags);
- ``recording.py``: the recorder that stands between torchdiffeq's solver and ``func`` and keeps the accepted steps;
- ``host.py``: ``_TorchdiffeqHost``, one solve as the core's ``HostSolver`` (solve, then the replay);
- ``dense_output.py``: torchdiffeq's interpolation formulas, restated to evaluate a step's output times at once;
- ``events.py``: event mode (``event_fn``): its input checks, its host (``_TorchdiffeqEventHost``, a subclass of
  ``_TorchdiffeqHost`` that only this module knows), fixed-grid step recording, the ``t[0]`` gradient;
- ``api.py``: :func:`odeint_symplectic_adjoint`, :func:`odeint_adjoint`, :func:`initial_step`,
  :func:`torchdiffeq_host`, :func:`supported_methods` and the resolution of their arguments;
- ``registration.py``: :func:`install`, what ``symadj_plugins.register()`` patches in torchdiffeq.
"""

from __future__ import annotations

from .api import (
    SYMPLECTIC,
    initial_step,
    odeint_adjoint,
    odeint_symplectic_adjoint,
    supported_methods,
    torchdiffeq_host,
)
from .fixed_grid import FixedGridRule
from .registration import install

__all__ = ["odeint_symplectic_adjoint", "odeint_adjoint", "initial_step", "supported_methods", "SYMPLECTIC",
           "FixedGridRule", "torchdiffeq_host", "install"]
