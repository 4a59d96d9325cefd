"""The benchmark's figures (PNG), drawn from its records: one function per figure, one colour per method."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .methods import BUDGET_METHODS, METHODS
from .records import Record, as_records, by_method, ok, ratio_spread
from .tables import fmt_bytes

FAMILY_STYLE = {"backprop": ("tab:red", "o"), "checkpoint": ("tab:orange", "s"), "adjoint": ("tab:blue", "^"),
                "ours": ("tab:green", "*")}
# One colour per method (a shade of its family's hue where possible), so that two methods of one family
# plotted on the same axes can be told apart; the marker stays the family's.
METHOD_COLOR = {"backprop": "#d62728", "torchdyn-autograd": "#8c564b",
                "adjoint": "#1f77b4", "adjoint-tight": "#17becf", "adjoint-seminorm": "#393b79",
                "torchdyn-adjoint": "#9467bd", "torchdyn-interp-adjoint": "#e377c2",
                "ckpt-step": "#ff7f0e", "ckpt-stage": "#bcbd22",
                "ours-torchdiffeq": "#2ca02c", "ours-min": "#74c476", "ours-max": "#00441b", "ours-torchdyn": "#7f7f7f",
                "ours-trajectory": "#a6761d", "ours-sqrt": "#66a61e", "ours-16MiB": "#1b9e77",
                # the budget sweep: darker green for a larger budget
                **dict(zip(BUDGET_METHODS, ("#c7e9c0", "#a1d99b", "#41ab5d", "#238b45", "#005a32")))}


def method_style(method: str) -> tuple[str, str, str]:
    """``(colour, marker, line style)`` of ``method`` in line and scatter plots."""
    family = METHODS[method].family
    color = METHOD_COLOR.get(method, FAMILY_STYLE[family][0])
    return color, FAMILY_STYLE[family][1], "--" if "torchdyn" in method or method == "ckpt-stage" else "-"


def plots(records: Iterable[Record | Mapping[str, Any]], out: Path) -> list[Path]:
    """Writes the PNGs for the problems present in ``records`` into ``out``; returns their paths."""
    records = as_records(records)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    steps = ok([r for r in records if r.problem == "steps"])
    if steps:
        written.append(_against_steps(plt, steps, "Peak memory, forward + backward", out / "steps_memory_time.png"))
    long = ok([r for r in records if r.problem == "long" and r.case.get("n_steps")])
    if long:
        written.append(_against_steps(plt, long, "Large state, small field: peak memory",
                                      out / "long_memory_time.png"))

    stages = ok([r for r in records if r.problem == "stages"])
    if stages:
        from .problems import STAGES
        solvers = [name for name in STAGES if any(r.case["solver"] == name for r in stages)]
        pos = {name: i for i, name in enumerate(solvers)}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        _memory_and_time_lines(axes, stages, lambda r: pos[r.case["solver"]])
        for ax in axes:
            ax.set_xticks(range(len(solvers)))
            ax.set_xticklabels([f"{name}\ns = {STAGES[name]}" for name in solvers])
        n = stages[0].case["n_steps"]
        axes[0].set(yscale="log", xlabel="solver (stages s)", ylabel="peak memory (MiB)",
                    title=f"Peak memory vs stages, N = {n} steps")
        axes[1].set(yscale="log", xlabel="solver (stages s)", ylabel="fwd+bwd time (s)",
                    title="Time vs stages (median)")
        _shared_legend(fig, axes[0])
        written.append(_save(fig, out / "stages_memory_time.png"))

    cnf = ok([r for r in records if r.problem == "cnf"])
    if cnf:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
        head = [r for r in cnf if r.case.get("role") == "all"]
        headline_rtol = head[0].case["rtol"] if head else None
        ax = axes[0]
        # Methods are told apart by colour and marker in the legend, not by text next to the points: many
        # points lie within a label's width of each other.
        for r in head:
            color, marker, _ = method_style(r.method)
            ax.scatter(r.grad_err, r.total_s, color=color, marker=marker, s=70 if r.family == "ours" else 40,
                       label=r.method, zorder=3, edgecolors="white", linewidths=0.5)
        for m in ("adjoint", "ours-torchdiffeq"):
            pts = sorted((r.case["rtol"], r.grad_err, r.total_s) for r in cnf if r.method == m)
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
        names = [r.method for r in head]
        ax.barh(range(len(head)), [r.peak_bytes / 2 ** 20 for r in head],
                color=[FAMILY_STYLE[r.family][0] for r in head])
        ax.set_yticks(range(len(head)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        for i, r in enumerate(head):
            ax.annotate(fmt_bytes(r.peak_bytes), (r.peak_bytes / 2 ** 20, i), fontsize=7, xytext=(3, -3),
                        textcoords="offset points")
        ax.set(xscale="log", xlabel="peak memory, forward + backward (MiB, log scale)", title="CNF: peak memory")
        _family_legend(ax)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(right=ax.get_xlim()[1] * 3)
        fig.tight_layout()
        written.append(_save(fig, out / "cnf_time_error_memory.png"))

    budget = ok([r for r in records if r.problem == "budget"])
    if budget:
        written.append(_budget_plot(budget, out))

    physics = ok([r for r in records if r.problem == "physics"])
    if physics:
        dtypes = list(dict.fromkeys(r.case["dtype"] for r in physics))
        fig, axes = plt.subplots(1, len(dtypes) + 1, figsize=(5 * (len(dtypes) + 1), 4.2))
        for ax, dtype in zip(axes, dtypes):
            for m in dict.fromkeys(r.method for r in physics):
                pts = sorted((r.case["rtol"], r.grad_err) for r in physics
                             if r.method == m and r.case["dtype"] == dtype)
                color, marker = FAMILY_STYLE[METHODS[m].family]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=marker, color=color, label=m)
            ax.set(xscale="log", yscale="log", xlabel="rtol = atol", ylabel="gradient relative error",
                   title=f"KdV, {dtype}: gradient error vs tolerance")
            ax.invert_xaxis()
            ax.legend(fontsize=7)
        ax = axes[-1]
        for dtype, style in zip(dtypes, ("-", "--")):
            for m in dict.fromkeys(r.method for r in physics):
                pts = sorted((r.grad_err, r.total_s) for r in physics
                             if r.method == m and r.case["dtype"] == dtype)
                color, marker = FAMILY_STYLE[METHODS[m].family]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, color=color,
                        label=f"{m} ({dtype})")
        ax.set(xscale="log", yscale="log", xlabel="gradient relative error", ylabel="fwd+bwd time (s)",
               title="KdV: time vs gradient error")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "physics_error_tolerance.png"))
    return written


def _budget_plot(records: list[Record], out: Path) -> Path:
    """Time (× backprop, median and min–max over the repeats) against peak memory (log), one panel per case: a
    marker per method, the budget sweep as one line through its points, each labelled with its budget."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    labels = list(dict.fromkeys(r.label for r in records))
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4.4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        recs = [r for r in records if r.label == label]
        base = by_method(recs).get("backprop")
        points = {}
        for r in recs:
            spread = ratio_spread(r, base)
            if spread is not None:
                points[r.method] = (r.peak_bytes / 2 ** 20, *spread)
        sweep = [m for m in BUDGET_METHODS if m in points]
        if sweep:
            ax.plot([points[m][0] for m in sweep], [points[m][1] for m in sweep], "-", color="tab:green", alpha=0.6,
                    zorder=2, label="memory_budget sweep")
            for m in sweep:
                r = by_method(recs)[m]
                ax.annotate(f"{r.budget_fraction:g}×", points[m][:2], fontsize=7, color="tab:green",
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


def _against_steps(plt, records: list[Record], memory_title: str, path: Path) -> Path:
    """Peak memory and time against the number of rk4 steps N (log-log), one line per method, with the line of one
    state per step."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _memory_and_time_lines(axes, records, lambda r: r.case["n_steps"])
    ns = sorted({r.case["n_steps"] for r in records})
    state = records[0].state_bytes
    axes[0].plot(ns, [n * state / 2 ** 20 for n in ns], ":", color="gray", label="N × |y| (one state/step)")
    axes[0].set(xscale="log", yscale="log", xlabel="number of steps N (rk4)", ylabel="peak memory (MiB)",
                title=memory_title)
    axes[1].set(xscale="log", yscale="log", xlabel="number of steps N (rk4)", ylabel="fwd+bwd time (s)",
                title="Time, forward + backward (median)")
    _shared_legend(fig, axes[0])
    return _save(fig, path)


def _memory_and_time_lines(axes, records: list[Record], x_of) -> None:
    """One line per method: peak memory (MiB) on ``axes[0]`` and fwd+bwd time (s) on ``axes[1]`` against ``x_of(r)``."""
    for m in dict.fromkeys(r.method for r in records):
        pts = sorted((x_of(r), r.peak_bytes / 2 ** 20, r.total_s) for r in records if r.method == m)
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
    fig.savefig(path, dpi=110, metadata={"Software": None})  # the same bytes from the same records
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
