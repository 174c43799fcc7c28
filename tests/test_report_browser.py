"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package) opens the
file from disk with name resolution blocked, every figure must decode (naturalWidth > 0), the
metrics table must have one row per layer and norm, and a screenshot must show the curve's
L2 blue and Linf orange. Through the DevTools protocol (a websocket client from tornado) the
interactive maps are checked: no console errors, every map's canvas is drawn, a real mouse
click on one sample's point in the first layer's map selects that sample, fills the selection
panel and changes the pixels of the last layer's map. Skipped when /usr/bin/chromium is absent
(``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_report import LAYERS, PROVENANCE, knn_oracle, make_run

from advlens.report import write_outputs
from advlens.report.figures import NORM_COLORS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason="headless Chromium not installed (/usr/bin/chromium): apt-get install -y chromium",
)

# Runs after every image has loaded (the load event waits for them); writes its findings into
# the DOM, which --dump-dom prints. The control image is broken on purpose: it must read 0.
CHECK = """
<img id="control" alt="control" src="data:image/png;base64,AAAA">
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].filter(i => i.id !== 'control')
    .map(i => [i.alt, i.naturalWidth, i.complete]);
  const rows = [...document.querySelectorAll('table#metrics tbody tr')]
    .map(r => [r.dataset.layer, r.dataset.norm]);
  const control = document.getElementById('control').naturalWidth;
  document.documentElement.setAttribute('data-check', JSON.stringify({imgs, rows, control}));
});
</script>
"""


def chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={user_dir}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run, rows = make_run(tmp_path_factory.mktemp("browser"), store=True)
    out = write_outputs(run, rows, LAYERS, PROVENANCE, progress=False)
    return out["report.html"]


def test_every_figure_loads_and_table_has_a_row_per_layer_and_norm(report, tmp_path):
    page = tmp_path / "check.html"
    page.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
    res = chromium("--dump-dom", page.as_uri(), user_dir=tmp_path / "profile")
    found = re.search(r'data-check="([^"]*)"', res.stdout)
    assert found, f"Chromium printed no check result (rc {res.returncode}): {res.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["control"] == 0  # a broken image is detected
    n_figures = len(list((report.parent / "figures").glob("*.png")))
    assert len(check["imgs"]) == n_figures >= 10
    for alt, natural_width, complete in check["imgs"]:
        assert complete and natural_width > 0, f"figure did not load: {alt}"
    assert sorted(map(tuple, check["rows"])) == sorted(
        (layer, norm) for layer in LAYERS for norm in ("l2", "linf")
    )


def test_screenshot_shows_the_curves(report, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    res = chromium(
        f"--screenshot={shot}", "--window-size=1280,1600", report.as_uri(),
        user_dir=tmp_path / "profile",
    )  # fmt: skip
    assert shot.is_file(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    img = imread(shot)[..., :3]
    assert img.shape[:2] == (1600, 1280)
    for norm, colour in NORM_COLORS.items():
        if norm == "l1":
            continue
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
        share = (np.abs(img - rgb).max(axis=-1) < 0.08).mean()
        assert share > 1e-4, f"no {norm} ({colour}) pixels on the first screen"


# ---------------------------------------------------------------- DevTools protocol
class DevTools:
    """A minimal Chrome DevTools protocol client over tornado's websocket client."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, **params):
        self.next_id += 1
        msg_id = self.next_id
        await self.ws.write_message(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            raw = await self.ws.read_message()
            assert raw is not None, "Chromium closed the DevTools connection"
            msg = json.loads(raw)
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg["error"]
                return msg["result"]
            self.events.append(msg)

    async def js(self, expr: str):
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    async def shot(self, rect: dict | None = None) -> np.ndarray:
        from matplotlib.image import imread

        kw = {"clip": {**rect, "scale": 1}} if rect else {}
        data = (await self.call("Page.captureScreenshot", format="png", **kw))["data"]
        return imread(io.BytesIO(base64.b64decode(data)))[..., :3]

    def errors(self) -> list:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(p["args"])
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"])
        return out


async def open_devtools(url: str, user_dir: Path, width: int = 1400):
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--remote-debugging-port=0", f"--user-data-dir={user_dir}",
         f"--window-size={width},1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    from tornado.websocket import websocket_connect

    port_file = user_dir / "DevToolsActivePort"
    for _ in range(300):
        if port_file.is_file() and port_file.read_text().strip():
            break
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as reply:
        targets = json.loads(reply.read())
    page = next(t for t in targets if t["type"] == "page")
    ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=1 << 28)
    dt = DevTools(ws)
    for domain in ("Runtime", "Page", "Log"):
        await dt.call(f"{domain}.enable")
    await dt.call("Page.navigate", url=url)
    for _ in range(300):  # the document is idle once every view has rendered
        if await dt.js("!!(window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].is_idle)"):
            break
        await asyncio.sleep(0.1)
    return proc, dt


VIEW = "[...Bokeh.index.roots].find(v => v.model.name === %s)"
# Screenshot clips are in page coordinates, mouse events in viewport coordinates.
RECT = """(() => { const v = %s; v.el.scrollIntoView({block: 'center'});
  const r = v.canvas_view.el.getBoundingClientRect();
  return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()"""
POINT = """(() => { const v = %s; const r = v.canvas_view.el.getBoundingClientRect();
  return [r.left + v.frame.x_scale.compute(%r), r.top + v.frame.y_scale.compute(%r)]; })()"""
FIELDS = """%s.model.renderers.map(r => r.glyph.fill_color.field)"""
STATE = """(() => { const d = Bokeh.documents[0];
  return {sel: d.get_model_by_name('src-apgd-ce-l2').selected.indices,
          panel: d.get_model_by_name('selection-apgd-ce-l2').text}; })()"""


def _isolated_point(run: Path) -> tuple[int, np.ndarray]:
    """The clean point of layer 0 (L2) farthest from every other point: a click there can hit
    nothing else."""
    npz = next((run / "tasks").glob("apgd-ce-l2-000-*.npz"))
    with np.load(npz) as z:
        xy = z["xy"].astype(float)
    n = len(xy) // 2
    nearest = np.linalg.norm(xy[:n] - xy[knn_oracle(xy, 1)[:n, 0]], axis=1)
    i = int(np.argmax(nearest))
    return i, xy[i]


def test_maps_render_and_a_click_selects_the_twin_in_every_layer(report, tmp_path):
    i, (x, y) = _isolated_point(report.parent)
    last = f"'map-apgd-ce-l2-{len(LAYERS) - 1}'"

    async def scenario():
        proc, dt = await open_devtools(report.as_uri(), tmp_path / "profile")
        try:
            names = await dt.js("[...Bokeh.index.roots].map(v => v.model.name)")
            maps = [n for n in names if n and n.startswith("map-")]
            drawn = {}
            for name in maps:
                img = await dt.shot(await dt.js(RECT % (VIEW % repr(name))))
                drawn[name] = float((img.min(axis=-1) < 0.9).mean())  # not white
            first = "'map-apgd-ce-l2-0'"
            await dt.js(RECT % (VIEW % first))
            before = await dt.shot(await dt.js(RECT % (VIEW % last)))
            await dt.js(RECT % (VIEW % first))
            px, py = await dt.js(POINT % (VIEW % first, float(x), float(y)))
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                await dt.call("Input.dispatchMouseEvent", type=kind, x=px, y=py,
                              button="left", clickCount=1)  # fmt: skip
            await asyncio.sleep(0.5)
            state = await dt.js(STATE)
            after = await dt.shot(await dt.js(RECT % (VIEW % last)))
            # the colour switch: the true-label scheme recolours every map
            await dt.js("Bokeh.documents[0].get_model_by_name('colour-apgd-ce-l2').active = 1")
            await asyncio.sleep(0.5)
            relabelled = await dt.shot(await dt.js(RECT % (VIEW % last)))
            fields = await dt.js(FIELDS % (VIEW % last))
            (tmp_path / "report-clicked.png").write_bytes(
                base64.b64decode((await dt.call("Page.captureScreenshot"))["data"])
            )
            return maps, drawn, before, after, relabelled, fields, state, dt.errors()
        finally:
            # close() only starts the closing handshake; the loop ends before Chromium answers,
            # so the socket itself is closed here (else it leaks to the end of the session).
            stream = dt.ws.protocol.stream if dt.ws.protocol is not None else None
            dt.ws.close()
            if stream is not None:
                stream.close()
            proc.terminate()
            proc.wait(timeout=30)

    maps, drawn, before, after, relabelled, fields, state, errors = asyncio.run(scenario())
    assert errors == []
    assert len(maps) == 2 * len(LAYERS)
    for name, share in drawn.items():
        assert share > 0.01, f"{name}: blank canvas ({share:.4f} of its pixels drawn)"
    assert state["sel"] == [i], state
    assert f"data-sample='{i}'" in state["panel"] and "data:image/png;base64," in state["panel"]
    assert before.shape == after.shape
    changed = (np.abs(after - before).max(axis=-1) > 0.1).mean()
    assert changed > 0.001, "selecting in layer 0 did not change the last layer's map"
    assert (tmp_path / "report-clicked.png").stat().st_size > 10_000
    assert fields == ["label", "label"]
    assert (np.abs(relabelled - after).max(axis=-1) > 0.1).mean() > 0.001
