"""Dates and partition names, parsed in one place for the jobs, the trainer and the DAG.

A partition of a feature table is ``dt=<name>``; the name is a day ``YYYY-MM-DD`` for the
daily tables and a split name (``train``, ``test``) for an ingested Ali-CCP table.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["DateError", "day_range", "parse_day", "parse_partitions"]

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class DateError(ValueError):
    """A date or a list of partitions that does not parse; the message names the option."""


def parse_day(value: str, option: str = "date") -> dt.date:
    """``YYYY-MM-DD`` → date; :class:`DateError` naming ``option`` otherwise.

    Example:
        >>> parse_day("2026-01-31")
        datetime.date(2026, 1, 31)
        >>> parse_day("2026-02-30", "--date")
        Traceback (most recent call last):
        ...
        contract.dates.DateError: --date '2026-02-30' is not a date of the form YYYY-MM-DD
    """
    text = str(value).strip()
    try:
        if not _DAY.match(text):
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        raise DateError(f"{option} '{value}' is not a date of the form YYYY-MM-DD") from None


def day_range(start: dt.date, end: dt.date) -> list[str]:
    """Every day from ``start`` to ``end`` inclusive, as ``YYYY-MM-DD`` strings.

    Example:
        >>> day_range(dt.date(2026, 1, 30), dt.date(2026, 2, 1))
        ['2026-01-30', '2026-01-31', '2026-02-01']
    """
    if end < start:
        raise DateError(f"the range ends ({end}) before it starts ({start})")
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def parse_partitions(spec: str, option: str = "partitions") -> list[str]:
    """Partition names from ``A..B`` (an inclusive range of days), ``A,B,C`` or ``A``.

    Items that look like days must be valid days; other names (``train``, ``test``) are
    taken as they are when listed.

    Example:
        >>> parse_partitions("2026-01-30..2026-02-01")
        ['2026-01-30', '2026-01-31', '2026-02-01']
        >>> parse_partitions("train, test")
        ['train', 'test']
    """
    text = spec.strip()
    if ".." in text:
        start_text, _, end_text = text.partition("..")
        try:
            start, end = parse_day(start_text, option), parse_day(end_text, option)
        except DateError:
            raise DateError(
                f"{option} '{spec}' is not a range of the form YYYY-MM-DD..YYYY-MM-DD"
            ) from None
        if end < start:
            raise DateError(f"{option} '{spec}': the end is before the start")
        return day_range(start, end)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise DateError(f"{option}: empty list of partitions")
    for part in parts:
        if re.match(r"^\d{4}-\d", part):
            parse_day(part, option)
    return parts
