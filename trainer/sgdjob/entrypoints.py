"""Resolve user `module:function` entry points named in a spec."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class EntryPointError(ValueError):
    """The entry point cannot be imported or is not callable; the message names it."""


def load_entry_point(ref: str, *, field: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EntryPointError(f"{field}: cannot import module {module_name!r}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EntryPointError(f"{field}: {module_name!r} has no callable {attr!r}")
    return fn
