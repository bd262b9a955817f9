"""Wall-clock time, written the way Mosaic's documents write it."""

import calendar
from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    # Mosaic's examples use UTC with milliseconds and a `Z` suffix ("2026-03-01T00:00:00.000Z").
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def one_month_after(moment: datetime) -> datetime:
    """The same day of the next month, clamped to that month's last day (Jan 31 → Feb 28)."""
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)
