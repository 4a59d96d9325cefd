"""Below one state per step: which states the forward pass keeps, and how the backward pass gets back the others.

The backward sweep visits the accepted steps from last to first and needs, for step ``n``, the state ``y_n`` it starts
from (and what the host needs to restart there: a carried first stage, torchdyn's ``k1``). Keeping every state costs
``(N + 1)·|y|``: the one term of the method's memory that grows with the length of the solve. Keeping only some of
them and recomputing the others in the backward pass, with the host's own step and the recorded step sizes, times and
flags, gives every state back bit for bit (the host's step is a deterministic function of what it is given; random
numbers and autocast are replayed as for any replayed evaluation).

Two halves:

- **Online, in the forward pass** (:class:`OnlineThinning`): an adaptive solver learns ``N`` only at its end, so the
  kept states are decided as steps are accepted. Positions that are multiples of a stride are kept; when more than the
  cap are kept, the stride doubles and every other position is dropped. The cap is a function of the step count:
  a constant for a byte budget, half of ``⌈log2(n + 1)⌉`` for ``"min"`` (:func:`min_kept`), so ``O(log N)`` states.
- **Offline, in the backward pass** (:func:`reversed_states`): ``N`` is known. Between two kept states the steps are
  reversed with the binomial (Revolve) schedule of Griewank & Walther, which for ``S`` snapshots reverses ``L`` steps
  with the fewest recomputed steps; the split points come from ``checkpoint_schedules`` (``n_advance``, the Revolve
  step of its ``MultistageCheckpointSchedule``). With ``O(log N)`` snapshots that is ``O(N log N)`` recomputed steps;
  with ``√N`` kept states and ``√N`` snapshots, one step recomputed per step (one extra forward pass).

``"min"`` holds at most ``log_cap(N) + 1`` restart points at once in the backward pass, the kept ones included: the
kept states stay alive for the whole backward pass (autograd holds what the forward pass saved until ``backward()``
returns), so a segment's reversal gets what they leave (:func:`min_snapshots`). Keeping about half of them in the
forward pass costs about one more recomputation per step than keeping none (then the first reversal re-runs the whole
solve), and about one fewer than keeping them all (then each segment's reversal has few snapshots).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from checkpoint_schedules.multistage import n_advance

__all__ = ["OnlineThinning", "Restart", "log_cap", "min_kept", "min_snapshots", "reversed_states"]


@dataclass
class Restart:
    """What the host restarts step ``n`` from.

    Attributes:
        state: ``y_n``, shaped like the state.
        carried: the first-stage value the host carried into step ``n`` without evaluating ``f`` at ``y_n`` (see
            ``Trajectory.carried``), or ``None``.
        extra: whatever else the host's step takes at ``n`` and cannot recompute bit for bit (torchdyn's ``k1``), or
            ``None``.
    """

    state: torch.Tensor
    carried: torch.Tensor | None = None
    extra: torch.Tensor | None = None


def log_cap(n: int) -> int:
    """``⌈log2(n + 1)⌉`` (at least 2): about how many restart points ``"min"`` holds at once after ``n`` steps."""
    return max(2, (n + 1).bit_length())


def min_kept(n: int) -> int:
    """The forward pass's share of ``"min"``: how many states it keeps after ``n`` steps (half of ``log_cap(n)``)."""
    return max(2, -(-log_cap(n) // 2))


def min_snapshots(num_steps: int, num_kept: int) -> int:
    """The backward pass's share of ``"min"``: the snapshots of one segment's reversal, its start included, when the
    forward pass kept ``num_kept`` states (``y_0`` and ``y_N`` included), so that at most ``log_cap(num_steps) + 1``
    restart points are alive at once (at least 2 snapshots: with one, the reversal is quadratic)."""
    return max(2, log_cap(num_steps) + 2 - num_kept)


class OnlineThinning:
    """Which states the forward pass keeps, decided as they arrive (position ``n`` is ``y_n``).

    Kept: position 0 and the positions that are multiples of ``stride``; when more than ``cap(n)`` are kept, the
    stride doubles (as often as needed) and the positions that are no longer multiples are dropped. After ``n`` steps
    the kept states are evenly spaced, at most ``cap(n)`` of them, at least about half as many.
    """

    def __init__(self, cap: Callable[[int], int]):
        self.cap = cap
        self.stride = 1
        self.kept: list[int] = []

    def admit(self, n: int) -> list[int]:
        """Position ``n`` arrives (positions arrive in order). Returns the positions to drop now (``n`` itself when it
        is not kept)."""
        cap = max(1, self.cap(n))
        if n % self.stride == 0:
            self.kept.append(n)
        else:
            return [n]
        dropped: list[int] = []
        while len(self.kept) > cap:
            self.stride *= 2
            dropped += [p for p in self.kept if p % self.stride]
            self.kept = [p for p in self.kept if p % self.stride == 0]
        return dropped


def reversed_states(num_steps: int, kept: dict[int, Restart], advance: Callable[[int, Restart], Restart],
                    snapshots: int) -> Iterator[tuple[int, Restart]]:
    """Yields ``(n, restart_n)`` for ``n = N - 1, ..., 0``, recomputing the states that were not kept.

    Args:
        num_steps: ``N``.
        kept: the restart data the forward pass kept, by position (it must hold position 0).
        advance: ``advance(n, restart_n) -> restart_{n+1}``: the host's step ``n``, without a graph.
        snapshots: how many restart points one segment's reversal may hold at a time, the kept one it starts from
            included (at least 1: then each step is recomputed from the segment's start, quadratic in its length).
    """
    if num_steps == 0:
        return
    if 0 not in kept:
        raise ValueError("the initial state must be kept")
    starts = sorted(p for p in kept if p < num_steps)
    ends = starts[1:] + [num_steps]
    for start, end in zip(reversed(starts), reversed(ends)):
        yield from _reverse_segment(start, kept[start], end, advance, max(1, snapshots))


def _reverse_segment(start: int, restart: Restart, end: int, advance: Callable[[int, Restart], Restart],
                     snapshots: int) -> Iterator[tuple[int, Restart]]:
    """Steps ``end - 1, ..., start`` from the restart point at ``start``: Revolve's loop, iteratively. ``stack`` holds
    the snapshots (positions ascending, ``start`` at the bottom); the next step to reverse is ``end - 1``."""
    stack: list[tuple[int, Restart]] = [(start, restart)]
    while end > start:
        position, point = stack[-1]
        if position == end - 1:
            yield position, point
            if position != start:
                stack.pop()
            end -= 1
            continue
        free = snapshots - len(stack)
        # With no snapshot free, walk to the step to reverse and keep nothing on the way.
        target = end - 1 if free <= 0 else position + n_advance(end - position, free + 1)
        for n in range(position, target):
            point = advance(n, point)
        if free <= 0:
            yield target, point
            end -= 1
        else:
            stack.append((target, point))
