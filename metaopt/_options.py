"""Validated hyper-parameters: one check per kind of value, run by the constructor and by every
later assignment (``opt.outer_lr = 2.0`` raises at once, before anything can move)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from .aggregation._validate import check_beta, check_reduction

T = TypeVar("T")

Check = Callable[[Any, str, str], T]


class Option(Generic[T]):
    """A hyper-parameter attribute whose every assignment is validated by ``check``.

    ``check(value, name, owner_class_name)`` returns the normalised value or raises
    ``TypeError``/``ValueError`` naming the option; the stored value is unchanged on error.

    Example:
        >>> class Opt:
        ...     lr = Option(fraction)
        ...     def __init__(self, lr: float) -> None:
        ...         self.lr = lr
        >>> o = Opt(0.5)
        >>> o.lr = 2.0
        Traceback (most recent call last):
        ...
        ValueError: Opt: lr must be in [0, 1], got 2.0
        >>> o.lr
        0.5
    """

    def __init__(self, check: Check[T]) -> None:
        self.check = check
        self.name = ""
        self.slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_option_" + name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Option[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> Option[T] | T:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.slot]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self.slot] = self.check(value, self.name, type(obj).__name__)


def _number(value: Any, name: str, where: str, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be {kind}, got {value!r}")
    return float(value)


def fraction(value: Any, name: str, where: str) -> float:
    """A number in [0, 1] (NaN rejected)."""
    v = _number(value, name, where, "a number in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1], got {value}")
    return v


def optional_fraction(value: Any, name: str, where: str) -> float | None:
    return None if value is None else fraction(value, name, where)


def non_negative(value: Any, name: str, where: str) -> float:
    """A finite number >= 0."""
    v = _number(value, name, where, "a finite number >= 0")
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value}")
    return v


def optional_positive(value: Any, name: str, where: str) -> float | None:
    """``None`` or a finite number > 0."""
    if value is None:
        return None
    v = _number(value, name, where, "a finite number > 0 or None")
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"{where}: {name} must be a finite number > 0 or None, got {value}")
    return v


def positive_int(value: Any, name: str, where: str) -> int:
    """An int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {value}")
    return int(value)


def optional_positive_int(value: Any, name: str, where: str) -> int | None:
    return None if value is None else positive_int(value, name, where)


def flag(value: Any, name: str, where: str) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be True or False, got {value!r}")
    return value


def reduction(value: Any, name: str, where: str) -> str:
    """``"sum"`` or ``"mean"`` (the aggregation layer's check)."""
    check_reduction(value, where)
    return str(value)


def beta(value: Any, name: str, where: str) -> float:
    """An EMA rate in [0, 1] (the aggregation layer's check)."""
    return check_beta(value, where)
