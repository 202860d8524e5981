"""Shared fixtures: the local servers on free ports and the end-to-end harness over them."""

from __future__ import annotations

import pytest

from devservers.run import Emulators
from tests.harness import Harness


@pytest.fixture
def emulators():
    with Emulators(companies=30, seed=7) as emu:
        yield emu


@pytest.fixture
def harness(emulators, tmp_path):
    h = Harness(emulators, tmp_path)
    yield h
    h.close()
