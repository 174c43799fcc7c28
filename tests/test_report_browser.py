"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package) opens the
file from disk with name resolution blocked, every figure must decode (naturalWidth > 0), the
metrics table must have one row per layer and norm, and a screenshot must show the curve's
L2 blue and Linf orange. Skipped when /usr/bin/chromium is absent
(``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_report import LAYERS, PROVENANCE, make_run

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
    run, rows = make_run(tmp_path_factory.mktemp("browser"))
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
