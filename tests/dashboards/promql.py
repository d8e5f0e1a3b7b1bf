"""Just enough PromQL lexing to list the metric names an expression reads.

Not a parser: it walks the expression once, skipping strings, comments, label matchers,
range/subquery brackets, label lists after by/without/on/ignoring/group_left/group_right, and
numbers/durations. Every other bare identifier that is not a keyword, an aggregation or a
function call is a metric name. `{__name__="x"}` matchers name metric x as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

KEYWORDS = frozenset({
    "and", "or", "unless", "atan2", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
})
AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
})
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL = r"[A-Za-z_][A-Za-z0-9_]*"
# Hex, decimal and float numbers; a trailing unit run makes durations (5m, 1h30m) one token.
_NUMBER = re.compile(
    r"0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_]*"
)
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)""")
_LABEL_LIST = re.compile(rf"^\s*(?:{_LABEL}\s*(?:,\s*{_LABEL}\s*)*,?\s*)?$")
_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
_LABEL_VALUES = re.compile(rf"^\s*label_values\s*\((?:(.*),)?\s*{_LABEL}\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((.*)\)\s*$", re.S)


class PromQLSyntaxError(ValueError):
    pass


def _skip_string(expr: str, i: int) -> int:
    """Index just past the string literal that starts at expr[i]."""
    quote = expr[i]
    j = i + 1
    while j < len(expr):
        if expr[j] == "\\" and quote != "`":
            j += 2
            continue
        if expr[j] == quote:
            return j + 1
        j += 1
    raise PromQLSyntaxError(f"unterminated string at {i}: {expr!r}")


def _skip_until(expr: str, i: int, close: str) -> tuple[int, str]:
    """Index just past `close` (strings inside respected) and the text in between."""
    j = i
    while j < len(expr):
        c = expr[j]
        if c in "\"'`":
            j = _skip_string(expr, j)
            continue
        if c == close:
            return j + 1, expr[i:j]
        j += 1
    raise PromQLSyntaxError(f"missing {close!r} after {i}: {expr!r}")


def _next_char(expr: str, i: int) -> str:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return expr[i] if i < len(expr) else ""


def _word_at(expr: str, i: int) -> str:
    """The identifier after any whitespace at i, lower-cased, or ""."""
    while i < len(expr) and expr[i].isspace():
        i += 1
    match = _IDENT.match(expr, i)
    return match.group(0).lower() if match else ""


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects, e.g. {"a", "b"} for `sum by (le) (rate(a[5m])) / b`."""
    names: set[str] = set()
    i = 0
    depth = 0
    n = len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c == "#":  # comment to the end of the line
            end = expr.find("\n", i)
            i = n if end < 0 else end + 1
        elif c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            i, matchers = _skip_until(expr, i + 1, "}")
            names.update(m.group(1)[1:-1] for m in _NAME_MATCHER.finditer(matchers))
        elif c == "[":
            i, _ = _skip_until(expr, i + 1, "]")
        elif c == "$":  # an unsubstituted Grafana variable: not a metric
            var = _GRAFANA_VAR.match(expr, i)
            i = var.end() if var else i + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            number = _NUMBER.match(expr, i)
            i = number.end() if number else i + 1
        elif ident := _IDENT.match(expr, i):
            word = ident.group(0)
            i = ident.end()
            following = _next_char(expr, i)
            lower = word.lower()
            if lower in LABEL_LIST_KEYWORDS:
                if following == "(":
                    i, labels = _skip_until(expr, expr.index("(", i) + 1, ")")
                    if not _LABEL_LIST.match(labels):
                        raise PromQLSyntaxError(f"bad label list ({labels}) in {expr!r}")
            elif lower in KEYWORDS:
                pass
            elif following == "(":
                pass  # function call, or aggregation with its clause after the arguments
            elif word in AGGREGATIONS and _word_at(expr, i) in ("by", "without"):
                pass  # `sum by (...) (...)` / `sum without (...) (...)`
            else:
                names.add(word)
        else:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth < 0:
                    raise PromQLSyntaxError(f"unbalanced ')' at {i}: {expr!r}")
            i += 1  # operators, parentheses, commas, @
    if depth:
        raise PromQLSyntaxError(f"unclosed '(' in {expr!r}")
    return names


def grafana_query_expr(query: str) -> str:
    """The PromQL inside a Grafana Prometheus variable query (label_values / query_result)."""
    match = _LABEL_VALUES.match(query)
    if match:
        return match.group(1) or ""  # label_values(label) reads no particular metric
    match = _QUERY_RESULT.match(query)
    if match:
        return match.group(1)
    return query


# Values for Grafana's built-in variables when an expression is sent to Prometheus directly.
GRAFANA_BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}


def grafana_variables(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _GRAFANA_VAR.finditer(expr)}


def substitute_grafana(expr: str, values: Mapping[str, str]) -> str:
    """Replace $var, ${var}, ${var:fmt} and [[var]]; KeyError on a variable not in `values`."""

    def repl(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values[name]

    return _GRAFANA_VAR.sub(repl, expr)
