"""Measures gradient methods on one case; run as ``python -m symadj_plugins.bench.worker SPEC OUT``.

Protocol for each method (in the order given, in one process; the CLI starts one process per method unless
``--isolate case``):

1. warm-up: one forward + backward, which also gives the gradient (error vs the float64 reference and vs
   backprop in the same dtype), the number of function evaluations and of accepted steps;
2. memory: one forward + backward under :class:`~symadj_plugins.bench.memory.PeakMemory` (peak live tensor
   bytes above what existed before the forward call; ``held`` = live bytes when backward starts);
3. time: ``repeats`` forward + backward runs, wall time of each phase; the medians are reported. With
   ``interleave`` (the ``budget`` problem) the methods are timed round-robin after all of them passed steps 1 and 2:
   repeat ``i`` of each method runs next to repeat ``i`` of backprop, and the per-repeat ratios are reported.

Gradients are taken with ``torch.autograd.grad`` w.r.t. the parameters of the vector field.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from .memory import PeakMemory, mark
from .methods import METHODS, Unavailable
from .models import CountingField
from .problems import Setup, build, case_key, reference_case

# Exactness is checked against backprop through the same library's solver (same tableau, same steps).
BACKPROP_OF = {"torchdiffeq": "backprop", "torchdyn": "torchdyn-autograd"}


def _library(method: str) -> str:
    return "torchdyn" if "torchdyn" in method else "torchdiffeq"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat(grads, params) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
                     ).detach().to("cpu", torch.float64)


def _rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g - ref).norm() / ref.norm().clamp_min(1e-300))


def gradient(setup: Setup, method: str) -> tuple[torch.Tensor, CountingField, float]:
    """One forward + backward with ``method``: flat float64 gradient, the counter, the loss."""
    counter = CountingField(setup.field, setup.adaptive)
    run = METHODS[method].prepare(setup, counter)
    params = setup.params()
    counter.reset()
    sol = run()
    loss = setup.loss(sol[-1])
    counter.phase = "backward"
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return _flat(grads, params), counter, float(loss.detach())


def reference_gradient(case: dict, device: torch.device, cache_dir: Path | None) -> torch.Tensor:
    """The exact gradient of a float64, tight-tolerance solve (per-step checkpointed backprop), cached."""
    ref_case = reference_case(case)
    path = None if cache_dir is None else cache_dir / f"ref-{case_key(ref_case)}.pt"
    if path is not None and path.exists():
        return torch.load(path)
    g, _, _ = gradient(build(ref_case, device), "ckpt-step")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(g, tmp)
        tmp.replace(path)
    return g


def measure(setup: Setup, method: str, repeats: int, device: torch.device, reference: torch.Tensor | None,
            backprop_grad: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """All figures of one method on one case; returns ``(record, gradient)``.

    ``backprop_grad``: the gradient of backprop through the same library's solver in the same dtype
    (torchdiffeq ``odeint`` for torchdiffeq-based methods, torchdyn ``autograd`` for torchdyn ones).
    """
    record, g, once = measure_untimed(setup, method, device, reference, backprop_grad)
    if once is not None:
        fwd, bwd = [], []
        for _ in range(repeats):
            _timed(once, fwd, bwd)
        record.update(_timings(fwd, bwd))
    return record, g


def measure_untimed(setup: Setup, method: str, device: torch.device, reference: torch.Tensor | None,
                    backprop_grad: torch.Tensor | None) -> tuple[dict, torch.Tensor | None, Callable | None]:
    """Steps 1 and 2 of the protocol (warm-up, memory); returns ``(record, gradient, once)``, where ``once()`` runs one
    forward + backward and returns ``(forward s, backward s, loss, grads)`` (``None`` when the method failed)."""
    spec = METHODS[method]
    record: dict = {"method": method, "method_label": spec.label, "family": spec.family}
    counter = CountingField(setup.field, setup.adaptive)
    try:
        run = spec.prepare(setup, counter)
    except Unavailable as exc:
        return dict(record, status="unavailable", reason=str(exc)), None, None
    record.update(getattr(run, "info", {}))  # e.g. the memory budget of an ours-budget-<fraction> method
    params = setup.params()

    def once(memory: PeakMemory | None = None):
        counter.reset()
        _sync(device)
        start = time.perf_counter()
        sol = run()
        loss = setup.loss(sol[-1])
        _sync(device)
        mid = time.perf_counter()
        counter.phase = "backward"
        if memory is not None:
            with mark("backward"):
                memory.direct_mark("backward")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        _sync(device)
        end = time.perf_counter()
        return mid - start, end - mid, float(loss.detach()), grads

    try:
        _, _, loss, grads = once()  # warm-up
    except Exception as exc:  # a failing method is reported as an error, not fatal to the other methods
        return dict(record, status="error", reason=f"{type(exc).__name__}: {exc}".strip()[:500],
                    traceback=traceback.format_exc(limit=6)), None, None
    g = _flat(grads, params)
    del grads
    record.update(
        status="ok", loss=loss,
        nfe_fwd=counter.nfe["forward"], nfe_bwd=counter.nfe["backward"],
        steps_fwd=counter.steps["forward"] or None, steps_bwd=counter.steps["backward"] or None,
        grad_err=None if reference is None else _rel_err(g, reference),
        grad_err_vs_backprop=(None if backprop_grad is None or method in BACKPROP_OF.values()
                              else _rel_err(g, backprop_grad)),
    )
    if spec.family in ("ours", "checkpoint"):  # they replay the forward steps in backward
        record["steps_bwd"] = record["steps_fwd"]
    if spec.family == "backprop":
        record["steps_bwd"] = None

    gc.collect()
    with PeakMemory(device, meter=setup.case.get("meter", "profiler")) as memory:
        once(memory)
    record.update(peak_bytes=memory.report.peak_bytes, held_bytes=memory.report.marks.get("backward"),
                  memory_method=memory.report.method)
    return record, g, once


def _timed(once: Callable, fwd: list[float], bwd: list[float]) -> None:
    gc.collect()
    f_s, b_s, _, _ = once()
    fwd.append(f_s)
    bwd.append(b_s)


def _timings(fwd: list[float], bwd: list[float]) -> dict:
    totals = [a + b for a, b in zip(fwd, bwd)]
    return dict(fwd_s=statistics.median(fwd), bwd_s=statistics.median(bwd), total_s=statistics.median(totals),
                times_fwd=fwd, times_bwd=bwd, repeats=len(fwd))


def run_spec(spec: dict) -> list[dict]:
    """Runs ``spec = {case, methods, repeats, device, cache_dir, threads, interleave}``; returns one record per
    method."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    case = spec["case"]
    cache_dir = Path(spec["cache_dir"]) if spec.get("cache_dir") else None
    key = case_key(case)
    setup = build(case, device)
    reference = None
    records: list[dict] = []
    began = time.perf_counter()
    try:
        reference = reference_gradient(case, device, cache_dir)
    except Exception as exc:
        records.append({"method": "reference", "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
    reference_s = round(time.perf_counter() - began, 2)
    def backprop_path(method: str) -> Path | None:
        return None if cache_dir is None else cache_dir / f"grad-{key}-{BACKPROP_OF[_library(method)]}.pt"

    backprop_grads: dict[str, torch.Tensor] = {}

    base = {"problem": case["problem"], "case": case, "case_key": key, "label": case.get("label", key),
            "state_bytes": setup.state_bytes, "n_params": sum(p.numel() for p in setup.params()),
            "device": str(device), "threads": torch.get_num_threads(), "reference_wall_s": reference_s}
    interleave = bool(spec.get("interleave"))
    repeats = int(spec.get("repeats", 3))
    timers: dict[str, Callable] = {}
    for method in spec["methods"]:
        library = _library(method)
        path = backprop_path(method)
        if library not in backprop_grads and path is not None and path.exists():
            backprop_grads[library] = torch.load(path)
        began = time.perf_counter()
        if interleave:  # timed below, one run of every method per round
            record, g, once = measure_untimed(setup, method, device, reference, backprop_grads.get(library))
            if once is not None:
                timers[method] = once
        else:
            record, g = measure(setup, method, repeats, device, reference, backprop_grads.get(library))
        record["measure_wall_s"] = round(time.perf_counter() - began, 2)
        if method == BACKPROP_OF[library] and g is not None:
            backprop_grads[library] = g
            if path is not None:
                torch.save(g, path)
        records.append(dict(base, **record))
        gc.collect()
    if timers:
        # Round-robin: repeat i of every method runs close in time to repeat i of backprop, so the ratio of the two
        # (reported per repeat, report.ratio_spread) is little moved by the load of a shared machine drifting.
        times = {m: ([], []) for m in timers}
        for _ in range(repeats):
            for method, once in timers.items():
                _timed(once, *times[method])
        for r in records:
            if r["method"] in times:
                r.update(_timings(*times[r["method"]]), timing="interleaved")
    return records


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    records = run_spec(json.loads(spec_path.read_text()))
    out_path.write_text(json.dumps(records))


if __name__ == "__main__":
    main()
