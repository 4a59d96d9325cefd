"""Bytes that autograd saves for backward, counted with saved-tensor hooks: what a gradient method holds.

One meter, three readings::

    meter = SavedTensorBytes(exclude=[*model.parameters(), x])   # alive anyway: not counted
    with meter:
        loss = model(x).sum()
    meter.held    # bytes of the storages the graph keeps alive now (each storage once)
    meter.total   # bytes of every tensor saved inside the region (numel × element size, each save counted)
    meter.peak    # the most of ``total`` alive at once (a save stops counting when autograd frees it)

``held`` answers "what does the forward pass leave for the backward pass" (read it while the graph is alive);
``total`` and ``peak`` answer "how many graphs of ``f`` were alive at once" when the region is a backward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

__all__ = ["SavedTensorBytes"]


class _Box:
    """What autograd keeps instead of the tensor; its finalizer tells the meter the save was freed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorBytes:
    """Counts the tensors autograd saves inside ``with meter:`` (a ``saved_tensors_hooks`` region).

    Args:
        exclude: tensors whose storages are not counted (parameters, inputs, outputs: alive anyway).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.total = 0  # bytes, every save counted
        self.live = 0  # bytes of saves not yet freed
        self.peak = 0  # most of `live` at once
        self._storages: dict[int, list[int]] = {}  # storage pointer -> [storage bytes, saves alive]
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def held(self) -> int:
        """Bytes of the distinct storages that saves still alive keep alive."""
        return sum(nbytes for nbytes, _ in self._storages.values())

    def pack(self, tensor: torch.Tensor) -> _Box:
        box = _Box(tensor.detach())  # detached: a saved output keeping its own grad_fn would be a reference cycle
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.exclude:
            nbytes = tensor.numel() * tensor.element_size()
            self.total += nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._storages.setdefault(pointer, [storage.nbytes(), 0])[1] += 1
            weakref.finalize(box, self._release, pointer, nbytes)
        return box

    @staticmethod
    def unpack(box: _Box) -> torch.Tensor:
        return box.tensor

    def _release(self, pointer: int, nbytes: int) -> None:
        self.live -= nbytes
        entry = self._storages[pointer]
        entry[1] -= 1
        if not entry[1]:
            del self._storages[pointer]

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
