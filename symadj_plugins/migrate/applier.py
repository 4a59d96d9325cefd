"""Applying the plan: a transformer that makes exactly the changes the planner decided on."""

from __future__ import annotations

import libcst as cst

from . import _cst as c
from ._names import SYMADJ_TD, TAG, TSA, TSA_MOVES
from .plans import Plan


class _Applier(cst.CSTTransformer):

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self._comments: list[list[str]] = []  # per enclosing statement: comment lines to put above it
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
            extra_lines.append(_import_line(module))
        if self._needs_register() and any(c.imports_torchdyn(s) for s in updated_node.body):
            extra_lines.extend(self._register_lines())
        updated_node = c.with_comment(updated_node.with_changes(body=body), comments)
        return cst.FlattenSentinel([updated_node, *extra_lines]) if extra_lines else updated_node

    def _compound_visit(self, node) -> None:
        self._comments.append([])

    def _compound_leave(self, original_node, updated_node):
        return c.with_comment(updated_node, self._comments.pop())

    visit_If = visit_For = visit_While = visit_With = visit_Try = visit_FunctionDef = visit_ClassDef = _compound_visit
    leave_If = leave_For = leave_While = leave_With = leave_Try = leave_FunctionDef = leave_ClassDef = _compound_leave

    def _add_comment(self, lines: list[str]) -> None:
        if lines and self._comments and not set(lines) <= set(self._comments[-1]):
            self._comments[-1].extend(lines)

    # -- imports --------------------------------------------------------------------------------------------
    def _needs_register(self) -> bool:
        return self.plan.torchdyn_rewrites and not self.plan.calls_register and not self._register_added

    def _register_lines(self) -> list[cst.SimpleStatementLine]:
        """``import symadj_plugins`` + ``symadj_plugins.register()``: torchdyn knows "symplectic_adjoint" only then."""
        self._register_added = True
        lines = [] if "symadj_plugins" in self.plan.present_imports else [_import_line("symadj_plugins")]
        comment = cst.Comment(f'# {TAG} makes sensitivity="symplectic_adjoint" known to torchdyn')
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
            imported = {c.dotted(alias.name) for alias in statement.names}
            if not imported & {"torchdiffeq", TSA}:
                continue
            for module in sorted(self.plan.needed_imports - self.plan.present_imports - self._added_imports):
                self._added_imports.add(module)
                out.append(module)
        return out

    def _rewrite_import(self, statement: cst.BaseSmallStatement) -> list[cst.BaseSmallStatement]:
        if not isinstance(statement, cst.ImportFrom) or statement.relative or statement.module is None:
            return [statement]
        if isinstance(statement.names, cst.ImportStar):
            return [statement]
        module = c.dotted(statement.module)
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
            out.append(statement.with_changes(names=c.fix_alias_commas(stays, statement)))
        else:  # everything moves: the first target takes over this statement, keeping its layout
            first = targets.pop(0)
            out.append(statement.with_changes(module=c.expr(first), names=c.fix_alias_commas(moves[first], statement)))
        for target in targets:
            names = [alias.with_changes(comma=cst.MaybeSentinel.DEFAULT) for alias in moves[target]]
            out.append(cst.ImportFrom(module=c.expr(target), names=c.join_aliases(names)))
        return out

    def _target(self, module: str, alias: cst.ImportAlias) -> tuple[str, cst.ImportAlias] | None:
        """Where an imported name moves, and its alias there; ``None`` if it stays."""
        name = c.dotted(alias.name)
        bound = alias.asname.name.value if alias.asname is not None else name
        if module == "torchdiffeq" and name == "odeint_adjoint":
            if self.plan.td_binding_mode.get(bound) == "alias":
                asname = cst.AsName(name=cst.Name(bound))
                return SYMADJ_TD, alias.with_changes(name=cst.Name("odeint_symplectic_adjoint"), asname=asname)
            return SYMADJ_TD, alias
        if module == TSA and name in TSA_MOVES and bound not in self.plan.bad_tsa_bindings:
            return TSA_MOVES[name], alias
        return None

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        """Needed imports that no existing import line could take go after the docstring and __future__."""
        missing = sorted(self.plan.needed_imports - self.plan.present_imports - self._added_imports)
        lines = [_import_line(m) for m in missing]
        if self._needs_register():
            lines.extend(self._register_lines())
        if not lines:
            return updated_node
        body = list(updated_node.body)
        index = 0
        while index < len(body) and c.is_docstring_or_future(body[index]):
            index += 1
        return updated_node.with_changes(body=[*body[:index], *lines, *body[index:]])

    # -- values ---------------------------------------------------------------------------------------------
    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        return self._replace_value(original_node, updated_node)

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.BaseExpression:
        return self._replace_value(original_node, updated_node)

    def _replace_value(self, original_node: cst.CSTNode, updated_node: cst.BaseExpression) -> cst.BaseExpression:
        source = self.plan.values.get(original_node)
        if source is None:
            return updated_node
        if original_node in self.plan.value_comments:
            self._add_comment([f"{TAG} {self.plan.value_comments[original_node]}"])
        return cst.parse_expression(source)

    # -- calls --------------------------------------------------------------------------------------------
    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        plan = self.plan.calls.get(original_node)
        if plan is None:
            return updated_node
        if original_node in self.plan.tsa_bound_calls:  # through a from-import: only if the binding moves
            if self.plan.tsa_bound_calls[original_node] in self.plan.bad_tsa_bindings:
                return updated_node
        updated_node = updated_node.with_changes(args=_rewrite_args(updated_node.args, plan))
        if plan.new_func is not None:
            updated_node = updated_node.with_changes(func=cst.parse_expression(plan.new_func))
        self._add_comment(plan.comment)
        return updated_node


def _import_line(module: str) -> cst.SimpleStatementLine:
    return cst.SimpleStatementLine(body=[cst.Import(names=[cst.ImportAlias(c.expr(module))])])


def _rewrite_args(old: tuple[cst.Arg, ...] | list[cst.Arg], plan) -> list[cst.Arg]:
    """The arguments with ``plan.set_kwargs`` set and ``plan.drop`` removed, keeping the layout."""
    missing = [k for k in plan.set_kwargs if c.kwarg_in(old, k) is None]
    args: list[cst.Arg] = []
    for arg in old:
        keyword = c.keyword_of(arg)
        if keyword in plan.set_kwargs:
            args.append(arg.with_changes(value=cst.parse_expression(plan.set_kwargs[keyword])))
        elif keyword not in plan.drop:
            args.append(arg)
        elif missing:  # a new argument takes the place (and the layout) of the first removed one
            keyword = missing.pop(0)
            args.append(c.keyword_arg(keyword, plan.set_kwargs[keyword]).with_changes(comma=arg.comma))
        elif args and c.has_newline(arg.comma) and not c.has_newline(args[-1].comma):
            args[-1] = args[-1].with_changes(comma=arg.comma)  # keep the line break the removed one had
    if args and old and c.keyword_of(old[-1]) in plan.drop:
        args[-1] = args[-1].with_changes(comma=old[-1].comma)
    for keyword in missing:
        args = c.append_arg(args, c.keyword_arg(keyword, plan.set_kwargs[keyword]))
    return args
