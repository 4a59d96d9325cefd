"""The codemod ``python -m symadj_plugins.migrate``: what it rewrites, and that it never harms a file.

Fixtures are ``tests/fixtures/migrate/NAME.py.before`` (code as users have it) and ``NAME.py.after`` (what the
codemod must produce). They are not ``.py`` files so that linters and test collection leave them alone.
"""

import importlib.util
import json
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


def _unmigrated_count(name: str) -> int:
    _, notes = migrate.migrate_source(_before(name))
    return sum(": not migrated: " in n for n in notes)


def test_without_write_prints_a_diff_and_changes_nothing(tmp_path, capsys):
    paths = _copy_cases(tmp_path)
    stamps = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in paths.items()}
    assert migrate.main([str(tmp_path)]) == 1  # some fixtures hold places it cannot switch (exit status 1)
    captured = capsys.readouterr()
    left = sum(_unmigrated_count(name) for name in CASES)
    assert left == 5 and f"{left} place(s) not migrated" in captured.err
    out = captured.out
    assert "+from symadj_plugins.torchdiffeq import odeint_adjoint" in out and out.startswith("--- ")
    for name, p in paths.items():
        assert (p.read_bytes(), p.stat().st_mtime_ns) == stamps[name]


def test_write_rewrites_whole_files_and_keeps_permissions(tmp_path, capsys):
    paths = _copy_cases(tmp_path)
    paths["torchdyn_model"].chmod(0o640)
    assert migrate.main([str(tmp_path), "--write"]) == 1  # the places it cannot switch are still reported
    for name, p in paths.items():
        assert p.read_bytes() == _after(name), name
    assert stat.S_IMODE(paths["torchdyn_model"].stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".symadj-migrate-")]  # no temp files left
    capsys.readouterr()
    assert migrate.main([str(tmp_path), "--write"]) == 1  # ... and again on the second run
    assert "0 file(s) rewritten" in capsys.readouterr().err
    clean = [name for name in CASES if _unmigrated_count(name) == 0]
    for name in set(CASES) - set(clean):
        paths[name].unlink()
    assert len(clean) >= 5 and migrate.main([str(tmp_path)]) == 0


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


# -- odeint_adjoint used as a value ----------------------------------------------------------------------------

def test_values_of_odeint_adjoint_are_wrapped():
    after = _after("torchdiffeq_values").decode()
    wrapped = 'functools.partial(odeint_adjoint, adjoint_method="symplectic")'
    assert f"self.odeint = {wrapped} if adjoint else odeint" in after          # conditional assignment
    assert f"solver = {wrapped}\n" in after                                      # plain assignment
    assert f'SOLVERS = {{"adjoint": {wrapped}, "backprop": odeint}}' in after  # container element
    assert f"solve={wrapped}):" in after                                         # default argument
    assert f"a = run({wrapped}, func" in after                                   # positional argument
    assert ('run(integrate=functools.partial(symadj_plugins.torchdiffeq.odeint_adjoint, '
            'adjoint_method="symplectic"), func=func' in after)                  # keyword argument, module style
    # functools.partial(odeint_adjoint, ...) gets the keyword itself (adjoint-only arguments removed)
    assert 'tight = partial(odeint_adjoint, rtol=1e-9, adjoint_method="symplectic")' in after
    assert 'loose = partial(symadj_plugins.torchdiffeq.odeint_adjoint, rtol=1e-3, adjoint_method="symplectic")' in after
    assert "import functools\n" in after and "import symadj_plugins.torchdiffeq\n" in after
    code = "\n".join(line for line in after.splitlines() if not line.lstrip().startswith("#"))
    assert "torchdiffeq.odeint_adjoint" not in code.replace("symadj_plugins.torchdiffeq.odeint_adjoint", "")


def _load(source: bytes, tmp_path: Path, name: str):
    path = tmp_path / f"{name}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_migrated_values_select_the_symplectic_adjoint(tmp_path, monkeypatch):
    """Every value use, called, runs the symplectic adjoint; before migration none of them did."""
    import torch
    import torchdiffeq

    import symadj_plugins.torchdiffeq as symadj_td
    import symadj_plugins.torchdiffeq.api as symadj_td_api

    calls = []
    real = symadj_td.odeint_symplectic_adjoint

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    # The public name, and the module whose odeint_adjoint looks it up.
    monkeypatch.setattr(symadj_td, "odeint_symplectic_adjoint", spy)
    monkeypatch.setattr(symadj_td_api, "odeint_symplectic_adjoint", spy)
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2).double()

        def forward(self, t, y):
            return torch.tanh(self.linear(y))

    func = Field()
    y0, t = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.linspace(0, 1, 4, dtype=torch.float64)

    def call_every_value(module) -> int:
        calls.clear()
        module.Model(func).odeint(func, y0, t)
        for value in (module.solver, module.tight, module.loose, module.SOLVERS["adjoint"]):
            value(func, y0, t, method="rk4", options=dict(step_size=0.25))
        module.train(func, y0, t)  # positional, keyword and default-argument values, plus one direct call
        return len(calls)

    assert call_every_value(_load(_after("torchdiffeq_values"), tmp_path, "values_after")) == 1 + 4 + 4
    assert calls[1]["rtol"] == 1e-7 and calls[2]["rtol"] == 1e-9 and calls[3]["rtol"] == 1e-3  # partial's kept
    assert call_every_value(_load(_before("torchdiffeq_values"), tmp_path, "values_before")) == 0

    # and the gradient through a wrapped value is backprop's through the same steps
    migrated = _load(_after("torchdiffeq_values"), tmp_path, "values_after2")
    options = dict(step_size=0.1)
    grads = torch.autograd.grad(migrated.solver(func, y0, t, method="rk4", options=options).square().sum(),
                                list(func.parameters()))
    reference = torch.autograd.grad(torchdiffeq.odeint(func, y0, t, method="rk4", options=options).square().sum(),
                                    list(func.parameters()))
    for g, r in zip(grads, reference):
        assert ((g - r).norm() / r.norm()).item() <= 1e-10


def test_uses_it_cannot_switch_are_reported_with_their_line_and_exit_1(tmp_path, capsys):
    path = _copy_cases(tmp_path, ["torchdiffeq_left"])["torchdiffeq_left"]
    assert migrate.main([str(path), "--write"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: line 15: not migrated: `solver is odeint_adjoint`" in err
    assert f"{path}: line 22: not migrated: `odeint_adjoint` used in a way the codemod does not rewrite" in err
    assert f"{path}: line 23: not migrated: `odeint_adjoint.__name__`" in err
    assert "3 place(s) not migrated" in err
    assert 'odeint_adjoint(func, y0, t, adjoint_method="symplectic")' in path.read_text()  # the rest is done
    # a second run still reports them
    assert migrate.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: line 15: not migrated:" in err and f"{path}: line 22: not migrated:" in err


def test_callback_adjoint_methods_are_warned_about():
    _, notes = migrate.migrate_source(_before("torchdiffeq_left"))
    assert any(n.startswith('line 10: `callback_accept_step_adjoint` is never called with adjoint_method="symplectic"')
               for n in notes)
    source = "class F:\n    def callback_step_adjoint(self, t0, y0, dt):\n        pass\n" \
             "    def callback_reject_step_adjoint(self, t0, y0, dt):\n        pass\n" \
             "    def callback_step(self, t0, y0, dt):\n        pass\n"
    new, notes = migrate.migrate_source(source)
    assert new == source
    assert [n.split(":")[0] for n in notes] == ["line 2", "line 4"]  # not for callback_step, which still runs


def test_events_through_odeint_interface_are_migrated(tmp_path, monkeypatch):
    """``odeint_event(..., odeint_interface=odeint_adjoint)`` gets the wrapped symplectic odeint_adjoint (events
    are supported), and run, it gives torchdiffeq's event time and the symplectic adjoint is what ran."""
    import torch
    import torchdiffeq

    import symadj_plugins.torchdiffeq.api as symadj_td_api

    after = _after("torchdiffeq_events").decode()
    wrapped = 'odeint_interface=functools.partial(odeint_adjoint, adjoint_method="symplectic")'
    assert wrapped in after and "from symadj_plugins.torchdiffeq import odeint_adjoint" in after
    assert ('odeint_interface=functools.partial(symadj_plugins.torchdiffeq.odeint_adjoint, '
            'adjoint_method="symplectic")') in after
    assert _unmigrated_count("torchdiffeq_events") == 0
    # what an older codemod left (symadj's odeint_adjoint passed unwrapped) is wrapped on a rerun
    old = ("from torchdiffeq import odeint_event\nfrom symadj_plugins.torchdiffeq import odeint_adjoint\n"
           "e = odeint_event(f, y0, t0, event_fn=ev, odeint_interface=odeint_adjoint)\n")
    new, notes = migrate.migrate_source(old)
    assert wrapped in new and "import functools\n" in new and not notes

    calls = []
    real = symadj_td_api.odeint_symplectic_adjoint
    monkeypatch.setattr(symadj_td_api, "odeint_symplectic_adjoint",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2).double()

        def forward(self, t, y):
            return self.linear(y)

    func = Field()
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    event_fn = lambda t, y: t - 0.5 + y.sum() * 0.01  # noqa: E731
    want_t, _ = torchdiffeq.odeint_event(func, y0, t0, event_fn=event_fn, method="dopri5")
    got_t, got_sol = _load(_after("torchdiffeq_events"), tmp_path, "events_after").first_hit(func, y0, t0, event_fn)
    assert len(calls) == 1 and calls[0]["event_fn"] is event_fn
    assert torch.equal(got_t, want_t)
    got_sol[-1].sum().backward()
    assert y0.grad is not None


# -- notebooks --------------------------------------------------------------------------------------------------

NOTEBOOK_BEFORE = FIXTURES / "notebook.ipynb.before"
NOTEBOOK_AFTER = FIXTURES / "notebook.ipynb.after"


def test_notebook_code_cells_are_migrated_together(tmp_path, capsys):
    path = tmp_path / "spiral.ipynb"
    path.write_bytes(NOTEBOOK_BEFORE.read_bytes())
    assert migrate.main([str(tmp_path)]) == 1  # found by the directory walk; cells 8 and 9 are left (see below)
    captured = capsys.readouterr()
    assert path.read_bytes() == NOTEBOOK_BEFORE.read_bytes()  # no --write: unchanged
    assert f"--- {path} (cell 3)" in captured.out and "+from symadj_plugins.torchdiffeq import odeint_adjoint" in \
        captured.out
    assert migrate.main([str(path), "--write"]) == 1
    assert path.read_bytes() == NOTEBOOK_AFTER.read_bytes()
    before, after = json.loads(NOTEBOOK_BEFORE.read_text()), json.loads(path.read_text())
    assert after.keys() == before.keys() and after["metadata"] == before["metadata"]
    for old, new in zip(before["cells"], after["cells"], strict=True):
        assert {k: v for k, v in old.items() if k != "source"} == {k: v for k, v in new.items() if k != "source"}
        assert type(old["source"]) is type(new["source"])  # list stays list, string stays string
    sources = ["".join(c["source"]) for c in after["cells"]]
    assert sources[0] == "".join(before["cells"][0]["source"])  # markdown untouched
    # the first code cell holds a magic: migrated all the same (new imports go there), the magic kept
    assert sources[1] == "import functools\n%matplotlib inline\nimport torch"
    assert sources[2].startswith("from symadj_plugins.torchdiffeq import odeint_adjoint\n")
    assert 'y0, t, adjoint_method="symplectic",\n' in sources[4]  # a call in another cell than the import
    assert sources[5].endswith('solver = functools.partial(odeint_adjoint, adjoint_method="symplectic")\nsolver')
    for kept in (3, 6, 7, 8):  # a shell line, help, a magic inside a loop, a %%bash cell: kept as they were
        assert after["cells"][kept] == before["cells"][kept]
    capsys.readouterr()
    assert migrate.main([str(path), "--write"]) == 1  # idempotent; the places left are still reported
    err = capsys.readouterr().err
    assert path.read_bytes() == NOTEBOOK_AFTER.read_bytes() and "0 file(s) rewritten" in err
    assert f"{path}: cell 8, line 2: not migrated: IPython line `%timeit odeint_adjoint(func, y0, t)`" in err
    assert f"{path}: cell 9, line 1: not migrated: cell skipped: it holds a cell magic" in err
    assert "2 place(s) not migrated" in err


def _notebook(tmp_path: Path, *cells: str) -> Path:
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                     "source": source.splitlines(keepends=True)} for source in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "tutorial.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_a_notebook_whose_import_cell_holds_magics_is_migrated(tmp_path, capsys):
    """torchdyn's tutorials start with `%load_ext autoreload` in the import cell: the calls below still switch."""
    path = _notebook(tmp_path, "%load_ext autoreload\n%autoreload 2\nfrom torchdyn.core import NeuralODE\n"
                               "x = !ls\n",
                     "model = NeuralODE(f, sensitivity='adjoint', solver='dopri5')\n")
    assert migrate.main([str(path), "--write"]) == 0
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]
    assert cells[0].startswith("%load_ext autoreload\n%autoreload 2\nfrom torchdyn.core import NeuralODE\n"
                               "import symadj_plugins\nsymadj_plugins.register()")
    assert cells[0].endswith("x = !ls\n")
    assert cells[1] == "model = NeuralODE(f, sensitivity='symplectic_adjoint', solver='dopri5')\n"
    assert "0 place(s) not migrated" in capsys.readouterr().err


def test_calls_whose_import_cannot_be_seen_are_reported_never_silently_left(tmp_path, capsys):
    """An import cell that does not parse hides where NeuralODE and odeint_adjoint come from: the calls that look
    like a continuous adjoint are each reported, with their place, and the exit status is 1."""
    path = _notebook(tmp_path, "from torchdyn.core import NeuralODE\nfrom torchdiffeq import odeint_adjoint\nif:\n",
                     "model = NeuralODE(f, sensitivity='adjoint')\ny = odeint_adjoint(f, y0, t)\n",
                     "model = NeuralODE(f, sensitivity='autograd')\n")
    assert migrate.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: cell 2, line 1: not migrated: `NeuralODE(..., sensitivity=\"adjoint\")`" in err
    assert f"{path}: cell 2, line 2: not migrated: `odeint_adjoint(...)`: the codemod cannot see where" in err
    assert "cell 3" not in err and "3 place(s) not migrated" in err  # with the unparsable cell 1 (it says adjoint)
    # the same in a .py file that star-imports them from elsewhere
    _, notes = migrate.migrate_source("from mylib import *\nm = NeuralODE(f, sensitivity='interpolated_adjoint')\n"
                                      "y = odeint_adjoint(f, y0, t, adjoint_method='symplectic')\n")
    assert [n.split(": not migrated: ")[0] for n in notes] == ["line 2"]


def test_notebook_notes_name_the_cell_and_its_line(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                     "source": ["import torch\n", "from torchdiffeq import odeint_adjoint\n"]},
                    {"cell_type": "markdown", "metadata": {}, "source": ["text"]},
                    {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                     "source": ["x = 1\n", "label = odeint_adjoint.__name__\n"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "label.ipynb"
    path.write_text(json.dumps(nb))
    result = migrate.migrate_file(str(path))
    assert [(n.cell, n.line, n.unmigrated) for n in result.notes] == [(3, 2, True)]


def test_a_file_that_is_not_a_notebook_is_refused(tmp_path, capsys):
    path = tmp_path / "old.ipynb"
    path.write_text('{"worksheets": []}')
    (tmp_path / "bad.ipynb").write_text("not json")
    assert migrate.main([str(path), str(tmp_path / "bad.ipynb")]) == 1
    err = capsys.readouterr().err
    assert f"{path}: error: not a Jupyter notebook (nbformat 4) file" in err and "nbformat 3" in err
    assert "bad.ipynb: error: not a Jupyter notebook" in err


# -- without libcst ---------------------------------------------------------------------------------------------

def test_without_libcst_the_command_says_what_to_install(tmp_path):
    path = _copy_cases(tmp_path, ["torchdiffeq_module"])["torchdiffeq_module"]
    code = ("import runpy, sys; sys.modules['libcst'] = None; sys.argv = ['migrate', sys.argv[1]]; "
            "runpy.run_module('symadj_plugins.migrate', run_name='__main__', alter_sys=True)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "needs libcst" in proc.stderr and "pip install -e '.[migrate]'" in proc.stderr
    assert "pip install libcst" in proc.stderr
    assert path.read_bytes() == _before("torchdiffeq_module")
    # the Python API says the same, as an ImportError
    code = ("import sys; sys.modules['libcst'] = None\nfrom symadj_plugins import migrate\n"
            "try:\n    migrate.main\nexcept ModuleNotFoundError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "pip install libcst" in proc.stdout, proc.stderr


# -- the package ------------------------------------------------------------------------------------------------

def test_one_method_name_table_for_codemod_and_compat():
    from torch_symplectic_adjoint import _methods

    from symadj_plugins._method_names import TSA_TO_TORCHDIFFEQ
    from symadj_plugins.migrate import _names

    assert _methods._TORCHDIFFEQ_NAME is TSA_TO_TORCHDIFFEQ
    assert set(TSA_TO_TORCHDIFFEQ) == set(_methods.METHODS)
    assert TSA_TO_TORCHDIFFEQ["rk38"] == "rk4" and TSA_TO_TORCHDIFFEQ["rk4"] is None
    assert _names.TSA_METHOD_TO_TORCHDIFFEQ == {k: v for k, v in TSA_TO_TORCHDIFFEQ.items() if v is not None}


def test_the_codemod_modules_import_one_way():
    """No import cycle among symadj_plugins.migrate's modules (not even under TYPE_CHECKING)."""
    import ast

    package = Path(migrate.__file__).parent
    imports = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {(node.module or "").split(".")[0] or alias.name
                              for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                              for alias in node.names}
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join((*stack, module))}"
        if module not in done:
            for imported in imports.get(module, ()):
                visit(imported, (*stack, module))
            done.add(module)

    for module in imports:
        visit(module, ())
    assert imports["plans"] and "planner" not in imports["plans"] and "files" not in imports["notebook"]
