"""Small libcst helpers shared by the planner and the applier."""

from __future__ import annotations

import textwrap

import libcst as cst

from ._names import TORCHDYN_CLASSES, TSA


def dotted(node: cst.BaseExpression) -> str:
    """``a.b.c`` for a Name/Attribute chain."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{dotted(node.value)}.{node.attr.value}"
    raise TypeError(f"not a dotted name: {node!r}")


def imports_torchdyn(statement: cst.BaseSmallStatement) -> bool:
    def is_torchdyn(name: str) -> bool:
        return name == "torchdyn" or name.startswith("torchdyn.")

    if isinstance(statement, cst.Import):
        return any(is_torchdyn(dotted(alias.name)) for alias in statement.names)
    return (isinstance(statement, cst.ImportFrom) and statement.module is not None and not statement.relative
            and is_torchdyn(dotted(statement.module)))


def is_docstring_or_future(statement: cst.CSTNode) -> bool:
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return False
    small = statement.body[0]
    if isinstance(small, cst.Expr) and isinstance(small.value, (cst.SimpleString, cst.ConcatenatedString)):
        return True
    return isinstance(small, cst.ImportFrom) and small.module is not None and dotted(small.module) == "__future__"


def expr(source: str) -> cst.BaseExpression:
    return cst.parse_expression(source)  # type: ignore[return-value]


def tsa_function(qualified: str) -> str | None:
    prefix = TSA + "."
    return qualified[len(prefix):] if qualified.startswith(prefix) and "." not in qualified[len(prefix):] else None


def is_torchdyn_class(qualified: str) -> bool:
    return qualified.startswith("torchdyn.") and qualified.rsplit(".", 1)[-1] in TORCHDYN_CLASSES


def keyword_of(arg: cst.Arg) -> str | None:
    return arg.keyword.value if arg.keyword is not None else None


def kwarg(call: cst.Call, keyword: str) -> cst.Arg | None:
    return next((a for a in call.args if keyword_of(a) == keyword), None)


def string_value(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.SimpleString) and not any(c in node.prefix.lower() for c in "bf"):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def is_string(node: cst.BaseExpression, value: str) -> bool:
    return string_value(node) == value


def quoted(node: cst.CSTNode, value: str) -> str:
    """``value`` as a string literal in the quote style of the first string literal in ``node`` (else ``"``)."""
    found: list[cst.SimpleString] = []

    class _Find(cst.CSTVisitor):
        def visit_SimpleString(self, s: cst.SimpleString) -> None:
            found.append(s)

    node.visit(_Find())
    mark = "'" if found and found[0].quote == "'" else '"'
    return f"{mark}{value}{mark}"


def keyword_arg(keyword: str, value: str) -> cst.Arg:
    no_space = cst.SimpleWhitespace("")
    return cst.Arg(keyword=cst.Name(keyword), value=cst.parse_expression(value),
                   equal=cst.AssignEqual(no_space, no_space))


def has_newline(comma: cst.Comma | cst.MaybeSentinel) -> bool:
    return isinstance(comma, cst.Comma) and isinstance(comma.whitespace_after, cst.ParenthesizedWhitespace)


def append_arg(args: list[cst.Arg], new: cst.Arg) -> list[cst.Arg]:
    """Appends ``new`` in the layout of the existing arguments (same separator, same trailing comma)."""
    if not args:
        return [new]
    last = args[-1]
    separator = args[-2].comma if len(args) >= 2 and isinstance(args[-2].comma, cst.Comma) else None
    if separator is None:
        separator = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    return [*args[:-1], last.with_changes(comma=separator), new.with_changes(comma=last.comma)]


def fix_alias_commas(aliases: list[cst.ImportAlias], statement: cst.ImportFrom) -> list[cst.ImportAlias]:
    """The kept aliases of an import, with the last one ending as the statement's last alias did."""
    aliases = list(aliases)
    last_comma = statement.names[-1].comma  # type: ignore[index]
    if statement.lpar is None and not isinstance(last_comma, cst.Comma):
        last_comma = cst.MaybeSentinel.DEFAULT
    aliases[-1] = aliases[-1].with_changes(comma=last_comma)
    return aliases


def join_aliases(aliases: list[cst.ImportAlias]) -> list[cst.ImportAlias]:
    comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    return [a.with_changes(comma=comma) for a in aliases[:-1]] + [aliases[-1]]


def with_comment(node: cst.CSTNode, lines: list[str]) -> cst.CSTNode:
    """``node`` with ``lines`` as ``#`` comments above it, wrapped at 100 characters."""
    if not lines:
        return node
    wrapped = [w for line in lines for w in textwrap.wrap(line, width=100, subsequent_indent="    ")]
    comments = [cst.EmptyLine(comment=cst.Comment(f"# {text}")) for text in wrapped]
    return node.with_changes(leading_lines=[*node.leading_lines, *comments])




def kwarg_in(args: tuple[cst.Arg, ...] | list[cst.Arg], keyword: str) -> cst.Arg | None:
    return next((a for a in args if keyword_of(a) == keyword), None)
