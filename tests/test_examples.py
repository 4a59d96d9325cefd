"""The examples run as a user runs them (tiny sizes here) and write their plots.

Each example is a script in ``examples/``; the test runs it in a fresh process, so an example that only works
with the test suite's imports or state fails here.
"""

from __future__ import annotations

import os
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


def test_spiral_fit_trains_with_exact_gradients(tmp_path):
    out = tmp_path / "spiral.png"
    stdout = _run("spiral_fit.py", "--niters", "10", "--test_freq", "5", "--check-grad", "--out", str(out))
    # --check-grad prints the relative difference to backprop through the same steps (float32).
    line = next(line for line in stdout.splitlines() if "relative difference" in line)
    difference = float(line.split("relative difference")[1].split()[0])
    assert difference < 1e-4, line
    _png(out)


def test_cnf_toy_density_trains_with_torchdyn(tmp_path):
    out = tmp_path / "cnf.png"
    stdout = _run("cnf_toy_density.py", "--iters", "3", "--batch", "64", "--out", str(out))
    assert "final NLL" in stdout
    _png(out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_which_gradient_prints_the_table_for_a_users_model(tmp_path):
    out = tmp_path / "which.png"
    stdout = _run("which_gradient.py", "--repeats", "1", "--methods", "backprop,adjoint,ours-torchdiffeq",
                  "--out", str(out))
    assert "| method | peak memory |" in stdout
    assert "| `ours-torchdiffeq` |" in stdout and "| `backprop` |" in stdout
    _png(out)
