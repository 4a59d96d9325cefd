"""The version matrix: torchdiffeq releases x torch releases, with torchdyn 1.0.6.

    python -m pip install nox
    python -m nox                      # the default CI combination (torch 2.13, torchdiffeq 0.2.5)
    python -m nox -s matrix            # every combination below (downloads one torch per torch version)
    python -m nox -s "matrix(torch='2.13', torchdiffeq='0.2.4')"    # one cell
    python -m nox -s matrix -- -k compat                            # arguments after -- go to pytest

Each session gets a fresh virtualenv with ``torch==<version>.*``, the torchdiffeq under test (``master`` is
installed from GitHub), torchdyn 1.0.6 (with ``--no-deps``: its declared dependencies include packages it does
not import, see the ``torchdyn`` extra in pyproject.toml), and this project with its ``dev`` and ``torchdyn``
extras, all resolved in one pip call so that nothing upgrades torch behind the pin. Tests marked ``gpu`` skip
themselves without CUDA; ``slow`` ones are deselected unless ``--slow`` is passed after ``--``.

Private torchdiffeq/torchdyn names we depend on are listed in the adapters' docstrings and the compat package's
``_host.py``, each with a test (``tests/test_*internals*.py``), so a host-library change fails there, loudly.
"""

from __future__ import annotations

import nox

# 0.2.3 has no step callbacks (func.callback_step / callback_accept_step), which the adapter records steps with:
# the adapter refuses it with a clear error, and pyproject.toml requires torchdiffeq>=0.2.4.
TORCHDIFFEQ = ["0.2.4", "0.2.5", "master"]
TORCH = ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8", "2.9", "2.10", "2.11", "2.12", "2.13"]
TORCHDYN = "1.0.6"
DEFAULT = ("2.13", "0.2.5")  # what the default CI runs

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _torchdiffeq_requirement(version: str) -> str:
    if version == "master":
        return "torchdiffeq @ git+https://github.com/rtqichen/torchdiffeq@master"
    return f"torchdiffeq=={version}"


def _numpy_requirement(torch: str) -> list[str]:
    # torch 2.1 and 2.2 wheels are built against NumPy 1.x: with NumPy 2 (what matplotlib and scikit-learn pull in
    # now) torch.Tensor.numpy() fails with "Numpy is not available".
    major, minor = (int(x) for x in torch.split(".")[:2])
    return ["numpy<2"] if (major, minor) < (2, 3) else []


def _run(session: nox.Session, torch: str, torchdiffeq: str) -> None:
    session.install(f"torch=={torch}.*", *_numpy_requirement(torch), _torchdiffeq_requirement(torchdiffeq), "-e",
                    ".[dev,torchdyn]")
    session.install("--no-deps", f"torchdyn=={TORCHDYN}")
    session.run("python", "-c", "import torch, torchdiffeq, torchdyn; print('torch', torch.__version__, "
                "'| torchdiffeq', torchdiffeq.__version__, '| torchdyn', torchdyn.__version__)")
    args = list(session.posargs)
    if "--slow" in args:
        args.remove("--slow")
    else:
        args = ["-m", "not slow", *args]
    session.run("python", "-m", "pytest", "-q", *args)


@nox.session
@nox.parametrize("torch,torchdiffeq", [DEFAULT])
def tests(session: nox.Session, torch: str, torchdiffeq: str) -> None:
    """The combination the default CI runs."""
    _run(session, torch, torchdiffeq)


@nox.session
@nox.parametrize("torchdiffeq", TORCHDIFFEQ)
@nox.parametrize("torch", TORCH)
def matrix(session: nox.Session, torch: str, torchdiffeq: str) -> None:
    """One cell of torch x torchdiffeq (torchdyn 1.0.6 throughout)."""
    _run(session, torch, torchdiffeq)
