"""Benchmark the gradient methods on *your* model, in this process: :func:`compare`."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence

import torch

from .methods import METHODS
from .problems import REFERENCE_SOLVER, REFERENCE_TOL, TORCHDYN_SOLVERS, Setup
from .worker import BACKPROP_OF, _library, gradient, measure

DEFAULT_COMPARE = ["backprop", "adjoint", "adjoint-tight", "ckpt-step", "ckpt-stage", "ours-torchdiffeq"]


def compare(func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor],
            *, method: str = "dopri5", rtol: float = 1e-6, atol: float = 1e-8, options: dict | None = None,
            methods: Sequence[str] | None = None, repeats: int = 3, reference: bool = True,
            progress: bool = True) -> list[dict]:
    """Measures each gradient method on ``func`` (an ``nn.Module`` ``f(t, y)``) and returns one record per method.

    Args:
        y0: initial state (one tensor); ``t``: ``[t0, T]`` (the loss sees ``y(T)``).
        loss: scalar loss of ``y(T)``; it must also accept a float64 ``y(T)`` when ``reference`` is true.
        method: the torchdiffeq solver, as for ``torchdiffeq.odeint``.
        rtol: as for ``torchdiffeq.odeint``.
        atol: as for ``torchdiffeq.odeint``.
        options: as for ``torchdiffeq.odeint``.
        methods: names from :data:`symadj_plugins.bench.METHODS` (default: the torchdiffeq-based ones).
        reference: compute the gradient error against a float64 copy of the model solved at
            ``rtol = atol = 1e-10`` (dopri8, exact per-step checkpointed backprop).
        progress: a tqdm progress bar on stderr, shown only when stderr is a terminal.
    Records hold ``peak_bytes`` (CPU: profiler; CUDA: allocator), ``fwd_s``/``bwd_s``/``total_s`` (medians),
    ``nfe_fwd``/``nfe_bwd``, ``steps_fwd``/``steps_bwd``, ``grad_err`` and ``grad_err_vs_backprop``; format them
    with :func:`symadj_plugins.bench.tables.method_table`.
    """
    methods = list(DEFAULT_COMPARE if methods is None else methods)
    methods.sort(key=lambda m: list(METHODS).index(m))  # backprop first: the others are compared with it
    t = t.to(torch.float64)
    case = {"problem": "user", "label": "your model", "solver": method, "rtol": rtol, "atol": atol}
    setup = Setup(func, y0, t, method, rtol, atol, dict(options or {}), None, loss, TORCHDYN_SOLVERS.get(method),
                  case)
    device = y0.device
    ref = None
    if reference:
        ref_setup = Setup(copy.deepcopy(func).double(), y0.double(), t, REFERENCE_SOLVER, REFERENCE_TOL,
                          REFERENCE_TOL, {}, None, loss, None, case)
        ref, _, _ = gradient(ref_setup, "ckpt-step")
    records, backprop = [], {}
    iterator = methods
    if progress and sys.stderr.isatty():  # a progress bar only on a terminal
        from tqdm.auto import tqdm
        iterator = tqdm(methods, desc="gradient methods", unit="method")
    for name in iterator:
        record, g = measure(setup, name, repeats, device, ref, backprop.get(_library(name)))
        if name == BACKPROP_OF[_library(name)] and g is not None:
            backprop[_library(name)] = g
        records.append(dict(record, problem="user", case=case, label="your model",
                            state_bytes=y0.numel() * y0.element_size(),
                            n_params=sum(p.numel() for p in setup.params()), device=str(device),
                            threads=torch.get_num_threads()))
    return records
