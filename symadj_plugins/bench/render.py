"""``python -m symadj_plugins.bench.render``: the documentation's measured tables and figures, from the results files.

Every measured table in README.md and docs/*.md sits between two markers naming what it shows::

    <!-- results:cnf -->
    (generated: do not edit)
    <!-- /results:cnf -->

and is rendered from ``docs/results/<problem>.json`` (written by ``python -m symadj_plugins.bench --results
docs/results``); the figures in docs/figures are drawn from the same files. The blocks are :data:`BLOCKS`, and for
a problem without blocks of its own, ``PROBLEM-run`` (how it was measured) and ``PROBLEM`` (its tables as the
benchmark's report prints them). Rendering is a pure function of the
files, so ``--check`` (and ``tests/test_docs.py``) can tell a table that differs from its file::

    python -m symadj_plugins.bench.render            # rewrite the tables and figures
    python -m symadj_plugins.bench.render --check    # exit 1 naming each table that differs from its file
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .records import Record, as_records, headline, load_results, of_problem
from .report import budget_section, cnf_sweep, problem_section
from .tables import (
    budget_summary_table,
    errors_list,
    fmt_bytes,
    fmt_err,
    fmt_s,
    growth_table,
    method_table,
    physics_table,
    pivot_table,
    summary_table,
    sweep_table,
)
from .targets import targets, targets_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
FIGURES = ROOT / "docs" / "figures"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)

# The README's table: the methods a torchdiffeq user chooses between, those present in the results.
SUMMARY_METHODS = ["backprop", "adjoint", "ckpt-stage", "ours-min", "ours-trajectory", "ours-stages",
                   "ours-torchdiffeq", "ours-max"]
# The budget summary's columns: the sweep, the default, and the other memory-saving exact methods.
BUDGET_SUMMARY_METHODS = ["ours-budget-0", "ours-torchdiffeq", "ours-budget-0.05", "ours-budget-0.25",
                          "ours-budget-0.5", "ours-budget-1", "ours-max", "adjoint", "ckpt-step"]


@dataclass(frozen=True)
class Block:
    """A generated part of a document: ``render`` of the records of ``problem`` (all problems' when ``None``)."""

    problem: str | None
    render: Callable[[list[Record], dict], str]


def run_caption(records: list[Record], meta: dict) -> str:
    """How a results file was measured: command, date, machine, versions, load; a smoke run says so."""
    if "machine" not in meta:
        return f"_Rebuilt by `{meta.get('command')}` from the results of several runs._"
    m = meta["machine"]
    load = meta.get("load_average_start") or [None]
    load_end = meta.get("load_average_end") or [None]
    lines = [f"_Measured by `{meta['command']}`, {meta['date'][:16].replace('T', ' ')} UTC "
             f"({meta.get('elapsed_s')} s), on {m.get('cpu_model', m.get('processor'))} ({m['cpu_count']} CPUs"
             + (f", {m['gpu']}" if m.get("gpu") else "") + f"), device {m['device']}; torch {m['torch']}, "
             f"torchdiffeq {m['torchdiffeq']}, torchdyn {m['torchdyn']}, Python {m['python']}; "
             f"1-minute load average {load[0]} at the start, {load_end[0]} at the end._"]
    if meta.get("quick"):
        lines.append("**A smoke run (`--quick`): smaller problems than the documented ones and one timing repeat; "
                     "only its memory, function evaluations and errors mean something. To be re-measured: "
                     f"[re-running]({meta.get('benchmarks_page', '')}#re-running-the-documented-numbers).**")
    elif load[0] is not None and load[0] >= m["cpu_count"] / 2:
        lines.append("**The machine was loaded while this ran: its times move between runs more than usual.**")
    return "\n".join(lines)


def _cnf_summary(records: list[Record], meta: dict) -> str:
    return run_caption(records, meta) + "\n\n" + summary_table(headline(records), SUMMARY_METHODS)


def _pivot(value: str, fmt) -> Callable[[list[Record], dict], str]:
    return lambda records, meta: pivot_table(records, value, fmt)


BLOCKS: dict[str, Block] = {
    # README.md
    "readme-cnf": Block("cnf", _cnf_summary),
    # docs/benchmarks.md: per problem how it ran, then its tables
    **{f"{p}-run": Block(p, run_caption) for p in ("cnf", "steps", "stages", "physics", "budget")},
    "cnf": Block("cnf", lambda records, meta: method_table(headline(records))),
    "cnf-sweep": Block("cnf", lambda records, meta: sweep_table(cnf_sweep(records))
                       if cnf_sweep(records) else "(no tolerance sweep in this run)"),
    "steps-memory": Block("steps", _pivot("peak_bytes", fmt_bytes)),
    "steps-time": Block("steps", _pivot("total_s", fmt_s)),
    "steps-error": Block("steps", _pivot("grad_err", fmt_err)),
    "steps-growth": Block("steps", lambda records, meta: growth_table(records)),
    "stages-memory": Block("stages", _pivot("peak_bytes", fmt_bytes)),
    "stages-time": Block("stages", _pivot("total_s", fmt_s)),
    "stages-error": Block("stages", _pivot("grad_err", fmt_err)),
    "physics": Block("physics", lambda records, meta: physics_table(records) + errors_list(records)),
    "budget": Block("budget", lambda records, meta: budget_section(records).rstrip("\n")),
    "budget-summary": Block("budget", lambda records, meta: budget_summary_table(records, BUDGET_SUMMARY_METHODS)),
    "targets": Block(None, lambda records, meta: targets_table(targets(records))),
}


def _generic_block(name: str, loaded: dict) -> Block | None:
    """For a problem with no blocks of its own: ``PROBLEM-run`` (how it ran) and ``PROBLEM`` (its tables, as the
    benchmark's report prints them)."""
    problem = name.removesuffix("-run")
    if problem not in loaded:
        return None
    if name.endswith("-run"):
        return Block(problem, run_caption)
    return Block(problem, lambda records, meta: problem_section(problem, records))


class MissingResults(Exception):
    """A block names a problem whose results file is not there."""


def load_all(results: Path = RESULTS) -> dict[str, tuple[list[Record], dict]]:
    """``{problem: (records, meta)}`` of every results file in ``results``."""
    out = {}
    for path in sorted(results.glob("*.json")):
        saved = load_results(path)
        out[path.stem] = (as_records(saved.records), dict(saved.meta))
    return out


def render_block(name: str, loaded: dict[str, tuple[list[Record], dict]], doc: Path | None = None) -> str:
    """The text between the markers of block ``name`` in document ``doc`` (links are relative to it)."""
    block = BLOCKS.get(name) or _generic_block(name, loaded)
    if block is None:
        raise KeyError(f"unknown results block {name!r}; known: {', '.join(BLOCKS)}, and for each results file "
                       f"PROBLEM and PROBLEM-run")
    if block.problem is None:
        records = [r for recs, _ in loaded.values() for r in recs]
        return block.render(records, {}).rstrip("\n") + "\n"
    if block.problem not in loaded:
        raise MissingResults(f"block {name!r} needs docs/results/{block.problem}.json: run python -m "
                             f"symadj_plugins.bench --problem {block.problem} --results docs/results")
    records, meta = loaded[block.problem]
    # docs/benchmarks.md, from the document the block is in (README.md at the top, the others in docs/)
    link = ("" if doc is None or doc.name == "benchmarks.md" else
            "benchmarks.md" if doc.parent.name == "docs" else "docs/benchmarks.md")
    return block.render(of_problem(records, block.problem), dict(meta, benchmarks_page=link)).rstrip("\n") + "\n"


def render_text(text: str, loaded: dict[str, tuple[list[Record], dict]], doc: Path | None = None) -> str:
    """``text`` (of document ``doc``) with every results block rendered afresh."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name"), loaded, doc) + m.group(4), text)


def documents(root: Path = ROOT) -> list[Path]:
    """The documents that may hold results blocks."""
    return [path for path in (root / "README.md", root / "MIGRATION.md", *sorted((root / "docs").glob("*.md")))
            if path.exists()]


def stale_blocks(root: Path = ROOT, results: Path | None = None) -> list[str]:
    """``"PATH: NAME"`` for each block whose text differs from what its results file renders."""
    loaded = load_all(results or root / "docs" / "results")
    stale = []
    for path in documents(root):
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m.group("body") != render_block(m.group("name"), loaded, path):
                stale.append(f"{path.relative_to(root)}: {m.group('name')}")
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m symadj_plugins.bench.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each table that differs "
                                                        "from its results file")
    p.add_argument("--no-figures", action="store_true", help="tables only (the figures need matplotlib)")
    args = p.parse_args(argv)
    try:
        if args.check:
            stale = stale_blocks()
            for item in stale:
                print(f"{item}: differs from docs/results (run python -m symadj_plugins.bench.render)",
                      file=sys.stderr)
            return 1 if stale else 0
        loaded = load_all()
        for path in documents():
            text = path.read_text(encoding="utf-8")
            new = render_text(text, loaded, path)
            if new != text:
                path.write_text(new, encoding="utf-8")
                print(f"rendered {path.relative_to(ROOT)}", file=sys.stderr)
    except (MissingResults, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.no_figures:
        from .figures import plots
        records = [r for recs, _ in loaded.values() for r in recs]
        for path in plots(records, FIGURES):
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
