"""The Dagster UI in a real browser: the asset graph loads and a materialization launched there succeeds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, stop_process, wait_for_port

from resources.storage import LocalStorage

pytestmark = pytest.mark.slow  # starts dagster dev and Chromium: about a minute

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ASSETS = ["web_shards", "human_pairs", "pretrained_med", "captioner", "filter", "synthetic_captions",
          "bootstrapped_corpus", "bootstrapped_med", "downstream_evals"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> Iterator[str]:
    """``python -m orchestration.ui`` on a free 127.0.0.1 port over a tiny world; yields its URL."""
    data = tmp_path_factory.mktemp("ui") / "data"
    LocalStorage(root=str(data)).publish_dir(tiny_world, "landing")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP_OPS_", "DAGSTER_HOME"))}
    log = data.parent / "ui.log"
    root = Path(__file__).resolve().parents[1]
    # env --default-signal: a background shell may start us with SIGINT ignored; dagster dev
    # needs it to shut its webserver, daemon and code server down.
    cmd = ["env", "--default-signal=INT,TERM", sys.executable, "-m", "orchestration.ui",
           "--data", str(data), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 240, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=40)
        print(log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def page(ui: str):
    from playwright import sync_api  # the dev group's (locked): missing, it is an error, not a skip

    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _open(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first-visit community dialog
    if skip.count():
        skip.click()


def test_asset_graph_shows_every_asset_and_check(page, ui: str):
    _open(page, f"{ui}/asset-groups")
    page.get_by_text("Global asset lineage").wait_for()
    for name in ASSETS:
        page.get_by_text(name, exact=True).first.wait_for()
    _open(page, f"{ui}/assets/bootstrapped_corpus?view=checks")
    for check in ("web_noise_ratio_in_band", "synthetic_noise_ratio_in_band", "no_eval_leak", "not_empty"):
        page.get_by_text(check, exact=True).first.wait_for()


def test_materialize_from_the_ui_succeeds(page, ui: str):
    _open(page, f"{ui}/assets/human_pairs")
    page.locator("button", has_text="Materialize").first.click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    toast.wait_for()
    run_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
    _open(page, f"{ui}/runs")
    page.get_by_role("link", name=run_id).click()  # the run's page, updated live
    page.wait_for_url(re.compile(rf"/runs/{run_id}[0-9a-f-]+"))
    # The run's process imports torch and Great Expectations: allow minutes on 2 busy cores.
    outcome = page.get_by_text(re.compile(r"^(Success|Failure)$")).first
    outcome.wait_for(timeout=300_000)
    assert outcome.inner_text() == "Success"
    page.get_by_text("Succeeded (2)").wait_for()  # human_pairs and its check
    _open(page, f"{ui}/assets/human_pairs")
    page.get_by_text("images_per_split", exact=True).first.wait_for()  # its metadata is there
