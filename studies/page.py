"""A self-contained HTML page (sections, tables, plotly figures; plotly.js inlined, so it opens offline) and the
atomic write every study page and CSV goes through. The report of one store (studies/report.py), the effects
page of `workbench intervene` (studies/effects_report.py) and `workbench evaluate`'s page
(studies/world_report.py) are built with it.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1400px; color: #222; padding: 0 16px; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }  /* (the row names: metrics, heads, samples) */
.note { color: #555; font-size: 0.9em; max-width: 60em; } .ok { color: #1a7f37; } .bad { color: #c62828; }
.figure { margin: 12px 0 28px 0; overflow-x: auto; max-width: 100%; } .tablewrap { overflow-x: auto; max-width: 100%; }
code { background: #f4f4f4; padding: 1px 4px; }
details summary { cursor: pointer; color: #1565c0; font-size: 0.9em; margin: 4px 0 12px 0; }
@page { size: A4 landscape; margin: 10mm; }
@media print {  /* (printed, a figure or table wider than the page was cut at its edge: its data seemed to end there) */
  body { max-width: none; margin: 0; padding: 0; }
  .figure, .tablewrap { overflow: visible; zoom: var(--print-zoom, 1); }
  .figure, tr { break-inside: avoid; } h2, h3 { break-after: avoid; }
  .modebar-container { display: none; }
}
"""
MIN_FIGURE_PX = 560  # a figure drawn narrower than its own width to fit a window keeps at least this much of it...
MIN_FIGURE_SHARE = 0.6  # ...and this share of its own width: a narrower window scrolls it (squashed, unreadable)
PRINT_WIDTH = 1040  # CSS pixels across an A4 landscape page inside its margins: wider figures and tables shrink to it
TABLE_ROWS = 30  # rows the reports' long tables (heads ranked, head metrics) show before folding the rest
FOLD_SLACK = 10  # a table of at most this many rows more than `shown` is shown whole (folding a few saves nothing)


def number(value, spec: str = "{:.4g}") -> str:
    """`value` formatted by `spec` ("{:.4f}", "{:+.3g}"), a value that rounds to zero written without its minus
    ("-0.0000" in a table of changes read as a small decrease): "0.0000", or "+0.0000" where `spec` signs."""
    text = spec.format(value)
    if isinstance(value, (int, np.integer)) or not isinstance(value, (float, np.floating)):
        return text  # (an integer has no negative zero)
    if not math.isfinite(value) or math.copysign(1.0, value) > 0:
        return text
    mantissa = re.split(r"[eE][+-]", spec.format(-float(value)))[0]  # (its digits before any exponent)
    return spec.format(0.0) if not re.search(r"[1-9]", mantissa) else text  # (padding, sign and units as the spec's)


# The page's figures fitted to the window (plotly keeps a figure's fixed `width`, so at 800 px a 1120-px heatmap
# row lost its last head and colour bar behind a scroll bar): a figure with a width is drawn at the smaller of it and
# its box's width, not below its data-min-width; its title rewrapped for that width as figures.wrap_title does
# (lines of (width - 120) / 9 characters at most, the top margin and height grown by a line each) and kept as many
# pixels from the left edge (not closer, over the y axis's name), so no title runs past the edge, also after a
# slider's step sets another; a figure without a width fills its box (plotly's autosize).
FIT_JS = """
function wrapTitle(text, width) { var limit = Math.max(20, Math.floor((width - 120) / 9));
  return text.split('<br>').map(function (line) { var out = [], cur = '';
    (line.match(/(?:<[^>]*>|<|[^\\s<])+/g) || []).forEach(function (word) { var next = cur ? cur + ' ' + word : word;
      if (cur && next.replace(/<[^>]*>/g, '').length > limit) { out.push(cur); cur = word; } else { cur = next; } });
    return out.concat([cur]).join('<br>'); }).join('<br>'); }
function fitted(div) { var own = div._own, room = div.parentNode.clientWidth;
  var width = Math.max(own.min, Math.min(own.width, room)), title = own.title, extra = 0;
  if (title && width < own.width) { title = wrapTitle(title, width);
    extra = title.split('<br>').length - own.title.split('<br>').length; }
  return {width: width, height: own.height + 22 * extra, top: own.top + 22 * extra, title: title,
          x: Math.min(0.5, own.x * own.width / width)}; }
function titleOf(layout) { var t = layout.title; return (t && (typeof t === 'string' ? t : t.text)) || ''; }
function fitFirst(div, layout) { if (!layout.width || !div.dataset.minWidth) return layout;
  var title = titleOf(layout), t = typeof layout.title === 'object' ? layout.title : {};
  var x = (typeof t.x === 'number' && t.xref !== 'paper') ? t.x : (t.xref === 'paper' || t.x != null) ? null : 0.05;
  div._own = {width: layout.width, min: Math.min(layout.width, Number(div.dataset.minWidth)), title: title,
              height: layout.height || 450, top: (layout.margin && layout.margin.t != null) ? layout.margin.t : 100,
              x: x};
  var f = fitted(div); layout.width = f.width; layout.height = f.height;
  layout.margin = Object.assign({}, layout.margin, {t: f.top});
  if (title) layout.title = Object.assign({}, t, {text: f.title}, x === null ? {} : {x: f.x});
  div._shown = f.title;
  return layout; }
function refit(div) { var f = fitted(div); div._shown = f.title;
  var keys = {width: f.width, height: f.height, 'margin.t': f.top};
  if (div._own.title) keys['title.text'] = f.title;
  if (div._own.title && div._own.x !== null) keys['title.x'] = f.x;
  return Plotly.relayout(div, keys).then(function () { fitPrint(div.parentNode); }); }
function onAnimated(div) { div.on('plotly_animated', function () { var now = titleOf(div.layout);
  if (div._own && now !== div._shown) { div._own.title = now; refit(div); } }); }
var refitTimer = null;
function refitAll() { clearTimeout(refitTimer); refitTimer = setTimeout(function () {
  document.querySelectorAll('.plotly-graph-div').forEach(function (div) { if (!div._own) return;
    var f = fitted(div); if (f.width !== div._fullLayout.width || f.height !== div._fullLayout.height) refit(div); });
}, 150); }
"""


def min_figure_width(width: int) -> int:
    """The narrowest a figure made `width` pixels wide is drawn to fit a window (MIN_FIGURE_PX, MIN_FIGURE_SHARE):
    its panels and colour bar stay readable; a narrower window scrolls it."""
    return min(int(width), max(MIN_FIGURE_PX, round(MIN_FIGURE_SHARE * width)))


class Page:
    """An HTML page assembled from sections, tables and figures."""

    def __init__(self, title: str):
        self.title, self.parts, self.ids = title, [], set()
        self.sections: list[tuple[str, str]] = []  # (anchor, text) of each <h2>, for the contents line

    def h(self, text: str, level: int = 2):
        if level != 2:
            self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
            return
        anchor = f"s{len(self.sections)}"
        self.sections.append((anchor, text))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(text)}</h2>')

    def p(self, text: str, cls: str = "note"):
        self.parts.append(f'<p class="{cls}">{text}</p>')

    def table(self, df: pd.DataFrame, *, index: bool = True, float_format: str = "{:.4g}", shown: int | None = None):
        """Append `df` as a table. With `shown`, a table of more rows shows its first `shown` and folds the rest
        under a line that opens them (a 1.3B model's 360 heads are ~9000 px of rows)."""
        if index and any(n is not None for n in df.index.names):  # a named index: its names in the one header row
            df, index = df.reset_index(), False                     # (to_html gives them a second, mostly empty row)

        def rows(part):  # a table wider than the page scrolls alone
            return '<div class="tablewrap">' + part.to_html(
                index=index, float_format=lambda v: number(v, float_format), border=0, na_rep="NaN",
                classes="table") + "</div>"

        if shown is None or len(df) <= shown + FOLD_SLACK:
            self.parts.append(rows(df))
            return
        self.parts.append(rows(df.iloc[:shown]) + f"<details><summary>the other {len(df) - shown} of {len(df)} "
                          f"rows</summary>{rows(df.iloc[shown:])}</details>")

    def figure(self, fig, fig_id: str, min_width: int | None = None):
        """Append plotly figure `fig` (div id `fig_id`). A figure made `width` pixels wide is drawn that wide where
        the page has room and at the page's width where it has not, but never below `min_width` (default
        `min_figure_width`): below that it scrolls."""
        if fig_id in self.ids:
            raise ValueError(f"duplicate figure id {fig_id}")
        self.ids.add(fig_id)
        payload = fig.to_json().replace("</", "<\\/")  # a JSON string cannot close the script element
        title = fig.layout.title.text or fig_id  # (a screen reader's name for the figure: its title as text)
        name = html.escape(" ".join(re.sub(r"<[^>]*>", " ", title).split()), quote=True)
        width = fig.layout.width
        fit = f' data-min-width="{int(min_width or min_figure_width(width))}"' if width else ""
        self.parts.append(
            f'<div class="figure" role="figure" aria-label="{name}"><div id="{fig_id}" class="plotly-graph-div"{fit}>'
            '</div>'
            f'<script type="application/json" id="{fig_id}-json">{payload}</script></div>'
        )

    def _contents(self) -> str:
        """A line of links to the sections, on a page of more than four (a report of every layer is long)."""
        if len(self.sections) <= 4:
            return ""
        links = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.sections)
        return f'<p class="note">Sections: {links}</p>\n'

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        # each figure plotted from its JSON (no "share to the cloud" button: the page works offline), fitted to the
        # window's width (FIT_JS) and refitted when it changes; a figure or table drawn wider than a printed page
        # gets the zoom that fits it there (--print-zoom, used by the print CSS); a narrower one keeps its size
        loader = (
            "function fitPrint(el) { var w = 0; el.querySelectorAll('.svg-container, table').forEach(function (c) {"
            " w = Math.max(w, c.getBoundingClientRect().width); });"  # (the drawing's width, not its box's)
            " el.style.removeProperty('--print-zoom');"
            f" if (w > {PRINT_WIDTH}) el.style.setProperty('--print-zoom', ({PRINT_WIDTH} / w).toFixed(3)); }}"
            " document.querySelectorAll('.tablewrap').forEach(fitPrint);" + FIT_JS +
            "document.querySelectorAll('script[type=\"application/json\"][id$=\"-json\"]').forEach(function (el) {"
            " var fig = JSON.parse(el.textContent); var div = document.getElementById(el.id.slice(0, -5));"
            " var layout = fitFirst(div, fig.layout);"
            " Plotly.newPlot(div, {data: fig.data, layout: layout, frames: fig.frames || [],"
            " config: {responsive: true, displaylogo: false, showSendToCloud: false}})"
            ".then(function () { fitPrint(div.parentNode); onAnimated(div); }); });"
            "window.addEventListener('resize', refitAll);"
        )
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f"<h1>{html.escape(self.title)}</h1>\n" + self._contents() + "\n".join(self.parts)
            + f"\n<script>{loader}</script></body></html>\n"
        )


def html_out(out: str | Path, what: str = "out") -> Path:
    """The HTML file a report writes, refused up front when it names a folder (it failed after the work, with the
    OS's words and a temporary file's name) or a .csv or .png file (a report's table and an effects report's figure
    go beside the page under its name with those suffixes: one of the two was lost); `what`: its name in the
    message (the command line's --out)."""
    from workbench.errors import WorkbenchError

    out = Path(out)
    if out.is_dir():
        raise WorkbenchError(f"{what} {str(out)!r} is a folder; give the HTML file to write, e.g. "
                             f"{str(out / 'report.html')!r}")
    if out.suffix.lower() in (".csv", ".png"):
        raise WorkbenchError(f"{what} {str(out)!r} names the HTML page, beside which a report writes its table (.csv) "
                             f"or figure (.png) under the page's name; give e.g. {str(out.with_suffix('.html'))!r}")
    return out


def write_atomic(text: str, out: str | Path) -> Path:
    """Write `text` to `out` atomically (models/files.py); returns `out`."""
    from models.files import atomic_write_text

    atomic_write_text(out, text)
    return Path(out)
