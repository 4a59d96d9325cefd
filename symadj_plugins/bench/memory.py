"""Peak memory of a region of code: what a gradient method needs on top of what already exists.

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` at the start (bytes
  handed out by PyTorch's caching allocator to tensors; the cache itself is not counted).
- CPU: the stream of allocation and free events that ``torch.profiler.profile(profile_memory=True)`` records
  for every tensor storage, summed in time order; the peak of that running sum is the peak of live tensor
  bytes allocated inside the region (frees of tensors that existed before count negative, so the figure is
  relative to the start). Memory outside PyTorch's allocator (Python objects, the profiler's own buffers) is
  not counted. ``tests/test_bench.py`` checks it against a known allocation. The profiler keeps every op
  event until the region ends (about 2 KB each): a region of a million ops needs about 2 GB.
- CPU, ``meter="dispatch"`` (for regions of millions of ops): a ``TorchDispatchMode`` sees every op, the backward
  pass's included, and counts each storage an op returns when it first appears, until the storage is freed (a
  finaliser on the storage's Python object, which PyTorch keeps alive as long as the storage). It keeps nothing per
  op (a Python call each, no events), but it does not see an op's internal scratch memory, nor frees of tensors that
  existed before the region: on the ``long`` problem it reads within about one state of the profiler.

Marks: :func:`mark` names a point in the region (``"backward"``); the result reports the live bytes just
before it (``held`` = what the forward pass left for the backward pass). Meters that read live bytes directly (CUDA,
the dispatch meter) take their marks from :meth:`PeakMemory.direct_mark`, called at the same point.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU_METHOD = "torch.profiler memory events (live tensor bytes, summed in time order)"
CUDA_METHOD = "torch.cuda.max_memory_allocated (relative to the start)"
DISPATCH_METHOD = "TorchDispatchMode over every op (live bytes of the storages ops return)"
METERS = ("profiler", "dispatch")

_MARK_PREFIX = "symadj_bench::"


@dataclass
class MemoryReport:
    peak_bytes: int = 0
    marks: dict[str, int] = field(default_factory=dict)  # live bytes just before each mark
    method: str = ""


def mark(name: str) -> contextlib.AbstractContextManager:
    """A named point (a profiler annotation on CPU); use as ``with mark("backward"): ...``."""
    return torch.profiler.record_function(_MARK_PREFIX + name)


class PeakMemory:
    """Measures the peak of live tensor bytes inside ``with PeakMemory(device) as m: ...``; then ``m.report``.

    ``meter``: on CPU, ``"profiler"`` (the default) or ``"dispatch"`` (see the module docstring); ignored on CUDA."""

    def __init__(self, device: torch.device | str = "cpu", meter: str = "profiler"):
        if meter not in METERS:
            raise ValueError(f"unknown memory meter {meter!r}; choose from {', '.join(METERS)}")
        self.device = torch.device(device)
        self.meter = meter
        self.report = MemoryReport()
        self._direct_marks: dict[str, int] = {}

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.report.method = CUDA_METHOD
        elif self.meter == "dispatch":
            self._dispatch = _StorageMeter()
            self._dispatch.__enter__()
            self.report.method = DISPATCH_METHOD
        else:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True, record_shapes=False, with_stack=False)
            with _quiet_native_stderr():
                self._prof.__enter__()
            self.report.method = CPU_METHOD
        return self

    def direct_mark(self, name: str) -> None:
        """For the meters that read live bytes directly (CUDA, ``"dispatch"``): call this at the marked point."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._direct_marks[name] = torch.cuda.memory_allocated(self.device) - self._start
        elif self.meter == "dispatch":
            self._direct_marks[name] = self._dispatch.live

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.report.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            self.report.marks = dict(self._direct_marks)
            return
        if self.meter == "dispatch":
            meter, self._dispatch = self._dispatch, None
            meter.__exit__(*exc)
            self.report.peak_bytes, self.report.marks = meter.peak, dict(self._direct_marks)
            return
        prof, self._prof = self._prof, None  # the events take ~2 KB each: keep them no longer than needed
        with _quiet_native_stderr():
            prof.__exit__(*exc)
        if exc[0] is None:
            self.report.peak_bytes, self.report.marks = _peak_from_profile(prof)


class _StorageMeter(TorchDispatchMode):
    """Live bytes of the CPU storages that ops return, counted from their first appearance until they are freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        # By id() of the storages' Python objects (alive while the storage is): the finaliser of each.
        self._counted: dict[int, weakref.finalize] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.pop(key, None)

    def __exit__(self, *exc):
        for finaliser in self._counted.values():  # storages that outlive the region: stop watching them
            finaliser.detach()
        self._counted.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self._counted:
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    self._counted[key] = weakref.finalize(storage, self._freed, key, nbytes)
        return out


def _peak_from_profile(prof: torch.profiler.profile) -> tuple[int, dict[str, int]]:
    """Peak of the running sum of CPU allocation (+) and free (-) events, and live bytes at each mark."""
    changes: list[tuple[int, int]] = []
    mark_times: dict[str, int] = {}
    for event in prof.profiler.kineto_results.events():
        name = event.name()
        if name == "[memory]":
            if event.device_type() == torch.autograd.DeviceType.CPU:
                changes.append((_start_ns(event), event.nbytes()))
        elif name.startswith(_MARK_PREFIX):
            mark_times.setdefault(name[len(_MARK_PREFIX):], _start_ns(event))
    changes.sort(key=lambda c: c[0])
    live = peak = 0
    marks: dict[str, int] = {}
    pending = sorted(mark_times.items(), key=lambda kv: kv[1])
    for when, nbytes in changes:
        while pending and pending[0][1] <= when:
            marks[pending.pop(0)[0]] = live
        live += nbytes
        peak = max(peak, live)
    for name, _ in pending:
        marks[name] = live
    return peak, marks


def _start_ns(event) -> int:
    """An event's start time in ns: ``start_ns()`` where torch has it, else ``start_us()`` (torch 2.1 has only that).

    Microseconds are coarser: events within one microsecond keep the order the profiler lists them in (the sort
    is stable), which can differ from their true order; ``tests/test_bench.py`` checks the figure either way."""
    start_ns = getattr(event, "start_ns", None)
    return start_ns() if start_ns is not None else event.start_us() * 1000


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silences file descriptor 2 while the profiler starts or stops: recent kineto builds print a
    ``profiler_start``/``profiler_stop`` line from C++ each time, which no logging setting turns off. Only those two
    calls are wrapped, never the measured code, so its errors and warnings still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
