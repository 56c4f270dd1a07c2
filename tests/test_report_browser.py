"""The report in a real browser: Debian's headless chromium, driven over the DevTools protocol.

The page must load from file:// with no console error and no request but itself, and
every chart must render (an SVG with a size, and paths or points in it). A full-page
screenshot is written to a temporary folder and, when CKPTVCS_SCREENSHOT_DIR is set,
there too (docs/img/report.png was made that way). scripts/setup.sh installs chromium;
without it the test is skipped, unless CKPTVCS_REQUIRE_BROWSER is set (then it fails).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import report_repo
from cdp_browser import Browser, chromium_path
from ckptvcs.report import build_summary, render_html

_INSPECT = """JSON.stringify({
  title: document.title,
  sections: [...document.querySelectorAll('section')].map(s => s.id),
  charts: [...document.querySelectorAll('svg.chart')].map(svg => {
    const box = svg.getBoundingClientRect();
    return {
      title: (svg.querySelector('title') || {}).textContent || '',
      width: box.width, height: box.height,
      paths: [...svg.querySelectorAll('path.line')].filter(p => p.getTotalLength() > 0).length,
      points: svg.querySelectorAll('.pt').length,
      bars: [...svg.querySelectorAll('rect.bar')].filter(r => r.getBBox().width > 0).length,
      tooltips: svg.querySelectorAll('.pt title, rect.bar title').length,
    };
  }),
})"""


@pytest.fixture(scope="module")
def browser() -> Browser:
    binary = chromium_path()
    if binary is None:
        if os.environ.get("CKPTVCS_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed and CKPTVCS_REQUIRE_BROWSER is set (run scripts/setup.sh)")
        pytest.skip("chromium is not installed (scripts/setup.sh installs it with apt-get as root)")
    b = Browser(binary)
    yield b
    b.close()


def test_report_renders_in_chromium(browser: Browser, tmp_path: Path) -> None:
    repo = report_repo.build(tmp_path / "repo")
    try:
        page = tmp_path / "report.html"
        page.write_text(render_html(build_summary(repo)), encoding="utf-8")
    finally:
        repo.close()
    shot = tmp_path / "report.png"
    result = browser.load(page.as_uri(), _INSPECT, screenshot=shot)

    assert result["console_errors"] == []
    assert result["requests"] == [page.as_uri()]  # nothing but the file itself
    info = json.loads(result["value"])
    assert info["title"].startswith("ckptvcs report")
    assert info["sections"] == ["attention", "overview", "metrics", "storage", "latency", "retention", "health"]
    charts = info["charts"]
    assert len(charts) >= 7
    for chart in charts:
        assert chart["width"] > 100 and chart["height"] > 100, chart
        assert chart["paths"] + chart["points"] + chart["bars"] > 0, chart  # not an empty plot
        assert chart["tooltips"] == chart["points"] + chart["bars"], chart
    metric_charts = [c for c in charts if "against training step" in c["title"]]
    assert len(metric_charts) == 2 and all(c["paths"] == 2 for c in metric_charts)  # one line per branch

    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("CKPTVCS_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "report.png")
