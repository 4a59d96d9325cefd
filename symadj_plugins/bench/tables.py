"""Markdown tables of the benchmark's records: number formats, and one table function per kind of table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .records import Record, as_records, by_method, labels, measured, ok, ratio_spread

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


def fmt_spread(x: tuple[float, float, float] | None) -> str:
    """A time ratio with its min–max over the repeats (see :func:`~symadj_plugins.bench.records.ratio_spread`)."""
    if x is None:
        return "–"
    return f"{fmt_ratio(x[0])} ({x[1]:.2f}–{x[2]:.2f})" if x[2] > x[1] else fmt_ratio(x[0])


def _pair(a, b) -> str:
    return f"{'–' if a is None else a} / {'–' if b is None else b}"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _not_ok_row(r: Record, width: int) -> list[str]:
    reason = r.reason or r.status or "?"
    if not reason.startswith(("n/a", "unavailable")):
        reason = f"{r.status}: {reason}"
    return [f"`{r.method}`", reason.replace("|", "/")] + [""] * (width - 2)


Row = Callable[[Record, "Record | None", "float | None"], list[str]]


def _methods_table(records: list[Record], header: list[str], row: Row) -> str:
    """One row per method of a case (``row(record, backprop's record, peak memory ÷ backprop's)``); a method that
    failed gets its status instead."""
    base = by_method(ok(records)).get("backprop")
    rows = []
    for r in measured(records):
        if not r.ok:
            rows.append(_not_ok_row(r, len(header)))
            continue
        rows.append(row(r, base, r.peak_bytes / base.peak_bytes if base and base.peak_bytes else None))
    return table(header, rows)


# ------------------------------------------------------------------------------------------------------------
# Tables

def method_table(records: Iterable[Record | Mapping[str, Any]]) -> str:
    """All figures of every method on one case (the ``cnf`` headline table)."""
    header = ["method", "peak memory", "× backprop", "held for backward", "forward s", "backward s",
              "fwd+bwd s", "× backprop", "NFE fwd / bwd", "steps fwd / bwd", "grad rel. error", "vs backprop"]

    def row(r: Record, base: Record | None, mem_ratio: float | None) -> list[str]:
        time_ratio = r.total_s / base.total_s if base else None
        return [f"`{r.method}`", fmt_bytes(r.peak_bytes), fmt_ratio(mem_ratio), fmt_bytes(r.held_bytes),
                fmt_s(r.fwd_s), fmt_s(r.bwd_s), fmt_s(r.total_s), fmt_ratio(time_ratio),
                _pair(r.nfe_fwd, r.nfe_bwd), _pair(r.steps_fwd, r.steps_bwd),
                fmt_err(r.grad_err), fmt_err(r.grad_err_vs_backprop)]
    return _methods_table(as_records(records), header, row)


def summary_table(records: Iterable[Record | Mapping[str, Any]], methods: list[str]) -> str:
    """The headline figures of ``methods`` (those present, in that order) on one case, as ratios to backprop; each
    method named by what it is (its label)."""
    records = as_records(records)
    chosen = [r for m in methods for r in records if r.method == m]
    header = ["method", "peak memory", "× backprop", "fwd+bwd × backprop", "grad rel. error"]

    def row(r: Record, base: Record | None, mem_ratio: float | None) -> list[str]:
        time_ratio = r.total_s / base.total_s if base else None
        return [r.method_label or f"`{r.method}`", fmt_bytes(r.peak_bytes), fmt_ratio(mem_ratio),
                fmt_ratio(time_ratio), fmt_err(r.grad_err)]
    base = by_method(ok(records)).get("backprop")
    rows = [_not_ok_row(r, len(header)) if not r.ok else
            row(r, base, r.peak_bytes / base.peak_bytes if base and base.peak_bytes else None) for r in chosen]
    return table(header, rows)


def sweep_table(records: Iterable[Record | Mapping[str, Any]]) -> str:
    """Time and gradient error of each method across cases (tolerance sweeps)."""
    header = ["case", "method", "fwd+bwd s", "NFE fwd / bwd", "steps fwd / bwd", "grad rel. error"]
    rows = []
    for r in measured(as_records(records)):
        if not r.ok:
            rows.append([r.label, f"`{r.method}`", r.reason or r.status, "", "", ""])
            continue
        rows.append([r.label, f"`{r.method}`", fmt_s(r.total_s), _pair(r.nfe_fwd, r.nfe_bwd),
                     _pair(r.steps_fwd, r.steps_bwd), fmt_err(r.grad_err)])
    return table(header, rows)


def budget_label(r: Record) -> str:
    """The memory budget of a method's record: a fraction of backprop's saved bytes (and the bytes), a named
    budget (``min``, ``max``, ``default``), or ``–`` for the other methods."""
    if r.budget_fraction is not None:
        return f"{r.budget_fraction:g} × backprop = {fmt_bytes(r.budget_bytes)}"
    return r.budget or "–"


def budget_table(records: Iterable[Record | Mapping[str, Any]]) -> str:
    """The ``budget`` problem on one case: every method's peak memory and time as ratios to backprop's."""
    header = ["method", "memory budget", "peak memory", "× backprop", "fwd+bwd s", "× backprop (min–max)",
              "NFE fwd / bwd", "grad error vs backprop"]

    def row(r: Record, base: Record | None, mem_ratio: float | None) -> list[str]:
        return [f"`{r.method}`", budget_label(r), fmt_bytes(r.peak_bytes), fmt_ratio(mem_ratio),
                fmt_s(r.total_s), fmt_spread(ratio_spread(r, base) if r.total_s is not None else None),
                _pair(r.nfe_fwd, r.nfe_bwd), fmt_err(r.grad_err_vs_backprop)]
    return _methods_table(as_records(records), header, row)


def budget_summary_table(records: Iterable[Record | Mapping[str, Any]], methods: list[str]) -> str:
    """The ``budget`` problem, one row per case: ``time ÷ backprop at peak memory ÷ backprop`` per method."""
    records = as_records(records)
    header = ["case", *[f"`{m}`" for m in methods]]
    rows = []
    for label in labels(records):
        recs = [r for r in records if r.label == label]
        base = by_method(ok(recs)).get("backprop")
        cells = []
        for m in methods:
            r = by_method(recs).get(m)
            if r is None or not r.ok or base is None:
                cells.append("–" if r is None else r.status)
                continue
            spread = ratio_spread(r, base)
            cells.append(f"{fmt_ratio(spread[0] if spread else None)} at {fmt_ratio(r.peak_bytes / base.peak_bytes)}")
        rows.append([f"{label} ({fmt_bytes(base.peak_bytes if base else None)})", *cells])
    return table(header, rows)


def pivot_table(records: Iterable[Record | Mapping[str, Any]], value: str, fmt: Callable[[Any], str]) -> str:
    """Methods as rows, cases as columns; ``value`` names a :class:`Record` field."""
    records = as_records(records)
    columns = labels(records)
    methods = list(dict.fromkeys(r.method for r in measured(records)))
    cell = {(r.method, r.label): r for r in records}
    rows = []
    for m in methods:
        row = [f"`{m}`"]
        for lab in columns:
            r = cell.get((m, lab))
            if r is None:
                row.append("")
            elif not r.ok:
                row.append("n/a" if (r.reason or "").startswith("n/a") else r.status)
            else:
                row.append(fmt(getattr(r, value)))
        rows.append(row)
    return table(["method", *columns], rows)


def growth_per_step(records: Iterable[Record | Mapping[str, Any]], method: str) -> tuple[float, float] | None:
    """Least-squares slope of peak memory vs N for ``method`` (bytes per step) and the state size."""
    good = ok(as_records(records))
    pts = [(r.case["n_steps"], r.peak_bytes) for r in good if r.method == method]
    if len(pts) < 2:
        return None
    mx = sum(n for n, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    slope = sum((n - mx) * (b - my) for n, b in pts) / sum((n - mx) ** 2 for n, _ in pts)
    return slope, good[0].state_bytes


def growth_table(records: Iterable[Record | Mapping[str, Any]]) -> str:
    good = ok(as_records(records))
    rows = []
    for m in dict.fromkeys(r.method for r in good):
        g = growth_per_step(good, m)
        if g:
            rows.append([f"`{m}`", fmt_bytes(g[0]), f"{g[0] / g[1]:.3g}"])
    state = good[0].state_bytes if good else None
    return table(["method", "peak memory growth per step", f"in states (|y| = {fmt_bytes(state)})"], rows)


def physics_table(records: Iterable[Record | Mapping[str, Any]]) -> str:
    records = as_records(records)
    columns = labels(records)
    methods = list(dict.fromkeys(r.method for r in measured(records)))
    cell = {(r.method, r.label): r for r in records}
    header = ["dtype, tolerance"] + [f"`{m}` error" for m in methods] + [f"`{m}` s" for m in methods]
    rows = []
    for lab in columns:
        errs, times = [], []
        for m in methods:
            r = cell.get((m, lab))
            good = r is not None and r.ok
            errs.append(fmt_err(r.grad_err) if good else
                        "failed (see below)" if r is not None and r.status == "error" else
                        (r.status if r is not None else ""))
            times.append(fmt_s(r.total_s) if good else "")
        rows.append([lab, *errs, *times])
    return table(header, rows)


def errors_list(records: Iterable[Record | Mapping[str, Any]]) -> str:
    """One item per method that failed on a case, with the reason (items apart by a blank line)."""
    return "\n".join(f"\n- `{r.method}` on {r.label or '?'}: error: {r.reason}"
                     for r in as_records(records) if r.status == "error")


def case_line(records: Iterable[Record | Mapping[str, Any]]) -> str:
    """What the case is: its parameters, state size, parameter count, device and threads."""
    r = next((r for r in as_records(records) if r.case), None)
    if r is None:
        return ""
    case = {k: v for k, v in r.case.items() if k not in ("label", "role", "problem")}
    return (f"Case: `{case}`; state {fmt_bytes(r.state_bytes)}, {r.n_params} parameters, "
            f"{r.device}, {r.threads} threads.\n")
