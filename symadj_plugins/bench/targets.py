"""The benchmark's targets (reported, not asserted).

Memory and growth per step are deterministic and get a verdict; timings move by 10-20 % between runs on a shared
machine, so a time target is reported as a ratio only (``met`` is None): a verdict that flips with the machine's
load would be noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .records import Record, as_records, by_method, headline, of_problem, ok
from .tables import growth_per_step, table

STEP_BOOKKEEPING_BYTES = 64  # per-step scalars the trajectory keeps besides the state (see targets())


@dataclass(frozen=True)
class Target:
    problem: str
    target: str
    measured: float | None
    threshold: float
    met: bool | None  # None: a timing (ratio only) or undetermined
    timing: bool = False
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _target(problem, name, measured, threshold, met, note="", timing=False) -> dict:
    return Target(problem, name, measured, threshold, None if timing else met, timing, note).as_dict()


def targets(records: Iterable[Record | Mapping[str, Any]]) -> list[dict]:
    """The targets the records can be checked against, as dicts (``problem``, ``target``, ``measured``,
    ``threshold``, ``met``, ``timing``, ``note``; the form ``results.json`` stores)."""
    records = as_records(records)
    out = []
    cnf = of_problem(records, "cnf")
    by = by_method(ok(headline(cnf)))
    ours, bp, adj = by.get("ours-torchdiffeq"), by.get("backprop"), by.get("adjoint")
    if ours and bp:
        ratio = ours.peak_bytes / bp.peak_bytes
        out.append(_target("cnf", "peak memory ≤ 0.1 × backprop", ratio, 0.1, ratio <= 0.1))
        ratio = ours.total_s / bp.total_s
        out.append(_target("cnf", "default fwd+bwd time ÷ backprop's (goal ≤ 1.3)", ratio, 1.3, None, timing=True))
    if ours and adj:
        ratio = ours.peak_bytes / adj.peak_bytes
        out.append(_target("cnf", "peak memory ≤ 1.3 × continuous adjoint", ratio, 1.3, ratio <= 1.3))
    if ours:
        curve = sorted((r.grad_err, r.total_s) for r in ok(cnf) if r.method == "adjoint" and r.grad_err is not None)
        out.append(_equal_error_target(ours, curve))

    g = growth_per_step(of_problem(records, "steps"), "ours-trajectory")  # one state per step
    if g:
        slope, state = g
        # Besides the state, each step keeps its float64 times (t0, t1, dt and the s stage times of rk4):
        # 56 B. The target allows that bookkeeping (64 B), not a second state.
        out.append(_target("steps", "peak memory grows ≤ one state per step (memory_budget='trajectory')",
                           slope / state, 1.0, slope <= state + STEP_BOOKKEEPING_BYTES,
                           f"{slope:.0f} B/step; one state = {state} B; allowance for the step's float64 times "
                           f"{STEP_BOOKKEEPING_BYTES} B"))
    out += _below_one_state_per_step(records)
    return out


def _ratio(a: Record | None, b: Record | None, attr: str) -> float | None:
    return None if a is None or b is None else getattr(a, attr) / getattr(b, attr)


def _below_one_state_per_step(records: list[Record]) -> list[dict]:
    """The targets below one state per step: ``"min"`` (O(log N) states), ``2√N`` states, and the default's bound."""
    out = []
    steps = {r.case.get("n_steps"): by_method(ok([x for x in records if x.problem == "steps"
                                                 and x.case.get("n_steps") == r.case.get("n_steps")]))
             for r in records if r.problem == "steps"}
    at_1000 = steps.get(1000, {})
    ratio = _ratio(at_1000.get("ours-min"), at_1000.get("adjoint"), "peak_bytes")
    if ratio is not None:
        out.append(_target("steps", "N=1000: 'min' peak ≤ 0.5 × the continuous adjoint's", ratio, 0.5, ratio <= 0.5))
    for method, goal in (("ours-min", 2.0), ("ours-sqrt", 1.35)):
        ratio = _ratio(at_1000.get(method), at_1000.get("ours-trajectory"), "total_s")
        if ratio is not None:
            out.append(_target("steps", f"N=1000: {method} time ≤ {goal:g} × 'trajectory' time", ratio, goal, None,
                               timing=True))
    ratio = _ratio(at_1000.get("ours-torchdiffeq"), at_1000.get("backprop"), "total_s")
    if ratio is not None:
        out.append(_target("steps", "N=1000: default time ≤ 1.55 × backprop", ratio, 1.55, None, timing=True))

    long = {r.case.get("n_steps"): by_method(ok([x for x in records if x.problem == "long"
                                                and x.case.get("n_steps") == r.case.get("n_steps")]))
            for r in records if r.problem == "long" and r.case.get("n_steps")}
    ratio = _ratio(long.get(1000, {}).get("ours-min"), long.get(1000, {}).get("adjoint"), "peak_bytes")
    if ratio is not None:
        out.append(_target("long", "N=1000: 'min' peak ≤ the continuous adjoint's", ratio, 1.0, ratio <= 1.0))
    for n, goal in ((1000, 1.5), (10_000, 2.0)):
        ratio = _ratio(long.get(n, {}).get("ours-min"), long.get(100, {}).get("ours-min"), "peak_bytes")
        if ratio is not None:
            out.append(_target("long", f"'min' peak at N={n} ≤ {goal:g} × its peak at N=100", ratio, goal,
                               ratio <= goal))

    # The default never holds more than twice what "trajectory" does, on every case that ran both.
    worst, where = None, ""
    for case in dict.fromkeys((r.problem, r.label) for r in records):
        by = by_method(ok([r for r in records if (r.problem, r.label) == case]))
        ratio = _ratio(by.get("ours-torchdiffeq"), by.get("ours-trajectory"), "peak_bytes")
        if ratio is not None and (worst is None or ratio > worst):
            worst, where = ratio, f"{case[0]} {case[1]}"
    if worst is not None:
        out.append(_target("all", "default peak ≤ 2 × 'trajectory' peak (worst case)", worst, 2.0, worst <= 2.0,
                           where))
    return out


def _equal_error_target(ours: Record | Mapping[str, Any], curve: list[tuple[float, float]]) -> dict:
    """Our time over the continuous adjoint's at our gradient error (a timing: ratio only, no verdict).

    ``curve``: ``(gradient error, time)`` of the continuous adjoint at several tolerances, sorted by error; its
    time at our error is interpolated log-log between the two runs that bracket it.
    """
    ours = as_records([ours])[0] if not isinstance(ours, Record) else ours
    name = "time ÷ continuous adjoint's at equal gradient error (< 1: faster)"

    def timing(measured, note):
        return _target("cnf", name, measured, 1.0, None, note, timing=True)

    err, time_ = ours.grad_err, ours.total_s
    if not curve or err is None:
        return timing(None, "no continuous adjoint points")
    errs = [e for e, _ in curve]
    if err < errs[0]:
        e0, t0 = curve[0]
        return timing(time_ / t0, f"the adjoint never reached error {err:.1e}; ratio to its most accurate run "
                                  f"(error {e0:.1e}, {t0:.3g} s)")
    if err > errs[-1]:
        e1, t1 = curve[-1]
        return timing(time_ / t1, f"ours (error {err:.1e}) is less accurate than every adjoint run; ratio to its "
                                  f"least accurate run (error {e1:.1e}, {t1:.3g} s)")
    for (e0, t0), (e1, t1) in zip(curve[:-1], curve[1:]):
        if e0 <= err <= e1:
            w = 0.0 if e1 == e0 else (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0))
            t_adj = math.exp((1 - w) * math.log(t0) + w * math.log(t1))
            return timing(time_ / t_adj, f"adjoint time at error {err:.1e}, interpolated between its tolerance "
                                         f"runs: {t_adj:.3g} s; ours {time_:.3g} s")
    return timing(None, "interpolation failed")


def targets_table(items: list[dict]) -> str:
    rows = []
    for t in items:
        if t.get("timing"):
            verdict = "ratio only (timing moves 10–20 % between runs)"
        else:
            verdict = {True: "**met**", False: "**missed**", None: "undetermined"}[t["met"]]
        measured = "–" if t["measured"] is None else f"{t['measured']:.3g}"
        rows.append([t["problem"], t["target"], measured, verdict, t["note"]])
    return table(["problem", "target", "measured ratio", "verdict", "note"], rows)
