"""What the codemod looks for, and what it writes: qualified names, keywords and messages (no libcst needed)."""

from __future__ import annotations

from .._method_names import TSA_TO_TORCHDIFFEQ

TAG = "symadj-migrate:"
SYMADJ_TD = "symadj_plugins.torchdiffeq"
SYMADJ_ODEINT_ADJOINT = f"{SYMADJ_TD}.odeint_adjoint"

# torchdiffeq
TD_ODEINT_ADJOINT = "torchdiffeq.odeint_adjoint"
ADJOINT_ONLY_TD = ("adjoint_rtol", "adjoint_atol", "adjoint_options")
# Hooks torchdiffeq calls on func during the continuous adjoint's backward solve; the symplectic adjoint has none.
CALLBACKS_ADJOINT = ("callback_step_adjoint", "callback_accept_step_adjoint", "callback_reject_step_adjoint")
FUNCTOOLS_PARTIAL = "functools.partial"

# torchdyn
TORCHDYN_CLASSES = ("NeuralODE", "ODEProblem")
ADJOINT_SENSITIVITIES = ("adjoint", "interpolated_adjoint")
ADJOINT_ONLY_TORCHDYN = ("solver_adjoint", "atol_adjoint", "rtol_adjoint", "seminorm")

# torch_symplectic_adjoint: function -> module it moves to (same name there)
TSA = "torch_symplectic_adjoint"
TSA_MOVES = {"odeint_symplectic_adjoint": SYMADJ_TD, "odeint": "torchdiffeq"}
TSA_STAYS = ("odeint_adjoint", "odeint_checkpoint", "odeint_onecheckpoint")
# The paper's method names that mean the same in torchdiffeq (its classical rk4 has no twin there).
TSA_METHOD_TO_TORCHDIFFEQ = {name: td for name, td in TSA_TO_TORCHDIFFEQ.items() if td is not None}

WHY_NO_ADJOINT_ARGS = ("the symplectic adjoint replays the forward steps exactly, so there is no backward "
                       "solve to configure")
STILL_CONTINUOUS = "calls through it still run torchdiffeq's continuous adjoint"
