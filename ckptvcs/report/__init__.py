"""The repository report: a JSON summary (:func:`build_summary`) and one self-contained HTML
page drawn from it (:func:`render_html`); ``ckptvcs report`` writes either. Torch-free.
See docs/report.md for what each section means.
"""

from __future__ import annotations

from .html import render_html
from .summary import SUMMARY_VERSION, build_summary, metric_mode

__all__ = ["build_summary", "render_html", "metric_mode", "SUMMARY_VERSION"]
