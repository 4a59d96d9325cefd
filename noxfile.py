"""The version matrix: torchdiffeq releases x torch releases, with torchdyn 1.0.6, plus the hosts' development
versions.

    python -m pip install nox
    python -m nox                      # the default CI combination (torch 2.13, torchdiffeq 0.2.5)
    python -m nox -s matrix            # every combination below (downloads one torch per torch version)
    python -m nox -s "matrix(torch='2.13', torchdiffeq='0.2.4')"    # one cell
    python -m nox -s matrix -- -k compat                            # arguments after -- go to pytest

    git clone https://github.com/rtqichen/torchdiffeq /src/torchdiffeq    # the development versions: any
    git clone https://github.com/DiffEqML/torchdyn /src/torchdyn          # checkout, at the commit to test
    TORCHDIFFEQ_SRC=/src/torchdiffeq TORCHDYN_SRC=/src/torchdyn python -m nox -s dev

    python -m nox -s docs              # the documentation site, built strictly (a stale API reference fails)

Each session gets a fresh virtualenv with ``torch==<version>.*``, the torchdiffeq under test, torchdyn 1.0.6
(with ``--no-deps``: its declared dependencies include packages it does not import, see the ``torchdyn`` extra
in pyproject.toml), and this project with its ``dev`` and ``torchdyn`` extras, all resolved in one pip call so
that nothing upgrades torch behind the pin. Tests marked ``gpu`` skip themselves without CUDA; ``slow`` ones are
deselected unless ``--slow`` is passed after ``--``.

The development versions are not on PyPI and report the same version numbers as the last releases (0.2.5 and
1.0.6), so they are installed from a source directory named by ``TORCHDIFFEQ_SRC`` / ``TORCHDYN_SRC`` (a
``git clone``, or an extracted ``git archive``); a session whose variable is unset skips itself saying so. The
``dev`` session runs one development host with the other at its release, torch 2.13; the ``master`` cells of
``matrix`` take ``TORCHDIFFEQ_SRC`` too. Each prints the commit it installed when the directory is a git checkout.

Private torchdiffeq/torchdyn names we depend on are listed in the adapters' docstrings and the compat package's
``_host.py``, each with a test (``tests/test_*internals*.py``), so a host-library change fails there, loudly.
"""

from __future__ import annotations

import os
import subprocess

import nox

# 0.2.3 has no step callbacks (func.callback_step / callback_accept_step), which the adapter records steps with:
# the adapter refuses it with a clear error, and pyproject.toml requires torchdiffeq>=0.2.4.
TORCHDIFFEQ = ["0.2.4", "0.2.5", "master"]
TORCH = ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8", "2.9", "2.10", "2.11", "2.12", "2.13"]
TORCHDYN = "1.0.6"
DEFAULT = ("2.13", "0.2.5")  # what the default CI runs

# Development versions: a source directory per host, named by an environment variable (see the module docstring).
DEV_SOURCE = {
    "torchdiffeq": ("TORCHDIFFEQ_SRC", "https://github.com/rtqichen/torchdiffeq"),
    "torchdyn": ("TORCHDYN_SRC", "https://github.com/DiffEqML/torchdyn"),
}

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _dev_source(session: nox.Session, host: str) -> str:
    """The source directory of ``host``'s development version, or skips the session when it is not given."""
    var, url = DEV_SOURCE[host]
    src = os.environ.get(var)
    if not src:
        session.skip(f"{host} master: set {var} to a source checkout of {host} (on a machine with GitHub access: "
                     f"git clone {url}); this session does not download it")
    src = os.path.abspath(src)
    if not (os.path.isfile(os.path.join(src, "setup.py")) or os.path.isfile(os.path.join(src, "pyproject.toml"))):
        session.error(f"{var}={src} is not a {host} source directory (no setup.py or pyproject.toml there)")
    try:
        commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    session.log(f"{host} from {src}, commit {commit}")
    return src


def _torchdiffeq_requirement(session: nox.Session, version: str) -> str:
    if version == "master":
        return _dev_source(session, "torchdiffeq")
    return f"torchdiffeq=={version}"


def _numpy_requirement(torch: str) -> list[str]:
    # torch 2.1 and 2.2 wheels are built against NumPy 1.x: with NumPy 2 (what matplotlib and scikit-learn pull in
    # now) torch.Tensor.numpy() fails with "Numpy is not available".
    major, minor = (int(x) for x in torch.split(".")[:2])
    return ["numpy<2"] if (major, minor) < (2, 3) else []


def _run(session: nox.Session, torch: str, torchdiffeq: str, torchdyn: str = TORCHDYN) -> None:
    """Installs the combination and runs the tests; ``torchdiffeq``/``torchdyn`` are a release or ``"master"``."""
    torchdiffeq_req = _torchdiffeq_requirement(session, torchdiffeq)
    torchdyn_req = _dev_source(session, "torchdyn") if torchdyn == "master" else f"torchdyn=={torchdyn}"
    session.install(f"torch=={torch}.*", *_numpy_requirement(torch), torchdiffeq_req, "-e", ".[dev,torchdyn]")
    session.install("--no-deps", torchdyn_req)
    if torchdiffeq == "master":
        # Same version number as the release: make sure the checkout, not a previously installed copy, is used.
        session.install("--no-deps", "--force-reinstall", torchdiffeq_req)
    if torchdyn == "master":
        session.install("--no-deps", "--force-reinstall", torchdyn_req)
    session.run("python", "-c", "import torch, torchdiffeq, torchdyn; print('torch', torch.__version__, "
                "'| torchdiffeq', torchdiffeq.__version__, torchdiffeq.__file__, '| torchdyn', torchdyn.__version__, "
                "torchdyn.__file__)")
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


@nox.session
@nox.parametrize("host", ["torchdiffeq", "torchdyn"])
def dev(session: nox.Session, host: str) -> None:
    """One host's development version from ``$TORCHDIFFEQ_SRC`` or ``$TORCHDYN_SRC``, the other at its release
    (torchdiffeq 0.2.5, torchdyn 1.0.6), torch 2.13."""
    torch, torchdiffeq = DEFAULT
    if host == "torchdiffeq":
        _run(session, torch, "master")
    else:
        _run(session, torch, torchdiffeq, torchdyn="master")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (``mkdocs.yml``), built with ``--strict``: a warning (a broken link, a docstring that
    names an argument the signature does not have) fails it. mkdocstrings reads the code without importing it, so
    the session installs only the ``docs`` extra's packages, not torch. Arguments after ``--`` go to mkdocs."""
    import tomllib  # Python >= 3.11 runs this session

    with open("pyproject.toml", "rb") as fh:
        requirements = tomllib.load(fh)["project"]["optional-dependencies"]["docs"]
    session.install(*requirements)
    session.run("python", "-m", "mkdocs", "build", "--strict", *(session.posargs or ["--site-dir", "site"]),
                env={"NO_MKDOCS_2_WARNING": "1"})
