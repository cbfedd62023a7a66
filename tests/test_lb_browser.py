"""A browser behind a real HAProxy loses the frontend serving its stream: headless Chromium
(driven as in ``tests/test_page_browser.py``) holds an ``EventSource`` on the load balancer's
URL; the frontend serving it is SIGKILLed, or drains and exits on SIGTERM; the browser
reconnects through the load balancer, lands on the other frontend, resumes with
``Last-Event-ID``, and every acknowledged like arrives exactly once, in order.  Every wait is a
condition with a deadline; Chromium, HAProxy and every node stop at teardown, even on failure."""

from __future__ import annotations

import signal

import pytest

from helpers import health, like, wait_until
from test_page_browser import CHROMIUM_ARGS, WAIT_MS, browser_path  # noqa: F401 - a fixture

pytestmark = [pytest.mark.browser, pytest.mark.lb, pytest.mark.topology]

#: the SSE retry the frontends send: the browser waits this long before it reconnects, the
#: window in which the test publishes likes the browser can only get from history.  Five
#: publishes take milliseconds; the rest is margin for a loaded machine.
RETRY_MS = 3000

#: each like its own event, so ids compare one to one
SETTINGS = {"frontend.aggregate_likes_above": "0", "frontend.retry_ms": str(RETRY_MS),
            "frontend.drain_seconds": "1.5"}

#: a raw EventSource (not the page's, which drops duplicates: this one must show them), on the
#: page's origin, the load balancer.  It records every like id, every open and every break.
WATCH = """(video) => {
    window.likes = []; window.resets = 0; window.opens = 0; window.breaks = 0;
    const es = new EventSource(`/v1/videos/${video}/events`);
    es.addEventListener('like', (e) => window.likes.push(JSON.parse(e.data).id));
    es.addEventListener('reset', () => { window.resets += 1; });
    es.addEventListener('open', () => { window.opens += 1; });
    es.addEventListener('error', () => { window.breaks += 1; });
    window.stream = es;
}"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "drained"])
async def test_a_browser_resumes_through_the_lb_when_its_frontend_goes(topology, balancer, browser_path, signum):
    from playwright.async_api import async_playwright

    topology.dispatcher("d1")
    fronts = {n.name: n for n in (topology.frontend("f1", **SETTINGS), topology.frontend("f2", **SETTINGS))}
    lb = await balancer(list(fronts.values()))
    video = "lb-browser"
    problems: list[str] = []

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda exc: problems.append(f"page: {exc}"))
            await page.goto(f"{lb.url}/healthz")  # any document of the LB's origin
            await page.evaluate(WATCH, video)
            await page.wait_for_function("window.opens === 1", timeout=WAIT_MS)

            async def serving() -> str | None:
                counts = {name: (await health(n.url))["connections"] for name, n in fronts.items() if n.alive()}
                held = [name for name, c in counts.items() if c == 1]
                return held[0] if sum(counts.values()) == 1 and held else None

            first = await wait_until(serving, what="the frontend serving the browser's stream")
            other = next(name for name in fronts if name != first)

            acked = [(await like(lb.url, video, user=f"before{i}"))["id"] for i in range(5)]
            await page.wait_for_function("(n) => window.likes.length === n", arg=len(acked), timeout=WAIT_MS)

            fronts[first].proc.send_signal(signum)  # SIGTERM: the stream ends after the drain
            await page.wait_for_function("window.breaks >= 1", timeout=WAIT_MS)
            missed = [(await like(lb.url, video, user=f"after{i}"))["id"] for i in range(5)]
            assert await page.evaluate("window.opens") == 1, \
                f"the browser reconnected before the likes it must get from history were published " \
                f"(RETRY_MS {RETRY_MS} too short for this machine)"
            acked += missed

            await page.wait_for_function("window.opens === 2", timeout=RETRY_MS + WAIT_MS)
            assert await wait_until(serving) == other
            # a marker after everything: once it is in, nothing else is still on its way
            marker = (await like(lb.url, video, user="marker"))["id"]
            await page.wait_for_function("(id) => window.likes.includes(id)", arg=marker, timeout=WAIT_MS)
            assert await page.evaluate("window.likes") == acked + [marker]
            assert await page.evaluate("window.resets") == 0
            # the missed likes came from history after the Last-Event-ID the browser sent
            assert (await health(fronts[other].url))["stats"]["events_recovered"] == len(missed)
            assert await page.evaluate("window.stream.readyState") == 1  # EventSource.OPEN
        finally:
            await browser.close()
    assert problems == []
    assert lb.server_states() == {first: "DOWN", other: "UP"}

