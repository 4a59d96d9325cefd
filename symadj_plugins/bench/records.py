"""The benchmark's records: one :class:`Record` per method and case, and the results files that hold them.

The worker writes plain dicts (JSON); the report reads them through :class:`Record`, whose fields are the figures
the tables, targets and plots use. A results file is ``{"meta": {...}, "records": [...]}`` (``OUT/<problem>.json``,
and ``docs/results/<problem>.json`` with ``--results docs/results``): what the documentation's tables and figures
are rendered from (:mod:`symadj_plugins.bench.render`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One gradient method on one case. Times in seconds, memory in bytes; ``None`` where not measured."""

    method: str
    status: str = "ok"  # "ok", "error" or "unavailable" (then ``reason`` says why)
    problem: str | None = None
    family: str | None = None  # "backprop", "checkpoint", "adjoint", "ours"
    method_label: str | None = None  # what the method is, in words
    label: str | None = None  # the case's label (a column or row of the tables)
    case: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None
    peak_bytes: float | None = None
    held_bytes: float | None = None
    fwd_s: float | None = None
    bwd_s: float | None = None
    total_s: float | None = None
    times_fwd: tuple[float, ...] = ()
    times_bwd: tuple[float, ...] = ()
    nfe_fwd: int | None = None
    nfe_bwd: int | None = None
    steps_fwd: int | None = None
    steps_bwd: int | None = None
    grad_err: float | None = None
    grad_err_vs_backprop: float | None = None
    state_bytes: int | None = None
    n_params: int | None = None
    device: str | None = None
    threads: int | None = None
    budget: str | None = None  # the memory budget of an ``ours-*`` method ("default", "min", ...)
    budget_fraction: float | None = None
    budget_bytes: int | None = None
    backprop_saved_bytes: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        """The record of a worker's dict (keys the report does not use are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for k in ("times_fwd", "times_bwd"):
            kwargs[k] = tuple(kwargs.get(k) or ())
        kwargs["case"] = dict(kwargs.get("case") or {})
        return cls(**kwargs)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def as_records(items: Iterable[Record | Mapping[str, Any]]) -> list[Record]:
    """``items`` as records (the public report functions take either the worker's dicts or records)."""
    return [r if isinstance(r, Record) else Record.from_dict(r) for r in items]


def ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.ok]


def measured(records: Iterable[Record]) -> list[Record]:
    """The methods' records (not the float64 reference's)."""
    return [r for r in records if r.method != "reference"]


def by_method(records: Iterable[Record]) -> dict[str, Record]:
    return {r.method: r for r in records}


def of_problem(records: Iterable[Record], problem: str) -> list[Record]:
    return [r for r in records if r.problem == problem]


def headline(records: Iterable[Record]) -> list[Record]:
    """The cases that run every method of the problem (not a tolerance sweep's extra points)."""
    return [r for r in records if r.case.get("role") == "all"]


def labels(records: Iterable[Record]) -> list[str]:
    """The cases' labels, in the order they ran."""
    return list(dict.fromkeys(r.label for r in records if r.label is not None))


def ratio_spread(r: Record | Mapping, base: Record | Mapping | None) -> tuple[float, float, float] | None:
    """Fwd+bwd time of ``r`` over backprop's (``base``) in the same run: ``(median, min, max)`` over the repeats.

    Repeat ``i`` of ``r`` is paired with repeat ``i`` of backprop (in the ``budget`` problem they ran next to each
    other, round-robin); without per-repeat times, the ratio of the medians (spread 0)."""
    r, base = as_records([r])[0], (None if base is None else as_records([base])[0])
    if base is None or not base.total_s:
        return None
    ours = [a + b for a, b in zip(r.times_fwd, r.times_bwd)]
    theirs = [a + b for a, b in zip(base.times_fwd, base.times_bwd)]
    if not ours or len(ours) != len(theirs):
        ratio = r.total_s / base.total_s
        return ratio, ratio, ratio
    ratios = [a / b for a, b in zip(ours, theirs)]
    return statistics.median(ratios), min(ratios), max(ratios)


# ------------------------------------------------------------------------------------------------------------
# Results files

@dataclass(frozen=True)
class Results:
    """One problem's results file: how it was measured (``meta``: command, date, machine, load) and the records."""

    meta: Mapping[str, Any]
    records: list[dict]

    @property
    def typed(self) -> list[Record]:
        return as_records(self.records)


def save_results(path: Path, meta: Mapping[str, Any], records: list[dict]) -> Path:
    """Writes a results file (sorted keys, one entry per line: diffs between runs stay readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, sort_keys=True) + "\n",
                    encoding="utf-8")
    return path


def load_results(path: Path) -> Results:
    data = json.loads(path.read_text(encoding="utf-8"))
    return Results(meta=data["meta"], records=data["records"])
