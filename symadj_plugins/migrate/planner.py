"""Rewrite existing neural-ODE code to the symplectic adjoint: ``python -m symadj_plugins.migrate PATH... [--write]``.

Built on libcst, so formatting and comments survive. Three starting points are understood:

torchdiffeq
    ``from torchdiffeq import odeint_adjoint`` becomes ``from symadj_plugins.torchdiffeq import odeint_adjoint``
    (a drop-in for torchdiffeq's) and its calls get ``adjoint_method="symplectic"``; ``torchdiffeq.odeint_adjoint(...)``
    becomes ``symadj_plugins.torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic")`` with
    ``import symadj_plugins.torchdiffeq`` added. ``adjoint_rtol``, ``adjoint_atol`` and ``adjoint_options`` are
    removed (a comment above the statement records them): the symplectic adjoint solves no second ODE.
torchdyn
    ``NeuralODE(..., sensitivity="adjoint" | "interpolated_adjoint")`` (and ``ODEProblem``) get
    ``sensitivity="symplectic_adjoint"``; ``solver_adjoint``, ``atol_adjoint``, ``rtol_adjoint`` and ``seminorm``
    are removed with a comment; ``integral_loss`` and everything else stay.
torch_symplectic_adjoint (the paper's package)
    ``odeint_symplectic_adjoint`` moves to ``symadj_plugins.torchdiffeq`` and ``odeint`` to ``torchdiffeq``, with
    method names translated (the paper's ``rk38`` is torchdiffeq's ``rk4``). Where that cannot be done exactly
    (the classical ``rk4``, which torchdiffeq lacks; a method that is not a string literal; ``**kwargs``; the
    function used other than by calling it) the code is left on the ``torch_symplectic_adjoint`` compat package
    that symadj-plugins installs. ``odeint_adjoint``, ``odeint_checkpoint`` and ``odeint_onecheckpoint`` have no
    symadj-plugins counterpart and stay there too.

Conservative by design: only names that resolve (through imports and aliases, scope by scope) to those functions
are touched; anything it cannot follow is left alone and reported. Without ``--write`` it prints a unified diff
and changes nothing. A file that cannot be parsed is reported and left untouched, and a file is written only
whole (a temporary file renamed over it), never partially. Exit status: 0 when every file was processed, 1 when
any could not be (unparsable, unreadable, or missing).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider, QualifiedNameProvider, ScopeProvider

__all__ = ["migrate_source", "migrate_file", "main", "Result"]

_TAG = "symadj-migrate:"
_SYMADJ_TD = "symadj_plugins.torchdiffeq"

# torchdiffeq
_TD_ODEINT_ADJOINT = "torchdiffeq.odeint_adjoint"
_ADJOINT_ONLY_TD = ("adjoint_rtol", "adjoint_atol", "adjoint_options")

# torchdyn
_TORCHDYN_CLASSES = ("NeuralODE", "ODEProblem")
_ADJOINT_SENSITIVITIES = ("adjoint", "interpolated_adjoint")
_ADJOINT_ONLY_TORCHDYN = ("solver_adjoint", "atol_adjoint", "rtol_adjoint", "seminorm")

# torch_symplectic_adjoint: function -> (module it moves to, name there)
_TSA = "torch_symplectic_adjoint"
_TSA_MOVES = {"odeint_symplectic_adjoint": _SYMADJ_TD, "odeint": "torchdiffeq"}
_TSA_STAYS = ("odeint_adjoint", "odeint_checkpoint", "odeint_onecheckpoint")
# The paper's method names that mean the same in torchdiffeq (rk38 is torchdiffeq's rk4; its rk4 has no twin).
_TSA_METHOD_TO_TORCHDIFFEQ = {"dopri8": "dopri8", "dopri5": "dopri5", "bosh3": "bosh3", "fehlberg2": "fehlberg2",
                              "adaptive_heun": "adaptive_heun", "rk38": "rk4", "midpoint": "midpoint",
                              "euler": "euler"}

_WHY_NO_ADJOINT_ARGS = ("the symplectic adjoint replays the forward steps exactly, so there is no backward "
                        "solve to configure")


@dataclass
class Result:
    """What happened to one file."""

    path: str
    old: str = ""
    new: str = ""
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def changed(self) -> bool:
        return self.error is None and self.new != self.old

    def diff(self) -> str:
        a, b = (self.path, self.path) if os.path.isabs(self.path) else (f"a/{self.path}", f"b/{self.path}")
        return "".join(difflib.unified_diff(self.old.splitlines(keepends=True), self.new.splitlines(keepends=True),
                                            fromfile=a, tofile=b))


# --------------------------------------------------------------------------------------------------------
# Planning: decide every change before making any, from the resolved names of the original tree.

@dataclass
class _CallPlan:
    new_func: str | None = None          # dotted name replacing the callee (attribute-style calls)
    set_kwargs: dict[str, str] = field(default_factory=dict)  # keyword -> new value (source), added if missing
    drop: tuple[str, ...] = ()            # keywords to remove
    comment: list[str] = field(default_factory=list)  # why, put above the statement


class _Planner(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (QualifiedNameProvider, ScopeProvider, PositionProvider)

    def __init__(self, module: cst.Module):
        super().__init__()
        self.module = module
        self.calls: dict[cst.Call, _CallPlan] = {}
        self.notes: list[str] = []
        self.bad_tsa_bindings: set[str] = set()   # from-imported names of torch_symplectic_adjoint kept on the shim
        self.tsa_bound_calls: dict[cst.Call, str] = {}  # call through a from-imported name -> function
        self.needed_imports: set[str] = set()      # modules to import (`import X`) for attribute-style rewrites
        self.present_imports: set[str] = set()     # `import X` (unaliased) already in the module
        self.torchdyn_star = False
        self.torchdyn_rewrites = False  # some sensitivity becomes "symplectic_adjoint": register() is needed
        self.calls_register = False     # the module already calls symadj_plugins.register()
        # from-imported torchdiffeq.odeint_adjoint: bound name -> calls through it (see finish())
        self.td_binding_calls: dict[str, list[tuple[cst.Call, bool, int]]] = {}  # (call, ambiguous, line)
        self.td_binding_mode: dict[str, str] = {}  # "switch" | "alias" | "keep"
        self.tsa_planned: list[tuple[cst.Call, int]] = []  # torch_symplectic_adjoint calls that may move
        self._callees: set[cst.CSTNode] = set()  # the callee of every call seen so far
        self._import_depth = 0
        self._noted: set[str] = set()

    # -- helpers ----------------------------------------------------------------------------------------
    def _line(self, node: cst.CSTNode) -> int:
        return self.get_metadata(PositionProvider, node).start.line

    def _note(self, node: cst.CSTNode | int, message: str, once_key: str | None = None) -> None:
        """Records a message for the user about ``node`` (or a line number, after the visit)."""
        if once_key is not None:
            if once_key in self._noted:
                return
            self._noted.add(once_key)
        self.notes.append(f"line {node if isinstance(node, int) else self._line(node)}: {message}")

    def _qualified(self, node: cst.CSTNode) -> set[str]:
        try:
            return {q.name for q in self.get_metadata(QualifiedNameProvider, node, set())}
        except KeyError:
            return set()

    def _code(self, node: cst.CSTNode) -> str:
        return self.module.code_for_node(node)

    # -- imports ----------------------------------------------------------------------------------------
    def visit_Import(self, node: cst.Import) -> None:
        self._import_depth += 1
        for alias in node.names:
            if alias.asname is None:
                self.present_imports.add(_dotted(alias.name))

    def leave_Import(self, original_node: cst.Import) -> None:
        self._import_depth -= 1

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        self._import_depth += 1
        module = _dotted(node.module) if node.module is not None and not node.relative else None
        if module is None or not isinstance(node.names, cst.ImportStar):
            return
        if module == "torchdyn" or module.startswith("torchdyn."):
            self.torchdyn_star = True
        if module in ("torchdiffeq", _TSA):
            self._note(node, f"`from {module} import *`: names from it cannot be followed; not migrated")

    def leave_ImportFrom(self, original_node: cst.ImportFrom) -> None:
        self._import_depth -= 1

    def visit_Name(self, node: cst.Name) -> None:
        if self._import_depth:
            return
        for name in self._qualified(node):
            function = _tsa_function(name)
            # A name from-imported from torch_symplectic_adjoint: only direct calls are planned (visit_Call, which
            # runs before the callee's visit_Name); any other use keeps the binding on the shim.
            if function in _TSA_MOVES:
                if node not in self._callees:
                    self.bad_tsa_bindings.add(node.value)
                    self._note(node, f"`{node.value}` ({_TSA}.{function}) is used other than by calling it; "
                                     f"kept on the {_TSA} compat package")

    # -- calls ------------------------------------------------------------------------------------------
    def visit_Call(self, node: cst.Call) -> None:
        self._callees.add(node.func)
        names = self._qualified(node.func)
        if "symadj_plugins.register" in names:
            self.calls_register = True
        if _TD_ODEINT_ADJOINT in names:
            ambiguous = len(names) > 1
            if isinstance(node.func, cst.Name):
                self.td_binding_calls.setdefault(node.func.value, []).append((node, ambiguous, self._line(node)))
            if ambiguous and not isinstance(node.func, cst.Name):
                self._note(node, f"`{self._code(node.func)}` may be torchdiffeq.odeint_adjoint or something else; "
                                 "not migrated")
                return
            self._plan_odeint_adjoint(node)
            return
        for name in sorted(names):
            function = _tsa_function(name)
            if function in _TSA_MOVES:
                self._plan_tsa(node, function)
                return
            if function in _TSA_STAYS:
                self._note(node, f"{_TSA}.{function} has no symadj-plugins counterpart; it stays on the {_TSA} "
                                 "compat package that symadj-plugins installs", once_key=f"stays:{function}")
                return
        if any(_is_torchdyn_class(name) for name in names) or self._torchdyn_star_call(node):
            self._plan_torchdyn(node)

    def _torchdyn_star_call(self, node: cst.Call) -> bool:
        """``NeuralODE(...)`` in a module with ``from torchdyn... import *`` and no other binding of the name."""
        if not (self.torchdyn_star and isinstance(node.func, cst.Name) and node.func.value in _TORCHDYN_CLASSES):
            return False
        scope = self.get_metadata(ScopeProvider, node.func, None)
        return scope is not None and node.func.value not in scope

    def finish(self) -> None:
        """Decides, per name bound to torchdiffeq.odeint_adjoint by a from-import, how its calls switch.

        ``switch``: every call through it is surely odeint_adjoint: import symadj's odeint_adjoint, add
        ``adjoint_method="symplectic"``. ``alias``: some call may also reach another function under the same
        name (torchdiffeq's own example binds ``odeint`` to either ``odeint_adjoint`` or ``odeint``): import
        ``odeint_symplectic_adjoint`` (``odeint``'s signature) under that name and leave the calls alone.
        ``keep``: as ``alias``, but a call passes adjoint-only arguments: import symadj's odeint_adjoint (same
        behaviour as torchdiffeq's) and leave the calls for the user.
        """
        moved = [line for call, line in self.tsa_planned if self.tsa_bound_calls.get(call) not in self.bad_tsa_bindings]
        if moved:
            self._note(moved[0], f"calls moved off {_TSA} use torchdiffeq's stepping: adaptive methods interpolate at "
                                 "output times instead of stepping onto them (differences at the tolerance level), and "
                                 "a func that is not an nn.Module needs adjoint_params; see MIGRATION.md")
        for binding, calls in self.td_binding_calls.items():
            if not any(ambiguous for _, ambiguous, _ in calls):
                self.td_binding_mode[binding] = "switch"
                continue
            for call, _, _ in calls:
                self.calls.pop(call, None)
            adjoint_args = [line for c, _, line in calls
                            if any(a.star or _keyword(a) in (*_ADJOINT_ONLY_TD, "adjoint_method") for a in c.args)]
            if adjoint_args:
                self.td_binding_mode[binding] = "keep"
                self._note(adjoint_args[0], f"`{binding}` may be torchdiffeq.odeint_adjoint or another function, and a "
                                            'call passes adjoint arguments; add adjoint_method="symplectic" yourself')
            else:
                self.td_binding_mode[binding] = "alias"
                self._note(calls[0][2], f"`{binding}` may be torchdiffeq.odeint_adjoint or another function; its "
                                        "odeint_adjoint import now binds symadj_plugins.torchdiffeq."
                                        "odeint_symplectic_adjoint (odeint's signature), calls unchanged")

    def _plan_odeint_adjoint(self, node: cst.Call) -> None:
        existing = _kwarg(node, "adjoint_method")
        if existing is not None and _is_string(existing.value, "symplectic") and isinstance(node.func, cst.Attribute):
            return  # torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic") after register(): already done
        if any(arg.star == "**" for arg in node.args):
            self._note(node, "odeint_adjoint(..., **kwargs): cannot tell whether kwargs sets adjoint_method; add "
                             'adjoint_method="symplectic" yourself')
            plan = _CallPlan()
        else:
            plan = _CallPlan(set_kwargs={"adjoint_method": _quote(node, "symplectic")})
            dropped = [a for a in node.args if _keyword(a) in _ADJOINT_ONLY_TD]
            changes = []
            if existing is not None and not _is_string(existing.value, "symplectic"):
                changes.append(f"replaced adjoint_method={self._code(existing.value)}")
            if dropped:
                changes.append("removed " + ", ".join(f"{_keyword(a)}={self._code(a.value)}" for a in dropped))
            plan.drop = _ADJOINT_ONLY_TD
            if changes:
                plan.comment = [f'{_TAG} adjoint_method="symplectic" gives the exact gradient; {"; ".join(changes)}: '
                                f"{_WHY_NO_ADJOINT_ARGS}."]
        if isinstance(node.func, cst.Attribute):
            plan.new_func = f"{_SYMADJ_TD}.odeint_adjoint"
            self.needed_imports.add(_SYMADJ_TD)
        self.calls[node] = plan

    def _plan_tsa(self, node: cst.Call, function: str) -> None:
        problem = None
        if any(arg.star for arg in node.args):
            problem = "passes *args/**kwargs"
        method = _kwarg(node, "method")
        new_method = None
        if problem is None and method is not None:
            literal = _string_value(method.value)
            if literal is None:
                problem = f"method={self._code(method.value)} is not a string literal"
            elif literal not in _TSA_METHOD_TO_TORCHDIFFEQ:
                problem = (f"method={literal!r} " + ("is the classical RK4, which torchdiffeq does not have"
                                                     if literal == "rk4" else "is not one of its methods"))
            elif _TSA_METHOD_TO_TORCHDIFFEQ[literal] != literal:
                new_method = _TSA_METHOD_TO_TORCHDIFFEQ[literal]
        target = _TSA_MOVES[function]
        if isinstance(node.func, cst.Name):
            self.tsa_bound_calls[node] = node.func.value
        if problem is not None:
            self._note(node, f"{_TSA}.{function}: {problem}; kept on the {_TSA} compat package")
            if isinstance(node.func, cst.Name):
                self.bad_tsa_bindings.add(node.func.value)
            return
        self.tsa_planned.append((node, self._line(node)))
        plan = _CallPlan()
        if new_method is not None:
            plan.set_kwargs["method"] = _quote(node, new_method)
            plan.comment = [f"{_TAG} method {_string_value(method.value)!r} of {_TSA} is {new_method!r} in "
                            "torchdiffeq (the 3/8 rule)."]
        if isinstance(node.func, cst.Attribute):
            plan.new_func = f"{target}.{function}"
            self.needed_imports.add(target)
        self.calls[node] = plan

    def _plan_torchdyn(self, node: cst.Call) -> None:
        sensitivity = _kwarg(node, "sensitivity")
        if sensitivity is None:
            if any(arg.star for arg in node.args) or sum(arg.keyword is None for arg in node.args) > 5:
                self._note(node, "torchdyn call whose sensitivity may be passed positionally or in **kwargs; "
                                 "not migrated")
            return
        value = _string_value(sensitivity.value)
        if value is None:
            self._note(node, f"sensitivity={self._code(sensitivity.value)} is not a string literal; not migrated "
                             '(use "symplectic_adjoint" where it is "adjoint" or "interpolated_adjoint")')
            return
        if value not in _ADJOINT_SENSITIVITIES:
            return
        plan = _CallPlan(set_kwargs={"sensitivity": _quote(sensitivity.value, "symplectic_adjoint")},
                         drop=_ADJOINT_ONLY_TORCHDYN)
        self.torchdyn_rewrites = True
        dropped = [a for a in node.args if _keyword(a) in _ADJOINT_ONLY_TORCHDYN]
        if dropped:
            what = ", ".join(f"{_keyword(a)}={self._code(a.value)}" for a in dropped)
            plan.comment = [f'{_TAG} sensitivity "{value}" -> "symplectic_adjoint" (exact gradient); removed {what}: '
                            f"{_WHY_NO_ADJOINT_ARGS}."]
        self.calls[node] = plan


# --------------------------------------------------------------------------------------------------------
# Applying the plan.

class _Applier(cst.CSTTransformer):

    def __init__(self, planner: _Planner):
        super().__init__()
        self.plan = planner
        self._comments: list[list[str]] = []
        self._added_imports: set[str] = set()
        self._register_added = False

    # -- statements (where comments and new imports go) -------------------------------------------------
    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        self._comments.append([])

    def leave_SimpleStatementLine(self, original_node, updated_node):
        comments = self._comments.pop()
        body: list[cst.BaseSmallStatement] = []
        extra_lines: list[cst.SimpleStatementLine] = []
        for statement in updated_node.body:
            replacement = self._rewrite_import(statement)
            if len(updated_node.body) == 1:
                body.append(replacement[0])
                extra_lines.extend(cst.SimpleStatementLine(body=[s]) for s in replacement[1:])
            else:
                body.extend(replacement)
        for module in self._imports_to_add_after(updated_node):
            extra_lines.append(cst.SimpleStatementLine(body=[cst.Import(names=[cst.ImportAlias(_name(module))])]))
        if self._needs_register() and any(_imports_torchdyn(s) for s in updated_node.body):
            extra_lines.extend(self._register_lines())
        updated_node = updated_node.with_changes(body=body)
        updated_node = _with_comment(updated_node, comments)
        return cst.FlattenSentinel([updated_node, *extra_lines]) if extra_lines else updated_node

    def _compound_visit(self, node) -> None:
        self._comments.append([])

    def _compound_leave(self, original_node, updated_node):
        return _with_comment(updated_node, self._comments.pop())

    visit_If = visit_For = visit_While = visit_With = visit_Try = visit_FunctionDef = visit_ClassDef = _compound_visit
    leave_If = leave_For = leave_While = leave_With = leave_Try = leave_FunctionDef = leave_ClassDef = _compound_leave

    def _needs_register(self) -> bool:
        return self.plan.torchdyn_rewrites and not self.plan.calls_register and not self._register_added

    def _register_lines(self) -> list[cst.SimpleStatementLine]:
        """``import symadj_plugins`` + ``symadj_plugins.register()``: torchdyn knows "symplectic_adjoint" only then."""
        self._register_added = True
        lines = []
        if "symadj_plugins" not in self.plan.present_imports:
            lines.append(cst.SimpleStatementLine(body=[cst.Import(names=[cst.ImportAlias(cst.Name("symadj_plugins"))])]))
        comment = cst.Comment(f'# {_TAG} makes sensitivity="symplectic_adjoint" known to torchdyn')
        lines.append(cst.SimpleStatementLine(
            body=[cst.Expr(cst.parse_expression("symadj_plugins.register()"))],
            trailing_whitespace=cst.TrailingWhitespace(whitespace=cst.SimpleWhitespace("  "), comment=comment)))
        return lines

    def _imports_to_add_after(self, line: cst.SimpleStatementLine) -> list[str]:
        """``import X`` lines needed by attribute-style rewrites, after the first import of the old module."""
        out = []
        for statement in line.body:
            if not isinstance(statement, cst.Import):
                continue
            imported = {_dotted(alias.name) for alias in statement.names}
            for module in sorted(self.plan.needed_imports):
                if module in self.plan.present_imports or module in self._added_imports:
                    continue
                if imported & {"torchdiffeq", _TSA}:
                    self._added_imports.add(module)
                    out.append(module)
        return out

    def _rewrite_import(self, statement: cst.BaseSmallStatement) -> list[cst.BaseSmallStatement]:
        if not isinstance(statement, cst.ImportFrom) or statement.relative or statement.module is None:
            return [statement]
        if isinstance(statement.names, cst.ImportStar):
            return [statement]
        module = _dotted(statement.module)
        moves: dict[str, list[cst.ImportAlias]] = {}
        stays: list[cst.ImportAlias] = []
        for alias in statement.names:
            target = self._target(module, alias)
            if target is None:
                stays.append(alias)
            else:
                moves.setdefault(target[0], []).append(target[1])
        if not moves:
            return [statement]
        out: list[cst.BaseSmallStatement] = []
        targets = list(moves)
        if stays:
            out.append(statement.with_changes(names=_fix_alias_commas(stays, statement)))
        else:  # everything moves: the first target takes over this statement, keeping its layout
            first = targets.pop(0)
            out.append(statement.with_changes(module=_name(first), names=_fix_alias_commas(moves[first], statement)))
        for target in targets:
            names = [alias.with_changes(comma=cst.MaybeSentinel.DEFAULT) for alias in moves[target]]
            out.append(cst.ImportFrom(module=_name(target), names=_join_aliases(names)))
        return out

    def _target(self, module: str, alias: cst.ImportAlias) -> tuple[str, cst.ImportAlias] | None:
        """Where an imported name moves, and its alias there; ``None`` if it stays."""
        name = _dotted(alias.name)
        bound = alias.asname.name.value if alias.asname is not None else name
        if module == "torchdiffeq" and name == "odeint_adjoint":
            if self.plan.td_binding_mode.get(bound) == "alias":
                asname = cst.AsName(name=cst.Name(bound))
                return _SYMADJ_TD, alias.with_changes(name=cst.Name("odeint_symplectic_adjoint"), asname=asname)
            return _SYMADJ_TD, alias
        if module == _TSA and name in _TSA_MOVES and bound not in self.plan.bad_tsa_bindings:
            return _TSA_MOVES[name], alias
        return None

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        """Needed imports that no existing import line could take go after the docstring and __future__."""
        missing = sorted(self.plan.needed_imports - self.plan.present_imports - self._added_imports)
        lines = [cst.SimpleStatementLine(body=[cst.Import(names=[cst.ImportAlias(_name(m))])]) for m in missing]
        if self._needs_register():
            lines.extend(self._register_lines())
        if not lines:
            return updated_node
        body = list(updated_node.body)
        index = 0
        while index < len(body) and _is_docstring_or_future(body[index]):
            index += 1
        return updated_node.with_changes(body=[*body[:index], *lines, *body[index:]])

    # -- calls --------------------------------------------------------------------------------------------
    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        plan = self.plan.calls.get(original_node)
        if plan is None:
            return updated_node
        if original_node in self.plan.tsa_bound_calls:  # through a from-import: only if the binding moves
            if self.plan.tsa_bound_calls[original_node] in self.plan.bad_tsa_bindings:
                return updated_node
        missing = [k for k in plan.set_kwargs if _kwarg(updated_node, k) is None]
        args: list[cst.Arg] = []
        for arg in updated_node.args:
            keyword = _keyword(arg)
            if keyword in plan.set_kwargs:
                args.append(arg.with_changes(value=cst.parse_expression(plan.set_kwargs[keyword])))
            elif keyword not in plan.drop:
                args.append(arg)
            elif missing:  # a new argument takes the place (and the layout) of the first removed one
                keyword = missing.pop(0)
                args.append(_keyword_arg(keyword, plan.set_kwargs[keyword]).with_changes(comma=arg.comma))
            elif args and _has_newline(arg.comma) and not _has_newline(args[-1].comma):
                args[-1] = args[-1].with_changes(comma=arg.comma)  # keep the line break the removed one had
        if args and _keyword(updated_node.args[-1]) in plan.drop:
            args[-1] = args[-1].with_changes(comma=updated_node.args[-1].comma)
        for keyword in missing:
            args = _append_arg(args, _keyword_arg(keyword, plan.set_kwargs[keyword]))
        updated_node = updated_node.with_changes(args=args)
        if plan.new_func is not None:
            updated_node = updated_node.with_changes(func=cst.parse_expression(plan.new_func))
        if plan.comment and self._comments:
            self._comments[-1].extend(plan.comment)
        return updated_node


# --------------------------------------------------------------------------------------------------------
# Small libcst helpers.

def _dotted(node: cst.BaseExpression) -> str:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{_dotted(node.value)}.{node.attr.value}"
    raise TypeError(f"not a dotted name: {node!r}")


def _imports_torchdyn(statement: cst.BaseSmallStatement) -> bool:
    def is_torchdyn(name: str) -> bool:
        return name == "torchdyn" or name.startswith("torchdyn.")

    if isinstance(statement, cst.Import):
        return any(is_torchdyn(_dotted(alias.name)) for alias in statement.names)
    return (isinstance(statement, cst.ImportFrom) and statement.module is not None and not statement.relative
            and is_torchdyn(_dotted(statement.module)))


def _is_docstring_or_future(statement: cst.CSTNode) -> bool:
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return False
    small = statement.body[0]
    if isinstance(small, cst.Expr) and isinstance(small.value, (cst.SimpleString, cst.ConcatenatedString)):
        return True
    return isinstance(small, cst.ImportFrom) and small.module is not None and _dotted(small.module) == "__future__"


def _name(dotted: str) -> cst.Name | cst.Attribute:
    return cst.parse_expression(dotted)  # type: ignore[return-value]


def _tsa_function(qualified: str) -> str | None:
    prefix = _TSA + "."
    return qualified[len(prefix):] if qualified.startswith(prefix) and "." not in qualified[len(prefix):] else None


def _is_torchdyn_class(qualified: str) -> bool:
    return qualified.startswith("torchdyn.") and qualified.rsplit(".", 1)[-1] in _TORCHDYN_CLASSES


def _keyword(arg: cst.Arg) -> str | None:
    return arg.keyword.value if arg.keyword is not None else None


def _kwarg(call: cst.Call, keyword: str) -> cst.Arg | None:
    return next((a for a in call.args if _keyword(a) == keyword), None)


def _string_value(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.SimpleString) and not any(c in node.prefix.lower() for c in "bf"):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def _is_string(node: cst.BaseExpression, value: str) -> bool:
    return _string_value(node) == value


def _quote(node: cst.CSTNode, value: str) -> str:
    """``value`` as a string literal in the quote style of the first string literal in ``node`` (else ``"``)."""
    found: list[cst.SimpleString] = []

    class _Find(cst.CSTVisitor):
        def visit_SimpleString(self, s: cst.SimpleString) -> None:
            found.append(s)

    node.visit(_Find())
    quote = "'" if found and found[0].quote == "'" else '"'
    return f"{quote}{value}{quote}"


def _keyword_arg(keyword: str, value: str) -> cst.Arg:
    no_space = cst.SimpleWhitespace("")
    return cst.Arg(keyword=cst.Name(keyword), value=cst.parse_expression(value),
                   equal=cst.AssignEqual(no_space, no_space))


def _has_newline(comma: cst.Comma | cst.MaybeSentinel) -> bool:
    return isinstance(comma, cst.Comma) and isinstance(comma.whitespace_after, cst.ParenthesizedWhitespace)


def _append_arg(args: list[cst.Arg], new: cst.Arg) -> list[cst.Arg]:
    """Appends ``new`` in the layout of the existing arguments (same separator, same trailing comma)."""
    if not args:
        return [new]
    last = args[-1]
    separator = args[-2].comma if len(args) >= 2 and isinstance(args[-2].comma, cst.Comma) else None
    if separator is None:
        separator = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    return [*args[:-1], last.with_changes(comma=separator), new.with_changes(comma=last.comma)]


def _fix_alias_commas(aliases: list[cst.ImportAlias], statement: cst.ImportFrom) -> list[cst.ImportAlias]:
    """The kept aliases of an import, with the last one ending as the statement's last alias did."""
    aliases = list(aliases)
    last_comma = statement.names[-1].comma  # type: ignore[index]
    if statement.lpar is None and not isinstance(last_comma, cst.Comma):
        last_comma = cst.MaybeSentinel.DEFAULT
    aliases[-1] = aliases[-1].with_changes(comma=last_comma)
    return aliases


def _join_aliases(aliases: list[cst.ImportAlias]) -> list[cst.ImportAlias]:
    comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    return [a.with_changes(comma=comma) for a in aliases[:-1]] + [aliases[-1]]


def _with_comment(node, lines: list[str]):
    if not lines:
        return node
    wrapped = [w for line in lines for w in textwrap.wrap(line, width=100, subsequent_indent="    ")]
    comments = [cst.EmptyLine(comment=cst.Comment(f"# {text}")) for text in wrapped]
    return node.with_changes(leading_lines=[*node.leading_lines, *comments])


# --------------------------------------------------------------------------------------------------------
# Files and the command line.

def migrate_source(source: str | bytes) -> tuple[str, list[str]]:
    """Returns ``(new_source, notes)``. Raises ``libcst.ParserSyntaxError`` if ``source`` does not parse."""
    module = cst.parse_module(source)
    wrapper = MetadataWrapper(module)
    planner = _Planner(wrapper.module)
    wrapper.visit(planner)
    planner.finish()
    new_module = wrapper.module.visit(_Applier(planner))
    new_code = new_module.code
    cst.parse_module(new_code)  # never write what does not parse
    return new_code, planner.notes


def migrate_file(path: str, write: bool = False) -> Result:
    """Migrates one file; writes it (atomically) only with ``write=True`` and only if it changed."""
    result = Result(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        result.error = f"cannot read: {e.strerror or e}"
        return result
    try:
        module = cst.parse_module(raw)
        result.old = module.code
        result.new, result.notes = migrate_source(raw)
    except cst.ParserSyntaxError as e:
        result.error = f"cannot parse (line {e.raw_line}, column {e.raw_column}): {e.message}"
        return result
    except Exception as e:  # a bug here must not cost the user a file: report it and leave the file alone
        result.error = f"internal error, file left untouched: {type(e).__name__}: {e}"
        return result
    if write and result.changed:
        encoding = module.encoding
        _atomic_write(path, result.new.encode(encoding))
    return result


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".symadj-migrate-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", "node_modules", "site-packages",
              "build", "dist"}


def _python_files(paths: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """``(path, exists)`` for every ``.py`` file named or under a named directory, in a stable order."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                for name in sorted(files):
                    if name.endswith(".py"):
                        yield os.path.join(root, name), True
        else:
            yield path, os.path.isfile(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m symadj_plugins.migrate",
        description="Rewrite torchdiffeq odeint_adjoint, torchdyn sensitivity='adjoint' and torch_symplectic_adjoint "
                    "code to use the symplectic adjoint of symadj-plugins. Prints a unified diff unless --write.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Python files or directories (searched for *.py)")
    parser.add_argument("--write", action="store_true", help="rewrite the files in place instead of printing a diff")
    args = parser.parse_args(argv)

    failed = changed = 0
    for path, exists in _python_files(args.paths):
        if not exists:
            print(f"{path}: error: no such file", file=sys.stderr)
            failed += 1
            continue
        result = migrate_file(path, write=args.write)
        if result.error is not None:
            print(f"{path}: error: {result.error}", file=sys.stderr)
            failed += 1
            continue
        for note in result.notes:
            print(f"{path}: {note}", file=sys.stderr)
        if result.changed:
            changed += 1
            if args.write:
                print(f"{path}: rewritten", file=sys.stderr)
            else:
                sys.stdout.write(result.diff())
    verb = "rewritten" if args.write else "would change"
    print(f"symadj-migrate: {changed} file(s) {verb}, {failed} could not be processed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
