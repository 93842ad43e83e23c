"""A rollout's business metric: a small, safe expression language over the staging output's columns.

```
mean(converted)                              share of converted sessions (a boolean counts as 0/1)
count(status == "paid") / count()            share of paid rows
sum(amount) / count(amount > 0)              average positive amount
max(durationSeconds) - min(durationSeconds)
distinct(col("customer-id"))                 a column whose name is not an identifier
```

The result is one number. Outside an aggregate there are only numbers, aggregates, `+ - * /`,
unary minus and parentheses. Inside an aggregate an expression is evaluated per row: column names
(identifiers, or `col("any name")`), number, string and `True`/`False` literals, comparisons
(`== != < <= > >=`, chained as in Python), `and` / `or` / `not`, `+ - * /` and unary minus.

| aggregate     | value                                                                           |
|---------------|---------------------------------------------------------------------------------|
| `count()`     | rows                                                                            |
| `count(x)`    | rows where `x` is true (a condition or boolean column), else rows where `x` is not null |
| `sum(x)`      | sum of the non-null values (0 for none); booleans count as 0/1                  |
| `mean(x)`     | mean of the non-null values (no value for none); booleans count as 0/1          |
| `min(x)`, `max(x)` | smallest / largest non-null number (no value for none)                     |
| `distinct(x)` | number of distinct non-null values (any type)                                   |

Nulls: comparisons and arithmetic with a null give null, which a condition treats as not true.
Dividing by zero (per row or between aggregates) gives no value; so does an aggregate of nothing.
A metric with no value does not hold, whatever its baseline.

The text is parsed with Python's `ast` and only the node types above are accepted: nothing is ever
evaluated by Python, and attributes, subscripts, keyword arguments, other functions or operators are
refused by `parse_metric` with a `ValueError` saying what and where.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

AGGREGATES = ("count", "sum", "mean", "min", "max", "distinct")
#: Longest accepted expression, and the deepest nesting of its operations.
MAX_LENGTH = 2000
MAX_DEPTH = 64

_FUNCTIONS_TEXT = 'count, sum, mean, min, max or distinct (and col("name") inside them)'
_COMPARE: dict[type, tuple[str, Callable[..., Any]]] = {
    ast.Eq: ("==", pc.equal),
    ast.NotEq: ("!=", pc.not_equal),
    ast.Lt: ("<", pc.less),
    ast.LtE: ("<=", pc.less_equal),
    ast.Gt: (">", pc.greater),
    ast.GtE: (">=", pc.greater_equal),
}
_ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_OPERATOR_NAMES = {
    ast.Mod: "%",
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Invert: "~",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}

# Static kinds of row expressions: what a literal or operation is known to give before any data.
NUMBER, BOOL, STRING, COLUMN = "number", "boolean", "string", "column"

Value: TypeAlias = pa.Array | pa.Scalar


class _Unavailable(Exception):
    """The metric has no value (division by zero, an aggregate of nothing)."""


# --- row expressions (inside an aggregate) ---------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    text: str
    kind: str

    def values(self, table: pa.Table) -> Value:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class _Column(_Row):
    name: str

    def values(self, table: pa.Table) -> Value:
        array = table.column(self.name).combine_chunks()
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        return array


@dataclass(frozen=True)
class _Literal(_Row):
    value: bool | int | float | str

    def values(self, table: pa.Table) -> Value:
        if isinstance(self.value, int) and not isinstance(self.value, bool):
            if not -(2**63) <= self.value < 2**63:
                return pa.scalar(float(self.value), pa.float64())
        return pa.scalar(self.value)


@dataclass(frozen=True)
class _Compare(_Row):
    op: str
    function: Callable[..., Any]
    left: _Row
    right: _Row

    def values(self, table: pa.Table) -> Value:
        left, right = self.left.values(table), self.right.values(table)
        try:
            return self.function(*_comparable(left, right))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
            raise ValueError(
                f"cannot compare {self.left.text} ({left.type}) with {self.right.text} ({right.type})"
            ) from None


@dataclass(frozen=True)
class _Logic(_Row):
    op: str  # "and" | "or"
    operands: tuple[_Row, ...]

    def values(self, table: pa.Table) -> Value:
        function = pc.and_kleene if self.op == "and" else pc.or_kleene
        result = _condition(self.operands[0], table, self.op)
        for operand in self.operands[1:]:
            result = function(result, _condition(operand, table, self.op))
        return result


@dataclass(frozen=True)
class _Not(_Row):
    operand: _Row

    def values(self, table: pa.Table) -> Value:
        return pc.invert(_condition(self.operand, table, "not"))


@dataclass(frozen=True)
class _Arithmetic(_Row):
    op: str
    left: _Row
    right: _Row

    def values(self, table: pa.Table) -> Value:
        left = _as_float(self.left, self.left.values(table), self.op)
        right = _as_float(self.right, self.right.values(table), self.op)
        if self.op == "+":
            return pc.add(left, right)
        if self.op == "-":
            return pc.subtract(left, right)
        if self.op == "*":
            return pc.multiply(left, right)
        # Division by zero gives null (no value for that row), not infinity.
        divisor = pc.if_else(pc.equal(right, 0.0), pa.scalar(None, pa.float64()), right)
        return pc.divide(left, divisor)


@dataclass(frozen=True)
class _Negative(_Row):
    operand: _Row

    def values(self, table: pa.Table) -> Value:
        return pc.negate(_as_float(self.operand, self.operand.values(table), "-"))


def _comparable(left: Value, right: Value) -> tuple[Value, Value]:
    """A boolean compared with a number compares as 0/1, as it counts everywhere in the language."""
    if pa.types.is_boolean(left.type) and _is_number_type(right.type) and not pa.types.is_boolean(right.type):
        left = pc.cast(left, pa.int64())
    if pa.types.is_boolean(right.type) and _is_number_type(left.type) and not pa.types.is_boolean(left.type):
        right = pc.cast(right, pa.int64())
    return left, right


def _is_number_type(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_boolean(data_type)
        or pa.types.is_decimal(data_type)
        or pa.types.is_null(data_type)
    )


def _as_float(node: _Row, value: Value, op: str) -> Value:
    if not _is_number_type(value.type):
        raise ValueError(f"{op} needs numbers: {node.text} is {value.type}")
    return pc.cast(value, pa.float64())


def _condition(node: _Row, table: pa.Table, op: str) -> Value:
    value = node.values(table)
    if pa.types.is_null(value.type):
        return pc.cast(value, pa.bool_())
    if not pa.types.is_boolean(value.type):
        raise ValueError(f"`{op}` needs conditions: {node.text} is {value.type}, not a boolean")
    return value


def _array(value: Value, rows: int) -> pa.Array:
    return pa.repeat(value, rows) if isinstance(value, pa.Scalar) else value


# --- scalar expressions (the metric) ---------------------------------------------------------------


@dataclass(frozen=True)
class _Scalar:
    text: str

    def value(self, table: pa.Table) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class _Number(_Scalar):
    number: float

    def value(self, table: pa.Table) -> float:
        return self.number


@dataclass(frozen=True)
class _Aggregate(_Scalar):
    function: str
    argument: _Row | None

    def value(self, table: pa.Table) -> float:
        rows = table.num_rows
        if self.argument is None:  # count()
            return float(rows)
        values = _array(self.argument.values(table), rows)
        if self.function == "distinct":
            return float(pc.count_distinct(values, mode="only_valid").as_py())
        if self.function == "count":
            if pa.types.is_boolean(values.type):
                return float(pc.sum(pc.cast(values, pa.int64()), min_count=0).as_py())
            return float(len(values) - values.null_count)
        if not _is_number_type(values.type):
            raise ValueError(f"{self.text}: {self.argument.text} is {values.type}, not a number")
        numbers = pc.cast(values, pa.int64() if pa.types.is_boolean(values.type) else pa.float64())
        if self.function == "sum":
            result = pc.sum(numbers, min_count=0).as_py()
        elif self.function == "mean":
            result = pc.mean(numbers).as_py()
        elif self.function == "min":
            result = pc.min(numbers).as_py()
        else:
            result = pc.max(numbers).as_py()
        if result is None:
            raise _Unavailable(f"{self.text} has no values")
        return float(result)


@dataclass(frozen=True)
class _ScalarArithmetic(_Scalar):
    op: str
    left: _Scalar
    right: _Scalar

    def value(self, table: pa.Table) -> float:
        left, right = self.left.value(table), self.right.value(table)
        if self.op == "+":
            return left + right
        if self.op == "-":
            return left - right
        if self.op == "*":
            return left * right
        if right == 0:
            raise _Unavailable(f"{self.text} divides by zero")
        return left / right


@dataclass(frozen=True)
class _ScalarNegative(_Scalar):
    operand: _Scalar

    def value(self, table: pa.Table) -> float:
        return -self.operand.value(table)


# --- the metric ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A parsed business metric; `columns` are the column names it reads, in order of appearance."""

    expression: str
    columns: tuple[str, ...]
    _root: _Scalar

    def evaluate(self, table: pa.Table) -> float | None:
        """The metric over `table`; None when it has no value (division by zero, an aggregate of
        nothing, a non-finite result). `ValueError` naming a column the table does not have, or
        an operation its column types do not allow."""
        missing = [name for name in self.columns if name not in table.column_names]
        if missing:
            raise ValueError(
                f"unknown column {missing[0]!r} in {self.expression!r}: the table has "
                f"{', '.join(table.column_names) or 'no columns'}"
            )
        try:
            result = self._root.value(table)
        except _Unavailable:
            return None
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            raise ValueError(f"cannot evaluate {self.expression!r}: {exc}") from None
        return result if math.isfinite(result) else None

    def explain_unavailable(self, table: pa.Table) -> str | None:
        """Why the metric has no value over `table` (None when it has one)."""
        try:
            result = self._root.value(table)
        except _Unavailable as exc:
            return str(exc)
        return None if math.isfinite(result) else "the result is not a finite number"


def parse_metric(expression: str) -> Metric:
    """Parse and check a business metric; `ValueError` saying what is wrong and where."""
    if not isinstance(expression, str):
        raise ValueError("the expression must be text")
    text = expression.strip()
    if not text:
        raise ValueError("the expression is empty")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise ValueError(f"not a valid expression{where}: {exc.msg}") from None
    except ValueError as exc:  # e.g. a NUL character
        raise ValueError(f"not a valid expression: {exc}") from None
    except (RecursionError, MemoryError):
        raise ValueError("the expression is nested too deeply") from None
    parser = _Parser(text)
    root = parser.scalar(tree.body, 0)
    return Metric(expression=text, columns=tuple(dict.fromkeys(parser.columns)), _root=root)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.columns: list[str] = []

    def _show(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ast.unparse(node)

    def _where(self, node: ast.AST) -> str:
        offset = getattr(node, "col_offset", None)
        return "" if offset is None else f" (at column {offset + 1})"

    def _fail(self, node: ast.AST, message: str) -> ValueError:
        return ValueError(f"{message}{self._where(node)}")

    def _depth(self, node: ast.AST, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise self._fail(node, f"the expression is nested more than {MAX_DEPTH} levels deep")
        return depth + 1

    def _refuse(self, node: ast.AST) -> ValueError:
        if isinstance(node, ast.Attribute):
            return self._fail(node, f"attributes are not allowed ({self._show(node)})")
        if isinstance(node, ast.Subscript):
            return self._fail(node, f"subscripts are not allowed ({self._show(node)})")
        if isinstance(node, ast.BinOp | ast.UnaryOp):
            symbol = _OPERATOR_NAMES.get(type(node.op), type(node.op).__name__)
            return self._fail(node, f"operator {symbol} is not supported: use + - * / and not")
        if isinstance(node, ast.Constant):
            return self._fail(
                node, f"literal {node.value!r} is not supported: use numbers, strings, True or False"
            )
        return self._fail(node, f"{self._show(node)!r} is not allowed in a business metric")

    # -- the metric: numbers, aggregates and arithmetic between them -----------------------------

    def scalar(self, node: ast.AST, depth: int) -> _Scalar:
        depth = self._depth(node, depth)
        text = self._show(node)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise self._fail(
                    node, f"{text} is not a number: the metric must be a number (compare inside an aggregate)"
                )
            return _Number(text, float(node.value))
        if isinstance(node, ast.Name):
            raise self._fail(
                node,
                f"column {node.id!r} must be inside an aggregate: {_FUNCTIONS_TEXT}, e.g. mean({node.id})",
            )
        if isinstance(node, ast.Call):
            name = self._function_name(node)
            if name == "col":
                raise self._fail(node, f"column {text} must be inside an aggregate: {_FUNCTIONS_TEXT}")
            return self._aggregate(node, name, depth)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ScalarArithmetic(
                text,
                _ARITHMETIC[type(node.op)],
                self.scalar(node.left, depth),
                self.scalar(node.right, depth),
            )
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self.scalar(node.operand, depth)
            return _ScalarNegative(text, operand) if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Compare | ast.BoolOp) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
        ):
            raise self._fail(
                node,
                f"{text} is a condition, not a number: put it inside count(...) or mean(...)",
            )
        raise self._refuse(node)

    def _function_name(self, node: ast.Call) -> str:
        if not isinstance(node.func, ast.Name):
            raise self._fail(node, f"only the functions {_FUNCTIONS_TEXT} can be called")
        name = node.func.id
        if name not in AGGREGATES and name != "col":
            raise self._fail(node, f"unknown function {name}(): use {_FUNCTIONS_TEXT}")
        if node.keywords:
            raise self._fail(node, f"{name}() takes no keyword arguments")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise self._fail(node, f"{name}() takes no *arguments")
        return name

    def _aggregate(self, node: ast.Call, name: str, depth: int) -> _Aggregate:
        text = self._show(node)
        if name == "count" and not node.args:
            return _Aggregate(text, name, None)
        if len(node.args) != 1:
            expected = "no argument or one" if name == "count" else "exactly one argument"
            raise self._fail(node, f"{name}() takes {expected}, got {len(node.args)}")
        argument = self.row(node.args[0], depth)
        if argument.kind == STRING and name in ("sum", "mean", "min", "max"):
            raise self._fail(node, f"{name}() needs numbers, not the string {argument.text}")
        return _Aggregate(text, name, argument)

    # -- per-row expressions, inside an aggregate -------------------------------------------------

    def row(self, node: ast.AST, depth: int) -> _Row:
        depth = self._depth(node, depth)
        text = self._show(node)
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                return _Literal(text, BOOL, value)
            if isinstance(value, int | float):
                return _Literal(text, NUMBER, value)
            if isinstance(value, str):
                return _Literal(text, STRING, value)
            raise self._refuse(node)
        if isinstance(node, ast.Name):
            self.columns.append(node.id)
            return _Column(text, COLUMN, node.id)
        if isinstance(node, ast.Call):
            name = self._function_name(node)
            if name != "col":
                raise self._fail(node, f"aggregates cannot be nested: {text} is inside another aggregate")
            if len(node.args) != 1 or not (
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            ):
                raise self._fail(node, 'col() takes one string: the column name, e.g. col("order-total")')
            column = node.args[0].value
            if not column:
                raise self._fail(node, "col() needs a non-empty column name")
            self.columns.append(column)
            return _Column(text, COLUMN, column)
        if isinstance(node, ast.Compare):
            return self._compare(node, depth)
        if isinstance(node, ast.BoolOp):
            op = "and" if isinstance(node.op, ast.And) else "or"
            operands = tuple(self.row(value, depth) for value in node.values)
            for operand in operands:
                if operand.kind not in (BOOL, COLUMN):
                    raise self._fail(node, f"`{op}` needs conditions: {operand.text} is a {operand.kind}")
            return _Logic(text, BOOL, op, operands)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                operand = self.row(node.operand, depth)
                if operand.kind not in (BOOL, COLUMN):
                    raise self._fail(node, f"`not` needs a condition: {operand.text} is a {operand.kind}")
                return _Not(text, BOOL, operand)
            if isinstance(node.op, ast.USub | ast.UAdd):
                operand = self.row(node.operand, depth)
                self._numeric(node, operand, "-")
                return _Negative(text, NUMBER, operand) if isinstance(node.op, ast.USub) else operand
            raise self._refuse(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            op = _ARITHMETIC[type(node.op)]
            left, right = self.row(node.left, depth), self.row(node.right, depth)
            self._numeric(node, left, op)
            self._numeric(node, right, op)
            return _Arithmetic(text, NUMBER, op, left, right)
        raise self._refuse(node)

    def _numeric(self, node: ast.AST, operand: _Row, op: str) -> None:
        if operand.kind not in (NUMBER, COLUMN):
            raise self._fail(node, f"{op} needs numbers: {operand.text} is a {operand.kind}")

    def _compare(self, node: ast.Compare, depth: int) -> _Row:
        operands = [self.row(node.left, depth)] + [self.row(c, depth) for c in node.comparators]
        pairs: list[_Row] = []
        for op_node, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if type(op_node) not in _COMPARE:
                symbol = _OPERATOR_NAMES.get(type(op_node), type(op_node).__name__)
                raise self._fail(node, f"comparison {symbol} is not supported: use == != < <= > >=")
            kinds = {left.kind, right.kind} - {COLUMN}
            if len(kinds) == 2 and STRING in kinds:
                raise self._fail(node, f"cannot compare {left.text} with {right.text}: a string and a number")
            op, function = _COMPARE[type(op_node)]
            pairs.append(_Compare(f"{left.text} {op} {right.text}", BOOL, op, function, left, right))
        if len(pairs) == 1:
            return pairs[0]
        return _Logic(self._show(node), BOOL, "and", tuple(pairs))
