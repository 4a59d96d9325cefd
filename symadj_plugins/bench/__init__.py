"""Benchmark of gradient methods for neural ODEs: ``python -m symadj_plugins.bench --help``.

Compares, on the same problem and solver in the same run: torchdiffeq backprop (``odeint``), the continuous
adjoint (``odeint_adjoint`` at the forward tolerance, at a tighter backward tolerance, with the seminorm),
per-step and per-step + per-stage checkpointing (``torch.utils.checkpoint``), torchdyn ``autograd`` /
``adjoint`` / ``interpolated_adjoint``, and the symplectic adjoint through both adapters, at its default
``memory_budget`` and (``ours-min``, ``ours-max``, ``ours-budget-<fraction>``, the ``budget`` problem) across it.

Figures per method: peak memory during forward + backward, forward and backward wall time, function
evaluations and accepted steps (forward / backward), and the gradient's relative error against a float64
reference at tight tolerance. Modules: ``problems`` (what is solved), ``methods`` (how gradients are
taken), ``memory`` (how memory is measured), ``worker`` (the measurement protocol), ``records`` (the records and
results files), ``tables``, ``targets``, ``figures``, ``report`` (the whole markdown report), ``cli``
(orchestration), ``render`` (the documentation's tables and figures from docs/results).
"""

from .memory import PeakMemory
from .methods import METHODS
from .problems import PROBLEMS

__all__ = ["METHODS", "PROBLEMS", "PeakMemory"]
