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

from symadj_plugins.bench import report
from symadj_plugins.bench.memory import PeakMemory, mark
from symadj_plugins.bench.methods import METHODS
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
    ours = {"grad_err": 1e-4, "total_s": 1.0}
    curve = [(1e-5, 4.0), (1e-3, 1.0)]  # error, time of the continuous adjoint at two tolerances
    target = report._equal_error_target(ours, curve)
    assert target["met"] is True and target["measured"] == pytest.approx(0.5)  # adjoint: 2 s at 1e-4
    assert report._equal_error_target({"grad_err": 1e-2, "total_s": 5.0}, curve)["met"] is False


def test_quick_benchmark_runs_every_method(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "symadj_plugins.bench", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | peak memory |" in proc.stdout

    result = json.loads((tmp_path / "results.json").read_text())
    records = {r["method"]: r for r in result["records"]}
    assert set(METHODS) <= set(records)
    for name, r in records.items():
        assert r["status"] == "ok", (name, r.get("reason"))
        for key in ("peak_bytes", "fwd_s", "bwd_s", "total_s", "nfe_fwd", "grad_err"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["grad_err"] < 0.1, (name, r["grad_err"])
        if name != "backprop" and name != "torchdyn-autograd":
            assert r["nfe_bwd"] > 0, name
    # Exact methods reproduce backprop through the same steps (float32).
    for name in ("ours-torchdiffeq", "ours-stored-stages", "ckpt-step", "ckpt-stage"):
        assert records[name]["grad_err_vs_backprop"] < 1e-4, name
    assert records["ours-torchdiffeq"]["peak_bytes"] < records["backprop"]["peak_bytes"]
    assert result["meta"]["memory_method"].startswith("torch.profiler")
    assert result["targets"], "targets are reported"
    assert (tmp_path / "cnf_time_error_memory.png").stat().st_size > 10_000


def test_compare_measures_the_users_own_model():
    from symadj_plugins.bench.api import compare
    from symadj_plugins.bench.models import MLPField

    torch.manual_seed(0)
    func, y0 = MLPField(3, 16, 1), torch.randn(4, 3)
    records = compare(func, y0, torch.tensor([0.0, 1.0]), lambda y: y.pow(2).sum(), rtol=1e-5, atol=1e-7,
                      methods=["ours-torchdiffeq", "backprop"], repeats=1, progress=False)
    assert [r["method"] for r in records] == ["backprop", "ours-torchdiffeq"]  # backprop first
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in records)
    assert records[1]["grad_err_vs_backprop"] < 1e-4
    assert "| `ours-torchdiffeq` |" in report.method_table(records)
