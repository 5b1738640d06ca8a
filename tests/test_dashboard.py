"""GET /dashboard in a real browser: headless Chromium over real server processes and a real
`swarmgate gateway` (uvicorn), including a server the gateway bans and one that dies."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from gateway.storage.tenants import KeyStore
from swarmgate.launcher import start_server, start_swarm, stop_all
from tests.support import wait_until
from tests.swarm_harness import FAST_ANNOUNCE, start_gateway

pytestmark = pytest.mark.e2e

STYLESHEET = Path(__file__).parents[1] / "gateway" / "dashboard" / "static" / "dashboard.css"
WINDOW = (1280, 1000)

# The page's state of one model's section: bars, coverage cells (with their on-screen boxes), the
# servers table's rows, the badge; the banned table; the key as the page stored it.
SNAPSHOT = """
const section = [...document.querySelectorAll("section.model")].find((s) => s.dataset.model === arguments[0]);
const box = (n) => { const r = n.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
return {
  status: document.getElementById("status").className,
  key: localStorage.getItem("swarmgate.dashboard.key"),
  viewport: [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio],
  banned: [...document.querySelectorAll("#banned tbody tr")].map((r) => [r.dataset.peer, r.querySelector(".reason").textContent]),
  model: section && {
    badge: section.querySelector(".badge").textContent,
    bars: [...section.querySelectorAll(".bar")].map((n) => ({
      peer: n.dataset.peer, start: +n.dataset.start, end: +n.dataset.end, banned: n.classList.contains("banned"), box: box(n),
    })),
    cells: [...section.querySelectorAll(".cell")].map((n) => ({ block: +n.dataset.block, state: n.dataset.state, box: box(n) })),
    rows: Object.fromEntries([...section.querySelectorAll("tr[data-peer]")].map((r) => [r.dataset.peer, [...r.cells].map((c) => c.textContent)])),
  },
};
"""


def _colour(name: str) -> tuple[int, int, int]:
    """A colour of the page's stylesheet (``--name: #rrggbb``), as the screenshot's RGB."""
    value = re.search(rf"--{name}: #([0-9a-f]{{6}});", STYLESHEET.read_text())
    assert value, f"no --{name} in {STYLESHEET}"
    return tuple(int(value[1][i:i + 2], 16) for i in (0, 2, 4))


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        reason = ("needs Debian's chromium and chromium-driver (apt-get install -y --no-install-recommends "
                  "chromium chromium-driver; .ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield browser
    finally:
        browser.quit()


def _page(browser: WebDriver, model: str) -> dict[str, Any]:
    return browser.execute_script(SNAPSHOT, model)


def _wait_page(browser: WebDriver, model: str, condition, message: str, timeout: float = 30) -> dict[str, Any]:
    """The page's state once ``condition(state)`` holds (it polls every 2 s)."""
    states = []

    def holds() -> bool:
        states.append(_page(browser, model))
        return condition(states[-1])

    wait_until(holds, timeout, interval=0.2, message=lambda: f"{message}; the page shows {states[-1]}")
    return states[-1]


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _share(image: Image.Image, box: list[float], colour: tuple[int, int, int]) -> float:
    """Fraction of the pixels inside ``box`` (CSS pixels, device scale 1) that are exactly ``colour``."""
    left, top, right, bottom = (round(v) for v in box)
    inside = image.crop((left + 1, top + 1, right - 1, bottom - 1))  # edges may be anti-aliased
    counts = dict((rgb, n) for n, rgb in inside.getcolors(inside.width * inside.height))
    return counts.get(colour, 0) / (inside.width * inside.height)


def test_dashboard_shows_spans_load_bans_and_coverage_live(llama_path, tmp_path, browser):
    model = llama_path.name
    key = KeyStore(tmp_path).create_key("acme")
    servers = start_swarm(llama_path, ["0:2"], extra_args=FAST_ANNOUNCE, log_dir=tmp_path)
    first, gateway = servers[0], None
    try:
        # The others and the gateway start at once. The last server corrupts every output: with
        # every hop spot-checked, the gateway bans it.
        with ThreadPoolExecutor() as pool:
            joining = [pool.submit(start_server, llama_path, "2:4", initial_peers=first.addrs, log_file=tmp_path / name,
                                   extra_args=[*FAST_ANNOUNCE, *extra])
                       for name, extra in [("honest-1.log", []), ("honest-2.log", []),
                                           ("liar.log", ["--drill-corrupt", "1"])]]
            starting = pool.submit(start_gateway, llama_path, first.addrs, tmp_path, "--wire-codec", "none",
                                   "--verify-fraction", "1")
            servers += [future.result() for future in joining if future.exception() is None]  # all stopped below
            if starting.exception() is None:
                gateway, base = starting.result()
            for future in [*joining, starting]:
                if future.exception() is not None:
                    raise future.exception()
        liar = servers[-1]
        auth = {"Authorization": f"Bearer {key}"}

        def view() -> dict[str, Any]:
            return httpx.get(f"{base}/v1/swarm", headers=auth, timeout=10).json()

        wait_until(lambda: len(view()["swarm"]["models"].get(model, {}).get("servers", [])) == 4, 60,
                   message="the gateway did not see the 4 servers")

        page = httpx.get(f"{base}/dashboard")  # the page is public, its data is not
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(f"{base}/dashboard/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(f"{base}/v1/swarm").status_code == 401

        # Without a key the page asks for one; given in its field, the map shows every server.
        browser.get(f"{base}/dashboard")
        wait_until(lambda: _page(browser, model)["status"] == "error", 10, message="no key: no error shown")
        assert "API key" in browser.find_element(By.ID, "status").text
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        state = _wait_page(browser, model, lambda s: s["model"] and len(s["model"]["bars"]) == 4, "4 server bars")
        assert state["key"] == key
        records = view()["swarm"]["models"][model]["servers"]
        assert sorted((b["peer"], b["start"], b["end"]) for b in state["model"]["bars"]) == \
            sorted((r["peer_id"], r["start"], r["end"]) for r in records)
        assert [(c["block"], c["state"]) for c in state["model"]["cells"]] == [(b, "covered") for b in range(4)]
        assert state["model"]["badge"] == "all 4 blocks covered"
        cells = {c["block"]: c["box"] for c in state["model"]["cells"]}
        for bar in state["model"]["bars"]:  # each bar lies over exactly its blocks' columns
            assert abs(bar["box"][0] - cells[bar["start"]][0]) <= 2 and abs(bar["box"][2] - cells[bar["end"] - 1][2]) <= 2

        # Generations through the gateway: it measures round trips, and its spot checks catch the liar.
        for _ in range(20):
            reply = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
            assert reply.status_code == 200, reply.text
            if view()["swarm"]["banned"]:
                break
        banned = view()["swarm"]["banned"]
        assert [ban["peer_id"] for ban in banned] == [liar.peer_id], banned
        state = _wait_page(browser, model, lambda s: s["banned"] and any(b["banned"] for b in s["model"]["bars"]),
                           "the ban shown")
        assert [b["peer"] for b in state["model"]["bars"] if b["banned"]] == [liar.peer_id]
        assert state["banned"] == [[liar.peer_id, banned[0]["reason"]]] and "wrong outputs" in banned[0]["reason"]
        assert state["model"]["rows"][liar.peer_id][-1] == "banned"

        # The servers table shows what the gateway reports: throughput, load, its measured RTT.
        def table_matches(s: dict[str, Any]) -> bool:
            rows, servers_now = s["model"]["rows"], view()["swarm"]["models"][model]["servers"]
            return all(
                r["peer_id"] in rows and rows[r["peer_id"]][1] == f"[{r['start']}, {r['end']})"
                and abs(_number(rows[r["peer_id"]][2]) - r["throughput"]) <= 0.05
                and int(rows[r["peer_id"]][3]) == r["sessions"] and int(rows[r["peer_id"]][4]) == r["free_tokens"]
                and (rows[r["peer_id"]][5] == "—") == (r["rtt_ms"] is None)
                for r in servers_now
            )

        state = _wait_page(browser, model, table_matches, "the table matches /v1/swarm")
        assert _number(state["model"]["rows"][first.peer_id][5]) > 0  # every chain starts at the only 0:2 server

        # ?key= works too, and leaves the address bar at once.
        browser.execute_script("localStorage.clear()")
        browser.get(f"{base}/dashboard?key={key}")
        state = _wait_page(browser, model, lambda s: s["model"] and len(s["model"]["bars"]) == 4, "map via ?key=")
        assert state["key"] == key and "key=" not in browser.current_url

        # The only server of blocks 0-1 dies: the page shows them missing, without a reload.
        first.stop(signal.SIGKILL)
        state = _wait_page(browser, model, lambda s: len(s["model"]["bars"]) == 3, "the dead server gone")
        assert [(c["block"], c["state"]) for c in state["model"]["cells"]] == \
            [(0, "missing"), (1, "missing"), (2, "covered"), (3, "covered")]
        assert state["model"]["badge"] == "missing blocks 0-1"

        # The screenshot: a PNG of the viewport whose pixels show the bars and the coverage colours.
        image = Image.open(io.BytesIO(browser.get_screenshot_as_png()))
        assert image.format == "PNG" and list(image.size) == state["viewport"]
        assert image.size[0] == WINDOW[0]
        image = image.convert("RGB")
        for bar in state["model"]["bars"]:
            assert _share(image, bar["box"], _colour("banned" if bar["banned"] else "bar")) > 0.6, bar
        for cell in state["model"]["cells"]:
            assert _share(image, cell["box"], _colour(cell["state"])) > 0.6, cell
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_all(servers)
