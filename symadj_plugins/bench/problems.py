"""The benchmark problems. Everything is generated locally from a seed; nothing is downloaded.

A *case* is one JSON-serialisable dict (problem, sizes, solver, tolerances, dtype): a worker process rebuilds
exactly the same model, data and solver settings from it. :func:`build` turns a case into a :class:`Setup`.

- ``cnf``: FFJORD-style continuous normalizing flow on synthetic data of MINIBOONE's dimension (43), state
  ``(z, Δlogp)``, Hutchinson divergence with fixed noise, dopri5 at FFJORD's tabular tolerances
  (``rtol=1e-6, atol=1e-8``); plus a tolerance sweep of the continuous adjoint and ours (time vs error).
- ``steps``: a tanh MLP field, fixed-grid rk4 with N = 10 ... 1000 steps: memory and time vs N.
- ``stages``: the same field, N fixed, across euler, midpoint, rk4, dopri5, dopri8 (s = 1, 2, 4, 7, 13);
  dopri5/dopri8 are forced to take the same N steps (``first_step = min_step = max_step``).
- ``budget``: the symplectic adjoint's ``memory_budget`` swept from 0 to backprop's saved bytes on the ``cnf``
  headline case, a wider ``cnf`` (MLP 512 wide) and ``steps`` at N = 1000, with backprop, the continuous adjoint
  and both checkpointing baselines as points on the same time-vs-memory axes (``case['model']`` names the model).
- ``physics``: a discretised KdV equation with a learned nonlinearity (stiff-ish), float32 and float64,
  gradient error vs tolerance for the continuous adjoint and ours.
- ``long``: a large state and a small field (a 512×64 state, an MLP 65-16-64 of 2 144 parameters), where the stored
  trajectory is the whole bill: rk4 at N = 100, 1 000, 10 000 and dopri5; memory and time against N for backprop (where
  it fits), the continuous adjoint and ours below, at and above one state per step.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .models import CNFField, KdVField, MLPField, cnf_nll

PROBLEMS = ("cnf", "steps", "stages", "physics", "budget", "long")

# Backprop through more steps than this on the ``long`` problem would hold gigabytes (N·s graphs): not run.
LONG_BACKPROP_MAX_STEPS = 1000

FIXED_GRID = ("euler", "midpoint", "rk4")
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4, "dopri5": 7, "dopri8": 14}  # tests/test_bench.py checks them
TORCHDYN_SOLVERS = {"euler": "euler", "midpoint": "midpoint", "rk4": "rk4", "dopri5": "dopri5"}

# The float64 reference: a tight adaptive solve, differentiated exactly (per-step checkpointed backprop
# through the same accepted steps, which holds one step's graph at a time).
PHYSICS_MAX_STEPS = 2000  # per adaptive solve (forward or backward) in the physics problem

REFERENCE_SOLVER = "dopri8"
REFERENCE_TOL = 1e-10


@dataclass
class Setup:
    """One problem instance, ready for any gradient method.

    Attributes:
        field: the vector field ``f(t, y)`` (an ``nn.Module``; its parameters are what gradients are taken of).
        y0: initial state, ``(batch, ...)``.
        t: output times ``[t0, T]`` (float64, as torchdiffeq keeps times).
        method, rtol, atol, options: the torchdiffeq solver settings of the forward solve.
        grid: the step times when they are known in advance (fixed grid, forced steps), else ``None``.
        loss: scalar loss of the final state ``y(T)``.
        torchdyn_solver: the same solver's name in torchdyn, or ``None`` if torchdyn has no equivalent.
    """

    field: torch.nn.Module
    y0: torch.Tensor
    t: torch.Tensor
    method: str
    rtol: float
    atol: float
    options: dict
    grid: torch.Tensor | None
    loss: Callable[[torch.Tensor], torch.Tensor]
    torchdyn_solver: str | None
    case: dict = field(default_factory=dict)
    backprop_saved_bytes: int | None = None  # measured on first use (methods.backprop_saved_bytes)

    @property
    def adaptive(self) -> bool:
        return self.method not in FIXED_GRID

    @property
    def state_bytes(self) -> int:
        return self.y0.numel() * self.y0.element_size()

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.field.parameters() if p.requires_grad]


# Bump when a problem's model, data or loss changes: cached reference gradients are keyed by it.
PROBLEMS_VERSION = 1


def case_key(case: dict) -> str:
    """A short stable name for a case (file names of cached gradients, JSON)."""
    text = json.dumps([PROBLEMS_VERSION, case], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def reference_case(case: dict) -> dict:
    """The float64, tight-tolerance version of ``case`` whose exact gradient is the reference."""
    ref = {k: v for k, v in case.items() if k not in ("label", "role")}
    ref.update(dtype="float64", solver=REFERENCE_SOLVER, rtol=REFERENCE_TOL, atol=REFERENCE_TOL)
    ref.pop("n_steps", None)
    return ref


# ------------------------------------------------------------------------------------------------------------
# Cases

def cases(problem: str, quick: bool) -> list[dict]:
    """The cases of ``problem``. ``role`` says which methods run: ``"all"`` (the problem's list) or ``"sweep"``
    (only the continuous adjoint and ours: the extra tolerances of a time-vs-error curve)."""
    if problem == "cnf":
        size = (dict(dim=43, hidden=[64, 64], batch=32) if quick else dict(dim=43, hidden=[256, 256], batch=128))
        base = dict(problem="cnf", **size, solver="dopri5", dtype="float32", seed=0)
        headline = dict(base, rtol=1e-4 if quick else 1e-6, atol=1e-6 if quick else 1e-8, role="all")
        out = [dict(headline, label=f"rtol={headline['rtol']:g}")]
        if not quick:
            for rtol in (1e-4, 1e-5, 1e-7):
                out.append(dict(base, rtol=rtol, atol=rtol * 1e-2, role="sweep", label=f"rtol={rtol:g}"))
        return out
    if problem == "steps":
        size = dict(dim=16, width=32, depth=2, batch=16) if quick else dict(dim=16, width=128, depth=3, batch=64)
        ns = (10, 30, 100) if quick else (10, 30, 100, 300, 1000)
        return [dict(problem="steps", **size, solver="rk4", n_steps=n, dtype="float32", seed=0, role="all",
                     label=f"N={n}") for n in ns]
    if problem == "stages":
        size = dict(dim=16, width=32, depth=2, batch=16) if quick else dict(dim=16, width=128, depth=3, batch=64)
        n = 10 if quick else 50
        solvers = ("euler", "rk4", "dopri5") if quick else tuple(STAGES)
        return [dict(problem="stages", **size, solver=s, n_steps=n, dtype="float32", seed=0, role="all",
                     label=f"{s} (s={STAGES[s]})") for s in solvers]
    if problem == "physics":
        size = dict(m=32, batch=2) if quick else dict(m=64, batch=4)
        out = []
        for dtype in ("float32", "float64"):
            # (float64 stops at 1e-8: at 1e-9 the continuous adjoint's run takes ~3 million profiled ops, 5 GB.)
            tols = (1e-3, 1e-5) if quick else ((1e-3, 1e-4, 1e-5, 1e-6, 1e-7) if dtype == "float32"
                                                else (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8))
            for tol in tols:
                out.append(dict(problem="physics", **size, solver="dopri5", rtol=tol, atol=tol, dtype=dtype,
                                seed=0, role="all", label=f"{dtype} tol={tol:g}"))
        return out
    if problem == "budget":
        return _budget_cases(quick)
    if problem == "long":
        size = dict(dim=16, width=8, depth=1, batch=64) if quick else dict(dim=64, width=16, depth=1, batch=512)
        # The CPU memory meter is the dispatch meter here: the profiler's keeps about 2 KB per op, and the continuous
        # adjoint's 10 000-step solve does not fit in 24 GB of its events.
        size["meter"] = "dispatch"
        ns = (10, 100) if quick else (100, 1000, 10_000)
        out = [dict(problem="long", **size, solver="rk4", n_steps=n, dtype="float32", seed=0, role="all",
                    label=f"rk4 N={n}") for n in ns]
        out.append(dict(problem="long", **size, solver="dopri5", rtol=1e-5, atol=1e-6, dtype="float32", seed=0,
                        role="all", label="dopri5 rtol=1e-5"))
        return out
    raise ValueError(f"unknown problem {problem!r}; choose from {', '.join(PROBLEMS)}")


def _budget_cases(quick: bool) -> list[dict]:
    """The ``budget`` problem: the ``cnf`` headline case (and a wider one) and ``steps`` at its largest N, each
    with ``model`` naming the problem whose model, data and loss it uses."""
    cnf = cases("cnf", quick)[0]
    steps = cases("steps", quick)[-1]
    if quick:  # seconds: eleven methods, each measured under the profiler, in one process
        cnf = dict(cnf, hidden=[32, 32], batch=16)
        steps = dict(steps, n_steps=30, label="N=30")
    out = [dict(cnf, problem="budget", model="cnf", label=f"cnf {_widths(cnf)}")]
    if not quick:
        wide = dict(cnf, hidden=[512, 512])
        out.append(dict(wide, problem="budget", model="cnf", label=f"cnf {_widths(wide)}"))
    out.append(dict(steps, problem="budget", model="steps", label=f"steps {steps['label']}"))
    return out


def _widths(case: dict) -> str:
    return "-".join(str(n) for n in (case["dim"], *case["hidden"], case["dim"]))


# ------------------------------------------------------------------------------------------------------------
# Building a case

def build(case: dict, device: torch.device | str = "cpu") -> Setup:
    """Rebuilds the model, data and solver settings of ``case`` (deterministic in ``case['seed']``).

    Models and data are generated in float32 and then cast, so the float32 and float64 versions of a case
    are the same problem.
    """
    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(case.get("seed", 0))
    problem = case.get("model", case["problem"])  # a budget case names the problem whose model it uses
    if problem == "cnf":
        field_, y0, loss, t_end = _cnf(case)
    elif problem in ("steps", "stages", "long"):
        field_, y0, loss, t_end = _mlp(case)
    elif problem == "physics":
        field_, y0, loss, t_end = _kdv(case)
    else:
        raise ValueError(f"unknown problem {problem!r}")
    field_ = field_.to(device=device, dtype=dtype)
    y0 = y0.to(device=device, dtype=dtype)
    t = torch.tensor([0.0, t_end], dtype=torch.float64, device=device)

    method, options, grid = case["solver"], {}, None
    n = case.get("n_steps")
    if n is not None:
        grid = torch.linspace(0.0, t_end, n + 1, dtype=torch.float64, device=device)
        if method in FIXED_GRID:
            options = {"grid_constructor": _LinspaceGrid(n)}
        else:  # force exactly n steps of an adaptive method: every step of size h is accepted
            h = t_end / n * (1 + 1e-12)
            options = {"first_step": h, "min_step": h, "max_step": h}
            grid = None  # its steps end slightly past the linspace points; they are recorded like any other
    if problem == "physics":
        # At loose tolerances the continuous adjoint's backward solve of this system collapses its step size
        # (thousands of rejected steps); cap every adaptive solve so that shows as a failure, not a hang.
        options["max_num_steps"] = PHYSICS_MAX_STEPS
    rtol = case.get("rtol", 1e-6)
    atol = case.get("atol", 1e-8)
    # torchdyn cannot force an adaptive solver to take a given number of steps.
    torchdyn_solver = None if (n is not None and method not in FIXED_GRID) else TORCHDYN_SOLVERS.get(method)
    return Setup(field_, y0, t, method, rtol, atol, options, grid, loss, torchdyn_solver, case)


class _LinspaceGrid:
    """torchdiffeq ``grid_constructor``: ``n`` equal steps from ``t[0]`` to ``t[-1]`` (works for reversed time)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), self.n + 1, dtype=t.dtype, device=t.device)


def _synthetic_tabular(n: int, dim: int, components: int = 6) -> torch.Tensor:
    """Standardised samples of a Gaussian mixture with random correlated covariances (a stand-in for the
    MINIBOONE table: 43 real-valued, correlated, multi-modal features)."""
    means = torch.randn(components, dim) * 2.0
    factors = torch.randn(components, dim, dim) / math.sqrt(dim)
    which = torch.randint(0, components, (n,))
    x = means[which] + torch.einsum("nij,nj->ni", factors[which], torch.randn(n, dim))
    return (x - x.mean(0)) / x.std(0)


def _cnf(case):
    dim, batch = case["dim"], case["batch"]
    field_ = CNFField(dim, tuple(case["hidden"]), batch)
    x = _synthetic_tabular(batch, dim)
    y0 = torch.cat([x, torch.zeros(batch, 1)], dim=1)
    return field_, y0, (lambda y: cnf_nll(y, dim)), 1.0


def _mlp(case):
    dim, batch = case["dim"], case["batch"]
    field_ = MLPField(dim, case["width"], case["depth"])
    y0 = torch.randn(batch, dim)
    target = torch.randn(batch, dim)
    return field_, y0, (lambda y: 0.5 * ((y - target.to(y)) ** 2).sum(-1).mean()), 1.0


def _kdv(case):
    m, batch = case["m"], case["batch"]
    field_ = KdVField(m=m)
    x = torch.linspace(0, 2 * math.pi, m + 1)[:-1]
    amp = 0.5 + 0.5 * torch.rand(batch, 1)
    phase = 2 * math.pi * torch.rand(batch, 1)
    y0 = amp * torch.cos(x + phase) + 0.2 * torch.sin(2 * x + phase)
    target = torch.roll(y0, shifts=m // 8, dims=-1)
    return field_, y0, (lambda u: ((u - target.to(u)) ** 2).mean()), 0.5
