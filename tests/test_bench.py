"""The benchmark measures what it says it measures.

- peak memory on CPU (profiler allocation events) matches a known allocation;
- the hand-written checkpointing baselines compute the same gradient as backprop / the symplectic adjoint
  through the same steps (so they are fair, exact peers);
- function evaluations and steps are counted per phase;
- ``python -m symadj_plugins.bench --quick`` runs every method to completion and writes plausible figures.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from symadj_plugins.bench import figures, records, tables, targets
from symadj_plugins.bench.memory import PeakMemory, mark
from symadj_plugins.bench.methods import BUDGET_FRACTIONS, BUDGET_METHODS, DEFAULT_METHODS, METHODS, budget_method
from symadj_plugins.bench.problems import build, cases
from symadj_plugins.bench.worker import gradient

MB8 = 8 * 2 ** 20
MARGIN = 64 * 2 ** 10  # scalars and bookkeeping tensors the region may allocate besides the known one


def test_cpu_peak_memory_is_a_known_allocation():
    with PeakMemory("cpu") as memory:
        x = torch.empty(MB8 // 4, dtype=torch.float32)
        x.fill_(1.0)
        with mark("backward"):
            pass
        del x
    assert MB8 <= memory.report.peak_bytes <= MB8 + MARGIN, memory.report
    assert MB8 <= memory.report.marks["backward"] <= MB8 + MARGIN
    assert "profiler" in memory.report.method


def test_cpu_peak_memory_counts_live_bytes_not_total_allocated():
    existing = torch.ones(MB8 // 4)  # allocated before: not part of the figure, even when freed inside
    with PeakMemory("cpu") as memory:
        for _ in range(3):
            x = torch.empty(MB8 // 4)
            del x
        y = torch.empty(MB8 // 4)
        z = torch.empty(MB8 // 4)
        del existing, y, z
    assert 2 * MB8 <= memory.report.peak_bytes <= 2 * MB8 + MARGIN, memory.report


def test_the_dispatch_meter_counts_live_bytes_of_a_known_allocation_and_a_backward_pass():
    existing = torch.ones(MB8 // 4)  # allocated before: not part of the figure
    with PeakMemory("cpu", meter="dispatch") as memory:
        for _ in range(3):
            x = torch.empty(MB8 // 4)
            del x
        y = torch.empty(MB8 // 4)
        memory.direct_mark("backward")
        z = torch.empty(MB8 // 4)
        del existing, y, z
    assert 2 * MB8 <= memory.report.peak_bytes <= 2 * MB8 + MARGIN, memory.report
    assert MB8 <= memory.report.marks["backward"] <= MB8 + MARGIN
    # The backward pass's ops are seen too: the gradient of this loss is one buffer the size of w.
    w = torch.ones(MB8 // 4, requires_grad=True)
    loss = (w * 2.0).sum()
    with PeakMemory("cpu", meter="dispatch") as memory:
        (grad,) = torch.autograd.grad(loss, w)
    assert MB8 <= memory.report.peak_bytes <= MB8 + MARGIN, memory.report
    assert "TorchDispatchMode" in memory.report.method
    with pytest.raises(ValueError, match="dispatch"):
        PeakMemory("cpu", meter="tracemalloc")


def _tiny(problem: str, **overrides) -> dict:
    case = dict(cases(problem, quick=True)[0], dtype="float64", **overrides)
    return case


@pytest.mark.parametrize("baseline", ["ckpt-step", "ckpt-stage"])
def test_checkpoint_baselines_equal_backprop_on_a_fixed_grid(baseline):
    setup = build(_tiny("steps", n_steps=7))
    g_ref, _, loss_ref = gradient(setup, "backprop")
    g, _, loss = gradient(setup, baseline)
    assert loss == loss_ref
    assert (g - g_ref).norm() <= 1e-12 * g_ref.norm()


@pytest.mark.parametrize("baseline", ["ckpt-step", "ckpt-stage"])
def test_checkpoint_baselines_replay_the_accepted_adaptive_steps(baseline):
    # Adaptive steps are recorded, then replayed one by one: the gradient is that of the same steps with the
    # step sizes held constant, which is what the symplectic adjoint computes.
    setup = build(_tiny("cnf", hidden=[16, 16], batch=8, rtol=1e-5, atol=1e-7))
    g_ours, counter_ours, _ = gradient(setup, "ours-torchdiffeq")
    g, counter, _ = gradient(setup, baseline)
    assert counter.steps["forward"] == counter_ours.steps["forward"] > 3
    assert (g - g_ours).norm() <= 1e-9 * g_ours.norm()


def test_function_evaluations_and_steps_are_counted_per_phase():
    setup = build(_tiny("steps", n_steps=5))  # rk4, 4 stages
    _, backprop, _ = gradient(setup, "backprop")
    assert backprop.nfe == {"forward": 20, "backward": 0}
    assert backprop.steps["forward"] == 5
    _, ours, _ = gradient(setup, "ours-torchdiffeq")
    assert ours.nfe["forward"] == 20 and ours.nfe["backward"] > 0
    _, adjoint, _ = gradient(setup, "adjoint")
    assert adjoint.steps["backward"] == 5 and adjoint.nfe["backward"] > 0


def test_equal_error_target_interpolates_the_adjoint_curve():
    ours = records.Record("ours-torchdiffeq", grad_err=1e-4, total_s=1.0)
    curve = [(1e-5, 4.0), (1e-3, 1.0)]  # error, time of the continuous adjoint at two tolerances
    target = targets._equal_error_target(ours, curve)
    assert target["measured"] == pytest.approx(0.5)  # adjoint: 2 s at 1e-4 (log-log interpolation)
    less_accurate = records.Record("ours-torchdiffeq", grad_err=1e-2, total_s=5.0)
    assert targets._equal_error_target(less_accurate, curve)["measured"] == pytest.approx(5.0)


def _record(method, family, peak_bytes, total_s, grad_err, rtol=1e-6):
    return {"problem": "cnf", "case": {"role": "all", "rtol": rtol}, "method": method, "family": family,
            "status": "ok", "peak_bytes": peak_bytes, "total_s": total_s, "grad_err": grad_err}


def test_timing_targets_report_ratios_without_a_verdict_memory_targets_keep_theirs():
    # Timings move by 10-20 % between runs: a met/missed verdict on them would flip with the machine's load.
    runs = [_record("backprop", "backprop", 100, 1.0, 1e-6), _record("adjoint", "adjoint", 10, 3.0, 1e-5),
            _record("ours-torchdiffeq", "ours", 5, 1.59, 1e-6)]
    items = {t["target"]: t for t in targets.targets(runs)}
    timing = [t for t in items.values() if t["timing"]]
    assert len(timing) == 2 and all(t["met"] is None for t in timing)
    assert {round(t["measured"], 2) for t in timing} == {1.59, 0.53}  # vs backprop; vs adjoint at equal error
    assert items["peak memory ≤ 0.1 × backprop"]["met"] is True
    assert items["peak memory ≤ 1.3 × continuous adjoint"]["met"] is True
    table = targets.targets_table(list(items.values()))
    assert table.count("**met**") == 2 and "missed" not in table and table.count("ratio only") == 2


@pytest.mark.parametrize("missing", [["matplotlib", "tqdm"], ["tqdm"]])
def test_bench_cli_names_the_extra_when_its_dependencies_are_missing(tmp_path, missing):
    # A clean install without the bench extra: the CLI stops before measuring anything and says what to install.
    hide = "".join(f"sys.modules[{name!r}] = None; " for name in missing)
    code = (f"import runpy, sys; {hide}sys.argv = ['bench', '--quick', '--out', {str(tmp_path / 'out')!r}]; "
            "runpy.run_module('symadj_plugins.bench', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the benchmark needs matplotlib and tqdm" in proc.stderr
    assert "pip install -e '.[bench]'" in proc.stderr
    assert f"not importable here: {', '.join(missing)}" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may run before the dependency check"


def test_quick_benchmark_runs_every_method(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "symadj_plugins.bench", "--quick", "--out", str(tmp_path),
                           "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | peak memory |" in proc.stdout
    assert "\r" not in proc.stderr, "no progress bar when stderr is not a terminal"
    assert "ratio only" in proc.stdout and "fwd+bwd time ÷ backprop" in proc.stdout  # timings: no verdict

    result = json.loads((tmp_path / "results.json").read_text())
    records = {r["method"]: r for r in result["records"]}
    assert set(DEFAULT_METHODS["cnf"]) <= set(records)
    for name, r in records.items():
        assert r["status"] == "ok", (name, r.get("reason"))
        for key in ("peak_bytes", "fwd_s", "bwd_s", "total_s", "nfe_fwd", "grad_err"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["grad_err"] < 0.1, (name, r["grad_err"])
        if name in ("backprop", "torchdyn-autograd", "ours-max"):  # "max" keeps every graph: nothing is evaluated
            assert r["nfe_bwd"] == 0, name
        else:
            assert r["nfe_bwd"] > 0, name
    # Exact methods reproduce backprop through the same steps (float32).
    for name in ("ours-torchdiffeq", "ours-min", "ours-max", "ckpt-step", "ckpt-stage"):
        assert records[name]["grad_err_vs_backprop"] < 1e-4, name
    assert records["ours-torchdiffeq"]["peak_bytes"] < records["backprop"]["peak_bytes"]
    assert result["meta"]["memory_method"].startswith("torch.profiler")
    assert result["targets"], "targets are reported"
    assert (tmp_path / "cnf_time_error_memory.png").stat().st_size > 10_000
    # --results: the file the documentation renders from holds the same records and how they were measured.
    from symadj_plugins.bench.records import load_results
    saved = load_results(tmp_path / "results" / "cnf.json")
    assert saved.records == result["records"] and saved.meta["command"] == result["meta"]["command"]
    assert "| `ours-torchdiffeq` |" in tables.method_table(saved.typed)


def test_compare_measures_the_users_own_model():
    from symadj_plugins.bench.api import compare
    from symadj_plugins.bench.models import MLPField

    torch.manual_seed(0)
    func, y0 = MLPField(3, 16, 1), torch.randn(4, 3)
    measured = compare(func, y0, torch.tensor([0.0, 1.0]), lambda y: y.pow(2).sum(), rtol=1e-5, atol=1e-7,
                       methods=["ours-torchdiffeq", "backprop"], repeats=1, progress=False)
    assert [r["method"] for r in measured] == ["backprop", "ours-torchdiffeq"]  # backprop first
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in measured)
    assert measured[1]["grad_err_vs_backprop"] < 1e-4
    assert "| `ours-torchdiffeq` |" in tables.method_table(measured)


def test_plots_tell_every_method_apart_and_label_them(tmp_path, monkeypatch):
    # One colour per method (two methods of a family share a plot), and a legend on the steps figure.
    assert len({figures.method_style(m)[0] for m in METHODS}) == len(METHODS)
    legends = {}

    def keep(fig, path):
        legends[path.name] = [text.get_text() for legend in fig.legends + [a.get_legend() for a in fig.axes if
                                                                          a.get_legend()] for text in legend.texts]
        return path
    monkeypatch.setattr(figures, "_save", keep)
    runs = [{"problem": "steps", "case": {"n_steps": n}, "method": m, "family": METHODS[m].family, "status": "ok",
             "peak_bytes": n * 4096.0 * (k + 1), "total_s": 0.01 * n, "state_bytes": 4096}
            for n in (10, 100) for k, m in enumerate(("backprop", "torchdyn-autograd", "ours-torchdiffeq"))]
    runs += [_record(m, METHODS[m].family, 2 ** 20 * (k + 1), 0.1 * (k + 1), 1e-6 * (k + 1))
             for k, m in enumerate(("backprop", "adjoint", "ours-torchdiffeq", "ours-torchdyn"))]
    figures.plots(runs, tmp_path)
    assert {"backprop", "torchdyn-autograd", "ours-torchdiffeq"} <= set(legends["steps_memory_time.png"])
    assert {"backprop", "adjoint", "ours-torchdiffeq", "ours-torchdyn"} <= set(legends["cnf_time_error_memory.png"])


# ------------------------------------------------------------------------------------------------------------
# The memory budget

@pytest.mark.parametrize("problem", ["steps", "cnf"])
def test_every_budget_gives_backprops_gradient_through_the_same_steps(problem):
    # float64: the sweep's points differ from backprop through the same steps only by rounding, whatever the
    # budget keeps. On a fixed grid that is torchdiffeq's backprop; on adaptive steps torchdiffeq's backprop also
    # differentiates its step-size choices, so the peer is per-step checkpointed backprop through the accepted
    # steps (whose replayed step ends carry the dense output's rounding: 1e-9), and the budgets must agree with
    # each other to 1e-10.
    setup = build(_tiny(problem, **({"n_steps": 6} if problem == "steps" else {"hidden": [16, 16], "batch": 8})))
    g_ref, _, _ = gradient(setup, "backprop" if problem == "steps" else "ckpt-step")
    g_min, _, _ = gradient(setup, "ours-min")
    assert (g_min - g_ref).norm() <= (1e-10 if problem == "steps" else 1e-9) * g_ref.norm()
    backward_nfe = []
    for name in ["ours-min", *BUDGET_METHODS, "ours-torchdiffeq", "ours-max"]:
        g, counter, _ = gradient(setup, name)
        assert (g - g_min).norm() <= 1e-10 * g_min.norm(), name
        backward_nfe.append(counter.nfe["backward"])
    # The budget reaches the solver: more bytes, fewer evaluations of f in the backward pass; max needs ~none
    # (an adaptive solver's last, interpolated output may take one).
    sweep = backward_nfe[1:1 + len(BUDGET_METHODS)]
    assert sweep == sorted(sweep, reverse=True) and sweep[0] > sweep[-1], backward_nfe
    assert backward_nfe[0] == sweep[0] and backward_nfe[-1] <= 1, backward_nfe


def test_budget_fractions_are_of_backprops_saved_bytes_on_the_case():
    from symadj_plugins.bench.methods import backprop_saved_bytes
    from symadj_plugins.bench.models import CountingField
    from symadj_plugins.bench.saved import SavedTensorBytes

    setup = build(_tiny("steps", n_steps=4))  # rk4, float64: 4 graphs of f per step
    saved = backprop_saved_bytes(setup)
    one_eval = SavedTensorBytes(exclude=[*setup.params(), setup.y0])
    with one_eval:
        out = setup.field(setup.t[0], setup.y0)
    assert 16 * one_eval.held <= saved <= 16 * one_eval.held + 64 * setup.state_bytes, (saved, one_eval.held)
    del out
    run = METHODS[budget_method(0.25)].prepare(setup, CountingField(setup.field, setup.adaptive))
    assert run.info["budget_bytes"] == int(0.25 * saved) and run.info["backprop_saved_bytes"] == saved


def test_time_ratios_pair_each_repeat_with_backprops():
    base = records.Record("backprop", total_s=2.0, times_fwd=(1.0, 2.0, 1.0), times_bwd=(1.0, 2.0, 0.5))  # 2, 4, 1.5
    r = records.Record("ours-max", total_s=3.0, times_fwd=(2.0, 4.0, 1.0), times_bwd=(1.0, 2.0, 2.0))  # 3, 6, 3
    median, low, high = records.ratio_spread(r, base)
    assert (median, low, high) == (pytest.approx(1.5), pytest.approx(1.5), pytest.approx(2.0))
    medians_only = records.Record("ours-max", total_s=3.0)  # no per-repeat times: the ratio of the medians
    assert records.ratio_spread(medians_only, base) == (1.5, 1.5, 1.5)


def test_quick_budget_run_measures_every_method_and_memory_grows_with_the_budget(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "symadj_plugins.bench", "--problem", "budget", "--quick",
                           "--repeats", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | memory budget | peak memory | × backprop | fwd+bwd s | × backprop (min–max) |" in proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    labels = list(dict.fromkeys(r["label"] for r in result["records"]))
    assert len(labels) == 2  # the cnf case and the steps case
    for label in labels:
        records = {r["method"]: r for r in result["records"] if r["label"] == label}
        assert set(records) == set(DEFAULT_METHODS["budget"]), label
        for name, r in records.items():
            assert r["status"] == "ok", (label, name, r.get("reason"))
            assert r["peak_bytes"] > 0 and r["repeats"] == 2 and r["timing"] == "interleaved", (label, name)
        for name in [*BUDGET_METHODS, "ours-torchdiffeq", "ours-max", "ckpt-step", "ckpt-stage"]:
            assert records[name]["grad_err_vs_backprop"] < 1e-4, (label, name)  # float32 rounding
        saved = records[BUDGET_METHODS[0]]["backprop_saved_bytes"]
        assert saved > 0
        for x, name in zip(BUDGET_FRACTIONS, BUDGET_METHODS):
            assert records[name]["budget_bytes"] == int(x * saved)
        # Memory is deterministic: a larger budget never lowers the peak (beyond a few KiB of the profiler's
        # bookkeeping), and the largest budgets keep backprop-sized graphs.
        peaks = [records[name]["peak_bytes"] for name in [*BUDGET_METHODS, "ours-max"]]
        noise = 8 * 2 ** 10
        assert all(b >= a - noise for a, b in zip(peaks, peaks[1:])), (label, peaks)
        assert peaks[-1] > 4 * peaks[0], (label, peaks)
    assert (tmp_path / "budget_time_memory.png").stat().st_size > 10_000


def test_stage_counts_in_the_stages_problem_are_torchdiffeqs():
    # The stages problem labels each solver with its stage count s; for the adaptive ones that is torchdiffeq's
    # tableau (its alpha lists the nodes after the first stage), for the fixed-grid ones the rule's.
    from torchdiffeq._impl.odeint import SOLVERS

    from symadj_plugins.bench.problems import STAGES
    from symadj_plugins.torchdiffeq import torchdiffeq_host
    for name, s in STAGES.items():
        tableau = getattr(SOLVERS[name], "tableau", None)
        if tableau is not None:
            assert len(tableau.alpha) + 1 == s, name
        else:
            host = torchdiffeq_host(lambda t, y: y, name, 1e-6, 1e-6, {})
            assert host.tableau.num_stages == s, name
