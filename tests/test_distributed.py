"""Multi-process training: ``DistributedDataParallel`` gives the gradients of one process on the whole batch.

Two CPU processes (gloo, 127.0.0.1 only) each take half of a batch; after ``backward()`` DDP has averaged their
gradients, which must equal (float64, relative error <= 1e-10) the gradient one process computes on the whole
batch with the same model. That holds because the symplectic adjoint is one ``torch.autograd.Function`` whose
inputs include the parameters: their gradients reach ``AccumulateGrad`` as ordinary autograd gradients, where
DDP's reducer hooks are. Checked for each entry point:

- torchdiffeq: ``odeint_symplectic_adjoint`` and ``torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic")``
  after ``register()``, called in the ``forward`` of an ``ODEBlock`` module that DDP wraps;
- torchdyn: ``NeuralODE(f, sensitivity="symplectic_adjoint")`` after ``register()``, held by an ``ODEBlock`` that
  DDP wraps, and wrapped by DDP directly.

Each also accumulates over micro-batches: two backward passes under ``no_sync()``, then a synchronised one.

Adaptive solvers choose their steps from an error norm over the *whole* state, so one process on the whole batch
takes other steps than each rank on its half (a property of batched adaptive solving, not of DDP). For them the
reference is one process solving each half separately, with the halves' gradients averaged as DDP does.

All scenarios run in one pair of spawned workers (importing torch and torchdyn dominates the time); a worker that
fails writes its traceback to a file, and the test raises it.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import rel_error
from torch import nn

import symadj_plugins

WORLD_SIZE = 2
BATCH, DIM = 8, 2
MICRO_BATCHES = 3  # the last one synchronises; the ones before run under no_sync()
TOLERANCE = 1e-10  # float64, relative
WORKER_TIMEOUT_S = 120.0

# torchdyn's own, for fixed-step solvers given tolerances.
pytestmark = pytest.mark.filterwarnings("ignore:Setting tolerances has no effect:UserWarning")


# --------------------------------------------------------------------------------------------------------
# Models, written as users write them: the solve happens in the forward of the module DDP wraps.

class Field(nn.Module):
    """``dx/dt = MLP(x)·(1 + t)``: time-dependent, so a stage replayed at a wrong time would show."""

    def __init__(self, dim: int = DIM, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, x, args=None):  # ``args``: torchdyn passes it
        return self.net(x) * (1 + t)


class ODEBlock(nn.Module):
    """Holds the vector field (or a torchdyn ``NeuralODE``); ``forward(x)`` solves and returns the states at all
    output times, ``(T, batch, dim)``."""

    def __init__(self, ode: nn.Module, solve: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.ode = ode
        self.solve = solve

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.solve(self.ode, x)


def _times() -> torch.Tensor:
    return torch.linspace(0.0, 1.0, 3, dtype=torch.float64)


def _torchdiffeq_block(method: str, registered_entry: bool, memory_budget: str | None = None) -> nn.Module:
    import torchdiffeq

    from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

    # "min" keeps O(log N) of its steps' states: enough steps that it recomputes some.
    options = {"step_size": 0.25 if memory_budget is None else 1 / 32} if method == "rk4" else None
    budget = {} if memory_budget is None else dict(memory_budget=memory_budget)

    def solve(field, x):
        if registered_entry:  # looked up at call time, so it is the function register() installed
            return torchdiffeq.odeint_adjoint(field, x, _times(), method=method, options=options, rtol=1e-6,
                                              atol=1e-8, adjoint_method="symplectic", adjoint_options=budget or None)
        return odeint_symplectic_adjoint(field, x, _times(), method=method, options=options, rtol=1e-6, atol=1e-8,
                                         **budget)

    return ODEBlock(Field(), solve)


def _neural_ode(solver: str) -> nn.Module:
    from torchdyn.core import NeuralODE

    return NeuralODE(Field(), sensitivity="symplectic_adjoint", solver=solver, atol=1e-8, rtol=1e-6)


def _torchdyn_block(solver: str) -> nn.Module:
    # For fixed-step torchdyn solvers the steps are the t_span intervals, hence a finer t_span for rk4.
    t_span = torch.linspace(0.0, 1.0, 5 if solver == "rk4" else 3, dtype=torch.float64)
    return ODEBlock(_neural_ode(solver), lambda node, x: node(x, t_span)[1])


# name -> (builder, adaptive)
SCENARIOS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "torchdiffeq-odeint_symplectic_adjoint-ODEBlock-rk4": (lambda: _torchdiffeq_block("rk4", False), False),
    "torchdiffeq-odeint_adjoint-registered-ODEBlock-rk4": (lambda: _torchdiffeq_block("rk4", True), False),
    "torchdiffeq-odeint_adjoint-registered-ODEBlock-dopri5": (lambda: _torchdiffeq_block("dopri5", True), True),
    "torchdiffeq-odeint_symplectic_adjoint-ODEBlock-rk4-min": (lambda: _torchdiffeq_block("rk4", False, "min"), False),
    "torchdiffeq-odeint_adjoint-registered-ODEBlock-dopri5-min": (lambda: _torchdiffeq_block("dopri5", True, "min"),
                                                                  True),
    "torchdyn-NeuralODE-in-ODEBlock-rk4": (lambda: _torchdyn_block("rk4"), False),
    "torchdyn-NeuralODE-rk4": (lambda: _neural_ode("rk4"), False),
    "torchdyn-NeuralODE-dopri5": (lambda: _neural_ode("dopri5"), True),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial parameters in every process
    return SCENARIOS[name][0]().double()


def batches() -> list[torch.Tensor]:
    """``1 + MICRO_BATCHES`` whole batches ``(BATCH, DIM)``: one for a plain step, then the micro-batches."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, DIM, dtype=torch.float64, generator=generator) for _ in range(1 + MICRO_BATCHES)]


def loss_of(output) -> torch.Tensor:
    """A mean over the batch (and times), so the mean of the halves' losses is the whole batch's loss."""
    sol = output[1] if isinstance(output, tuple) else output  # DDP around NeuralODE returns (t_eval, sol)
    return sol.pow(2).mean() + sol.sin().mean()


def half(x: torch.Tensor, rank: int) -> torch.Tensor:
    size = x.shape[0] // WORLD_SIZE
    return x[rank * size:(rank + 1) * size]


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------------------
# The workers

def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
        symadj_plugins.register()
        results = {name: _run_scenario(name, rank) for name in SCENARIOS}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()  # both results written before either rank tears the group down
        torch.distributed.destroy_process_group()
    except BaseException:
        partial = Path(out_dir) / f"rank{rank}.err.partial"
        partial.write_text(traceback.format_exc())
        partial.rename(partial.with_suffix(""))  # whole: the parent may stop this process once it sees the file
        raise
    # gloo's teardown sometimes aborts at interpreter exit (examples/ddp_training.py says more); the result is saved.
    os._exit(0)


def _run_scenario(name: str, rank: int) -> dict[str, list[torch.Tensor]]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(build(name))
    plain, *micro = batches()

    loss_of(model(half(plain, rank))).backward()
    single = grads_of(model.module)

    model.zero_grad(set_to_none=True)
    for x in micro[:-1]:
        with model.no_sync():  # gradients accumulate locally, no all-reduce
            loss_of(model(half(x, rank))).backward()
    loss_of(model(half(micro[-1], rank))).backward()  # all-reduces the accumulated gradients
    return {"single": single, "accumulated": grads_of(model.module)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir: Path, worker: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Runs ``worker`` (default: ``_worker``) on ``WORLD_SIZE`` spawned processes; returns each rank's results or
    raises with the worker's traceback."""
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=worker or _worker, args=(rank, port, str(out_dir)), daemon=True)
                 for rank in range(WORLD_SIZE)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if any(out_dir.glob("rank*.err")) or any(p.exitcode not in (None, 0) for p in processes):
            break  # a rank failed: the other would wait for it in a collective until the gloo timeout
        time.sleep(0.1)
    for p in processes:
        if p.is_alive():
            p.terminate()
        p.join()
    errors = [f"{f.name}:\n{f.read_text()}" for f in sorted(out_dir.glob("rank*.err"))]
    if errors:
        raise AssertionError("a DDP worker failed:\n" + "\n".join(errors))
    missing = [rank for rank in range(WORLD_SIZE) if not (out_dir / f"rank{rank}.pt").exists()]
    if missing:
        codes = [p.exitcode for p in processes]
        raise AssertionError(f"DDP workers {missing} wrote no result (exit codes {codes}; timeout "
                             f"{WORKER_TIMEOUT_S:.0f} s)")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


# --------------------------------------------------------------------------------------------------------
# The single-process references

@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, registered_for_module) -> list[dict]:
    return run_workers(tmp_path_factory.mktemp("ddp"))


def single_process_grads(name: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One process, no DDP: the gradient accumulated over the whole batches ``xs``. For an adaptive solver
    each batch is solved as its ``WORLD_SIZE`` halves, averaged (see the module docstring)."""
    model = build(name)
    for x in xs:
        if SCENARIOS[name][1]:
            for rank in range(WORLD_SIZE):
                (loss_of(model(half(x, rank))) / WORLD_SIZE).backward()
        else:
            loss_of(model(x)).backward()
    return grads_of(model)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_gradient_equals_one_process_on_the_whole_batch(name, ddp_results):
    want = single_process_grads(name, batches()[:1])
    assert all(w.norm() > 0 for w in want), "every parameter must get a gradient, or the test shows nothing"
    for rank, results in enumerate(ddp_results):
        got = results[name]["single"]
        assert got[0].dtype == torch.float64
        error = rel_error(got, want)
        assert error <= TOLERANCE, f"rank {rank}: relative error {error:.2e}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_no_sync_accumulation_equals_one_process_on_the_whole_batches(name, ddp_results):
    want = single_process_grads(name, batches()[1:])
    for rank, results in enumerate(ddp_results):
        error = rel_error(results[name]["accumulated"], want)
        assert error <= TOLERANCE, f"rank {rank}: relative error {error:.2e}"


def test_adaptive_halves_take_other_steps_than_the_whole_batch(registered_for_module):
    """Why the adaptive scenarios are compared with per-half solves: on the whole batch the error norm, hence
    the steps, differ, and so does the gradient (by about the solver tolerance, far above rounding)."""
    name = "torchdiffeq-odeint_adjoint-registered-ODEBlock-dopri5"
    whole = build(name)
    loss_of(whole(batches()[0])).backward()
    assert rel_error(grads_of(whole), single_process_grads(name, batches()[:1])) > 1e2 * TOLERANCE


# --------------------------------------------------------------------------------------------------------
# FSDP. The symplectic adjoint differentiates the parameters it receives when the solve starts, and its backward
# pass evaluates f again. FSDP around a module that calls the solver (the ODE block, the whole model) has installed
# the unsharded parameters for its whole forward pass, and its backward hooks (registered on that module's outputs)
# reduce-scatter their gradients: that works. FSDP around the vector field (or a module inside it) swaps the
# parameters on every call of f, so the solve received parameters f does not use: refused when the solve starts,
# as is FSDP1's default use_orig_params=False, which replaces the field's parameters by views of a flat parameter.

FSDP_STEPS = dict(method="rk4", options={"step_size": 0.25})


def _fsdp_solve(budget: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

    return lambda field, x: odeint_symplectic_adjoint(field, x, _times(), memory_budget=budget, **FSDP_STEPS)


def _fsdp_model(name: str) -> nn.Module:
    """The model of scenario ``name`` (``<how>-<budget>``), sharded as ``how`` says."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    how, budget = name.rsplit("-", 1)
    torch.manual_seed(0)
    if how.startswith("torchdyn"):
        node = _neural_ode("rk4").double()
        model = ODEBlock(node, lambda node_, x: node_(x, torch.linspace(0.0, 1.0, 5, dtype=torch.float64))[1])
        field = node.vf.vf
    else:
        field = Field().double()
        model = ODEBlock(field, _fsdp_solve(budget))
    cpu = torch.device("cpu")
    if how in ("fsdp2-root", "torchdyn-fsdp2-root"):
        _fully_shard()(model)
    elif how in ("fsdp2-field", "torchdyn-fsdp2-field"):
        _fully_shard()(field)
        _fully_shard()(model)
    elif how.startswith("fsdp1-root"):
        model = FullyShardedDataParallel(model, use_orig_params=how.endswith("orig_params"), device_id=cpu)
    elif how.startswith("fsdp1-field"):
        model.ode = FullyShardedDataParallel(field, use_orig_params=how.endswith("orig_params"), device_id=cpu)
        model = FullyShardedDataParallel(model, use_orig_params=how.endswith("orig_params"), device_id=cpu)
    return model


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


BUDGETS = ("min", "stages", "max")
# Scenario names: <how>-<budget>. torchdyn takes its budget from symadj_plugins.options(): the default.
FSDP_WORKS = [f"{how}-{b}" for how in ("fsdp2-root", "fsdp1-root-orig_params") for b in BUDGETS] + \
    ["torchdyn-fsdp2-root-default"]
FSDP_REFUSED = {  # scenario -> what the error must say
    **{f"fsdp2-field-{b}": "sharded by FSDP" for b in BUDGETS},
    **{f"fsdp1-field-{p}-{b}": "sharded by FSDP" for p in ("orig_params", "flat_params") for b in BUDGETS},
    **{f"fsdp1-root-flat_params-{b}": "use_orig_params=True" for b in BUDGETS},
    "torchdyn-fsdp2-field-default": "sharded by FSDP",
}


def _full_grads(model: nn.Module, name: str) -> list[torch.Tensor | None]:
    """The whole (unsharded) gradient of every parameter, in the order of the unwrapped model's parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if "fsdp1" in name:
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    return [None if p.grad is None else p.grad.full_tensor() for p in model.parameters()]


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
        symadj_plugins.register()
        results = {}
        for name in [*FSDP_WORKS, *FSDP_REFUSED]:
            model = _fsdp_model(name)
            phase = "forward"
            try:  # an error is raised identically on both ranks: no collective is left waiting
                output = model(half(batches()[0], rank))
                phase = "backward"
                loss_of(output).backward()
            except Exception as exc:
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "phase": phase}
                continue
            results[name] = {"grads": _full_grads(model, name)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        partial = Path(out_dir) / f"rank{rank}.err.partial"
        partial.write_text(traceback.format_exc())
        partial.rename(partial.with_suffix(""))
        raise
    os._exit(0)


def _fsdp_available() -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
        _fully_shard()
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, registered_for_module) -> list[dict]:
    if not _fsdp_available():
        pytest.skip("torch.distributed with FSDP1 and FSDP2 (fully_shard) is not available")
    return run_workers(tmp_path_factory.mktemp("fsdp"), _fsdp_worker)


def backprop_grads_on_the_whole_batch(name: str) -> list[torch.Tensor]:
    """Backprop through the same rk4 steps, one process, no FSDP, on the whole batch (the mean of the halves' losses):
    torchdiffeq.odeint, or torchdyn's sensitivity="autograd"."""
    import torchdiffeq
    from torchdyn.core import NeuralODE

    torch.manual_seed(0)
    if name.startswith("torchdyn"):
        node = NeuralODE(Field(), sensitivity="autograd", solver="rk4").double()
        model = ODEBlock(node, lambda node_, x: node_(x, torch.linspace(0.0, 1.0, 5, dtype=torch.float64))[1])
    else:
        model = ODEBlock(Field().double(), lambda field, x: torchdiffeq.odeint(field, x, _times(), **FSDP_STEPS))
    loss_of(model(batches()[0])).backward()
    return grads_of(model)


@pytest.mark.parametrize("name", FSDP_WORKS)
def test_fsdp_around_the_module_that_solves_gives_backprops_gradient(name, fsdp_results):
    want = backprop_grads_on_the_whole_batch(name)
    assert all(w.norm() > 0 for w in want)
    for rank, results in enumerate(fsdp_results):
        got = results[name].get("grads")
        assert got is not None, f"rank {rank}: {results[name]}"
        assert all(g is not None for g in got), f"rank {rank}: a parameter got no gradient"
        error = rel_error(got, want)
        assert error <= TOLERANCE, f"rank {rank}: relative error {error:.2e}"


@pytest.mark.parametrize("name", list(FSDP_REFUSED))
def test_fsdp_around_the_vector_field_is_refused_when_the_solve_starts(name, fsdp_results):
    for results in fsdp_results:
        assert results[name].get("phase") == "forward", f"not refused in the forward pass: {results[name]}"
        message = results[name]["error"]
        assert message.startswith("ValueError")
        assert FSDP_REFUSED[name] in message
        # The message names the configurations that work.
        assert "fully_shard(model)" in message and "use_orig_params=True" in message


# --------------------------------------------------------------------------------------------------------
# The example

@pytest.mark.slow
def test_ddp_training_example_keeps_ranks_identical():
    script = Path(__file__).resolve().parent.parent / "examples" / "ddp_training.py"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), "--steps", "3"], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for rank in range(WORLD_SIZE):  # two processes share stdout: count the records, not the lines
        assert len(re.findall(rf"rank {rank} step \d+ loss", proc.stdout)) == 3, proc.stdout
    check = next(line for line in lines if "parameter difference between ranks" in line)
    assert float(check.split("parameter difference between ranks")[1].split()[0]) == 0.0, check


# --------------------------------------------------------------------------------------------------------
# Lightning: Trainer(strategy="ddp", accelerator="cpu", devices=2) with torchdyn. The "ddp" strategy starts the
# other rank by re-running the command line, so this file is run as a script (see the bottom), not under pytest.

LIGHTNING_NAME = "torchdyn-NeuralODE-in-ODEBlock-rk4"


def _lightning_main(out_dir: str) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    symadj_plugins.register()

    class Learner(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build(LIGHTNING_NAME)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return loss_of(self.model(x))

        def on_after_backward(self):  # DDP has averaged the gradients by now
            torch.save({"grads": grads_of(self.model), "inputs": self._inputs},
                       Path(out_dir) / f"lightning-rank{self.global_rank}.pt")

        def on_train_batch_start(self, batch, batch_idx):
            self._inputs = batch[0].detach().clone()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    # Lightning's DistributedSampler gives each rank every WORLD_SIZE-th sample: BATCH // WORLD_SIZE each.
    data = DataLoader(TensorDataset(batches()[0]), batch_size=BATCH // WORLD_SIZE, shuffle=False)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=WORLD_SIZE, max_steps=1, precision="64-true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Learner(), data)
    torch.distributed.barrier()  # both ranks have saved their results
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown sometimes aborts at interpreter exit (examples/ddp_training.py says more)


@pytest.mark.slow
def test_lightning_ddp_strategy_gradient_equals_one_process_on_the_whole_batch(tmp_path, registered_for_module):
    pytest.importorskip("pytorch_lightning")
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--lightning", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = single_process_grads(LIGHTNING_NAME, batches()[:1])
    seen = []
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"lightning-rank{rank}.pt")
        seen.append(result["inputs"])
        error = rel_error(result["grads"], want)
        assert error <= TOLERANCE, f"rank {rank}: relative error {error:.2e}"
    # The ranks really did split the batch between them.
    assert torch.equal(torch.cat(seen).sort(dim=0).values, batches()[0].sort(dim=0).values)


if __name__ == "__main__" and sys.argv[1:2] == ["--lightning"]:
    _lightning_main(sys.argv[2])
