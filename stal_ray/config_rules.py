"""Settings' values and rules: YAML values coerced to the dataclasses' annotated types, how a type and a value
are shown in an error, and the reusable rules (a choice, a range, a list) that stal_ray.config's table applies
to each setting. Nothing here knows a setting by name."""

import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


class WrongType(Exception):
    pass


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any) -> Any:
    """value as the annotated type tp, or WrongType; YAML lists become lists or tuples as declared."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise WrongType
        if origin is list:
            return [coerce(v, args[0]) for v in value]
        if len(value) != len(args):
            raise WrongType
        return tuple(coerce(v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise WrongType
    if tp is int:
        if isinstance(value, bool):
            raise WrongType
        if isinstance(value, int):
            return value
        number = _number(value)
        if number is not None and number.is_integer():  # 1.5e+5 from YAML
            return int(number)
        raise WrongType
    if tp is float:
        if isinstance(value, bool):
            raise WrongType
        number = _number(value)
        if number is None:
            raise WrongType
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise WrongType
    raise TypeError(f"no coercion for {tp}")


def _number(value: Any) -> float | None:
    """A finite float from a number or a numeric string (PyYAML reads 1e-3 as a string), else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{describe(inner)} or null"
    if origin is list:
        return {int: "a list of integers", float: "a list of numbers"}.get(args[0], f"a list of {args[0]}")
    if origin is tuple:
        return f"a list of {len(args)} numbers [low, high]"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value



Rule = Callable[[Any], str | None]  # returns why the value is invalid, or None


def one_of(choices: Sequence) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def int_at_least(low: int) -> Rule:
    return lambda v: None if v >= low else f"must be an integer >= {low}"


def at_least(low: float) -> Rule:
    return lambda v: None if v >= low else f"must be a number >= {low}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be a number > 0"


def interval(low: float, high: float, closed_low: bool, closed_high: bool) -> Rule:
    shown = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"

    def rule(v):
        ok = (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high)
        return None if ok else f"must be a number in {shown}"
    return rule


def path_or_null(v: str | None) -> str | None:
    return None if v is None or v.strip() else "must be a non-empty path or URL, or null"


def search_range(low_exclusive: bool) -> Rule:
    def rule(v):
        low, high = v
        ok = (low > 0 if low_exclusive else low >= 0) and low < high
        return None if ok else f"must be [low, high] with {'0 <' if low_exclusive else '0 <='} low < high"
    return rule


def nonempty_list(item: Rule, what: str) -> Rule:
    return lambda v: None if v and all(item(x) is None for x in v) else f"must be a non-empty list of {what}"


def increasing(v: list[int]) -> str | None:
    ok = all(x >= 1 for x in v) and all(a < b for a, b in zip(v, v[1:], strict=False))
    return None if ok else "must be a list of increasing integers >= 1 (iterations), e.g. [4000, 7000]"
