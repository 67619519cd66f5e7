"""The SGDJob API: types (``types``), defaults (``defaults``), validation (``validation``).

This package is the single source of truth for the spec; ``crds/`` is generated from it.
It imports neither torch nor zmq (an import-linter contract checks that).
"""

from sgdjob.api.types import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAME,
    SGDJob,
    SGDJobSpec,
)
from sgdjob.api.validation import SpecError, load_job, parse_job

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "SGDJob",
    "SGDJobSpec",
    "SpecError",
    "load_job",
    "parse_job",
]
