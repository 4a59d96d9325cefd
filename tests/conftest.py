"""Fixtures shared by the test files.

- ``registered`` / ``registered_for_module``: ``symadj_plugins.register()`` for one test / one test file, and
  ``unregister()`` after it. A file whose every test needs it says
  ``pytestmark = pytest.mark.usefixtures("registered")``.
- ``torchdyn_warnings_ignored``: silences torchdyn's own warnings about options its fixed-step solvers ignore.
- ``problem``: a small float64 torchdiffeq problem ``(func, y0, t)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import symadj_plugins


@pytest.fixture
def registered() -> Iterator[None]:
    """``symadj_plugins.register()`` for the test; everything it patched is restored afterwards."""
    symadj_plugins.register()
    yield
    symadj_plugins.unregister()


@pytest.fixture(scope="module")
def registered_for_module() -> Iterator[None]:
    """``registered`` for a whole test file (for module-scoped fixtures that need it)."""
    symadj_plugins.register()
    yield
    symadj_plugins.unregister()


@pytest.fixture
def torchdyn_warnings_ignored() -> Iterator[None]:
    """torchdyn's "Setting tolerances has no effect on fixed-step methods" and "Setting save_at ..." warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting (tolerances|save_at) has no effect", category=UserWarning)
        yield


@pytest.fixture
def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``(func, y0, t)``: the time-dependent MLP field of ``helpers`` in float64, ``y0`` of shape ``(2, 3)``
    requiring grad, ``t = [0, 0.5, 1]``. Seeded: every test gets the same problem."""
    from helpers import TimeDependentField  # imported here: helpers imports torchdiffeq

    torch.manual_seed(0)
    func = TimeDependentField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    return func, y0, t
