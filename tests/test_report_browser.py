"""End to end: a report renders offline in headless Chromium with every figure loaded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap

import pytest

from gradlab import lab

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("GRADLAB_REQUIRE_BROWSER"):
        pytest.fail(
            "GRADLAB_REQUIRE_BROWSER is set but no Chromium was found (apt-get install chromium)"
        )
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")


# Appended to a copy of the report: after load, count images that decoded to a real bitmap.
PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement('div');
  out.id = 'gradlab-probe';
  out.textContent = 'images=' + imgs.length + ' loaded=' + ok + ' tables=' +
    document.querySelectorAll('table').length + ' h1=' + (document.querySelector('h1') || {}).textContent;
  document.body.appendChild(out);
});
</script>
"""


def test_report_renders_offline_with_every_figure(tmp_path):
    browser = _browser()
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        textwrap.dedent(
            """
            kind = "descent"
            description = "A <b>tag</b> & an ampersand must be escaped"
            [descent]
            num_steps = 200
            problem = [{name = "quadratic", dim = 4}]
            strategy = ["exact", "central_difference"]
            """
        )
    )
    out = tmp_path / "report"
    lab.run(cfg, out=out)
    page = (out / "report.html").read_text()
    assert "&lt;b&gt;tag&lt;/b&gt; &amp; an ampersand" in page  # text escaped
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from the network
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    m = re.search(
        r'id="gradlab-probe">images=(\d+) loaded=(\d+) tables=(\d+) h1=([^<]*)<', proc.stdout
    )
    assert m, f"the page did not render (exit {proc.returncode}): {proc.stderr[-2000:]}"
    images, loaded, tables = int(m[1]), int(m[2]), int(m[3])
    figures = len(list((out / "figures").glob("*.png")))
    assert images == figures == 3
    assert loaded == images
    assert tables >= 1 and "gradlab report" in m[4]
