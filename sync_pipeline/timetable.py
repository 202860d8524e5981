"""When the schedules run: the cron strings Dagster runs them on, and the same times for what a
tick checks and for the next-probe search. All come from one list of local times per day, so the
schedule Dagster shows and what a tick decides cannot disagree.

Daytime imports run at `start` and every `every_minutes` after it, up to and including `end`, on
the set days; the nightly jobs once a day. Times are wall-clock times in the settings' time zone
(Dagster's `execution_timezone`). When the clock skips a time (daylight saving starts), Dagster
runs a daily schedule at the end of the gap instead, so a tick there counts for the skipped time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sync_pipeline.settings import WEEKDAYS, ImportWindow

# cron numbers the days of the week from Sunday.
_CRON_DAY = {day: (i + 1) % 7 for i, day in enumerate(WEEKDAYS)}


def import_times(window: ImportWindow) -> list[time]:
    """The local times of day an import runs at."""
    first = window.start.hour * 60 + window.start.minute
    last = window.end.hour * 60 + window.end.minute
    return [time(m // 60, m % 60) for m in range(first, last + 1, window.every_minutes)]


def import_crons(window: ImportWindow) -> list[str]:
    """Cron strings that run exactly at `import_times` on the window's days: one per set of
    hours that share their minutes (07:00-19:00 every 15 minutes: `0 7-19`, `15,30,45 7-18`)."""
    hours_by_minute: dict[int, list[int]] = {}
    for at in import_times(window):
        hours_by_minute.setdefault(at.minute, []).append(at.hour)
    minutes_by_hours: dict[tuple[int, ...], list[int]] = {}
    for minute, hours in sorted(hours_by_minute.items()):
        minutes_by_hours.setdefault(tuple(hours), []).append(minute)
    days = "*" if len(window.days) == 7 else _cron_field(_CRON_DAY[d] for d in window.days)
    return [
        f"{_cron_field(minutes)} {_cron_field(hours)} * * {days}"
        for hours, minutes in minutes_by_hours.items()
    ]


def daily_cron(at: time) -> str:
    return f"{at.minute} {at.hour} * * *"


def _cron_field(values: Iterable[int]) -> str:
    """Numbers as a cron field, runs of three or more as ranges: 7-19, 0,6, 15,30,45."""
    ordered = sorted(set(values))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts.extend(str(v) for v in ordered[i : j + 1])
        i = j + 1
    return ",".join(parts)


def is_due(times: Sequence[time], days: Sequence[str], zone: ZoneInfo, when: datetime) -> bool:
    """Whether a tick at `when` is one of `times` on one of `days` (local, in `zone`), or the
    end of a daylight-saving gap that skipped one of them."""
    local = when.astimezone(zone)
    if WEEKDAYS[local.weekday()] not in days:
        return False
    wall = local.replace(tzinfo=None)
    if wall.time() in times:
        return True
    jump = local.utcoffset() - (when - timedelta(seconds=1)).astimezone(zone).utcoffset()  # type: ignore[operator]
    if jump <= timedelta(0):
        return False
    return any(wall - jump <= datetime.combine(wall.date(), at) < wall for at in times)


def next_import_time(window: ImportWindow, zone: ZoneInfo, earliest: datetime) -> datetime | None:
    """The first import at or after `earliest`, within the next 8 days (None: there is none,
    which a valid window cannot be)."""
    times = import_times(window)
    first_day: date = earliest.astimezone(zone).date()
    for offset in range(8):
        day = first_day + timedelta(days=offset)
        if WEEKDAYS[day.weekday()] not in window.days:
            continue
        for at in times:
            when = datetime.combine(day, at, tzinfo=zone).astimezone(UTC)
            if when >= earliest:
                return when
    return None
