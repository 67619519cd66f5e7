"""Kubernetes resource quantities, parsed as the API server parses them (``resource.Quantity``).

Accepted: an integer (``2``, as YAML/JSON numbers too), a decimal (``0.5``, ``.5``, ``1.``),
optionally signed, followed by nothing, a decimal SI suffix (``n u m k M G T P E``), a binary
SI suffix (``Ki Mi Gi Ti Pi Ei``) or a decimal exponent (``1e3``, ``2E-2``). A YAML float
(``cpu: .5``) is kept as its string, because the CRD types these fields
``x-kubernetes-int-or-string``. Requests and limits must not be negative (pod validation).
"""

from __future__ import annotations

import re
from decimal import Decimal

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SUFFIX = r"(?P<suffix>[eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?"
QUANTITY_RE = re.compile(rf"^(?P<number>{_NUMBER}){_SUFFIX}$")
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


class QuantityError(ValueError):
    """Not a Kubernetes quantity; the message says why."""


def normalise(value: object) -> object:
    """A YAML float becomes its decimal string (``0.5`` -> ``"0.5"``); anything else as is."""
    if isinstance(value, float) and not isinstance(value, bool):
        return repr(value)
    return value


def parse_quantity(value: int | str) -> Decimal:
    """The quantity's value (``"500m"`` -> 0.5, ``"1Ki"`` -> 1024)."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a Kubernetes quantity")
    if isinstance(value, int):
        return Decimal(value)
    m = QUANTITY_RE.match(value)
    if not m:
        raise QuantityError(
            f"{value!r} is not a Kubernetes quantity (e.g. 2, 0.5, 500m, 1e3, 512Mi)"
        )
    number, suffix = Decimal(m["number"]), m["suffix"] or ""
    if suffix in _BINARY:
        return number * (Decimal(2) ** _BINARY[suffix])
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_DECIMAL[suffix])
