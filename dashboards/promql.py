"""A small PromQL lexer for two questions the live checks ask of an expression, without a full parser:

* ``metric_names(expr)``: which metric names it selects (so a check can compare them with what the exporters export);
* ``probes(expr)``: the parts of an alert expression that must return data in a healthy run. An alert's expression
  is a condition (``x > 0.05``, ``a > 100 and b > 0``, ``absent(m)``) that is false — empty — when all is well, so
  returning nothing proves nothing. Its probes are the operands of every top-level comparison and set operator
  (``and``/``or``/``unless``), numeric literals dropped, and the argument of ``absent``/``absent_over_time``; each
  is an ordinary query that does return data when the metrics behind the alert exist. PromQL's precedence makes this
  split exact: comparisons bind looser than arithmetic, and set operators looser than comparisons, so cutting the
  expression at those operators outside any parentheses yields whole sub-expressions.
"""
from __future__ import annotations

import re
from typing import NamedTuple

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<dur>(?:\d+(?:ms|[smhdwy]))+\b)
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=,@])
  | (?P<open>[(\[{])
  | (?P<close>[)\]}])
""", re.VERBOSE)

AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile"})
# keywords followed by a parenthesised list of label names, not of expressions
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
SET_OPERATORS = frozenset({"and", "or", "unless"})
KEYWORDS = AGGREGATIONS | LABEL_LISTS | SET_OPERATORS | {"bool", "offset", "atan2", "inf", "nan"}
COMPARISONS = frozenset({"==", "!=", ">", "<", ">=", "<="})
_ABSENT = re.compile(r"^\s*(?:absent|absent_over_time)\s*\((.*)\)\s*$", re.DOTALL)


class Token(NamedTuple):
    kind: str
    text: str
    start: int
    end: int


def tokens(expr: str) -> list[Token]:
    out: list[Token] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        if match.lastgroup != "ws":
            out.append(Token(match.lastgroup, match.group(), match.start(), match.end()))
        pos = match.end()
    return out


def _closing(toks: list[Token], index: int) -> int:
    """Index of the token closing the bracket opened at ``index``."""
    depth = 0
    for i in range(index, len(toks)):
        if toks[i].kind == "open":
            depth += 1
        elif toks[i].kind == "close":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced brackets in PromQL expression")


def metric_names(expr: str) -> set[str]:
    """Metric names the expression selects: bare identifiers that are not functions, keywords or label names,
    plus ``{__name__="..."}`` matchers."""
    toks = tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(toks):
        tok = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else None
        if tok.kind == "open" and tok.text == "{":
            end = _closing(toks, i)
            inner = toks[i + 1:end]
            for j in range(len(inner) - 2):
                if inner[j].text == "__name__" and inner[j + 1].text == "=" and inner[j + 2].kind == "str":
                    names.add(inner[j + 2].text[1:-1])
            i = end + 1
            continue
        if tok.kind == "open" and tok.text == "[":
            i = _closing(toks, i) + 1  # range or subquery resolution: durations only
            continue
        if tok.kind == "ident":
            word = tok.text.lower()
            if word in LABEL_LISTS and following is not None and following.text == "(":
                i = _closing(toks, i + 1) + 1
                continue
            is_call = following is not None and following.text == "("
            if word not in KEYWORDS and not is_call:
                names.add(tok.text)
        i += 1
    return names


def _split_top_level(expr: str, toks: list[Token], operators: frozenset[str]) -> list[str]:
    """Cut ``expr`` at the given operators where they stand outside every bracket."""
    parts: list[str] = []
    depth = 0
    start = 0
    for tok in toks:
        if tok.kind == "open":
            depth += 1
        elif tok.kind == "close":
            depth -= 1
        elif depth == 0 and (tok.text.lower() if tok.kind == "ident" else tok.text) in operators:
            parts.append(expr[start:tok.start])
            start = tok.end
    parts.append(expr[start:])
    return parts


def _strip_modifiers(operand: str) -> str:
    """Drop a leading ``bool`` and vector-matching clauses (``on (a)``, ``group_left (b)``) left by a cut."""
    toks = tokens(operand)
    i = 0
    while i < len(toks) and toks[i].kind == "ident" and toks[i].text.lower() in LABEL_LISTS | {"bool"}:
        if i + 1 < len(toks) and toks[i + 1].text == "(" and toks[i].text.lower() != "bool":
            i = _closing(toks, i + 1) + 1
        else:
            i += 1
    return operand[toks[i].start:].strip() if i < len(toks) else ""


def _is_number(operand: str) -> bool:
    toks = tokens(operand)
    return bool(toks) and all(t.kind == "num" or t.text in "+-" or t.text.lower() in ("inf", "nan") for t in toks)


def probes(expr: str) -> list[str]:
    """Sub-expressions that must each return data for the metrics behind ``expr`` to be there (see module doc).

    An expression without a top-level comparison, set operator or ``absent`` is its own only probe.
    """
    out: list[str] = []
    for part in _split_top_level(expr, tokens(expr), SET_OPERATORS):
        for operand in _split_top_level(part, tokens(part), COMPARISONS):
            operand = _strip_modifiers(operand.strip())
            if not operand or _is_number(operand):
                continue
            toks = tokens(operand)
            absent = _ABSENT.match(operand)
            if absent and _closing(toks, 1) == len(toks) - 1:
                operand = absent.group(1).strip()
                # absent_over_time(m[5m]): the probe is the selector itself
                operand = re.sub(r"\[[^\]]*\]\s*$", "", operand).strip()
            elif toks[0].text == "(" and _closing(toks, 0) == len(toks) - 1:
                inner = probes(operand[toks[0].end:toks[-1].start])  # "(a > 1) or ...": a condition in brackets
                out.extend(p for p in inner if p not in out)
                continue
            if operand not in out:
                out.append(operand)
    return out
