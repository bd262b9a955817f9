"""The shape a Mosaic event must have before it is stored: what jsonb and the steps can take.

`json.loads` reads `1e400` as infinity (jsonb refuses it: a 5xx) and accepts any type for any
key, so numbers are checked while parsing and the keys the service reads are checked after.
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.input_text import RUN_ID_PATTERN

_RUN_ID = re.compile(RUN_ID_PATTERN)
# Keys the service reads as lists of nodes (RUN_FINISHED and RUN_PROGRESS, docs/mosaic.md).
NODE_LISTS = ("nodes", "updated_nodes")


def finite_float(text: str) -> float:
    """A `parse_float` for json.loads that refuses numbers outside a double's range."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def shape_problem(payload: dict[str, Any]) -> str | None:
    """What is wrong with a parsed event's shape, or None."""
    run_id = payload.get("run_id")
    if isinstance(run_id, str) and not _RUN_ID.match(run_id):
        return "`run_id` must be letters, digits and . _ ~ : - (not starting with a dot)."
    for key in NODE_LISTS:
        nodes = payload.get(key)
        if nodes is not None and not isinstance(nodes, list):
            return f"`{key}` must be a list."
    return None
