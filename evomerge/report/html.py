"""The run report: one self-contained HTML page to look at a run and point at what to export.

``evomerge report RUN`` writes ``RUN/report.html``, and the search rewrites it after every
generation, so a browser refreshed during a run shows it as it goes. Like ``inspect`` it reads the
run folder only (config.yaml, archive.jsonl, history.jsonl, pareto.json, probes.json and, where
someone computed it, kinship.json), never a model and never a live search.

Plotted with plotly.js, inlined once for the whole page: one file that opens offline (no CDN),
with hover, zoom and click on every panel. Chosen over altair/vega-lite because plotly.js ships
inside the Python package (one ~4.8 MB bundle, nothing to fetch), while altair inlines its three
JavaScript bundles only through a further package (vl-convert) and embeds each chart's data in
its own spec, where pairwise panels want one copy of the data shared by all of them.

The page is data (``page_data``) plus plotly specs (``figures``) plus a little JavaScript that
draws them; this module lays them out.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from evomerge.errors import UserError
from evomerge.report.candidates import candidate_table
from evomerge.report.figures import figures
from evomerge.report.page_data import report_data
from evomerge.run import ArchiveEntry, RunDir, atomic_write


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


_PANELS = [  # panel, heading, what it tells a user
    ("front", "Pareto front", "Every distinct candidate at its highest fidelity; hover a dot for its recipe and "
                              "scores, click it for its export command. Pairwise panels beyond two objectives."),
    ("progress", "Progress", "Best value per objective, the front's hypervolume and candidates per minute, per generation."),
    ("recipes", "The picks' recipes", "Per layer: each expert's parameters (and the method), or a layer path's steps."),
    ("estimates", "Estimates against every item", "Candidates scored on the estimator's items and on every validation "
                                                  "item: how far to trust an estimate."),
    ("kinship", "Kinship of the experts", "How alike the experts' task vectors are (alike ones interfere less)."),
]

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:12px 20px;color:#222}
h1{font-size:20px;margin:8px 0 2px}h2{font-size:16px;margin:22px 0 2px}p.what{color:#666;margin:0 0 6px}
.note{color:#8a5a00;background:#fff8e6;border-left:3px solid #e0a800;padding:6px 10px}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:3px 8px;text-align:left;vertical-align:top}
tr.pick td{border-top:1px solid #e4e4e4}td:last-child{max-width:420px}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px;font-size:12px}.muted{color:#777}
#selected{min-height:1.5em;font-size:12.5px;margin-top:4px}h3{font-size:13px;margin:12px 0 0}
"""

_SCRIPT = """
(function () {
  var state = window.__report;
  function finish() {
    state.done = true;
    document.getElementById('report-status').textContent = JSON.stringify(state);
  }
  try {
    var DATA = JSON.parse(document.getElementById('report-data').textContent);
    var resolve = function (node) {
      if (Array.isArray(node)) return node.map(resolve);
      if (node && typeof node === 'object') {
        var keys = Object.keys(node);
        if (keys.length === 1 && keys[0] === '$ref')
          return node.$ref.split('/').reduce(function (o, k) { return o[k]; }, DATA);
        var out = {};
        keys.forEach(function (k) { out[k] = resolve(node[k]); });
        return out;
      }
      return node;
    };
    var marks = function (div) {  // what each plot drew: points, lines, heatmap images, bars
      return div.querySelectorAll('path.point, path.js-line, g.hm image, .barlayer path').length;
    };
    var started = performance.now();
    var jobs = DATA.plots.filter(function (p) { return p.figure; }).map(function (p) {
      var div = document.getElementById(p.id);
      var figure = resolve(p.figure);
      return Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false})
        .then(function () {
          state.plots[p.id] = marks(div);
          if (p.id === 'plot-front') div.on('plotly_click', function (event) {
            var point = event.points[0];
            document.getElementById('selected').innerHTML = point.text +
              '<br>export: <code>' + DATA.export_html + ' ' + point.customdata + '</code>';
          });
        });
    });
    Promise.all(jobs).then(function () {
      state.render_ms = performance.now() - started;  // drawing the plots
      state.load_ms = performance.now();  // since navigation began: parsing plotly.js and the data too
      state.plotly = Plotly.version;
    }, function (error) { state.errors.push('plot failed: ' + error); }).then(finish);
    var live = document.getElementById('live');
    live.checked = location.hash === '#live';
    live.onchange = function () { location.hash = live.checked ? 'live' : ''; };
    setInterval(function () { if (live.checked) location.reload(); }, 30000);
  } catch (error) {
    state.errors.push(String(error));
    finish();
  }
})();
"""

_CATCH = """
window.__report = {errors: [], plots: {}, done: false};
window.addEventListener('error', function (e) { window.__report.errors.push(String(e.message || e)); });
window.addEventListener('unhandledrejection', function (e) { window.__report.errors.push('unhandled: ' + e.reason); });
"""


def render_html(data: Mapping[str, Any], plots: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The page: a header, the picks with their export commands, then one section per panel."""
    plots = figures(data) if plots is None else plots
    esc = lambda value: html.escape(str(value))  # noqa: E731
    counts = data["counts"]
    objs = ", ".join(f"{o['name']} ({o['direction']})" for o in data["objectives"]) or "not known yet"
    head = (f"<h1>evomerge run <code>{esc(data['run'])}</code></h1>"
            f"<p class=muted>{counts['evaluations']} evaluations ({counts['distinct']} distinct recipes, "
            f"{counts['errors']} failed), {counts['generations']} generations, {counts['front']} on the front, "
            f"{counts['verified']} scored on every validation item · objectives {esc(objs)} · written "
            f"{esc(data['written'])} <label><input type=checkbox id=live> reload every 30 s</label></p>")
    body = [head, "<h2>Picks</h2>", _picks_table(data)]
    by_panel: dict[str, list[Mapping[str, Any]]] = {}
    for plot in plots:
        by_panel.setdefault(plot["panel"], []).append(plot)
    for panel, heading, what in _PANELS:
        body.append(f"<section data-panel={panel}><h2>{esc(heading)}</h2><p class=what>{esc(what)}</p>")
        for plot in by_panel.get(panel, []):
            if plot.get("title"):
                body.append(f"<h3>{esc(plot['title'])}</h3>")
            if "note" in plot:
                body.append(f"<p class=note id={plot['id']} data-note>{esc(plot['note'])}</p>")
            else:
                body.append(f"<div class=plot id={plot['id']}></div>")
        if panel == "front":
            body.append("<div id=selected class=muted>click a candidate for its export command</div>")
        body.append("</section>")
    blob = {**data, "plots": list(plots), "export_html": esc(data["export"])}
    # Every "<" as \u003c: the data can neither end its script element nor open a comment in it.
    payload = json.dumps(blob, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return "\n".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>evomerge · {esc(data['run'])}</title><style>{_STYLE}</style>",
        f"<script>{_CATCH}</script><script>{_plotly_js()}</script></head><body>",
        *body,
        "<pre id=report-status hidden></pre>",
        f"<script type=application/json id=report-data>{payload}</script>",
        f"<script>{_SCRIPT}</script></body></html>"])


def _picks_table(data: Mapping[str, Any]) -> str:
    """The candidate table (``candidates.candidate_table``) of the picks, each with its specs in
    front and its export command below."""
    if not data["picks"]:
        return "<p class=note>no picks yet: the front needs a finished generation</p>"
    esc = lambda value: html.escape(str(value))  # noqa: E731
    header, cells = candidate_table(data["picks"], data["tasks"], [o["name"] for o in data["objectives"]])
    rows = []
    for pick, line in zip(data["picks"], cells):
        rows.append("<tr class=pick>" + "".join(f"<td>{esc(c)}</td>" for c in [", ".join(pick["picks"]), *line])
                    + f"</tr><tr><td></td><td colspan={len(header)}><code>{esc(pick['export'])}</code></td></tr>")
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in ["pick", *header]) + "</tr>" + "".join(rows)
            + "</table>")


def write_report(run: RunDir, out: str | Path | None = None, entries: Iterable[ArchiveEntry] | None = None) -> Path:
    """Write the page to ``out`` (default ``RUN/report.html``) atomically, so a browser refreshing
    it during a search never reads half a file; returns its path."""
    path = Path(out) if out is not None else run.report_path
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file path such as {path / 'report.html'}")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist; create it or write elsewhere")
    atomic_write(path, render_html(report_data(run, entries)))
    return path
