"""The codemod ``python -m symadj_plugins.migrate``: what it rewrites, and that it never harms a file.

Fixtures are ``tests/fixtures/migrate/NAME.py.before`` (code as users have it) and ``NAME.py.after`` (what the
codemod must produce). They are not ``.py`` files so that linters and test collection leave them alone.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libcst")

from symadj_plugins import migrate  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "migrate"
CASES = sorted(p.name[: -len(".py.before")] for p in FIXTURES.glob("*.py.before") if p.name != "broken.py.before")


def _before(name: str) -> bytes:
    return (FIXTURES / f"{name}.py.before").read_bytes()


def _after(name: str) -> bytes:
    return (FIXTURES / f"{name}.py.after").read_bytes()


def _copy_cases(tmp_path: Path, names=CASES) -> dict[str, Path]:
    paths = {}
    for name in names:
        path = tmp_path / f"{name}.py"
        path.write_bytes(_before(name))
        paths[name] = path
    return paths


@pytest.mark.parametrize("name", CASES)
def test_each_rewrite_gives_the_expected_output(name):
    new, _ = migrate.migrate_source(_before(name))
    assert new.encode() == _after(name)


@pytest.mark.parametrize("name", CASES)
def test_second_run_changes_nothing(name):
    after = _after(name)
    new, _ = migrate.migrate_source(after)
    assert new.encode() == after


def test_fixtures_cover_every_rewrite():
    """The expected outputs contain each kind of rewrite the issue asks for (so a fixture cannot go stale)."""
    after = {name: _after(name).decode() for name in CASES}
    assert 'from symadj_plugins.torchdiffeq import odeint_adjoint' in after["torchdiffeq_from_import"]
    assert 'adjoint_method="symplectic"' in after["torchdiffeq_from_import"]
    call = after["torchdiffeq_from_import"].split("pred = ")[1].split("\n    loss")[0]
    assert "adjoint_rtol" not in call and "adjoint_atol" not in call
    assert "symadj_plugins.torchdiffeq.odeint_adjoint(" in after["torchdiffeq_module"]
    assert "import symadj_plugins.torchdiffeq\n" in after["torchdiffeq_module"]
    assert "odeint_symplectic_adjoint as odeint" in after["torchdiffeq_canonical"]
    assert "sensitivity='symplectic_adjoint'" in after["torchdyn_model"]
    assert 'sensitivity="symplectic_adjoint", solver="tsit5"' in after["torchdyn_model"]
    assert "integral_loss=None" in after["torchdyn_model"]  # kept
    register = "from torchdyn.core import NeuralODE\nimport symadj_plugins\nsymadj_plugins.register()"
    assert register in after["torchdyn_model"]
    assert 'sensitivity="autograd"' in after["torchdyn_model"]  # not an adjoint: untouched
    assert "method='rk4')" in after["tsa_paper"]  # the paper's rk38 is torchdiffeq's rk4
    assert "from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint" in after["tsa_paper"]
    assert 'tsa.odeint_symplectic_adjoint(func, y0, t, method="rk4")' in after["tsa_paper"]  # classical: stays
    assert _after("untouched") == _before("untouched")


def test_removed_adjoint_arguments_are_recorded_in_a_comment():
    after = _after("torchdyn_model").decode()
    comment = after.split("model = NeuralODE")[0]
    for removed in ("solver_adjoint='dopri5'", "atol_adjoint=1e-4", "rtol_adjoint=1e-4", "no backward solve"):
        assert removed in comment
    assert "solver_adjoint" not in after.split("model = NeuralODE")[1].split("\n")[0]


def test_comments_and_formatting_survive():
    after = _after("torchdiffeq_from_import").decode()
    assert "from torchdiffeq import odeint  # solvers" in after
    assert "        adjoint_method='symplectic',\n    )" in after  # trailing-comma layout and quote style kept
    assert b"\r\n" in _after("crlf_line_endings") and b"\n" not in _after("crlf_line_endings").replace(b"\r\n", b"")


def test_what_cannot_be_resolved_is_left_alone_and_reported():
    _, notes = migrate.migrate_source(_before("torchdyn_model"))
    assert any("sensitivity=SENS is not a string literal" in n for n in notes)
    _, notes = migrate.migrate_source(_before("edge_cases"))
    assert any("**kwargs" in n for n in notes)
    assert any("used other than by calling it" in n for n in notes)
    kept = 'solver(func, y0, t), odeint_symplectic_adjoint(func, y0, t, method="rk38")'
    assert kept in _after("edge_cases").decode()
    _, notes = migrate.migrate_source(_before("tsa_paper"))
    assert any("classical RK4" in n for n in notes)


def test_without_write_prints_a_diff_and_changes_nothing(tmp_path, capsys):
    paths = _copy_cases(tmp_path)
    stamps = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in paths.items()}
    assert migrate.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "+from symadj_plugins.torchdiffeq import odeint_adjoint" in out and out.startswith("--- ")
    for name, p in paths.items():
        assert (p.read_bytes(), p.stat().st_mtime_ns) == stamps[name]


def test_write_rewrites_whole_files_and_keeps_permissions(tmp_path, capsys):
    paths = _copy_cases(tmp_path)
    paths["torchdyn_model"].chmod(0o640)
    assert migrate.main([str(tmp_path), "--write"]) == 0
    for name, p in paths.items():
        assert p.read_bytes() == _after(name), name
    assert stat.S_IMODE(paths["torchdyn_model"].stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".symadj-migrate-")]  # no temp files left
    capsys.readouterr()
    assert migrate.main([str(tmp_path), "--write"]) == 0
    assert "0 file(s) rewritten" in capsys.readouterr().err


def test_unparsable_file_is_reported_and_left_untouched(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_bytes((FIXTURES / "broken.py.before").read_bytes())
    good = _copy_cases(tmp_path, ["torchdiffeq_module"])["torchdiffeq_module"]
    assert migrate.main([str(broken), str(good), "--write"]) == 1
    err = capsys.readouterr().err
    assert f"{broken}: error: cannot parse" in err
    assert broken.read_bytes() == (FIXTURES / "broken.py.before").read_bytes()
    assert good.read_bytes() == _after("torchdiffeq_module")  # the other files are still processed


def test_missing_path_is_an_error(tmp_path, capsys):
    assert migrate.main([str(tmp_path / "nope.py")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_a_failure_while_rewriting_leaves_the_file_untouched(tmp_path, monkeypatch, capsys):
    """Never a partial edit: if anything goes wrong after parsing, nothing is written."""
    path = _copy_cases(tmp_path, ["torchdiffeq_from_import"])["torchdiffeq_from_import"]

    def explode(self, original_node, updated_node):
        raise RuntimeError("boom")

    monkeypatch.setattr(migrate._Applier, "leave_SimpleStatementLine", explode)
    assert migrate.main([str(path), "--write"]) == 1
    assert "internal error, file left untouched" in capsys.readouterr().err
    assert path.read_bytes() == _before("torchdiffeq_from_import")


def test_module_entry_point(tmp_path):
    path = _copy_cases(tmp_path, ["torchdyn_model"])["torchdyn_model"]
    shutil.copy(FIXTURES / "broken.py.before", tmp_path / "broken.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "symadj_plugins.migrate", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "+model = NeuralODE(f, sensitivity='symplectic_adjoint'" in proc.stdout
    assert "broken.py: error: cannot parse" in proc.stderr
    assert path.read_bytes() == _before("torchdyn_model")
