"""The live readout page (GET /readout/ui) in headless Chromium, against a real server.

Needs Debian's chromium at /usr/bin/chromium and the `playwright` package (both installed
by `bash scripts/setup.sh --dev`); never `playwright install`, which downloads a browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing (apt-get install chromium; bash scripts/setup.sh --dev)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (bash scripts/setup.sh --dev)"
)

pytestmark = pytest.mark.server

# Without the background-networking flags Chromium keeps trying to reach Google's
# services, which on a closed network floods it with refused connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_TOKENS = 12
GENERATE_TIMEOUT_MS = 120_000
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser) -> Iterator[tuple[sync_api.Page, list[str]]]:
    """A fresh page (own storage) and the console errors and uncaught exceptions it logs."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console.error: {msg.text} ({msg.location})")
            if msg.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    try:
        yield page, errors
    finally:
        context.close()


def open_and_generate(page: sync_api.Page, url: str, api_key: str) -> str:
    """Open the page, fill the form, click Generate; the #status state it ends in."""
    page.goto(f"{url}/readout/ui")
    page.fill("#apikey", api_key)
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.click("#generate")
    page.wait_for_function(
        "['done', 'error'].includes(document.getElementById('status').dataset.state)",
        timeout=GENERATE_TIMEOUT_MS,
    )
    return page.get_attribute("#status", "data-state")


def test_page_streams_and_colours_the_readout(readout_server, page):
    page, errors = page
    state = open_and_generate(page, readout_server.url, readout_server.api_key)
    status = page.inner_text("#status")
    assert state == "done", status
    assert "done" in status

    tokens = page.locator("#tokens .token")
    assert tokens.count() == MAX_TOKENS
    indices = [tokens.nth(k).get_attribute("data-index") for k in range(MAX_TOKENS)]
    assert indices == [str(k) for k in range(MAX_TOKENS)]

    # Every token is coloured as the legend says its top concept is.
    legend = page.eval_on_selector_all(
        "#legend .legend-item",
        """items => Object.fromEntries(items.map(i => [
            i.dataset.concept, getComputedStyle(i.querySelector('.swatch')).backgroundColor]))""",
    )
    assert legend and set(legend) <= set(readout_server.concepts)
    colours = page.eval_on_selector_all(
        "#tokens .token",
        "spans => spans.map(s => [s.dataset.concept, getComputedStyle(s).backgroundColor])",
    )
    for concept, colour in colours:
        assert concept in legend, (concept, sorted(legend))
        assert colour == legend[concept], (concept, colour, legend[concept])
    assert len(set(legend.values())) > 1 or len(legend) == 1

    # Hover: the top-5 concepts, named from the readout, best first.
    for k in (0, MAX_TOKENS - 1):
        tokens.nth(k).hover()
        tooltip = page.locator("#tooltip")
        tooltip.wait_for(state="visible")
        items = tooltip.locator(".top5-item")
        assert items.count() == min(5, len(readout_server.concepts))
        names = [items.nth(i).get_attribute("data-concept") for i in range(items.count())]
        values = [float(items.nth(i).get_attribute("data-value")) for i in range(items.count())]
        assert set(names) <= set(readout_server.concepts), names
        assert len(set(names)) == len(names)
        assert values == sorted(values, reverse=True), values
        # the displayed names are the same ones
        assert [items.nth(i).locator(".name").inner_text() for i in range(len(names))] == names
        # the hovered token's colour is its top concept's
        assert names[0] == tokens.nth(k).get_attribute("data-concept")
    page.mouse.move(0, 0)
    page.locator("#tooltip").wait_for(state="hidden")

    # The timeline: polylines of the concepts with the highest peaks, one point per token.
    series = page.locator("#timeline .series")
    assert 1 <= series.count() <= 6
    for i in range(series.count()):
        assert series.nth(i).get_attribute("data-concept") in readout_server.concepts
        assert len(series.nth(i).get_attribute("points").split()) == MAX_TOKENS

    # The layer selector defaults to the last layer and recolours on change.
    layers = page.eval_on_selector_all("#layer option", "opts => opts.map(o => o.value)")
    assert layers and page.input_value("#layer") == layers[-1]
    if len(layers) > 1:
        page.select_option("#layer", layers[0])
        assert page.locator("#tokens .token").count() == MAX_TOKENS
        assert page.locator("#timeline .series").count() >= 1

    assert not errors, errors


def test_wrong_api_key_shows_401(readout_server, page):
    page, _ = page  # the failed request itself is logged as a console error
    state = open_and_generate(page, readout_server.url, readout_server.api_key + "-wrong")
    status = page.inner_text("#status")
    assert state == "error", status
    assert "401" in status, status
    assert page.locator("#tokens .token").count() == 0
