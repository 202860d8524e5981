"""Stopping `make soak` with a signal is a clean end, not a failure to explain by hand.

A soak stream runs until someone needs the machine. Before, SIGTERM or SIGINT broke the Dagster
run in progress and hypothesis reported that scenario as failed or flaky. Here a short soak (the
`soak` profile, small scenarios, a progress line per scenario) gets the signal once its second
scenario has started: that scenario must finish, and the stream end there, with its totals, a
line saying why it stopped, and pytest's exit status 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FALSE_ALARMS = [
    "Falsifying example", "Flaky", "Traceback", "FAILED", "KeyboardInterrupt",
    "DagsterExecutionInterruptedError", "reproduce this failure",
]  # fmt: skip


# About 12 s each on a quiet machine. The group asks `--dist loadgroup` (make test) for one soak at
# a time, both on one worker, beside the convergence halves on 2 cores. pytest-xdist 3.8 marks the
# group on `item._nodeid`, which pytest 9 no longer reads, so for now they may run side by side
# (~27 s each then).
@pytest.mark.xdist_group("soak-stop")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.timeout(180)
def test_a_signal_stops_the_soak_after_the_scenario_in_progress(signum):
    # A fresh session, as `make soak` starts one: nothing of this run's pytest or settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CONVERGENCE_"))}
    env.update(
        CONVERGENCE_MAX_EXAMPLES="20",  # more than run: the signal must end the stream
        CONVERGENCE_STEPS="3",
        CONVERGENCE_PROGRESS_EVERY="1",  # a line as each scenario starts, after the first
    )
    soak = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_convergence.py", "--hypothesis-profile=soak", "-s"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert soak.stdout is not None
        seen = []
        for line in soak.stdout:
            seen.append(line)
            if line.startswith("soak progress: 1 scenarios"):  # the second one has started
                break
        else:
            pytest.fail("the soak ended before its second scenario:\n" + "".join(seen[-40:]))
        time.sleep(0.3)  # into its steps: most of a scenario's time is Dagster runs
        soak.send_signal(signum)
        rest = soak.stdout.read()  # to the end of its output: the stream stops by itself
        soak.wait(timeout=30)
    finally:
        if soak.poll() is None:
            soak.kill()
            soak.wait()
    out = "".join(seen) + rest
    tail = out[-4000:]
    name = signal.Signals(signum).name
    assert soak.returncode == 0, tail
    assert "1 passed" in out, tail
    assert f"soak: {name} received" in out, tail
    assert "convergence: scenarios=2" in out, tail  # the totals, the second scenario finished
    assert f"soak stopped by {name} after 2 scenarios" in out, tail
    assert "not a failure" in out, tail
    alarms = [a for a in FALSE_ALARMS if a in out]
    assert not alarms, tail


def test_hypothesis_ending_an_example_itself_is_not_a_failed_rule():
    """An example that runs out of data ends with hypothesis's StopTest on its way through the
    machine's teardown. Counted as a failed rule, it kept a requested stop waiting for a failure
    report that never came, and the stream ran on."""
    from hypothesis.errors import Frozen, StopTest, UnsatisfiedAssumption

    from tests.test_convergence import failed_rule

    assert not failed_rule(None)
    for control_flow in (StopTest(0), UnsatisfiedAssumption(), Frozen()):
        assert not failed_rule(control_flow)
    assert failed_rule(AssertionError("a lost edit"))
    assert failed_rule(RuntimeError("a sync job failed with faults off"))
