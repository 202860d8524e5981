"""The Dagster UI as an operator opens it: a plan with a long rejection reason, materialised into a
DAGSTER_HOME instance, shown by the real webserver and read in headless Chromium (Debian's
`chromium` and `chromium-driver`, driven by Selenium). The page must show the whole reason, wrapped
inside the window; the screenshot is kept as `sync_plan.png` in the test's tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest

from tests.harness import Harness, free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WEBSERVER_START_S = 120
PAGE_WAIT_S = 60
# The "[Show Markdown]" link of the latest materialisation's `rejections_preview` metadata.
SHOW_REJECTIONS = (
    "//tr[.//*[normalize-space()='rejections_preview']]//*[normalize-space()='[Show Markdown]']"
)
# Every table cell's text as drawn (wrapped lines joined), whether it is drawn at all, and
# whether it lies inside the window (nothing to scroll sideways to).
CELLS_JS = """
return Array.from(document.querySelectorAll('td')).map(td => {
  const r = td.getBoundingClientRect();
  return {text: td.innerText, shown: r.width > 0 && r.height > 0,
          inside: r.left >= 0 && r.right <= window.innerWidth};
});
"""

pytestmark = pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


def _materialise_a_rejection(emulators, tmp_path: Path, home: Path) -> tuple[Harness, str]:
    """Two cycles into the DAGSTER_HOME instance; in between, an Unleashed customer gets a
    website the CRM must not receive. Returns the harness and the rejection's reason."""
    h = Harness(emulators, tmp_path, instance=dg.DagsterInstance.from_config(str(home)))
    h.cycle()
    pair = h.linked_company()
    h.plant_customer(pair["erp_id"], Website="javascript:alert(document.cookie)")
    h.cycle()
    (reason,) = h.query(
        "SELECT reason FROM rejections WHERE resolved_at IS NULL AND crm_id = ? AND field = ?",
        [str(pair["crm_id"]), "website"],
    )["reason"]
    return h, reason


def _start_webserver(h: Harness, home: Path, port: int, log: Path) -> subprocess.Popen:
    """`dagster-webserver` on the production code location (`sync_pipeline.definitions`), wired
    by environment variables to the same local servers, DuckDB file and settings."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CRM_BASE_URL": h.emu.crm_url,
        "CRM_TOKEN": h.emu.crm_token,
        "UNLEASHED_BASE_URL": h.emu.unleashed_url,
        "UNLEASHED_API_ID": h.emu.unleashed_api_id,
        "UNLEASHED_API_KEY": h.emu.unleashed_api_key,
        "SYNC_DUCKDB_PATH": str(h.db),
        "SYNC_SETTINGS_FILE": str(h.settings_file),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
         "-m", "sync_pipeline.definitions"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + WEBSERVER_START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"no webserver answer in {WEBSERVER_START_S} s:\n{log.read_text()}")


def _chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1600,1300",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _open_rejections_preview(driver, reason: str) -> list[dict]:
    """Click the preview's "[Show Markdown]" as an operator does (past the first-visit
    newsletter dialog) and return the drawn table cells that mention the rejected record."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    record = reason.split(": ", 1)[0]  # the start of the reason: the record it is about
    found: list[dict] = []
    deadline = time.monotonic() + PAGE_WAIT_S
    while time.monotonic() < deadline and not found:
        try:
            for skip in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
                skip.click()
            if not driver.find_elements(By.XPATH, "//button[normalize-space()='Close']"):
                for show in driver.find_elements(By.XPATH, SHOW_REJECTIONS):
                    show.click()
            cells = driver.execute_script(CELLS_JS)
            found = [c for c in cells if c["shown"] and record in " ".join(c["text"].split())]
        except WebDriverException:
            pass  # the page re-rendered under us: look again
        if not found:
            time.sleep(0.5)
    return found


def test_the_plan_asset_page_shows_the_whole_rejection_reason(emulators, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    h, reason = _materialise_a_rejection(emulators, tmp_path, home)
    assert len(reason) > 200, reason  # long enough that any cut shows
    server = _start_webserver(h, home, free_port(), tmp_path / "webserver.log")
    port = server.args[server.args.index("-p") + 1]
    driver = None
    try:
        driver = _chromium(tmp_path / "chromium-profile")
        driver.get(f"http://127.0.0.1:{port}/assets/sync/sync_plan")
        shot = tmp_path / "sync_plan.png"
        try:
            cells = _open_rejections_preview(driver, reason)
        finally:
            driver.save_screenshot(str(shot))
        # The whole reason, in a cell of its own, drawn and wrapped inside the window.
        whole = [c for c in cells if " ".join(c["text"].split()) == " ".join(reason.split())]
        assert whole, f"the reason is not shown whole: {cells}; see {shot}"
        assert whole[0]["inside"], f"the reason runs off the side of the window; see {shot}"
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)
        h.close()
