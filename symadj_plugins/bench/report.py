"""The whole benchmark report (markdown): per problem its tables, then the targets.

The pieces live in their own modules: :mod:`~symadj_plugins.bench.records` (the records and results files),
:mod:`~symadj_plugins.bench.tables`, :mod:`~symadj_plugins.bench.targets` and :mod:`~symadj_plugins.bench.figures`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .records import Record, as_records, headline, labels, of_problem
from .tables import (
    budget_table,
    case_line,
    errors_list,
    fmt_bytes,
    fmt_err,
    fmt_s,
    growth_table,
    method_table,
    physics_table,
    pivot_table,
    sweep_table,
)
from .targets import targets, targets_table

SWEPT = ("adjoint", "ours-torchdiffeq", "backprop")  # the methods of the cnf tolerance sweep table


def cnf_sweep(records: list[Record]) -> list[Record]:
    """The ``cnf`` tolerance sweep's records, by method then tolerance (empty when only one tolerance ran)."""
    sweep = [r for r in records if r.method in SWEPT]
    if len({r.label for r in sweep}) <= 1:
        return []
    return sorted(sweep, key=lambda r: (r.method, r.case["rtol"]))


def problem_section(problem: str, recs: list[Record]) -> str:
    """The tables of one problem (its records ``recs``)."""
    parts = []
    if problem != "budget":  # one line per case in its own section
        parts.append(case_line(recs))
    if problem == "cnf":
        parts.append(method_table(headline(recs)))
        sweep = cnf_sweep(recs)
        if sweep:
            parts.append("\nTolerance sweep (continuous adjoint vs ours; time vs gradient error):\n")
            parts.append(sweep_table(sweep))
    elif problem not in ("physics", "budget"):  # steps, stages, and any problem of several cases
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
        parts.append(budget_section(recs))
    return "\n".join(parts)


def budget_section(records: list[Record]) -> str:
    """The ``budget`` problem: per case a heading, what the case is, and its table."""
    parts = []
    for label in labels(records):
        recs = [r for r in records if r.label == label]
        saved = next((r.backprop_saved_bytes for r in recs if r.backprop_saved_bytes), None)
        parts.append(f"#### {label}\n")
        parts.append(case_line(recs).rstrip("\n") + f" Backprop's saved bytes (the budget's unit): "
                     f"{fmt_bytes(saved)}.\n")
        parts.append(budget_table(recs) + "\n")
    return "\n".join(parts)


def markdown(records: Iterable[Record | Mapping[str, Any]], problems: list[str]) -> str:
    """The report of ``problems`` (in that order), then the targets."""
    records = as_records(records)
    parts = []
    for problem in problems:
        recs = of_problem(records, problem)
        if not recs:
            continue
        parts.append(f"### `{problem}`\n")
        parts.append(problem_section(problem, recs))
        errors = errors_list(recs)
        if errors:
            parts.append(errors)
        parts.append("")
    items = targets(records)
    if items:
        parts.append("### Targets\n")
        parts.append(targets_table(items))
    return "\n".join(parts) + "\n"
