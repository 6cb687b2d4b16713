"""Argument checks shared by the package: one test, one wording, for every integer and timeout field.

Each check raises `ValueError` naming the field, the value and what was
expected (`"num_pages must be a positive int, got 0"`), and returns the value
normalized: a numpy integer comes back as the Python int it holds, so that
nothing downstream (shapes, `repr`-based fingerprints, JSON metrics) sees a
numpy scalar. A bool is never an int here, though Python says it is one.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np


def check_int(field: str, value, *, minimum: int | None = None, expected: str = "an int") -> int:
    """`value` as a Python int: an int or numpy integer (not a bool) of at least `minimum`.

    `expected` completes the message, "`field` must be `expected`, got `value`";
    say the bound in it when there is one ("an int >= 2 (page 0 is the null page)").
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field} must be {expected}, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{field} must be {expected}, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise ValueError(f"{field} must be {expected}, got {value!r}")
    return n


def check_positive_int(field: str, value) -> int:
    """`value` as a Python int >= 1; else ValueError "`field` must be a positive int, got `value`"."""
    return check_int(field, value, minimum=1, expected="a positive int")


def check_non_negative_int(field: str, value) -> int:
    """`value` as a Python int >= 0; else ValueError "`field` must be a non-negative int, got `value`"."""
    return check_int(field, value, minimum=0, expected="a non-negative int")


def check_positive_seconds(field: str, value) -> float:
    """`value` as a float > 0 (inf allowed, NaN not); else ValueError "`field` must be a positive number of seconds"."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"{field} must be a positive number of seconds, got {value!r}")
    return float(value)
