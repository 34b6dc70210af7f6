"""The HTML report in headless Chromium: it loads offline with no console error, and every plot
<img> is present and decoded (naturalWidth > 0).

Chromium prints the page's DOM after the load event (--dump-dom) and every console message on
stderr (--enable-logging=stderr). A probe script, inserted first in a copy of the page, records
script errors, failed resources and, at the load event, each image's decoded size into the DOM,
where the test reads them back.

Skipped only when chromium is absent and CI is unset; under CI a missing chromium fails.
"""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from moekit.analysis import RoutingTrace
from moekit.analysis.report import AnalysisConfig, analyze

PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window ? "resource failed: " + (t.src || t.href || t.tagName) : "script: " + e.message);
  }, true);
  ["error", "warn"].forEach(function (level) {
    var orig = console[level];
    console[level] = function () { errors.push(level + ": " + Array.from(arguments).join(" ")); orig.apply(console, arguments); };
  });
  // NOTE: synchronous at the load event, when every image has loaded (or failed): a promise
  // resolving later may miss --dump-dom, which fires once the load event has run.
  window.addEventListener("load", function () {
    var out = document.createElement("pre");
    out.id = "moekit-probe";
    out.textContent = JSON.stringify({
      errors: errors,
      images: Array.from(document.images).map(function (img) {
        return {id: img.id, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight};
      })
    });
    document.body.appendChild(out);
  });
})();
</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: .ci/run must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); set CI=1 to make this a failure")
    return path


def test_report_loads_in_headless_chromium(browser, tmp_path):
    rng = np.random.default_rng(0)
    seqs = [np.argsort(rng.random((3, 40, 8)), axis=2)[:, :, :2] for _ in range(6)]
    trace = RoutingTrace(seqs, 8, ["python", "german", "french"] * 2)
    cfg = AnalysisConfig(srp_n=(4, 16), n_boot=20, sch_n=(4,), model_sch_n=(4,), max_multiple=4,
                         model_multiples=(1, 2), workers=1)
    analyze(trace, tmp_path / "rep", cfg, progress=False)
    page = (tmp_path / "rep" / "report.html").read_text()
    expected = re.findall(r'<img class="plot" id="(plot-[a-z_]+)"', page)
    assert len(expected) == 7
    probed = tmp_path / "rep" / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))

    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'<pre id="moekit-probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the probe never reported; chromium stdout ends:\n{proc.stdout[-1500:]}"
    report = json.loads(match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                        .replace("&amp;", "&"))
    assert report["errors"] == []
    # The report has no script of its own, so any console line is an error the page caused.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    images = {img["id"]: img for img in report["images"]}
    assert sorted(images) == sorted(expected)
    for name, img in images.items():
        assert img["complete"], name
        assert img["naturalWidth"] > 0 and img["naturalHeight"] > 0, name
