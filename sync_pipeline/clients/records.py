"""What a list call hands back: the records that parsed, and the ones set aside with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class BadRecord:
    """One record a list call could not use. `reason` names the record, the field and why.

    `parent_id` is set for a child set aside on its own (a contact inside a customer): that
    parent's child list is then incomplete, so a missing child must not be read as deleted."""

    system: str
    endpoint: str
    record_id: str | None
    reason: str
    parent_id: str | None = None


@dataclass
class ListResult(Generic[T]):
    """All pages of one listing. `reported_total` is the server's own count, when it gives one."""

    items: list[T] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    reported_total: int | None = None
    pages: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)
