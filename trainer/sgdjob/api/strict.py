"""The base every API object derives from: camelCase aliases, no unknown fields, immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Strict(BaseModel):
    """Base for every API object: camelCase aliases, no unknown fields, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        frozen=True,
        validate_default=True,
    )
