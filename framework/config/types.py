"""What every config schema shares: the strict base model and the value types with their one-line errors.

A schema holds types, ranges and allowed values, never a value: the values live in conf/. So every
field is required (`Optional` where null means something), and `extra="forbid"` turns a misspelt key
into an error. A value type fails with :func:`invalid`, whose `expected` text becomes the end of the
one-line error `framework.config.validate_config` raises (`train.epochs=0 is invalid: expected a
whole number >= 1`). Allowed values that a registry owns are given as a function returning them,
called at validation time, so importing a schema imports no registry (and no torch).
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator
from pydantic_core import PydanticCustomError


class Schema(BaseModel):
    """A config node: every key declared, no key unknown, nothing converted."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def invalid(expected: str, field: str | None = None, value: Any = None) -> PydanticCustomError:
    """The error of a bad value: `expected` says what is allowed. A model validator names the
    `field` (below the node it checks) and its `value`; a field validator names neither."""
    return PydanticCustomError("mpq_invalid", "{expected}", {"expected": expected, "field": field, "value": value})


def sentence(text: str) -> PydanticCustomError:
    """The error of a check across keys: `text` is the whole line, naming the keys itself."""
    return PydanticCustomError("mpq_sentence", "{text}", {"text": text})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(check: Callable[[Any], bool], expected: str, kind: type = object) -> Any:
    def validate(value: Any) -> Any:
        if not check(value):
            raise invalid(expected)
        return value

    return Annotated[kind, PlainValidator(validate)]


def whole(minimum: int = 0, maximum: int | None = None) -> Any:
    """A whole number (not a bool) >= `minimum` (and <= `maximum`)."""
    def ok(value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
                and (maximum is None or value <= maximum))

    expected = f"expected a whole number >= {minimum}" if maximum is None else f"expected a whole number in {minimum}-{maximum}"
    return _typed(ok, expected, int)


def number(minimum: float = 0, strict: bool = False) -> Any:
    """A number (int or float, not a bool) >= `minimum`, or > `minimum` when `strict`."""
    op = ">" if strict else ">="
    return _typed(lambda v: _is_number(v) and (v > minimum if strict else v >= minimum), f"expected a number {op} {minimum:g}",
                  float)


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Any:
    """A number in [low, high], or (low, high] with `low_open` (a fraction of a split), [low, high)
    with `high_open` (a share held out of a split)."""
    if low_open and not high_open and (low, high) == (0, 1):
        expected = "expected a fraction in (0, 1]"
    else:
        expected = f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return _typed(lambda v: _is_number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high),
                  expected, float)


def number_in(bounds: Callable[[], Sequence[float]]) -> Any:
    """A number (int or float, not a bool) in [min, max] of what `bounds()` returns (a registry's
    values, e.g. the supported bit-widths, read at validation time)."""
    def validate(value: Any) -> Any:
        values = list(bounds())
        low, high = min(values), max(values)
        if not (_is_number(value) and low <= value <= high):
            raise invalid(f"expected a number in [{low:g}, {high:g}]")
        return value

    return Annotated[float, PlainValidator(validate)]


def one_of(values: Sequence[Any] | Callable[[], Sequence[Any]]) -> Any:
    """One of `values` (or of what the function `values` returns: a registry's names)."""
    def allowed() -> Sequence[Any]:
        return values() if callable(values) else values

    def validate(value: Any) -> Any:
        names = allowed()
        if isinstance(value, bool) or value not in names:
            raise invalid(f"choose one of {', '.join(map(str, names))}")
        return value

    return Annotated[Any, PlainValidator(validate)]


def list_of(values: Callable[[], Sequence[Any]], item: str) -> Any:
    """A non-empty list of items from `values()`; `item` names one item in the error."""
    def validate(value: Any) -> Any:
        names = list(values())
        if not isinstance(value, list):
            raise invalid(f"expected a list of {item}s from {', '.join(map(str, names))}")
        unknown = [v for v in value if isinstance(v, bool) or v not in names]
        if unknown or not value:
            raise invalid(f"unknown or no {item} {unknown[:1]}; choose a list from {', '.join(map(str, names))}")
        return value

    return Annotated[list, PlainValidator(validate)]


Flag = _typed(lambda v: isinstance(v, bool), "expected true or false", bool)
Text = _typed(lambda v: isinstance(v, str) and v != "", "expected a non-empty string", str)
Mapping = _typed(lambda v: isinstance(v, dict), "expected a mapping ({key: value, ...})", dict)
Texts = _typed(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "expected a list of strings", list)
