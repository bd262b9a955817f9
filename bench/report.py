"""Plain-text tables: what, baseline, measured, ratio."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Row:
    what: str
    baseline: str
    measured: str
    ratio: str


def ratio(measured: float, baseline: float) -> str:
    if baseline <= 0:
        return "n/a"
    return f"{measured / baseline:.2f}x"


def table(title: str, rows: Sequence[Row], *, baseline: str, measured: str) -> str:
    header = Row("what", baseline, measured, "ratio")
    cells = [header, *rows]
    widths = [
        max(len(getattr(row, name)) for row in cells)
        for name in ("what", "baseline", "measured", "ratio")
    ]

    def line(row: Row) -> str:
        return (
            f"  {row.what:<{widths[0]}}  {row.baseline:>{widths[1]}}  "
            f"{row.measured:>{widths[2]}}  {row.ratio:>{widths[3]}}"
        )

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([title, line(header), rule, *(line(row) for row in rows)])
