"""The status page in a real browser (headless Chromium, driven by Playwright), against a
real gateway with MLflow runners and a registry whose alias moves.

Screenshots go to ``$MODEL_GATEWAY_ARTIFACTS`` (default ``build/test-artifacts``), not
into the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.conftest import ROOT, GatewayProcess
from tests.registry import Registry

pytestmark = pytest.mark.slow

X = {"dataframe_split": {"columns": ["x"], "data": [[0.5]]}}
ADMIN, KEY = "admin-of-the-page-tests", "key-of-the-page-tests"
ARTIFACTS = Path(os.environ.get("MODEL_GATEWAY_ARTIFACTS", ROOT / "build" / "test-artifacts"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "scripts/install installs Debian's chromium; it is missing"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


def row(page: Page, endpoint: str) -> Any:
    return page.locator(f'tr[data-endpoint="{endpoint}"]')


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"status-page-{name}.png"), full_page=True)


def test_rows_follow_start_cutover_and_eviction_without_a_reload(
        start_gateway: Any, registry: Registry, browser: Browser) -> None:
    client = MlflowClient(registry.tracking_uri)
    client.set_registered_model_alias("const", "page", "1")
    gw: GatewayProcess = start_gateway(
        [{"name": "const", "alias": "page", "poll_interval": "1s", "drain_timeout": "2s"},
         {"name": "iris", "alias": "champion", "batching": {"max_batch_size": 8}}],
        auth={"admin_tokens": [ADMIN]},
        pool={"idle_timeout": "8s", "min_residency": 0})
    page = browser.new_page()
    console = Console(page)
    page.goto(gw.url + "/")
    const, iris = row(page, "const/page"), row(page, "iris/champion")
    expect(const).to_have_attribute("data-state", "cold")
    expect(iris).to_have_attribute("data-state", "cold")
    expect(const.locator(".state")).to_have_text("cold")  # in words, not in colour alone
    expect(page.locator("#count")).to_have_text("2 of 2 endpoints")
    expect(row(page, "iris/champion").locator(".batching")).to_have_text(
        "batches ≤ 8 · mean –")
    expect(const.locator(".batching")).to_have_count(0)
    shot(page, "1-cold")

    assert gw.predict("const", "page", X).json() == {"predictions": [1.0]}
    expect(const).to_have_attribute("data-state", "ready", timeout=10_000)
    expect(const.locator(".state")).to_have_text("serving")
    expect(const.locator(".version")).to_have_text("v1")
    expect(iris).to_have_attribute("data-state", "cold")
    expect(page.locator("#pool-runners")).to_contain_text("1 /")
    expect(page.locator('#events li[data-kind="start"]')).to_have_count(1)
    shot(page, "2-serving")

    # Traffic keeps the runner from idling out while the alias moves and it cuts over.
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            gw.predict("const", "page", X)
            stop.wait(0.3)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        client.set_registered_model_alias("const", "page", "2")
        expect(const.locator(".version")).to_have_text("v2", timeout=60_000)
        expect(page.locator('#events li[data-kind="cutover"]')).to_contain_text(
            "cut over to version 2")
        # Requests were drawn: a rate above zero on the row.
        expect(const.locator("td.num .value").first).to_have_text(
            re.compile(r"^([1-9]\d*\.\d|0\.[1-9])$"), timeout=15_000)
        shot(page, "3-cutover")
    finally:
        stop.set()
        worker.join()

    # Idle past idle_timeout: evicted, and the row says so.
    expect(const).to_have_attribute("data-state", "cold", timeout=40_000)
    expect(page.locator('#events li[data-kind="eviction"]')).to_contain_text("evicted (idle)")
    shot(page, "4-evicted")
    assert console.errors == []
    page.close()


def test_the_page_asks_for_a_token_and_shows_what_it_may_see(
        start_gateway: Any, registry: Registry, browser: Browser) -> None:
    """200 endpoints (one per alias of ``const``, never started): filter and sort work,
    an api key sees its endpoints only and no error column, an admin token sees all."""
    endpoints: list[dict[str, Any]] = [{"name": "const", "alias": "live"}]
    endpoints += [{"name": "const", "alias": f"m{i:03d}", "model_uri": "models:/const/1"}
                  for i in range(199)]
    endpoints[5]["model_uri"] = "models:/const/3"  # a version that cannot load: it fails
    endpoints[7]["api_keys"] = ["a-key-for-m006-only"]
    gw: GatewayProcess = start_gateway(endpoints, auth={"admin_tokens": [ADMIN],
                                                        "api_keys": [KEY]})
    page = browser.new_page()
    console = Console(page)
    page.goto(gw.url + "/")
    expect(page.locator("#message")).to_contain_text("needs a token")
    expect(page.locator("tbody tr")).to_have_count(0)

    page.fill("#token", KEY)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#count")).to_have_text("199 of 199 endpoints")  # not m006
    expect(row(page, "const/m006")).to_have_count(0)
    expect(page.locator("th.admin-only")).to_be_hidden()
    expect(page.locator("#role")).to_have_text("api key")

    page.fill("#token", ADMIN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#count")).to_have_text("200 of 200 endpoints")
    expect(page.locator("th.admin-only")).to_be_visible()

    # The broken one fails; its last error is on the page for the admin.
    assert gw.predict("const", "m004", X, headers={"Authorization": f"Bearer {KEY}"}
                      ).status_code == 503
    failed = row(page, "const/m004")
    expect(failed).to_have_attribute("data-state", "failed", timeout=10_000)
    expect(failed.locator("td.error")).not_to_be_empty()

    page.select_option("#sort", "state")  # failed first
    expect(page.locator("tbody tr").first).to_have_attribute("data-endpoint", "const/m004")
    page.fill("#filter", "m01")
    expect(page.locator("#count")).to_have_text("10 of 200 endpoints")
    page.fill("#filter", "failed")
    expect(page.locator("tbody tr")).to_have_count(1)
    shot(page, "5-filtered")

    page.click("#forget")
    expect(page.locator("#message")).to_contain_text("needs a token")
    # The only console errors: the browser reporting the 401s of the token-less polls.
    assert console.errors and all("401" in e for e in console.errors), console.errors
    page.close()


def test_a_rollout_and_its_rollback_show_on_the_row(start_gateway: Any, registry: Registry,
                                                    browser: Browser) -> None:
    client = MlflowClient(registry.tracking_uri)
    client.set_registered_model_alias("canary", "page", "1")
    gw: GatewayProcess = start_gateway(
        [{"name": "canary", "alias": "page", "poll_interval": "1s",
          "rollout": {"steps": [50, 100], "step_time": "5m", "min_requests": 5,
                      "max_latency_ratio": 10.0}}],
        auth={"admin_tokens": [ADMIN]})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert gw.predict("canary", "page", {"inputs": {"x": [1]}}).status_code == 200
    page = browser.new_page()
    console = Console(page)
    page.goto(gw.url + "/")
    canary = row(page, "canary/page")
    client.set_registered_model_alias("canary", "page", "4")
    expect(canary.locator(".rollout")).to_have_text(
        re.compile(r"^rollout of v4: step 1/2 · 50 % · \d+ requests$"), timeout=60_000)
    for _ in range(20):
        assert gw.predict("canary", "page", {"inputs": {"x": [1]}}).status_code == 200
    expect(canary.locator(".rollout")).to_contain_text("requests", timeout=5_000)
    shot(page, "5-rollout")
    aborted = gw.client.post("/admin/endpoints/canary/page/rollout/abort", headers=admin)
    assert aborted.status_code == 200
    expect(canary.locator(".rolled-back")).to_have_text("v4 rolled back", timeout=10_000)
    expect(canary.locator(".rolled-back")).to_have_attribute("title", "aborted by an operator")
    expect(canary.locator(".rollout")).to_have_count(0)
    expect(canary.locator(".version")).to_have_text("v1")
    expect(page.locator('#events li[data-kind="rollback"]')).to_contain_text(
        "version 4 rolled back: aborted by an operator")
    shot(page, "6-rolled-back")
    assert console.errors == []
    page.close()
