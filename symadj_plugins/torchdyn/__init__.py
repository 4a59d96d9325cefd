"""torchdyn adapter: ``sensitivity="symplectic_adjoint"`` in torchdyn's ``NeuralODE`` and ``ODEProblem``.

After ``symadj_plugins.register()``::

    model = torchdyn.core.NeuralODE(f, sensitivity="symplectic_adjoint", solver="dopri5")
    t_eval, sol = model(x, t_span)          # torchdyn's own forward pass, bit for bit
    loss(sol).backward()                    # exact gradient, one stored state per accepted step

The forward pass *is* torchdyn's: ``torchdyn.numerics.odeint`` is called exactly as the ``'autograd'`` branch of
``ODEProblem.odeint`` calls it (its solver objects and tableaux, ``init_step``, ``adapt_step``, ``hairer_norm``,
its handling of ``t_span``, ``save_at`` and ``interpolator``), so ``(t_eval, sol)`` are identical (``torch.equal``)
to ``sensitivity="autograd"``. It runs on a shallow copy of the problem's solver whose ``step`` is shadowed by a
recorder (nothing shared is patched per call, so one model can solve in several threads) that forwards every
call and notes, for each accepted step, ``(t, dt, x)`` and the time at which each stage's
``f`` call really happened. The core's reverse sweep (``symadj_plugins.core``) then replays those steps.

What is exact: gradients w.r.t. ``x`` and the vector field's parameters (``vf.parameters()``, which includes
``optimizable_params`` as torchdyn registers them, and an ``integral_loss`` module's parameters) equal
backpropagation through the same accepted steps with the step sizes held constant, up to rounding. Fixed-step
solvers: that *is* ``sensitivity="autograd"``. Adaptive ones: torchdyn's autograd also differentiates the first
step size chosen by ``init_step`` (and the clipped steps that inherit it); we do not (the paper's convention).
"The same steps" includes torchdyn's rounding: with a float64 state its ``adapt_step`` returns a float32 ``dt``
and ``dopri5``/``tsit5`` then form some ``dt * a_ij`` in float32; those steps' coefficients are read off
torchdyn's own ``step`` and handed to the core (``coefficients.py``).

Supported: torchdyn's explicit Runge–Kutta solvers ``euler``, ``midpoint``, ``rk4``, ``dopri5``, ``tsit5`` (by
name or as instances of exactly those classes); ``atol``/``rtol``; ``interpolator`` ``None`` or ``'4th'``;
``save_at``; ``args``; reversed ``t_span``; ``order`` (torchdyn's ``DEFunc`` turns an order-``k`` system into a
first-order one, which is what the solver sees); ``integral_loss`` (torchdyn's adjoint convention: the state is
not augmented, and backward adds the exact gradient of ``Σ ∫ integral_loss(t, x) dt``, the quadrature that the
solver's own stages define, i.e. what ``'autograd'`` computes on a state augmented with the accumulator).
Rejected with a ``ValueError``: other solvers (``alf``, ``ieuler``, hypersolvers, multiple shooting), other
interpolators, dict states, gradients w.r.t. ``t_span``, a ``t_span`` that is not strictly monotonic.

Private torchdyn names (and behaviours) this package depends on; only ``_internals.py`` imports torchdyn, and its
``_check_torchdyn()`` verifies them at ``register()`` (:func:`install`) and raises naming the installed version if
they differ; tests/test_torchdyn*.py cover each:

- ``torchdyn.core.problems.ODEProblem._autograd_func``: the sensitivity dispatch we wrap (the only hook).
  ``ODEProblem.odeint`` calls ``self._autograd_func()(self.vf_params, x, t_span, save_at, args)`` for every
  ``sensalg`` but ``'autograd'``. ``MultipleShootingProblem._autograd_func`` is wrapped only to reject us clearly.
- ``ODEProblem`` attributes ``sensalg``, ``vf``, ``solver``, ``atol``, ``rtol``, ``interpolator``, ``integral_loss``.
- ``torchdyn.core.problems.odeint``: the forward solve (the name ``ODEProblem.odeint`` itself uses).
- ``torchdyn.numerics.solvers.ode``: ``Euler``, ``Midpoint``, ``RungeKutta4``, ``DormandPrince45``, ``Tsitouras45``:
  ``step(f, x, t, dt, k1=None, args=None)`` returning the new state second, calling ``f(t, x)`` once per stage in
  stage order; ``.tableau = (c, a, b_sol, b_err)`` (synchronised to ``x`` by ``sync_device_dtype``) with stage
  ``i >= 2`` evaluated at ``t + c[i - 2] * dt``: for ``RungeKutta4`` that is ``(t, t, t + dt/2, t + dt/2)``, not the
  textbook ``(t, t + dt/2, t + dt/2, t + dt)`` (the replay uses the times recorded from the ``f`` calls, so it
  follows the step, not ``c``); ``Euler`` and ``Midpoint`` coefficients are hard-coded in their ``step`` and
  written here; ``.stepping_class``; ``SOLVER_DICT`` names.
- ``torchdyn.numerics.utils.adapt_step`` (behaviour): returns ``dt`` in the dtype of the solver's float32
  ``safety``/``min_factor``/``max_factor`` when ``dt`` is 0-dim; see ``coefficients.py``.
- ``torchdyn.numerics.odeint._adaptive_odeint`` (mirrored, not called): an accepted step ``[t, t + dt]`` emits
  the ``t_span`` points ``p`` with ``t + dt > p`` by interpolation (when an interpolator is in use), then ``p`` if
  ``t + dt == p`` as the new state; ``k1`` is carried from the previous step's last stage (FSAL); the interpolant
  is ``interpolator.fit(dt, k1, k_last, x, x_new, x + dt * sum(bmid[i] * k[i]))``; ``Tsitouras45`` forces
  ``interpolator = None``. ``_fixed_odeint`` (mirrored): a step end ``t`` is output iff
  ``torch.isclose(t, save_at).sum()``. ``odeint`` replaces ``f`` by ``-f(-t, x)`` for reversed time.
- ``torchdyn.numerics.interpolators``: ``FourthOrder`` (``bmid``, ``fit``, ``evaluate``, ``sync_device_dtype``),
  ``str_to_interp``, ``INTERP_DICT``.
- Module attributes that ``NeuralODE._prep_integration`` sets before each solve and the vector field reads:
  ``noise`` of modules with a ``trace_estimator`` (CNF, Hutchinson) and ``_control`` (``DataControl``). They are
  snapshotted in the forward pass and put back during the replay, so a second forward before ``backward()``
  does not change the first one's gradient.

One module per job, so that a torchdyn upgrade lands in one of them:

- ``_internals.py``: every import of torchdyn, its solver classes and tableau layout (``_tableau_of``), and the
  check of the names above (``_check_torchdyn``, ``_probe_solver``);
- ``recording.py``: the recorder that shadows ``solver.step`` and keeps the accepted steps;
- ``outputs.py``: which rows torchdyn returns (the core's output slots) and the integral-loss accumulator;
- ``coefficients.py``: the coefficients of the steps whose ``dt * a_ij`` torchdyn rounded;
- ``host.py``: ``_TorchdynHost``, one solve as the core's ``HostSolver`` (solve, then the replay);
- ``dispatch.py``: the entry point torchdyn's dispatch returns, its input checks, and :func:`install`.
"""

from __future__ import annotations

from ._internals import SENSITIVITY, SUPPORTED_SOLVERS
from .dispatch import install

# SENSITIVITY: the ``sensitivity`` value ("symplectic_adjoint") that selects the symplectic adjoint in torchdyn's
# ``ODEProblem`` / ``NeuralODE``. SUPPORTED_SOLVERS: torchdyn's explicit Runge–Kutta solver classes, by the name
# torchdyn accepts for them.

__all__ = ["SENSITIVITY", "SUPPORTED_SOLVERS", "install", "register", "supported_solvers"]


def supported_solvers() -> list[str]:
    """The names of :data:`SUPPORTED_SOLVERS`."""
    return list(SUPPORTED_SOLVERS)


def register() -> None:
    """Same as ``symadj_plugins.register()`` (which registers every installed host library; it is idempotent and
    ``symadj_plugins.unregister()`` undoes it)."""
    from .. import register as _register

    _register()
