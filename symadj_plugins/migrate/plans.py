"""How one call (or value) is rewritten: the per-library rules, as functions of the planner's view of a node.

The rules see the planner only through :class:`PlannerView` (what they read and record), so this module does not
import :mod:`.planner`; the planner imports the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import libcst as cst

from . import _cst as c
from ._names import (
    ADJOINT_ONLY_TD,
    ADJOINT_ONLY_TORCHDYN,
    ADJOINT_SENSITIVITIES,
    TAG,
    TSA,
    TSA_METHOD_TO_TORCHDIFFEQ,
    TSA_MOVES,
    WHY_NO_ADJOINT_ARGS,
)


@dataclass
class CallPlan:
    """How one call is rewritten."""

    new_func: str | None = None          # dotted name replacing the callee (attribute-style calls)
    set_kwargs: dict[str, str] = field(default_factory=dict)  # keyword -> new value (source), added if missing
    drop: tuple[str, ...] = ()            # keywords to remove
    comment: list[str] = field(default_factory=list)  # why, put above the statement


@dataclass
class Plan:
    """Everything the applier needs: per-node rewrites and module-level facts."""

    calls: dict[cst.Call, CallPlan] = field(default_factory=dict)
    values: dict[cst.CSTNode, str] = field(default_factory=dict)  # expression -> replacement source
    value_comments: dict[cst.CSTNode, str] = field(default_factory=dict)
    bad_tsa_bindings: set[str] = field(default_factory=set)  # from-imported tsa names kept on the shim
    tsa_bound_calls: dict[cst.Call, str] = field(default_factory=dict)  # call through a from-import -> name
    needed_imports: set[str] = field(default_factory=set)   # modules to import (`import X`)
    present_imports: set[str] = field(default_factory=set)  # `import X` (unaliased) already there
    td_binding_mode: dict[str, str] = field(default_factory=dict)  # "switch" | "alias" | "keep"
    torchdyn_rewrites: bool = False  # some sensitivity becomes "symplectic_adjoint": register() is needed
    calls_register: bool = False     # the module already calls symadj_plugins.register()


class PlannerView(Protocol):
    """What the rules use of :class:`~.planner._Planner`."""

    plan: Plan
    tsa_planned: list[tuple[cst.Call, int]]  # torch_symplectic_adjoint calls that may move

    def line_of(self, node: cst.CSTNode) -> int: ...

    def code(self, node: cst.CSTNode) -> str: ...

    def note(self, line: int, message: str, unmigrated: bool = False, once_key: str | None = None) -> None: ...


def wrapped_value(function: str) -> str:
    """The source that replaces ``odeint_adjoint`` used as a value: the same function, symplectic when called.

    A ``functools.partial`` keeps odeint_adjoint's whole signature (``adjoint_rtol`` & co. are accepted and
    ignored), and a caller's own ``adjoint_method=`` still overrides it.
    """
    return f'functools.partial({function}, adjoint_method="symplectic")'


def plan_adjoint_kwargs(planner: PlannerView, node: cst.Call, line: int) -> CallPlan:
    """``adjoint_method="symplectic"`` for a call of (or ``functools.partial`` of) odeint_adjoint."""
    existing = c.kwarg(node, "adjoint_method")
    if any(arg.star == "**" for arg in node.args):
        planner.note(line, "odeint_adjoint(..., **kwargs): cannot tell whether kwargs sets adjoint_method; add "
                           'adjoint_method="symplectic" yourself', unmigrated=True)
        return CallPlan()
    plan = CallPlan(set_kwargs={"adjoint_method": c.quoted(node, "symplectic")}, drop=ADJOINT_ONLY_TD)
    dropped = [a for a in node.args if c.keyword_of(a) in ADJOINT_ONLY_TD]
    changes = []
    if existing is not None and not c.is_string(existing.value, "symplectic"):
        changes.append(f"replaced adjoint_method={planner.code(existing.value)}")
    if dropped:
        changes.append("removed " + ", ".join(f"{c.keyword_of(a)}={planner.code(a.value)}" for a in dropped))
    if changes:
        plan.comment = [f'{TAG} adjoint_method="symplectic" gives the exact gradient; {"; ".join(changes)}: '
                        f"{WHY_NO_ADJOINT_ARGS}."]
    return plan


def _tsa_method_problem(planner: PlannerView, node: cst.Call) -> tuple[str | None, str | None]:
    """``(problem, new_method)``: why the call cannot move to torchdiffeq, or the method name to write there."""
    if any(arg.star for arg in node.args):
        return "passes *args/**kwargs", None
    method = c.kwarg(node, "method")
    if method is None:
        return None, None
    literal = c.string_value(method.value)
    if literal is None:
        return f"method={planner.code(method.value)} is not a string literal", None
    if literal not in TSA_METHOD_TO_TORCHDIFFEQ:
        return (f"method={literal!r} " + ("is the classical RK4, which torchdiffeq does not have"
                                          if literal == "rk4" else "is not one of its methods")), None
    new = TSA_METHOD_TO_TORCHDIFFEQ[literal]
    return None, (new if new != literal else None)


def plan_tsa(planner: PlannerView, node: cst.Call, function: str) -> None:
    """A call of torch_symplectic_adjoint's ``odeint`` or ``odeint_symplectic_adjoint``: move it if exact."""
    line = planner.line_of(node)
    problem, new_method = _tsa_method_problem(planner, node)
    if isinstance(node.func, cst.Name):
        planner.plan.tsa_bound_calls[node] = node.func.value
    if problem is not None:
        planner.note(line, f"{TSA}.{function}: {problem}; kept on the {TSA} compat package")
        if isinstance(node.func, cst.Name):
            planner.plan.bad_tsa_bindings.add(node.func.value)
        return
    planner.tsa_planned.append((node, line))
    plan = CallPlan()
    if new_method is not None:
        old = c.string_value(c.kwarg(node, "method").value)  # type: ignore[union-attr]
        plan.set_kwargs["method"] = c.quoted(node, new_method)
        plan.comment = [f"{TAG} method {old!r} of {TSA} is {new_method!r} in torchdiffeq (the 3/8 rule)."]
    if isinstance(node.func, cst.Attribute):
        target = TSA_MOVES[function]
        plan.new_func = f"{target}.{function}"
        planner.plan.needed_imports.add(target)
    planner.plan.calls[node] = plan


def plan_torchdyn(planner: PlannerView, node: cst.Call, line: int) -> None:
    """``NeuralODE``/``ODEProblem`` with an adjoint sensitivity: ``"symplectic_adjoint"``."""
    sensitivity = c.kwarg(node, "sensitivity")
    if sensitivity is None:
        if any(arg.star for arg in node.args) or sum(arg.keyword is None for arg in node.args) > 5:
            planner.note(line, "torchdyn call whose sensitivity may be passed positionally or in **kwargs",
                         unmigrated=True)
        return
    value = c.string_value(sensitivity.value)
    if value is None:
        planner.note(line, f"sensitivity={planner.code(sensitivity.value)} is not a string literal "
                           '(use "symplectic_adjoint" where it is "adjoint" or "interpolated_adjoint")',
                     unmigrated=True)
        return
    if value not in ADJOINT_SENSITIVITIES:
        return
    plan = CallPlan(set_kwargs={"sensitivity": c.quoted(sensitivity.value, "symplectic_adjoint")},
                    drop=ADJOINT_ONLY_TORCHDYN)
    planner.plan.torchdyn_rewrites = True
    dropped = [a for a in node.args if c.keyword_of(a) in ADJOINT_ONLY_TORCHDYN]
    if dropped:
        what = ", ".join(f"{c.keyword_of(a)}={planner.code(a.value)}" for a in dropped)
        plan.comment = [f'{TAG} sensitivity "{value}" -> "symplectic_adjoint" (exact gradient); removed {what}: '
                        f"{WHY_NO_ADJOINT_ARGS}."]
    planner.plan.calls[node] = plan
