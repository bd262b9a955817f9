"""Text from callers that PostgreSQL can store: no NUL characters, no lone surrogates.

Anything else would pass pydantic and then fail in the database as a 5xx; refused here it is a
422 that names the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text") from exc
    return value


StorableStr = Annotated[str, AfterValidator(storable)]


# Mosaic's run ids are UUIDs; anything beyond this set could be read as more than one path
# segment (`.`, `..`, `/`) by Mosaic or a proxy in between, so it is refused at the edge.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._~:-]{0,199}$"
