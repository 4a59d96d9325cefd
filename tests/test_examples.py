"""The examples run as a user runs them (tiny sizes here) and write their plots.

Each example is a script in ``examples/``; the test runs it in a fresh process, so an example that only works
with the test suite's imports or state fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} B)"


ALL = sorted(path.name for path in EXAMPLES.glob("*.py"))
WRITES_A_FILE = {"spiral_fit.py", "cnf_toy_density.py", "which_gradient.py", "bouncing_ball.py"}


@pytest.mark.parametrize("script", ALL)
def test_every_example_has_a_cli_whose_help_prints_and_exits(script):
    # --help must print the usage and exit, not run the example; one flag style: kebab-case, --out PATH for a file.
    stdout = _run(script, "--help", timeout=120)
    assert stdout.startswith("usage:"), stdout[:300]
    flags = set(re.findall(r"(?<![\w-])--[\w-]+", stdout))
    assert not [f for f in flags if "_" in f], f"{script}: flags must be kebab-case: {sorted(flags)}"
    if script in WRITES_A_FILE:
        assert "--out PATH" in stdout, f"{script} writes a file: it takes --out PATH"
    text = (EXAMPLES / script).read_text()
    assert ("savefig" in text) == (script in WRITES_A_FILE), "update WRITES_A_FILE and docs/examples.md's table"


def test_spiral_fit_trains_with_exact_gradients(tmp_path):
    out = tmp_path / "spiral"  # no extension: the plot is spiral.png, and that is the name reported
    stdout = _run("spiral_fit.py", "--quick", "--check-grad", "--out", str(out))
    # --check-grad prints the relative difference to backprop through the same steps (float32).
    line = next(line for line in stdout.splitlines() if "relative difference" in line)
    difference = float(line.split("relative difference")[1].split()[0])
    assert difference < 1e-4, line
    assert f"wrote {out}.png" in stdout and not out.exists()
    _png(tmp_path / "spiral.png")


def test_cnf_toy_density_trains_with_torchdyn(tmp_path):
    out = tmp_path / "cnf.png"
    stdout = _run("cnf_toy_density.py", "--quick", "--out", str(out))
    assert "final NLL" in stdout and f"wrote {out}" in stdout
    _png(out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_which_gradient_prints_the_table_for_a_users_model(tmp_path):
    out = tmp_path / "which.png"
    stdout = _run("which_gradient.py", "--quick", "--out", str(out))
    assert "| method | peak memory |" in stdout
    assert "| `ours-torchdiffeq` |" in stdout and "| `backprop` |" in stdout
    assert f"wrote {out}" in stdout
    _png(out)


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d\.\d+e[-+]\d+", line)]


def test_demo_shows_our_gradient_equals_backprop_through_the_same_steps():
    stdout = _run("demo.py", "--quick")
    assert "1 threads" in stdout  # pinned: stable timings
    ours = next(line for line in stdout.splitlines() if line.startswith("| symplectic adjoint"))
    assert _numbers(ours)[0] <= 1e-10, ours  # float64, same accepted steps


def test_first_step_example_shows_backprop_differentiates_the_initial_step_choice():
    # The claim of MIGRATION.md's note: without a fixed first_step, backprop and the adjoint differ by far more
    # than rounding; with it, only by rounding (float64).
    stdout = _run("first_step.py")
    without = _numbers(next(line for line in stdout.splitlines() if "without first_step" in line))[0]
    with_ = _numbers(next(line for line in stdout.splitlines() if "with first_step" in line))[0]
    assert with_ <= 1e-13 and without >= 1e-10 and without >= 1e4 * with_, stdout


@pytest.mark.slow
def test_torchdiffeq_exactness_example_reports_rounding_level_errors():
    stdout = _run("torchdiffeq_exactness.py", "--quick")
    rows = [line for line in stdout.splitlines() if line.startswith(("| dopri5", "| rk4"))]
    assert len(rows) == 2, stdout
    for row in rows:
        assert _numbers(row)[0] <= 1e-10, row  # ours, float64


@pytest.mark.slow
def test_torchdyn_exactness_example_reports_rounding_level_errors():
    stdout = _run("torchdyn_exactness.py", "--quick")
    rows = [line for line in stdout.splitlines() if line.startswith(("euler ", "dopri5 "))]
    assert len(rows) == 4, stdout  # two solvers, in the error table and in the memory table
    for row in rows[:2]:
        assert _numbers(row)[0] <= 1e-10, row  # same steps, float64
