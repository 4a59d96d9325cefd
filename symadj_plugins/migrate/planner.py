"""Planning: every change is decided before any is made, from the resolved names of the original tree.

:class:`_Planner` visits the module once. Calls are planned as they are seen; uses of
``torchdiffeq.odeint_adjoint`` through a from-imported name are only collected, and :meth:`_Planner.finish`
decides per name how they switch (see there), because a later use may show that the name is ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
from libcst.metadata import (
    ExpressionContext,
    ExpressionContextProvider,
    ParentNodeProvider,
    PositionProvider,
    QualifiedNameProvider,
    ScopeProvider,
)

from . import _cst as c
from ._names import (
    ADJOINT_ONLY_TD,
    ADJOINT_SENSITIVITIES,
    CALLBACKS_ADJOINT,
    FUNCTOOLS_PARTIAL,
    STILL_CONTINUOUS,
    SYMADJ_ODEINT_ADJOINT,
    SYMADJ_TD,
    TD_ODEINT_ADJOINT,
    TORCHDYN_CLASSES,
    TSA,
    TSA_MOVES,
    TSA_STAYS,
)
from .notes import Note
from .plans import Plan, plan_adjoint_kwargs, plan_torchdyn, plan_tsa, wrapped_value

# Where odeint_adjoint used as a value can be replaced by a functools.partial that behaves the same when called.
_WRAP = "wrap"
_PARTIAL = "partial"   # the first argument of functools.partial(...): add the keyword to that call instead
_EVENT = "event"       # odeint_interface= of torchdiffeq.odeint_event: wrapped too (event_fn is supported)


@dataclass
class _Value:
    """A use of ``torchdiffeq.odeint_adjoint`` other than calling it, and how it can be rewritten."""

    node: cst.CSTNode
    line: int
    context: str | None          # _WRAP, _PARTIAL, _EVENT, or None: cannot be rewritten
    around: cst.CSTNode          # the expression it is used in (for messages)
    partial: cst.Call | None = None  # for _PARTIAL: the functools.partial call
    partial_line: int = 0


@dataclass
class _Use:
    """A use of ``torchdiffeq.odeint_adjoint`` through a from-imported name, decided on in ``finish()``."""

    node: cst.Name
    ambiguous: bool          # the name may also be bound to something else here
    line: int
    call: cst.Call | None = None    # a call through the name, or
    value: _Value | None = None     # a use as a value


class _Planner(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (QualifiedNameProvider, ScopeProvider, PositionProvider, ParentNodeProvider,
                             ExpressionContextProvider)

    def __init__(self, module: cst.Module):
        super().__init__()
        self.module = module
        self.plan = Plan()
        self.notes: list[Note] = []
        self.torchdyn_star = False
        self.td_uses: dict[str, list[_Use]] = {}  # from-imported name bound to torchdiffeq.odeint_adjoint -> uses
        self.tsa_planned: list[tuple[cst.Call, int]] = []  # torch_symplectic_adjoint calls that may move
        self._callees: set[cst.CSTNode] = set()  # the callee of every call seen so far
        self._import_depth = 0
        self._noted: set[str] = set()

    # -- helpers ----------------------------------------------------------------------------------------
    def line_of(self, node: cst.CSTNode) -> int:
        return self.get_metadata(PositionProvider, node).start.line

    def note(self, line: int, message: str, unmigrated: bool = False, once_key: str | None = None) -> None:
        """Records a message for the user about ``line``; ``unmigrated`` if a continuous adjoint stays there."""
        if once_key is not None:
            if once_key in self._noted:
                return
            self._noted.add(once_key)
        self.notes.append(Note(line, message, unmigrated))

    def _qualified(self, node: cst.CSTNode) -> set[str]:
        try:
            return {q.name for q in self.get_metadata(QualifiedNameProvider, node, set())}
        except KeyError:
            return set()

    def code(self, node: cst.CSTNode) -> str:
        return self.module.code_for_node(node)

    # -- imports ----------------------------------------------------------------------------------------
    def visit_Import(self, node: cst.Import) -> None:
        self._import_depth += 1
        for alias in node.names:
            if alias.asname is None:
                self.plan.present_imports.add(c.dotted(alias.name))

    def leave_Import(self, original_node: cst.Import) -> None:
        self._import_depth -= 1

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        self._import_depth += 1
        module = c.dotted(node.module) if node.module is not None and not node.relative else None
        if module is None or not isinstance(node.names, cst.ImportStar):
            return
        if module == "torchdyn" or module.startswith("torchdyn."):
            self.torchdyn_star = True
        if module in ("torchdiffeq", TSA):
            self.note(self.line_of(node), f"`from {module} import *`: names from it cannot be followed",
                      unmigrated=module == "torchdiffeq")

    def leave_ImportFrom(self, original_node: cst.ImportFrom) -> None:
        self._import_depth -= 1

    # -- definitions ------------------------------------------------------------------------------------
    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node.name.value in CALLBACKS_ADJOINT:
            self.note(self.line_of(node), f"`{node.name.value}` is never called with adjoint_method=\"symplectic\": "
                                          "torchdiffeq calls it during the continuous adjoint's backward solve, which "
                                          "the symplectic adjoint does not have; see MIGRATION.md")

    # -- names used other than by calling them -------------------------------------------------------------
    def visit_Name(self, node: cst.Name) -> None:
        if self._import_depth or not self._is_load(node):
            return
        names = self._qualified(node)
        if TD_ODEINT_ADJOINT in names and node not in self._callees:
            value = self._value(node)
            self.td_uses.setdefault(node.value, []).append(_Use(node, len(names) > 1, value.line, value=value))
        elif SYMADJ_ODEINT_ADJOINT in names and node not in self._callees:
            self._check_migrated_value(node)
        for name in names:
            function = c.tsa_function(name)
            # A name from-imported from torch_symplectic_adjoint: only direct calls are planned (visit_Call, which
            # runs before the callee's visit_Name); any other use keeps the binding on the shim.
            if function in TSA_MOVES and node not in self._callees:
                self.plan.bad_tsa_bindings.add(node.value)
                self.note(self.line_of(node), f"`{node.value}` ({TSA}.{function}) is used other than by calling "
                                              f"it; kept on the {TSA} compat package")

    def visit_Attribute(self, node: cst.Attribute) -> None:
        """``torchdiffeq.odeint_adjoint`` (through any module alias) used as a value."""
        if self._import_depth or node in self._callees or not self._is_load(node):
            return
        names = self._qualified(node)
        if SYMADJ_ODEINT_ADJOINT in names:
            self._check_migrated_value(node)
        if TD_ODEINT_ADJOINT not in names:
            return
        line = self.line_of(node)
        if len(names) > 1:
            self.note(line, f"`{self.code(node)}` may be torchdiffeq.odeint_adjoint or something else; "
                            f"{STILL_CONTINUOUS}", unmigrated=True)
            return
        value = self._value(node)
        self._plan_value(value, f"{SYMADJ_TD}.odeint_adjoint")
        if value.context in (_WRAP, _PARTIAL, _EVENT):
            self.plan.needed_imports.add(SYMADJ_TD)

    def _check_migrated_value(self, node: cst.CSTNode) -> None:
        """symadj's odeint_adjoint where a run before could not switch it: still reported (so a rerun is not 0),
        or, passed as ``odeint_interface`` (left by an older codemod, when events needed the continuous adjoint),
        wrapped now."""
        value = self._value(node)
        if value.context in (_EVENT, None):
            self._plan_value(value, self.code(node))

    def _is_load(self, node: cst.CSTNode) -> bool:
        return self.get_metadata(ExpressionContextProvider, node, None) in (ExpressionContext.LOAD, None)

    def _value(self, node: cst.CSTNode) -> _Value:
        """How a value use of odeint_adjoint can be rewritten: ``_WRAP``, ``_PARTIAL``, ``_EVENT`` or ``None``.

        Only where the value is stored or passed on is it wrapped: there a ``functools.partial`` is called like
        the function. Compared (``is``), its attributes read, a dict key: left alone and reported.
        """
        line = self.line_of(node)
        parent = self.get_metadata(ParentNodeProvider, node, None)
        if isinstance(parent, cst.Arg) and parent.value is node:
            call = self.get_metadata(ParentNodeProvider, parent, None)
            if c.keyword_of(parent) == "odeint_interface":
                return _Value(node, line, _EVENT, call)
            if parent.star:
                return _Value(node, line, None, call)
            if (isinstance(call, cst.Call) and call.args and call.args[0] is parent and parent.keyword is None
                    and FUNCTOOLS_PARTIAL in self._qualified(call.func)):
                return _Value(node, line, _PARTIAL, call, call, self.line_of(call))
            if not isinstance(call, cst.Call):  # a class's bases
                return _Value(node, line, None, node)
            return _Value(node, line, _WRAP, call)
        stored = {cst.Assign: "value", cst.AnnAssign: "value", cst.Return: "value", cst.Element: "value",
                  cst.DictElement: "value", cst.Param: "default", cst.Lambda: "body", cst.Yield: "value",
                  cst.NamedExpr: "value", cst.IfExp: ("body", "orelse")}
        for kind, fields in stored.items():
            if isinstance(parent, kind):
                fields = (fields,) if isinstance(fields, str) else fields
                if any(getattr(parent, f) is node for f in fields):
                    return _Value(node, line, _WRAP, parent)
        if isinstance(parent, cst.ComparisonTarget):  # report the whole comparison, not `is odeint_adjoint`
            parent = self.get_metadata(ParentNodeProvider, parent, None)
        return _Value(node, line, None, parent if isinstance(parent, cst.BaseExpression) else node)

    def _plan_value(self, value: _Value, function: str) -> None:
        """Plans the rewrite of one value use of odeint_adjoint, ``function`` being its new spelling."""
        code = self.code(value.node)
        if value.context in (_WRAP, _EVENT):
            self.plan.values[value.node] = wrapped_value(function)
            self.plan.value_comments[value.node] = f'`{code}` wrapped: calls select adjoint_method="symplectic".'
            self.plan.needed_imports.add("functools")
        elif value.context == _PARTIAL:
            if function != code:
                self.plan.values[value.node] = function
            self.plan.calls[value.partial] = plan_adjoint_kwargs(self, value.partial, value.partial_line)
        else:
            around = self.code(value.around).strip().splitlines()[0]
            where = "" if value.around is value.node else f"`{around}`: "
            self.note(value.line, f"{where}`{code}` used in a way the codemod does not rewrite (where it is stored "
                                  'or passed on, it becomes functools.partial(..., adjoint_method="symplectic")); '
                                  "check this use by hand", unmigrated=True)

    # -- calls ------------------------------------------------------------------------------------------
    def visit_Call(self, node: cst.Call) -> None:
        self._callees.add(node.func)
        names = self._qualified(node.func)
        if "symadj_plugins.register" in names:
            self.plan.calls_register = True
        if TD_ODEINT_ADJOINT in names:
            self._visit_odeint_adjoint_call(node, ambiguous=len(names) > 1)
            return
        for name in sorted(names):
            function = c.tsa_function(name)
            if function in TSA_MOVES:
                plan_tsa(self, node, function)
                return
            if function in TSA_STAYS:
                self.note(self.line_of(node), f"{TSA}.{function} has no symadj-plugins counterpart; it stays on the "
                                              f"{TSA} compat package that symadj-plugins installs",
                          once_key=f"stays:{function}")
                return
        if any(c.is_torchdyn_class(name) for name in names) or self._torchdyn_star_call(node):
            plan_torchdyn(self, node, self.line_of(node))
        elif not names:
            self._unresolved_call(node)

    def _unresolved_call(self, node: cst.Call) -> None:
        """A call through a name bound nowhere the codemod can see (``from x import *``, an import in a notebook
        cell that does not parse) that looks like a continuous adjoint: reported, never left silently."""
        callee = node.func.attr.value if isinstance(node.func, cst.Attribute) else getattr(node.func, "value", None)
        sensitivity = c.kwarg(node, "sensitivity")
        method = c.kwarg(node, "adjoint_method")
        name = self.code(node.func)
        where = f"the codemod cannot see where `{name}` is imported from (in a notebook: a cell that does not parse?)"
        if sensitivity is not None and c.string_value(sensitivity.value) in ADJOINT_SENSITIVITIES:
            self.note(self.line_of(node), f'`{name}(..., sensitivity="{c.string_value(sensitivity.value)}")`: '
                                          f'{where}; if it is torchdyn\'s, use sensitivity="symplectic_adjoint" '
                                          "after symadj_plugins.register()", unmigrated=True)
        elif callee == "odeint_adjoint" and (method is None or not c.is_string(method.value, "symplectic")):
            self.note(self.line_of(node), f"`{name}(...)`: {where}; if it is torchdiffeq's, use "
                                          'symadj_plugins.torchdiffeq.odeint_adjoint with adjoint_method="symplectic"',
                      unmigrated=True)

    def _visit_odeint_adjoint_call(self, node: cst.Call, ambiguous: bool) -> None:
        line = self.line_of(node)
        if isinstance(node.func, cst.Name):
            self.td_uses.setdefault(node.func.value, []).append(_Use(node.func, ambiguous, line, call=node))
        elif ambiguous:
            self.note(line, f"`{self.code(node.func)}` may be torchdiffeq.odeint_adjoint or something else; "
                            f"{STILL_CONTINUOUS}", unmigrated=True)
            return
        existing = c.kwarg(node, "adjoint_method")
        if existing is not None and c.is_string(existing.value, "symplectic") and isinstance(node.func, cst.Attribute):
            return  # torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic") after register(): already done
        plan = plan_adjoint_kwargs(self, node, line)
        if isinstance(node.func, cst.Attribute):
            plan.new_func = f"{SYMADJ_TD}.odeint_adjoint"
            self.plan.needed_imports.add(SYMADJ_TD)
        self.plan.calls[node] = plan

    def _torchdyn_star_call(self, node: cst.Call) -> bool:
        """``NeuralODE(...)`` in a module with ``from torchdyn... import *`` and no other binding of the name."""
        if not (self.torchdyn_star and isinstance(node.func, cst.Name) and node.func.value in TORCHDYN_CLASSES):
            return False
        scope = self.get_metadata(ScopeProvider, node.func, None)
        return scope is not None and node.func.value not in scope

    # -- after the visit --------------------------------------------------------------------------------
    def finish(self) -> None:
        """Decides, per name bound to torchdiffeq.odeint_adjoint by a from-import, how its uses switch.

        ``switch``: every use is surely odeint_adjoint: import symadj's odeint_adjoint, add
        ``adjoint_method="symplectic"`` to the calls and wrap the values. ``alias``: some use may also reach
        another function under the same name (torchdiffeq's own example binds ``odeint`` to either
        ``odeint_adjoint`` or ``odeint``): import ``odeint_symplectic_adjoint`` (``odeint``'s signature) under
        that name and leave the uses alone. ``keep``: as ``alias``, but a call passes adjoint-only arguments:
        import symadj's odeint_adjoint (same behaviour as torchdiffeq's) and leave the uses for the user.
        """
        moved = [line for call, line in self.tsa_planned
                 if self.plan.tsa_bound_calls.get(call) not in self.plan.bad_tsa_bindings]
        if moved:
            self.note(moved[0], f"calls moved off {TSA} use torchdiffeq's stepping: adaptive methods interpolate at "
                                "output times instead of stepping onto them (differences at the tolerance level), "
                                "and a func that is not an nn.Module needs adjoint_params; see MIGRATION.md")
        for binding, uses in self.td_uses.items():
            self.plan.td_binding_mode[binding] = mode = self._binding_mode(binding, uses)
            if mode == "switch":
                for use in uses:
                    if use.value is not None:
                        self._plan_value(use.value, binding)
                continue
            for use in uses:
                if use.call is not None:
                    self.plan.calls.pop(use.call, None)
                elif mode == "keep":
                    self.note(use.line, f"`{binding}` may be torchdiffeq.odeint_adjoint or another function and is "
                                        f"used as a value; {STILL_CONTINUOUS}", unmigrated=True)
        self.notes.sort(key=lambda n: n.line)

    def _binding_mode(self, binding: str, uses: list[_Use]) -> str:
        if not any(use.ambiguous for use in uses):
            return "switch"
        adjoint_args = [use.line for use in uses if use.call is not None and any(
            a.star or c.keyword_of(a) in (*ADJOINT_ONLY_TD, "adjoint_method") for a in use.call.args)]
        if adjoint_args:
            self.note(adjoint_args[0], f"`{binding}` may be torchdiffeq.odeint_adjoint or another function, and a "
                                       'call passes adjoint arguments; add adjoint_method="symplectic" yourself',
                      unmigrated=True)
            return "keep"
        self.note(uses[0].line, f"`{binding}` may be torchdiffeq.odeint_adjoint or another function; its "
                                "odeint_adjoint import now binds symadj_plugins.torchdiffeq."
                                "odeint_symplectic_adjoint (odeint's signature), uses unchanged")
        return "alias"
