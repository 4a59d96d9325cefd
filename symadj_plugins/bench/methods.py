"""The gradient methods compared, each as a ``prepare(setup, counter) -> run`` pair.

``prepare`` builds whatever the method needs once (a torchdyn ``NeuralODE``, the step grid) and raises
:class:`Unavailable` with a reason when the method does not apply to the case; ``run()`` then does the forward
solve and returns the solution at ``setup.t`` (its last entry is ``y(T)``), differentiable w.r.t. the
parameters of ``setup.field``. ``counter`` is the counted vector field every method must call.

The checkpointing baselines are written the way a PyTorch user would write them by hand, on top of torchdiffeq:
each step is one ``torchdiffeq.odeint`` call over that step's interval inside ``torch.utils.checkpoint``
(``use_reentrant=False, preserve_rng_state=False``: the fields are deterministic, and the CPU RNG state
would otherwise add 5 KB per checkpoint); ``ckpt-stage`` also checkpoints every call of the vector field, so
it holds one graph of ``f`` at a time, like the symplectic adjoint. The step times come from the problem when they are
known (fixed grid); otherwise a first solve without a graph records torchdiffeq's accepted steps
(``callback_accept_step``), and each step is replayed with ``first_step = min_step = max_step = dt_n`` so the
replay takes exactly that step (that recording solve is part of the method's forward time and NFE).

The symplectic adjoint runs at its default ``memory_budget`` (``ours-torchdiffeq``: no budget argument), at
``"min"``, ``"trajectory"`` and ``"max"``, at ``2√N`` states (``ours-sqrt``, fixed grids), at 16 MiB, and at
fractions of backprop's saved bytes on the case (``ours-budget-<fraction>``, :func:`backprop_saved_bytes`): the
``budget`` problem's sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchdiffeq
from torch.utils.checkpoint import checkpoint

from .models import CountingField
from .problems import LONG_BACKPROP_MAX_STEPS, Setup

# Captured before anything calls symadj_plugins.register() (which replaces the attribute with a drop-in
# that forwards every adjoint_method but "symplectic" here anyway).
_TORCHDIFFEQ_ODEINT_ADJOINT = torchdiffeq.odeint_adjoint

# adjoint-tight: backward tolerances = forward tolerances x this. (x0.01 at FFJORD's rtol=1e-6 asks float32 for
# rtol=1e-8, below its rounding: the backward solve then takes ~40x more steps, see the cnf sweep at rtol=1e-7.)
TIGHT_FACTOR = 0.1


# The budget sweep: memory_budget = fraction × backprop's saved bytes on the case (``ours-budget-<fraction>``).
BUDGET_FRACTIONS = (0.0, 0.05, 0.25, 0.5, 1.0)


def budget_method(fraction: float) -> str:
    """The method name of the budget sweep's point at ``fraction`` × backprop's saved bytes."""
    return f"ours-budget-{fraction:g}"


class Unavailable(Exception):
    """The method cannot run on this case (or in this environment); the message says why."""


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    family: str  # "backprop", "checkpoint", "adjoint", "ours": for plots and targets
    prepare: Callable[[Setup, CountingField], Callable[[], torch.Tensor]]


# ------------------------------------------------------------------------------------------------------------
# torchdiffeq

def _backprop(setup: Setup, f: CountingField):
    if setup.case.get("problem") == "long" and setup.case.get("n_steps", 0) > LONG_BACKPROP_MAX_STEPS:
        raise Unavailable(f"n/a: backprop through {setup.case['n_steps']} steps would hold gigabytes (N·s graphs)")

    def run():
        return torchdiffeq.odeint(f, setup.y0, setup.t, rtol=setup.rtol, atol=setup.atol, method=setup.method,
                                  options=dict(setup.options))
    return run


def _adjoint(tight: bool = False, seminorm: bool = False):
    def prepare(setup: Setup, f: CountingField):
        if (tight or seminorm) and not setup.adaptive:
            raise Unavailable(f"n/a: {setup.method} is a fixed-grid solver (no backward tolerance or norm to set)")
        kwargs = {}
        if tight:
            kwargs.update(adjoint_rtol=setup.rtol * TIGHT_FACTOR, adjoint_atol=setup.atol * TIGHT_FACTOR)
        if seminorm:
            kwargs["adjoint_options"] = dict(setup.options, norm="seminorm")
        params = setup.params()

        def run():
            return _TORCHDIFFEQ_ODEINT_ADJOINT(f, setup.y0, setup.t, rtol=setup.rtol, atol=setup.atol,
                                               method=setup.method, options=dict(setup.options),
                                               adjoint_params=params, **kwargs)
        return run
    return prepare


_DEFAULT = object()  # no memory_budget argument at all: the symplectic adjoint's own default


def _ours_torchdiffeq(memory_budget=_DEFAULT, fraction: float | None = None, sqrt_states: bool = False):
    """``odeint_symplectic_adjoint`` with ``memory_budget`` (a budget as the user writes it), or with ``fraction``
    × backprop's saved bytes on the case (:func:`backprop_saved_bytes`), or with ``2√N`` states' bytes (a fixed grid
    of ``N`` steps), or with no budget argument at all."""
    def prepare(setup: Setup, f: CountingField):
        from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint
        params = setup.params()
        kwargs, info = {}, {}
        if sqrt_states:
            n = setup.case.get("n_steps")
            if n is None or setup.adaptive:
                raise Unavailable("n/a: 2√N states needs N in advance (a fixed grid)")
            states = math.ceil(2 * math.sqrt(n))
            kwargs["memory_budget"] = states * setup.state_bytes
            info = {"budget": f"2√N = {states} states", "budget_bytes": kwargs["memory_budget"]}
        elif fraction is not None:
            reference = backprop_saved_bytes(setup)
            kwargs["memory_budget"] = int(fraction * reference)
            info = {"budget": f"{fraction:g} × backprop", "budget_fraction": fraction,
                    "budget_bytes": kwargs["memory_budget"], "backprop_saved_bytes": reference}
        elif memory_budget is not _DEFAULT:
            kwargs["memory_budget"] = memory_budget
            info = {"budget": str(memory_budget)}
        else:
            info = {"budget": "default"}

        def run():
            return odeint_symplectic_adjoint(f, setup.y0, setup.t, rtol=setup.rtol, atol=setup.atol,
                                             method=setup.method, options=dict(setup.options), adjoint_params=params,
                                             **kwargs)
        run.info = info  # what the worker adds to the method's record
        return run
    return prepare


def backprop_saved_bytes(setup: Setup) -> int:
    """Bytes autograd saves during one backprop forward solve of ``setup`` (torchdiffeq ``odeint`` + the loss): the
    distinct storages its graph holds when backward would start, parameters and ``y0`` excluded. The unit of the
    ``ours-budget-<fraction>`` methods; measured once per setup (it is deterministic) and cached on it."""
    if setup.backprop_saved_bytes is not None:
        return setup.backprop_saved_bytes
    from .saved import SavedTensorBytes
    meter = SavedTensorBytes(exclude=[*setup.params(), setup.y0])
    with meter:
        sol = torchdiffeq.odeint(setup.field, setup.y0, setup.t, rtol=setup.rtol, atol=setup.atol,
                                 method=setup.method, options=dict(setup.options))
        loss = setup.loss(sol[-1])
    setup.backprop_saved_bytes = meter.held  # read while the graph is alive
    del sol, loss  # frees the graph
    return setup.backprop_saved_bytes


# ------------------------------------------------------------------------------------------------------------
# Per-step (and per-stage) checkpointing

class _CheckpointedField(torch.nn.Module):
    """``f`` with every call inside ``torch.utils.checkpoint``: only its inputs are kept for backward."""

    def __init__(self, f: CountingField):
        super().__init__()
        self.f = f

    def forward(self, t, y):
        return checkpoint(self.f, t, y, use_reentrant=False, preserve_rng_state=False)


_REPLAY_KEEP = ("norm", "dtype")


def _checkpointed(per_stage: bool):
    def prepare(setup: Setup, f: CountingField):
        if len(setup.t) != 2:
            raise Unavailable("n/a: the checkpoint baselines are written for outputs at [t0, T] only")
        plain = f.plain()  # no step callbacks: the replays' steps are known, not new accepted steps
        field = _CheckpointedField(f) if per_stage else plain

        def step(y, t_pair, options):
            # clone: [-1] is a view that would keep odeint's whole (2, ...) solution alive as the next input.
            return torchdiffeq.odeint(field, y, t_pair, rtol=setup.rtol, atol=setup.atol, method=setup.method,
                                      options=options)[-1].clone()

        def run():
            if setup.grid is not None:
                grid = setup.grid
                steps = [(grid[n:n + 2], {}) for n in range(len(grid) - 1)]
            else:
                steps = _recorded_steps(setup, f)
            y = setup.y0
            for t_pair, options in steps:
                y = checkpoint(step, y, t_pair, options, use_reentrant=False, preserve_rng_state=False)
            return torch.stack([setup.y0, y])
        return run
    return prepare


def _recorded_steps(setup: Setup, f: CountingField) -> list[tuple[torch.Tensor, dict]]:
    """Solves once without a graph, recording the accepted steps; returns ``(interval, options)`` per step
    such that ``torchdiffeq.odeint`` over that interval takes exactly that step.

    Step ``n`` ends where step ``n + 1`` starts (torchdiffeq's ``t1 = t0 + dt``, or the next grid point); the
    last interval ends at ``T``, where an adaptive solver interpolates inside its last step as the original
    solve did. Adaptive replays are forced to take the recorded step (``first_step = min_step = max_step``).
    """
    log: list[tuple[torch.Tensor, torch.Tensor]] = []
    f.step_log = log
    try:
        with torch.no_grad():
            torchdiffeq.odeint(f, setup.y0, setup.t, rtol=setup.rtol, atol=setup.atol, method=setup.method,
                               options=dict(setup.options))
    finally:
        f.step_log = None
    keep = {k: v for k, v in setup.options.items() if k in _REPLAY_KEEP}
    starts = [t0 for t0, _ in log]
    ends = [*starts[1:], setup.t[-1]]
    steps = []
    for (t0, dt), t1 in zip(log, ends):
        options = {}
        if setup.adaptive:
            h = dt.to(torch.float64)
            options = dict(keep, first_step=h, min_step=h, max_step=h)
        steps.append((torch.stack([t0.to(setup.t.dtype), t1.to(setup.t.dtype)]), options))
    return steps


# ------------------------------------------------------------------------------------------------------------
# torchdyn

class _TorchdynField(torch.nn.Module):
    """torchdyn calls ``vf(t, x, args=...)``; the counted field takes ``(t, y)``."""

    def __init__(self, f: CountingField):
        super().__init__()
        self.f = f

    def forward(self, t, x, args=None):
        return self.f(t, x)


def _torchdyn(sensitivity: str, ours: bool = False):
    def prepare(setup: Setup, f: CountingField):
        if setup.torchdyn_solver is None:
            raise Unavailable(f"n/a: torchdyn has no equivalent of {setup.method}"
                              + (" with a forced number of steps" if setup.case.get("n_steps") else ""))
        try:
            from torchdyn.core import NeuralODE
        except Exception as exc:  # any import failure makes the method unavailable
            raise Unavailable(f"unavailable: torchdyn cannot be imported ({exc})") from exc
        if ours:
            try:
                import symadj_plugins
                symadj_plugins.register()
            except Exception as exc:
                raise Unavailable(f"unavailable: symadj_plugins.register() failed for torchdyn "
                                  f"({type(exc).__name__}: {exc})") from exc
            if not symadj_plugins.is_registered("torchdyn"):
                raise Unavailable("unavailable: symadj_plugins.register() did not register torchdyn")
        t_span = (setup.grid if setup.grid is not None else setup.t).to(setup.y0.dtype)
        # Fixed grid: t_span lists every step; keep only y(t0), y(T) like the torchdiffeq methods (torchdyn's
        # adjoint sensitivities ignore save_at and return every point: N + 1 states more, tiny next to a graph).
        save_at = t_span[[0, -1]]
        try:
            model = NeuralODE(_TorchdynField(f), solver=setup.torchdyn_solver, sensitivity=sensitivity,
                              atol=setup.atol, rtol=setup.rtol, atol_adjoint=setup.atol,
                              rtol_adjoint=setup.rtol, return_t_eval=False).to(setup.y0.device)
        except Exception as exc:
            raise Unavailable(f"unavailable: NeuralODE(sensitivity={sensitivity!r}) failed "
                              f"({type(exc).__name__}: {exc})") from exc

        def run():
            return model(setup.y0, t_span, save_at=save_at)
        return run
    return prepare


# ------------------------------------------------------------------------------------------------------------

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("backprop", "torchdiffeq odeint (backprop)", "backprop", _backprop),
    Method("adjoint", "torchdiffeq odeint_adjoint", "adjoint", _adjoint()),
    Method("adjoint-tight", f"torchdiffeq odeint_adjoint, adjoint tol x{TIGHT_FACTOR:g}", "adjoint",
           _adjoint(tight=True)),
    Method("adjoint-seminorm", "torchdiffeq odeint_adjoint, seminorm", "adjoint", _adjoint(seminorm=True)),
    Method("ckpt-step", "checkpoint per step (ACA-style)", "checkpoint", _checkpointed(per_stage=False)),
    Method("ckpt-stage", "checkpoint per step + per stage", "checkpoint", _checkpointed(per_stage=True)),
    Method("torchdyn-autograd", "torchdyn autograd", "backprop", _torchdyn("autograd")),
    Method("torchdyn-adjoint", "torchdyn adjoint", "adjoint", _torchdyn("adjoint")),
    Method("torchdyn-interp-adjoint", "torchdyn interpolated_adjoint", "adjoint",
           _torchdyn("interpolated_adjoint")),
    Method("ours-torchdiffeq", "ours: symplectic adjoint (torchdiffeq), default budget", "ours", _ours_torchdiffeq()),
    Method("ours-min", "ours (torchdiffeq), memory_budget='min'", "ours", _ours_torchdiffeq("min")),
    Method("ours-sqrt", "ours (torchdiffeq), memory_budget = 2√N states", "ours", _ours_torchdiffeq(sqrt_states=True)),
    Method("ours-trajectory", "ours (torchdiffeq), memory_budget='trajectory'", "ours",
           _ours_torchdiffeq("trajectory")),
    Method("ours-16MiB", "ours (torchdiffeq), memory_budget='16MiB'", "ours", _ours_torchdiffeq("16MiB")),
    *[Method(budget_method(x), f"ours (torchdiffeq), memory_budget = {x:g} × backprop's saved bytes", "ours",
             _ours_torchdiffeq(fraction=x)) for x in BUDGET_FRACTIONS],
    Method("ours-max", "ours (torchdiffeq), memory_budget='max'", "ours", _ours_torchdiffeq("max")),
    Method("ours-torchdyn", "ours: symplectic adjoint (torchdyn)", "ours",
           _torchdyn("symplectic_adjoint", ours=True)),
]}

BUDGET_METHODS = [budget_method(x) for x in BUDGET_FRACTIONS]

# What each problem runs unless --methods says otherwise ("sweep" cases run only the last list).
DEFAULT_METHODS = {
    "cnf": [m for m in METHODS if m not in (*BUDGET_METHODS, "ours-sqrt", "ours-16MiB")],  # adaptive: no 2√N
    "steps": ["backprop", "ckpt-step", "ckpt-stage", "adjoint", "torchdyn-autograd", "ours-torchdiffeq", "ours-min",
              "ours-sqrt", "ours-trajectory", "ours-torchdyn"],
    # The budget sweep, with the other methods as points on the same time-vs-memory axes (budget 0 is "min";
    # "trajectory" is one state per step, between it and the fractions of backprop's bytes).
    "budget": ["backprop", "adjoint", "ckpt-step", "ckpt-stage", "ours-torchdiffeq", *BUDGET_METHODS,
               "ours-trajectory", "ours-max"],
    "long": ["backprop", "adjoint", "ours-min", "ours-sqrt", "ours-16MiB", "ours-trajectory", "ours-torchdiffeq"],
    "stages": ["backprop", "ckpt-step", "ckpt-stage", "adjoint", "ours-torchdiffeq", "ours-torchdyn"],
    "physics": ["backprop", "adjoint", "ours-torchdiffeq"],
}
SWEEP_METHODS = ["adjoint", "ours-torchdiffeq"]
