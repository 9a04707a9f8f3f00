"""The dashboard (GET /ui) driven in a real headless Chromium through chromedriver.

The gateway runs in the test's event loop; the browser calls block, so they run
in a worker thread. Every wait is for what a person would see (an element's
text), bounded. With ``SAGA_DASHBOARD_SCREENSHOT=path`` the test also saves a
screenshot of the page there (docs/img/dashboard.png comes from such a run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from saga_events import Mirror, Registrar
from tests.gateway_helpers import Served, serve_gateway

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SKIP_REASON = (
    "chromium/chromedriver not installed; .ci/run installs Debian's chromium and chromium-driver"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,900",
]
XSS = "<img src=x onerror=window.__xss=1>"
REGISTER = "/api/v1/services/register"

pytestmark = pytest.mark.anyio
needs_browser = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason=SKIP_REASON)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


async def in_browser(fn: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(fn)


async def see(driver: Any, check: Callable[[Any], Any], what: str, timeout: float = 20) -> Any:  # noqa: ASYNC109
    """Wait (bounded) until ``check(driver)`` is truthy, as the page shows it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> Any:
        return WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.05,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(check, message=what)

    return await in_browser(wait)


def row_text(key: str) -> Callable[[Any], str | None]:
    # One script call: the page re-renders its rows on every event, so element
    # handles kept across calls may go stale.
    def check(driver: Any) -> str | None:
        text = driver.execute_script(
            "const row = [...document.querySelectorAll('#services tr[data-key]')]"
            ".find((r) => r.dataset.key === arguments[0]);"
            "return row ? row.innerText : null;",
            key,
        )
        return None if text is None else str(text)

    return check


def texts(driver: Any, selector: str) -> list[str]:
    found = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent);",
        selector,
    )
    return [str(t) for t in found]


def shown(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def no_row(key: str) -> Callable[[Any], bool]:
    return lambda driver: row_text(key)(driver) is None


async def register(served: Served, **body: Any) -> str:
    r = await served.client.post(REGISTER, json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["service_id"])


@needs_browser
async def test_dashboard_follows_registrations_and_shows_hostile_text_as_text(
    served: Served, browser: Any
) -> None:
    """Registers and removals over REST show on the page without a reload; HTML in
    metadata is shown as text and runs nothing; the page is keyboard usable."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    orders = await register(
        served,
        service_name="orders",
        service_url="http://10.0.0.11:8080",
        capabilities=["rest", "graphql"],
        metadata={"zone": "eu-west-1", "version": "2.4.1"},
    )
    await in_browser(lambda: browser.get(f"{served.base_url}/"))  # redirects to /ui
    assert browser.current_url.endswith("/ui")
    text = await see(browser, row_text(f"orders/{orders}"), "orders row")
    assert "http://10.0.0.11:8080" in text and "eu-west-1" in text and "graphql" in text
    await see(browser, lambda d: "view: current" in d.find_element(By.ID, "stale").text, "current")
    await see(browser, lambda d: "health: ok" in d.find_element(By.ID, "health").text, "health")

    billing = await register(
        served, service_name="billing", service_url="https://billing.internal", service_id="b-1"
    )
    await see(browser, row_text(f"billing/{billing}"), "billing row")
    await see(browser, lambda d: "2 services · 2 instances" in shown(d, "counts"), "counts")
    changes = browser.find_element(By.ID, "changes").text
    assert "added" in changes and "billing/b-1" in changes

    r = await served.client.delete("/api/v1/services/orders")
    assert r.status_code == 200, r.text
    await see(browser, no_row(f"orders/{orders}"), "orders gone")
    await see(browser, lambda d: "removed" in shown(d, "changes"), "removal noted")

    # Hostile text: in a metadata value and a metadata key.
    xss = await register(
        served,
        service_name="xss",
        service_url="http://10.0.0.66:80",
        metadata={"note": XSS, XSS: "key"},
    )
    text = await see(browser, row_text(f"xss/{xss}"), "xss row")
    assert XSS in text
    assert XSS in texts(browser, "#services .kv .v")
    assert XSS in texts(browser, "#services .kv .k")
    assert texts(browser, "img") == []
    assert browser.execute_script("return window.__xss") is None

    # Keyboard: "/" focuses the filter, typing narrows, Escape clears.
    body = browser.find_element(By.TAG_NAME, "body")
    await in_browser(lambda: body.send_keys("/"))
    assert browser.switch_to.active_element.get_attribute("id") == "filter"
    await in_browser(lambda: browser.switch_to.active_element.send_keys("billing"))
    await see(browser, no_row(f"xss/{xss}"), "filtered out")
    assert row_text(f"billing/{billing}")(browser) is not None
    await in_browser(lambda: browser.switch_to.active_element.send_keys(Keys.ESCAPE))
    await see(browser, row_text(f"xss/{xss}"), "filter cleared")

    # Nothing the page did was blocked by its own CSP (no inline script or style).
    logs = browser.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e.get("message", "")], logs

    shot = os.environ.get("SAGA_DASHBOARD_SCREENSHOT")
    if shot:
        await _stage_screenshot(served, browser, Path(shot))


async def test_dashboard_is_served_with_a_strict_csp(served: Served) -> None:
    """/ redirects to /ui; the page, its script and style come with a strict CSP and nosniff,
    and the page has no inline script or style for the CSP to block."""
    r = await served.client.get("/")
    assert r.status_code == 302 and r.headers["location"] == "/ui"
    for path, media in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ]:
        r = await served.client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media), path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, csp
        assert "style-src 'self'" in csp and "unsafe" not in csp, csp
        assert r.headers["x-content-type-options"] == "nosniff"
    page = (await served.client.get("/ui")).text
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    assert "http://" not in page and "https://" not in page  # no external requests
    script = (await served.client.get("/ui/app.js")).text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


async def _stage_screenshot(served: Served, browser: Any, path: Path) -> None:
    """A representative registry for the README's picture."""
    r = await served.client.delete("/api/v1/services/xss")
    assert r.status_code == 200, r.text
    for i, zone in enumerate(["eu-west-1", "eu-west-2"]):
        await register(
            served,
            service_name="orders",
            service_url=f"http://10.0.1.{i + 10}:8080",
            capabilities=["rest", "graphql"],
            metadata={"zone": zone, "version": "2.4.1"},
        )
    await register(
        served,
        service_name="inventory",
        service_url="grpc://10.0.2.5:50051",
        capabilities=["grpc"],
        metadata={"zone": "eu-west-1"},
    )
    await register(
        served,
        service_name="payments",
        service_url="https://payments.internal:8443",
        capabilities=["rest"],
        metadata={"pci": "true"},
    )
    from selenium.webdriver.common.by import By

    await see(
        browser,
        lambda d: "4 services · 5 instances" in d.find_element(By.ID, "counts").text,
        "staged",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    assert await in_browser(lambda: browser.save_screenshot(str(path)))


@needs_browser
async def test_dashboard_shows_an_operators_drain_and_its_end(served: Served, browser: Any) -> None:
    """Who and why of an operator's drain show on the instance's row, live; undrain
    clears them."""
    sid = await register(
        served, service_name="pay", service_url="http://10.0.0.21:80", service_id="p-1"
    )
    await in_browser(lambda: browser.get(f"{served.base_url}/ui"))
    await see(browser, row_text(f"pay/{sid}"), "pay row")
    r = await served.client.post(
        "/api/v1/services/pay/drain", json={"by": "alice", "reason": "disk full"}
    )
    assert r.status_code == 200, r.text

    def drained(d: Any) -> str | None:
        text = row_text(f"pay/{sid}")(d)
        return text if text is not None and "draining (by alice: disk full)" in text else None

    await see(browser, drained, "the drain's who and why")
    r = await served.client.post("/api/v1/services/pay/undrain")
    assert r.status_code == 200, r.text

    def serving(d: Any) -> str | None:
        text = row_text(f"pay/{sid}")(d)
        return text if text is not None and "draining" not in text else None

    await see(browser, serving, "the drain ended")
