"""Markdown tables, target checks and plots from the benchmark records (a list of dicts, see ``worker``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from .methods import BUDGET_METHODS, METHODS

STEP_BOOKKEEPING_BYTES = 64  # per-step scalars the trajectory keeps besides the state (see targets())

FAMILY_STYLE = {"backprop": ("tab:red", "o"), "checkpoint": ("tab:orange", "s"), "adjoint": ("tab:blue", "^"),
                "ours": ("tab:green", "*")}
# One colour per method (a shade of its family's hue where possible), so that two methods of one family
# plotted on the same axes can be told apart; the marker stays the family's.
METHOD_COLOR = {"backprop": "#d62728", "torchdyn-autograd": "#8c564b",
                "adjoint": "#1f77b4", "adjoint-tight": "#17becf", "adjoint-seminorm": "#393b79",
                "torchdyn-adjoint": "#9467bd", "torchdyn-interp-adjoint": "#e377c2",
                "ckpt-step": "#ff7f0e", "ckpt-stage": "#bcbd22",
                "ours-torchdiffeq": "#2ca02c", "ours-min": "#74c476", "ours-max": "#00441b", "ours-torchdyn": "#7f7f7f",
                # the budget sweep: darker green for a larger budget
                **dict(zip(BUDGET_METHODS, ("#c7e9c0", "#a1d99b", "#41ab5d", "#238b45", "#005a32")))}


def method_style(method: str) -> tuple[str, str, str]:
    """``(colour, marker, line style)`` of ``method`` in line and scatter plots."""
    family = METHODS[method].family
    color = METHOD_COLOR.get(method, FAMILY_STYLE[family][0])
    return color, FAMILY_STYLE[family][1], "--" if "torchdyn" in method or method == "ckpt-stage" else "-"


# ------------------------------------------------------------------------------------------------------------
# Formatting

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x >= 0.01 else f"{x * 1e3:.2g} ms"


def fmt_err(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×" if x >= 0.1 else f"{x:.3f}×"


def _pair(a, b) -> str:
    return f"{'–' if a is None else a} / {'–' if b is None else b}"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def _by_method(records: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in records}


def _not_ok_row(r: dict, width: int) -> list[str]:
    reason = r.get("reason", r.get("status", "?"))
    if not reason.startswith(("n/a", "unavailable")):
        reason = f"{r.get('status')}: {reason}"
    return [f"`{r['method']}`", reason.replace("|", "/")] + [""] * (width - 2)


# ------------------------------------------------------------------------------------------------------------
# Per-problem tables

def method_table(records: list[dict]) -> str:
    """All figures of every method on one case (the ``cnf`` headline table)."""
    header = ["method", "peak memory", "× backprop", "held for backward", "forward s", "backward s",
              "fwd+bwd s", "× backprop", "NFE fwd / bwd", "steps fwd / bwd", "grad rel. error", "vs backprop"]

    def row(r: dict, base: dict | None, mem_ratio: float | None) -> list[str]:
        time_ratio = r["total_s"] / base["total_s"] if base else None
        return [f"`{r['method']}`", fmt_bytes(r["peak_bytes"]), fmt_ratio(mem_ratio), fmt_bytes(r["held_bytes"]),
                fmt_s(r["fwd_s"]), fmt_s(r["bwd_s"]), fmt_s(r["total_s"]), fmt_ratio(time_ratio),
                _pair(r["nfe_fwd"], r["nfe_bwd"]), _pair(r["steps_fwd"], r["steps_bwd"]),
                fmt_err(r["grad_err"]), fmt_err(r.get("grad_err_vs_backprop"))]
    return _methods_table(records, header, row)


def _methods_table(records: list[dict], header: list[str], row) -> str:
    """One row per method of a case (``row(record, backprop's record, peak memory ÷ backprop's)``); a method that
    failed gets its status instead."""
    base = _by_method(_ok(records)).get("backprop")
    rows = []
    for r in records:
        if r.get("method") == "reference":
            continue
        if r.get("status") != "ok":
            rows.append(_not_ok_row(r, len(header)))
            continue
        rows.append(row(r, base, r["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] else None))
    return _table(header, rows)


def sweep_table(records: list[dict]) -> str:
    """Time and gradient error of each method across cases (tolerance sweeps)."""
    header = ["case", "method", "fwd+bwd s", "NFE fwd / bwd", "steps fwd / bwd", "grad rel. error"]
    rows = []
    for r in records:
        if r.get("method") == "reference":
            continue
        if r.get("status") != "ok":
            rows.append([r["label"], f"`{r['method']}`", r.get("reason", r.get("status")), "", "", ""])
            continue
        rows.append([r["label"], f"`{r['method']}`", fmt_s(r["total_s"]), _pair(r["nfe_fwd"], r["nfe_bwd"]),
                     _pair(r["steps_fwd"], r["steps_bwd"]), fmt_err(r["grad_err"])])
    return _table(header, rows)


def ratio_spread(r: dict, base: dict) -> tuple[float, float, float] | None:
    """Fwd+bwd time of ``r`` over backprop's (``base``) in the same run: ``(median, min, max)`` over the repeats.

    Repeat ``i`` of ``r`` is paired with repeat ``i`` of backprop (in the ``budget`` problem they ran next to each
    other, round-robin); without per-repeat times, the ratio of the medians (spread 0)."""
    if not base or not base.get("total_s"):
        return None
    ours = [a + b for a, b in zip(r.get("times_fwd") or [], r.get("times_bwd") or [])]
    theirs = [a + b for a, b in zip(base.get("times_fwd") or [], base.get("times_bwd") or [])]
    if not ours or len(ours) != len(theirs):
        ratio = r["total_s"] / base["total_s"]
        return ratio, ratio, ratio
    ratios = [a / b for a, b in zip(ours, theirs)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _spread(x: tuple[float, float, float] | None) -> str:
    if x is None:
        return "–"
    return f"{fmt_ratio(x[0])} ({x[1]:.2f}–{x[2]:.2f})" if x[2] > x[1] else fmt_ratio(x[0])


def budget_label(r: dict) -> str:
    """The memory budget of a method's record: a fraction of backprop's saved bytes (and the bytes), a named
    budget (``min``, ``max``, ``default``), or ``–`` for the other methods."""
    if r.get("budget_fraction") is not None:
        return f"{r['budget_fraction']:g} × backprop = {fmt_bytes(r['budget_bytes'])}"
    return r.get("budget", "–")


def budget_table(records: list[dict]) -> str:
    """The ``budget`` problem on one case: every method's peak memory and time as ratios to backprop's."""
    header = ["method", "memory budget", "peak memory", "× backprop", "fwd+bwd s", "× backprop (min–max)",
              "NFE fwd / bwd", "grad error vs backprop"]

    def row(r: dict, base: dict | None, mem_ratio: float | None) -> list[str]:
        return [f"`{r['method']}`", budget_label(r), fmt_bytes(r["peak_bytes"]), fmt_ratio(mem_ratio),
                fmt_s(r.get("total_s")), _spread(ratio_spread(r, base) if "total_s" in r else None),
                _pair(r["nfe_fwd"], r["nfe_bwd"]), fmt_err(r.get("grad_err_vs_backprop"))]
    return _methods_table(records, header, row)


def pivot_table(records: list[dict], value: str, fmt) -> str:
    """Methods as rows, cases as columns."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records if r.get("method") != "reference"))
    cell = {(r["method"], r["label"]): r for r in records}
    rows = []
    for m in methods:
        row = [f"`{m}`"]
        for lab in labels:
            r = cell.get((m, lab))
            if r is None:
                row.append("")
            elif r.get("status") != "ok":
                row.append("n/a" if r.get("reason", "").startswith("n/a") else r.get("status"))
            else:
                row.append(fmt(r[value]))
        rows.append(row)
    return _table(["method", *labels], rows)


def growth_per_step(records: list[dict], method: str) -> tuple[float, float] | None:
    """Least-squares slope of peak memory vs N for ``method`` (bytes per step) and the state size."""
    pts = [(r["case"]["n_steps"], r["peak_bytes"]) for r in _ok(records) if r["method"] == method]
    if len(pts) < 2:
        return None
    mx = sum(n for n, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    slope = sum((n - mx) * (b - my) for n, b in pts) / sum((n - mx) ** 2 for n, _ in pts)
    return slope, _ok(records)[0]["state_bytes"]


def growth_table(records: list[dict]) -> str:
    rows = []
    for m in dict.fromkeys(r["method"] for r in _ok(records)):
        g = growth_per_step(records, m)
        if g:
            rows.append([f"`{m}`", fmt_bytes(g[0]), f"{g[0] / g[1]:.3g}"])
    state = _ok(records)[0]["state_bytes"] if _ok(records) else None
    return _table(["method", "peak memory growth per step", f"in states (|y| = {fmt_bytes(state)})"], rows)


def physics_table(records: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records if r.get("method") != "reference"))
    cell = {(r["method"], r["label"]): r for r in records}
    header = ["dtype, tolerance"] + [f"`{m}` error" for m in methods] + [f"`{m}` s" for m in methods]
    rows = []
    for lab in labels:
        errs, times = [], []
        for m in methods:
            r = cell.get((m, lab))
            ok = r is not None and r.get("status") == "ok"
            errs.append(fmt_err(r["grad_err"]) if ok else
                        "failed (see below)" if r is not None and r.get("status") == "error" else
                        (r or {}).get("status", ""))
            times.append(fmt_s(r["total_s"]) if ok else "")
        rows.append([lab, *errs, *times])
    return _table(header, rows)


# ------------------------------------------------------------------------------------------------------------
# Targets (reported, not asserted). Memory and growth per step are deterministic and get a verdict; timings
# move by 10-20 % between runs on a shared machine, so a time target is reported as a ratio only (``met`` is
# None): a verdict that flips with the machine's load would be noise.

def _target(problem, name, measured, threshold, met, note="", timing=False):
    return {"problem": problem, "target": name, "measured": measured, "threshold": threshold,
            "met": None if timing else met, "timing": timing, "note": note}


def targets(records: list[dict]) -> list[dict]:
    out = []
    cnf = [r for r in records if r.get("problem") == "cnf"]
    headline = [r for r in cnf if r["case"].get("role") == "all"]
    by = _by_method(_ok(headline))
    ours, bp, adj = by.get("ours-torchdiffeq"), by.get("backprop"), by.get("adjoint")
    if ours and bp:
        ratio = ours["peak_bytes"] / bp["peak_bytes"]
        out.append(_target("cnf", "peak memory ≤ 0.1 × backprop", ratio, 0.1, ratio <= 0.1))
        ratio = ours["total_s"] / bp["total_s"]
        out.append(_target("cnf", "fwd+bwd time ÷ backprop's (goal ≤ 1.6)", ratio, 1.6, None, timing=True))
    if ours and adj:
        ratio = ours["peak_bytes"] / adj["peak_bytes"]
        out.append(_target("cnf", "peak memory ≤ 1.3 × continuous adjoint", ratio, 1.3, ratio <= 1.3))
    if ours:
        curve = sorted((r["grad_err"], r["total_s"]) for r in _ok(cnf)
                       if r["method"] == "adjoint" and r["grad_err"] is not None)
        out.append(_equal_error_target(ours, curve))

    steps = [r for r in records if r.get("problem") == "steps"]
    g = growth_per_step(steps, "ours-min")  # the least memory: one state per step (the default keeps s)
    if g:
        slope, state = g
        # Besides the state, each step keeps its float64 times (t0, t1, dt and the s stage times of rk4):
        # 56 B. The target allows that bookkeeping (64 B), not a second state.
        out.append(_target("steps", "peak memory grows ≤ one state per step (memory_budget='min')", slope / state, 1.0,
                           slope <= state + STEP_BOOKKEEPING_BYTES,
                           f"{slope:.0f} B/step; one state = {state} B; allowance for the step's float64 times "
                           f"{STEP_BOOKKEEPING_BYTES} B"))
    return out


def _equal_error_target(ours: dict, curve: list[tuple[float, float]]) -> dict:
    """Our time over the continuous adjoint's at our gradient error (a timing: ratio only, no verdict).

    ``curve``: ``(gradient error, time)`` of the continuous adjoint at several tolerances, sorted by error; its
    time at our error is interpolated log-log between the two runs that bracket it.
    """
    name = "time ÷ continuous adjoint's at equal gradient error (< 1: faster)"

    def timing(measured, note):
        return _target("cnf", name, measured, 1.0, None, note, timing=True)

    err, time_ = ours["grad_err"], ours["total_s"]
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
    return _table(["problem", "target", "measured ratio", "verdict", "note"], rows)


# ------------------------------------------------------------------------------------------------------------
# Whole report

def markdown(records: list[dict], problems: list[str]) -> str:
    parts = []
    for problem in problems:
        recs = [r for r in records if r.get("problem") == problem]
        if not recs:
            continue
        parts.append(f"### `{problem}`\n")
        if problem != "budget":  # one line per case in its own section
            parts.append(_case_line(recs))
        if problem == "cnf":
            head = [r for r in recs if r["case"].get("role") == "all"]
            parts.append(method_table(head))
            sweep = [r for r in recs if r["method"] in ("adjoint", "ours-torchdiffeq", "backprop")]
            if len({r["label"] for r in sweep}) > 1:
                parts.append("\nTolerance sweep (continuous adjoint vs ours; time vs gradient error):\n")
                parts.append(sweep_table(sorted(sweep, key=lambda r: (r["method"], r["case"]["rtol"]))))
        elif problem in ("steps", "stages"):
            parts.append("Peak memory during forward + backward:\n")
            parts.append(pivot_table(recs, "peak_bytes", fmt_bytes))
            parts.append("\nForward + backward time (s, median):\n")
            parts.append(pivot_table(recs, "total_s", fmt_s))
            parts.append("\nGradient relative error (vs float64 reference):\n")
            parts.append(pivot_table(recs, "grad_err", fmt_err))
            if problem == "steps":
                parts.append("\nMemory growth per step (least-squares slope over N):\n")
                parts.append(growth_table(recs))
        elif problem == "physics":
            parts.append(physics_table(recs))
        elif problem == "budget":
            parts.append(_budget_section(recs))
        bad = [r for r in recs if r.get("status") == "error"]
        for r in bad:
            parts.append(f"\n- `{r['method']}` on {r.get('label', '?')}: error: {r.get('reason')}")
        parts.append("")
    items = targets(records)
    if items:
        parts.append("### Targets\n")
        parts.append(targets_table(items))
    return "\n".join(parts) + "\n"


def _budget_section(records: list[dict]) -> str:
    parts = []
    for label in dict.fromkeys(r["label"] for r in records if "label" in r):
        recs = [r for r in records if r.get("label") == label]
        saved = next((r["backprop_saved_bytes"] for r in recs if r.get("backprop_saved_bytes")), None)
        parts.append(f"#### {label}\n")
        parts.append(_case_line(recs).rstrip("\n") + f" Backprop's saved bytes (the budget's unit): "
                     f"{fmt_bytes(saved)}.\n")
        parts.append(budget_table(recs) + "\n")
    return "\n".join(parts)


def _case_line(records: list[dict]) -> str:
    r = next((r for r in records if "case" in r), None)
    if r is None:
        return ""
    case = {k: v for k, v in r["case"].items() if k not in ("label", "role", "problem")}
    return (f"Case: `{case}`; state {fmt_bytes(r.get('state_bytes'))}, {r.get('n_params')} parameters, "
            f"{r.get('device')}, {r.get('threads')} threads.\n")


# ------------------------------------------------------------------------------------------------------------
# Plots

def plots(records: list[dict], out: Path) -> list[Path]:
    """Writes the PNGs for the problems present in ``records``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    steps = _ok([r for r in records if r.get("problem") == "steps"])
    if steps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        _memory_and_time_lines(axes, steps, lambda r: r["case"]["n_steps"])
        ns = sorted({r["case"]["n_steps"] for r in steps})
        state = steps[0]["state_bytes"]
        axes[0].plot(ns, [n * state / 2 ** 20 for n in ns], ":", color="gray", label="N × |y| (one state/step)")
        axes[0].set(xscale="log", yscale="log", xlabel="number of steps N (rk4)", ylabel="peak memory (MiB)",
                    title="Peak memory, forward + backward")
        axes[1].set(xscale="log", yscale="log", xlabel="number of steps N (rk4)", ylabel="fwd+bwd time (s)",
                    title="Time, forward + backward (median)")
        _shared_legend(fig, axes[0])
        written.append(_save(fig, out / "steps_memory_time.png"))

    stages = _ok([r for r in records if r.get("problem") == "stages"])
    if stages:
        from .problems import STAGES
        solvers = [name for name in STAGES if any(r["case"]["solver"] == name for r in stages)]
        pos = {name: i for i, name in enumerate(solvers)}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        _memory_and_time_lines(axes, stages, lambda r: pos[r["case"]["solver"]])
        for ax in axes:
            ax.set_xticks(range(len(solvers)))
            ax.set_xticklabels([f"{name}\ns = {STAGES[name]}" for name in solvers])
        n = stages[0]["case"]["n_steps"]
        axes[0].set(yscale="log", xlabel="solver (stages s)", ylabel="peak memory (MiB)",
                    title=f"Peak memory vs stages, N = {n} steps")
        axes[1].set(yscale="log", xlabel="solver (stages s)", ylabel="fwd+bwd time (s)",
                    title="Time vs stages (median)")
        _shared_legend(fig, axes[0])
        written.append(_save(fig, out / "stages_memory_time.png"))

    cnf = _ok([r for r in records if r.get("problem") == "cnf"])
    if cnf:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
        head = [r for r in cnf if r["case"].get("role") == "all"]
        headline_rtol = head[0]["case"]["rtol"] if head else None
        ax = axes[0]
        # Methods are told apart by colour and marker in the legend, not by text next to the points: many
        # points lie within a label's width of each other.
        for r in head:
            color, marker, _ = method_style(r["method"])
            ax.scatter(r["grad_err"], r["total_s"], color=color, marker=marker, s=70 if r["family"] == "ours" else 40,
                       label=r["method"], zorder=3, edgecolors="white", linewidths=0.5)
        for m in ("adjoint", "ours-torchdiffeq"):
            pts = sorted((r["case"]["rtol"], r["grad_err"], r["total_s"]) for r in cnf if r["method"] == m)
            if len(pts) > 1:
                color, _, _ = method_style(m)
                ax.plot([p[1] for p in pts], [p[2] for p in pts], ":", color=color, alpha=0.7, zorder=2,
                        label=f"{m} tolerance sweep")
                errors = [p[1] for p in pts]
                for rtol, e, t in pts:
                    if rtol == headline_rtol:  # the headline point is the scatter marker itself
                        continue
                    # Above the (slower) adjoint's points and below ours, clear of the scatter markers between
                    # the two curves; aligned to stay inside the axes at each curve's two ends.
                    ha = "left" if e == min(errors) else "right" if e == max(errors) else "center"
                    ax.annotate(f"rtol {rtol:g}", (e, t), fontsize=6, color=color, ha=ha, textcoords="offset points",
                                xytext=(0, 4) if m == "adjoint" else (0, -11))
        ax.set(xscale="log", yscale="log", xlabel="gradient relative error (vs float64 reference)",
               ylabel="fwd+bwd time (s, median)", title="CNF: time vs gradient error")
        ax.margins(y=0.1)  # room for the rtol labels at the top and bottom
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
        ax = axes[1]
        names = [r["method"] for r in head]
        ax.barh(range(len(head)), [r["peak_bytes"] / 2 ** 20 for r in head],
                color=[FAMILY_STYLE[r["family"]][0] for r in head])
        ax.set_yticks(range(len(head)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        for i, r in enumerate(head):
            ax.annotate(fmt_bytes(r["peak_bytes"]), (r["peak_bytes"] / 2 ** 20, i), fontsize=7, xytext=(3, -3),
                        textcoords="offset points")
        ax.set(xscale="log", xlabel="peak memory, forward + backward (MiB, log scale)", title="CNF: peak memory")
        _family_legend(ax)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(right=ax.get_xlim()[1] * 3)
        fig.tight_layout()
        written.append(_save(fig, out / "cnf_time_error_memory.png"))

    budget = _ok([r for r in records if r.get("problem") == "budget"])
    if budget:
        written.append(_budget_plot(budget, out))

    physics = _ok([r for r in records if r.get("problem") == "physics"])
    if physics:
        dtypes = list(dict.fromkeys(r["case"]["dtype"] for r in physics))
        fig, axes = plt.subplots(1, len(dtypes) + 1, figsize=(5 * (len(dtypes) + 1), 4.2))
        for ax, dtype in zip(axes, dtypes):
            for m in dict.fromkeys(r["method"] for r in physics):
                pts = sorted((r["case"]["rtol"], r["grad_err"]) for r in physics
                             if r["method"] == m and r["case"]["dtype"] == dtype)
                color, marker = FAMILY_STYLE[METHODS[m].family]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=marker, color=color, label=m)
            ax.set(xscale="log", yscale="log", xlabel="rtol = atol", ylabel="gradient relative error",
                   title=f"KdV, {dtype}: gradient error vs tolerance")
            ax.invert_xaxis()
            ax.legend(fontsize=7)
        ax = axes[-1]
        for dtype, style in zip(dtypes, ("-", "--")):
            for m in dict.fromkeys(r["method"] for r in physics):
                pts = sorted((r["grad_err"], r["total_s"]) for r in physics
                             if r["method"] == m and r["case"]["dtype"] == dtype)
                color, marker = FAMILY_STYLE[METHODS[m].family]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, color=color,
                        label=f"{m} ({dtype})")
        ax.set(xscale="log", yscale="log", xlabel="gradient relative error", ylabel="fwd+bwd time (s)",
               title="KdV: time vs gradient error")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "physics_error_tolerance.png"))
    return written


def _budget_plot(records: list[dict], out: Path) -> Path:
    """Time (× backprop, median and min–max over the repeats) against peak memory (log), one panel per case: a
    marker per method, the budget sweep as one line through its points, each labelled with its budget."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    labels = list(dict.fromkeys(r["label"] for r in records))
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4.4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        recs = [r for r in records if r["label"] == label]
        base = _by_method(recs).get("backprop")
        points = {}
        for r in recs:
            spread = ratio_spread(r, base)
            if spread is not None:
                points[r["method"]] = (r["peak_bytes"] / 2 ** 20, *spread)
        sweep = [m for m in BUDGET_METHODS if m in points]
        if sweep:
            ax.plot([points[m][0] for m in sweep], [points[m][1] for m in sweep], "-", color="tab:green", alpha=0.6,
                    zorder=2, label="memory_budget sweep")
            for m in sweep:
                r = _by_method(recs)[m]
                ax.annotate(f"{r['budget_fraction']:g}×", points[m][:2], fontsize=7, color="tab:green",
                            textcoords="offset points", xytext=(4, 4))
        for m, (x, y, lo, hi) in points.items():
            color, marker, _ = method_style(m)
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt=marker, color=color, ms=9 if m in sweep else 7,
                        label=None if m in sweep else m, zorder=3, capsize=2,
                        mec="#00441b" if m in sweep else "white", mew=0.5)
        ax.set(xscale="log", xlabel="peak memory, forward + backward (MiB, log scale)",
               ylabel="fwd+bwd time ÷ backprop's (median, min–max)", title=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axhline(1.0, color="gray", lw=0.5, ls=":")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    return _save(fig, out / "budget_time_memory.png")


def _memory_and_time_lines(axes, records: list[dict], x_of) -> None:
    """One line per method: peak memory (MiB) on ``axes[0]`` and fwd+bwd time (s) on ``axes[1]`` against ``x_of(r)``."""
    for m in dict.fromkeys(r["method"] for r in records):
        pts = sorted((x_of(r), r["peak_bytes"] / 2 ** 20, r["total_s"]) for r in records if r["method"] == m)
        color, marker, style = method_style(m)
        for ax, k in ((axes[0], 1), (axes[1], 2)):
            ax.plot([p[0] for p in pts], [p[k] for p in pts], style, marker=marker, color=color, label=m, alpha=0.9)


def _shared_legend(fig, ax) -> None:
    """One legend for both panels, below them (the lines are the same methods in both)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)


def _family_legend(ax) -> None:
    from matplotlib.patches import Patch
    names = {"backprop": "backprop", "checkpoint": "checkpointing", "adjoint": "continuous adjoint",
             "ours": "symplectic adjoint (ours)"}
    ax.legend(handles=[Patch(color=FAMILY_STYLE[f][0], label=n) for f, n in names.items()], fontsize=7,
              loc="lower right")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
