"""While Unleashed's monthly API usage limit is used up: what each tick says, and when the
daytime import probes whether the limit was raised.

Unleashed refuses every request until the limit resets (`clients.base.UsageBlock`). The ticks
that would call Unleashed skip, saying since when, until when (UTC and the settings' time zone)
and what waits. The daytime import runs as a probe once no request has been refused for about an
hour: if the limit was raised, it imports and clears the block; if not, it is refused within
seconds, which records the block anew and so puts the next probe an hour later. One probe per
refusal and hour: `Probe.key` names it, so a tick finds the one already launched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sync_pipeline.clients.base import UsageBlock
from sync_pipeline.settings import Settings
from sync_pipeline.timetable import next_import_time

PROBE_KEY_TAG = "sync/usage-limit-probe"  # a usage-limit probe's run: its refusal and hour

PAUSED_IMPORTS = (
    "Imports are paused meanwhile and resume on their own at the reset, or as soon as an "
    "Unleashed request succeeds again (the limit was raised). To find out, an import tick "
    "runs the import as a probe once no request has been refused for about an hour: "
)


def hour_partition(when: datetime) -> str:
    """The hourly import window `when` falls in (the partition key)."""
    return when.astimezone(UTC).strftime("%Y-%m-%d-%H:00")


def utc_and_local(when: datetime, settings: Settings) -> str:
    local = when.astimezone(settings.zone)
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC ({local:%Y-%m-%d %H:%M} {settings.timezone})"


def usage_limit_pause(block: UsageBlock, settings: Settings, what_waits: str) -> str:
    """Why a tick does nothing while the usage limit is used up: since when, until when, and
    what waits."""
    return (
        "Paused: Unleashed's monthly API usage limit is used up (a request was refused at "
        f"{block.seen_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC); Unleashed refuses every request "
        f"until the limit resets on {utc_and_local(block.resets_at, settings)}. {what_waits}"
    )


def next_probe(settings: Settings, block: UsageBlock, earliest: datetime) -> str:
    """When the next probe comes, if no request is refused meanwhile: the first import at or
    after `earliest`, unless the reset comes first."""
    tick = next_import_time(settings.imports, settings.zone, earliest)
    if tick is None or tick >= block.resets_at:
        return "the reset comes first"
    return f"the next at {utc_and_local(tick, settings)}"


def not_yet(settings: Settings, block: UsageBlock, when: datetime) -> str:
    """What an import tick says when no probe is due at `when`."""
    # Imports are whole minutes apart, so a minute on is past this one.
    earliest = max(block.next_probe(), when + timedelta(minutes=1))
    return usage_limit_pause(
        block, settings, f"{PAUSED_IMPORTS}{next_probe(settings, block, earliest)}."
    )


@dataclass(frozen=True)
class Probe:
    """The probe an import tick at `when` launches: one per refusal and hour since it is due."""

    block: UsageBlock
    when: datetime

    @property
    def refused_at(self) -> str:
        return f"{self.block.seen_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S}"

    @property
    def hour(self) -> int:
        return (self.when - self.block.next_probe()) // timedelta(hours=1)

    @property
    def key(self) -> str:
        return f"usage-limit-probe:{self.refused_at}+{self.hour}h"

    def tags(self) -> dict[str, str]:
        return {
            "sync/trigger": "usage-limit-probe",
            PROBE_KEY_TAG: self.key,
            "sync/usage-limit-refused-at": self.refused_at,
            "sync/usage-limit-resets-at": self.block.resets_at.astimezone(UTC).isoformat(),
        }

    def still_waiting(self, settings: Settings, run_id: str) -> str:
        """What a tick says while this hour's probe (run `run_id`) has not reached Unleashed."""
        retry = next_probe(
            settings, self.block, self.block.next_probe() + timedelta(hours=self.hour + 1)
        )
        return usage_limit_pause(
            self.block,
            settings,
            f"{PAUSED_IMPORTS}the probe of this hour (run {run_id[:8]}) has not reached "
            f"Unleashed yet; if it ends without doing so, {retry}.",
        )
