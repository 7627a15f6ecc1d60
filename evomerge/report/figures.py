"""The run report's plotly figures, as plain specs built from ``page_data`` (so tests check them
without a browser). Large arrays stay in the page's data once and are referenced from the specs as
``{"$ref": "front/groups/evaluated/values/zoo_add"}``: a four-objective run draws each candidate in
six pairwise panels, and copying its hover text six times would multiply the file."""

from __future__ import annotations

from typing import Any, Mapping

from evomerge.report.candidates import number

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]
_GROUP_STYLE = {  # name, marker; the order is the drawing order, so picks are on top
    "evaluated": ("evaluated", {"size": 5, "color": "rgba(120,120,120,0.45)"}),
    "front": ("Pareto front", {"size": 7, "color": "#1f77b4"}),
    "grid": ("uniform merges", {"size": 10, "color": "#2ca02c", "symbol": "triangle-up",
                                "line": {"width": 1, "color": "white"}}),
    "experts": ("experts", {"size": 10, "color": "#ff7f0e", "symbol": "diamond", "line": {"width": 1, "color": "white"}}),
    "base": ("base", {"size": 10, "color": "black", "symbol": "square", "line": {"width": 1, "color": "white"}}),
    "picks": ("picks", {"size": 15, "color": "#d62728", "symbol": "star", "line": {"width": 1, "color": "white"}}),
}
_HOVER = "%{text}<extra></extra>"


def _ref(*path: str | int) -> dict[str, str]:
    return {"$ref": "/".join(map(str, path))}


def figures(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every plot of the page: ``{"id", "panel", "figure": {"data", "layout"}}`` or, where there
    is nothing to draw yet, ``{"id", "panel", "note"}``."""
    plots = [_front_plot(data), _progress_plot(data)]
    for pick in data["picks"]:
        plots.append(_recipe_plot(pick))
    if not data["picks"]:
        plots.append({"id": "plot-recipe", "panel": "recipes", "note": "no picks yet (no finished generation)"})
    plots += [_estimate_plot(data), _kinship_plot(data)]
    return plots


def _front_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["front"]
    names = [o["name"] for o in view["objectives"]]
    groups = view["groups"]
    plot: dict[str, Any] = {"id": "plot-front", "panel": "front"}
    if not names:
        return {**plot, "note": "objectives not known yet: no generation has finished"}
    if not any(groups[g]["id"] for g in groups):
        return {**plot, "note": "no successful evaluation yet"}
    label = {o["name"]: f"{o['name']} ({o['direction']})" for o in view["objectives"]}
    traces: list[dict[str, Any]] = []
    layout: dict[str, Any] = {"height": 460, "hovermode": "closest", "margin": {"t": 30, "r": 10, "b": 50, "l": 60},
                              "legend": {"orientation": "h", "y": 1.08, "x": 0}}

    def scatter(group: str, x: Any, y: Any, axes: int, first: bool) -> dict[str, Any]:
        name, marker = _GROUP_STYLE[group]
        return {"type": "scatter", "mode": "markers", "name": name, "x": x, "y": y, "text": _ref("front", "groups", group, "hover"),
                "hovertemplate": _HOVER, "marker": marker, "legendgroup": group, "showlegend": first,
                "xaxis": f"x{axes if axes > 1 else ''}", "yaxis": f"y{axes if axes > 1 else ''}",
                "customdata": _ref("front", "groups", group, "id")}

    present = [g for g in _GROUP_STYLE if groups[g]["id"]]
    if len(names) == 1:
        (o,) = names
        traces.append({"type": "scatter", "mode": "lines", "name": "best so far", "x": view["best"]["id"],
                       "y": view["best"]["values"][o], "line": {"shape": "hv", "color": "#1f77b4"},
                       "hoverinfo": "skip"})
        traces += [scatter(g, _ref("front", "groups", g, "id"), _ref("front", "groups", g, "values", o), 1, True)
                   for g in present if g != "front"]
        layout.update(xaxis={"title": {"text": "archive id"}}, yaxis={"title": {"text": label[o]}})
        return {**plot, "figure": {"data": traces, "layout": layout}}
    n = len(names)
    cells = [(row, col) for row in range(n - 1) for col in range(row + 1)]  # lower triangle
    size, gap = 1 / (n - 1), 0.06 if n > 2 else 0.0
    for k, (row, col) in enumerate(cells, start=1):
        x, y = names[col], names[row + 1]
        suffix = "" if k == 1 else str(k)
        layout[f"xaxis{suffix}"] = {"domain": [col * size + gap / 2, (col + 1) * size - gap / 2],
                                    "anchor": f"y{suffix}", "title": {"text": label[x] if row == n - 2 else ""},
                                    "zeroline": False}
        layout[f"yaxis{suffix}"] = {"domain": [1 - (row + 1) * size + gap / 2, 1 - row * size - gap / 2],
                                    "anchor": f"x{suffix}", "title": {"text": label[y] if col == 0 else ""},
                                    "zeroline": False}
        if n == 2 and groups["front"]["id"]:  # with two objectives the front is a staircase worth joining
            traces.append({"type": "scatter", "mode": "lines", "name": "front line", "showlegend": False,
                           "x": _staircase(groups["front"], x, y)[0], "y": _staircase(groups["front"], x, y)[1],
                           "line": {"color": "#1f77b4", "width": 1}, "hoverinfo": "skip"})
        traces += [scatter(g, _ref("front", "groups", g, "values", x), _ref("front", "groups", g, "values", y), k, k == 1)
                   for g in present]
    layout["height"] = 460 if n == 2 else min(260 * (n - 1), 900)
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _staircase(group: Mapping[str, Any], x: str, y: str) -> tuple[list, list]:
    points = sorted(zip(group["values"][x], group["values"][y]), key=lambda p: (p[0] is None, p))
    return [p[0] for p in points], [p[1] for p in points]


def _progress_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["progress"]
    plot: dict[str, Any] = {"id": "plot-progress", "panel": "progress"}
    if not view["generation"]:
        return {**plot, "note": "no generation finished yet"}
    gens = view["generation"]
    traces = [{"type": "scatter", "mode": "lines+markers", "name": f"best {name}", "x": gens, "y": values,
               "line": {"color": _PALETTE[i % len(_PALETTE)]}, "hovertemplate": f"generation %{{x}}<br>best {name} %{{y}}<extra></extra>"}
              for i, (name, values) in enumerate(view["best"].items())]
    traces.append({"type": "scatter", "mode": "lines+markers", "name": "hypervolume", "x": gens, "y": view["hypervolume"],
                   "yaxis": "y2", "line": {"color": "black"}, "hovertemplate": "generation %{x}<br>hypervolume %{y}<extra></extra>"})
    traces.append({"type": "bar", "name": "candidates/min", "x": gens, "y": view["rate"], "yaxis": "y3",
                   "customdata": view["evaluations"], "marker": {"color": "#9aa9bd"},
                   "hovertemplate": "generation %{x}<br>%{y} candidates/min<br>%{customdata} evaluations<extra></extra>"})
    layout = {"height": 520, "margin": {"t": 30, "r": 10, "b": 45, "l": 60}, "hovermode": "closest",
              "legend": {"orientation": "h", "y": 1.06, "x": 0},
              "xaxis": {"anchor": "y3", "title": {"text": "generation"}, "dtick": 1 if len(gens) <= 30 else None},
              "yaxis": {"domain": [0.58, 1], "title": {"text": "best per objective"}},
              "yaxis2": {"domain": [0.3, 0.52], "title": {"text": "hypervolume"}},
              "yaxis3": {"domain": [0, 0.24], "title": {"text": "cand./min"}, "type": "log"}}
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _recipe_plot(pick: Mapping[str, Any]) -> dict[str, Any]:
    view = pick["view"]
    plot: dict[str, Any] = {"id": f"plot-recipe-{pick['id']}", "panel": "recipes",
                            "title": f"id {pick['id']} · {', '.join(pick['picks'])}"}
    if view["kind"] == "note":
        return {**plot, "note": view["note"]}
    if view["kind"] == "path":
        text = [[f"step {i}: {source} block {b} · scale {s:g}" if b is not None else ""
                 for i, (b, s) in enumerate(zip(blocks, row))]
                for source, blocks, row in zip(view["rows"], view["blocks"], view["z"])]
        traces = [{"type": "heatmap", "x": view["columns"], "y": view["rows"], "z": view["z"], "text": text,
                   "hovertemplate": _HOVER, "colorscale": "Viridis", "colorbar": {"title": {"text": "scale"}},
                   "xgap": 1, "ygap": 1}]
        layout = {"height": 110 + 28 * len(view["rows"]), "margin": {"t": 30, "r": 10, "b": 40, "l": 110},
                  "title": {"text": view["summary"], "font": {"size": 12}},
                  "xaxis": {"title": {"text": "step of the path"}}, "yaxis": {"autorange": "reversed"}}
        return {**plot, "figure": {"data": traces, "layout": layout}}
    columns, rows, z = view["columns"], view["rows"], view["z"]
    method_rows = [f"method · {m['component']}" if m["component"] != "all" else "method" for m in view["methods"]]
    names = list(dict.fromkeys(name for m in view["methods"] for name in m["methods"]))
    text = [[f"{row} · layer {col}: {number(v)}" for col, v in zip(columns, values)] for row, values in zip(rows, z)]
    method_text = [[f"layer {col}: {name}" + (f" ({g})" if g else "") for col, name, g in zip(columns, m["methods"], m["globals"])]
                   for m in view["methods"]]
    steps = max(len(names), 1)
    palette = [stop for i in range(steps) for stop in ([i / steps, _PALETTE[i % 10]], [(i + 1) / steps, _PALETTE[i % 10]])]
    traces = [{"type": "heatmap", "x": columns, "y": rows, "z": z, "text": text, "hovertemplate": _HOVER,
               "colorscale": "Viridis", "xgap": 1, "ygap": 1, "colorbar": {"title": {"text": "value"}, "len": 0.8, "y": 0.4}},
              {"type": "heatmap", "x": columns, "y": method_rows, "yaxis": "y2", "showscale": False, "xgap": 1,
               "z": [[names.index(name) + 0.5 for name in m["methods"]] for m in view["methods"]],
               "zmin": 0, "zmax": steps, "colorscale": palette, "text": method_text, "hovertemplate": _HOVER}]
    annotations = []
    for row, m in zip(method_rows, view["methods"]):  # the method's name once per run of layers using it
        start = 0
        for i in range(1, len(columns) + 1):
            if i == len(columns) or m["methods"][i] != m["methods"][start]:
                annotations.append({"x": columns[(start + i - 1) // 2], "y": row, "xref": "x", "yref": "y2",
                                    "text": m["methods"][start], "showarrow": False, "font": {"color": "white", "size": 11}})
                start = i
    band = 0.12 if len(rows) > 6 else 0.2
    layout = {"height": 140 + 22 * (len(rows) + len(method_rows)), "margin": {"t": 30, "r": 10, "b": 40, "l": 140},
              "xaxis": {"title": {"text": "layer"}, "type": "category"},
              "yaxis": {"domain": [0, 1 - band - 0.03], "autorange": "reversed", "type": "category"},
              "yaxis2": {"domain": [1 - band, 1], "type": "category"}, "annotations": annotations}
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _estimate_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["estimates"]
    plot: dict[str, Any] = {"id": "plot-estimates", "panel": "estimates"}
    if not view["tasks"]:
        return {**plot, "note": "no candidate was scored both ways yet: the search verifies its best estimates on "
                                "every validation item at the end (fitness.verify), and racing each generation "
                                "(fitness.multi_fidelity)"}
    traces, low, high = [], 1.0, 0.0
    for i, (task, pairs) in enumerate(view["tasks"].items()):
        low, high = min(low, *pairs["estimate"], *pairs["full"]), max(high, *pairs["estimate"], *pairs["full"])
        traces.append({"type": "scatter", "mode": "markers", "name": f"{task} (|gap| {number(pairs['mae'])})",
                       "x": pairs["estimate"], "y": pairs["full"], "customdata": pairs["id"],
                       "marker": {"size": 9, "color": _PALETTE[i % 10]},
                       "hovertemplate": f"id %{{customdata}} · {task}<br>estimate %{{x}}<br>all items %{{y}}<extra></extra>"})
    traces.insert(0, {"type": "scatter", "mode": "lines", "name": "estimate = all items", "x": [low, high], "y": [low, high],
                      "line": {"dash": "dot", "color": "grey"}, "hoverinfo": "skip"})
    layout = {"height": 420, "margin": {"t": 30, "r": 10, "b": 50, "l": 60}, "hovermode": "closest",
              "xaxis": {"title": {"text": "estimate (the estimator's items)"}},
              "yaxis": {"title": {"text": "score on every validation item"}, "scaleanchor": "x"}}
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _kinship_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["kinship"]
    plot: dict[str, Any] = {"id": "plot-kinship", "panel": "kinship"}
    if "note" in view:
        return {**plot, "note": view["note"]}
    experts = view["experts"]
    matrices = [("cosine of task vectors", view["cosine"], "RdBu", -1, 1)]
    if view["overlap"] is not None:
        chance = f" (random: {number(view['chance'])})" if view["chance"] is not None else ""
        matrices.append((f"top singular subspace overlap{chance}", view["overlap"], "Viridis", 0, 1))
    traces, layout = [], {"height": 150 + 45 * len(experts), "margin": {"t": 40, "r": 10, "b": 60, "l": 80},
                          "annotations": []}
    width = 1 / len(matrices)
    for k, (title, z, scale, low, high) in enumerate(matrices, start=1):
        suffix = "" if k == 1 else str(k)
        traces.append({"type": "heatmap", "x": experts, "y": experts, "z": z, "zmin": low, "zmax": high,
                       "colorscale": scale, "texttemplate": "%{z:.2f}", "showscale": False,
                       "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
                       "hovertemplate": f"{title}<br>%{{y}} · %{{x}}: %{{z}}<extra></extra>"})
        layout[f"xaxis{suffix}"] = {"domain": [(k - 1) * width + 0.04, k * width - 0.04], "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "autorange": "reversed"}
        layout["annotations"].append({"text": title, "xref": "paper", "yref": "paper", "x": (k - 0.5) * width,
                                      "y": 1.08, "showarrow": False})
    return {**plot, "figure": {"data": traces, "layout": layout}}
