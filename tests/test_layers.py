"""The package's import graph is layered, and this test keeps it so.

Each module of ``evomerge`` sits in one layer of :data:`LAYERS` and may import only from its own
layer or those below; no two modules may import each other, directly or round a loop; a private
name (``_x``) stays in the module that defines it. The graph is read from the source with
``ast``, so it holds every import a module may run: at module level, inside functions, under
``if TYPE_CHECKING`` (a type a module names is a module it depends on). Importing
``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` too, so an import also reaches the packages
above its target; package ``__init__`` files hold only a docstring, so they sit in the lowest
layer and every submodule can be imported without its siblings.

A new module fails the test until it is placed in :data:`LAYERS`: where a module goes is a
decision, so it is made once, here.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

import pytest

import evomerge

PACKAGE = Path(evomerge.__file__).parent

# Lowest first (DESIGN.md, "Layers"): a module imports only from its own layer or one below it.
DATA, MATH, MODELS, ENGINE, FITNESS, REPORTS, SEARCH, PLAN, CLI = range(9)

LAYERS: dict[str, int] = {
    # packages: their __init__ holds only a docstring
    "evomerge": DATA, "evomerge.fitness": DATA, "evomerge.merge": DATA, "evomerge.zoo": DATA,
    # data types, config and its name lists, serialization, errors
    "evomerge.errors": DATA,
    "evomerge.serialization": DATA,
    "evomerge.zoo_config": DATA,
    "evomerge.config": DATA,
    # the method registry is a name list (which methods, which parameters, their ranges) that
    # the config and a recipe are checked against; it holds no math and imports only errors
    "evomerge.merge.params": DATA,
    "evomerge.merge.registry": DATA,
    "evomerge.recipe": DATA,
    "evomerge.layer_path": DATA,
    "evomerge.run": DATA,
    # what a search optimizes and how a run folder records it: the front and the reports read
    # it without touching the fitness machinery
    "evomerge.fitness.objectives": DATA,
    "evomerge.front": DATA,
    # merge math
    "evomerge.merge.draws": MATH,
    "evomerge.merge.quantized": MATH,
    "evomerge.merge.factored": MATH,
    "evomerge.merge.kernels": MATH,
    "evomerge.merge.stats": MATH,
    "evomerge.merge.subspace": MATH,
    "evomerge.merge.methods": MATH,
    "evomerge.merge.memory": MATH,
    # pools and model files, mergekit I/O
    "evomerge.architecture": MODELS,
    "evomerge.model_files": MODELS,
    "evomerge.adapters": MODELS,
    "evomerge.pool": MODELS,
    "evomerge.mergekit_config": MODELS,
    # merge engine, path model, export
    "evomerge.merge.engine": ENGINE,
    "evomerge.merge.weight_grad": ENGINE,  # reads a Merger's components
    "evomerge.merge.path_model": ENGINE,
    "evomerge.merge.export": ENGINE,
    # zoo, fitness, and kinship (which takes base and experts from the zoo when no models are given)
    "evomerge.fitness.native": FITNESS,
    "evomerge.fitness.losses": FITNESS,
    "evomerge.fitness.dual_anchors": FITNESS,  # reads a Merger's base and task vectors
    "evomerge.fitness.text": FITNESS,
    "evomerge.fitness.tasks": FITNESS,
    "evomerge.fitness.estimators": FITNESS,
    "evomerge.fitness.evaluator": FITNESS,
    "evomerge.zoo.skills": FITNESS,
    "evomerge.zoo.tasks": FITNESS,
    "evomerge.zoo.base": FITNESS,
    "evomerge.zoo.pico": FITNESS,
    "evomerge.zoo.finetune": FITNESS,
    "evomerge.zoo.card": FITNESS,
    "evomerge.zoo.build": FITNESS,
    "evomerge.kinship": FITNESS,
    # reports: below the search, which rewrites report.html as it goes
    "evomerge.report": DATA,
    "evomerge.report.candidates": REPORTS,
    "evomerge.report.run_data": REPORTS,
    "evomerge.report.text": REPORTS,
    "evomerge.report.plots": REPORTS,
    "evomerge.report.page_data": REPORTS,
    "evomerge.report.figures": REPORTS,
    "evomerge.report.html": REPORTS,
    # search
    "evomerge.search.path_space": SEARCH,
    "evomerge.search.pool_space": SEARCH,
    "evomerge.search.space": SEARCH,
    "evomerge.search.messages": SEARCH,
    "evomerge.search.hooks": SEARCH,
    "evomerge.search.algorithms": SEARCH,
    "evomerge.search.workers": SEARCH,
    "evomerge.search.settings": SEARCH,
    "evomerge.search.refine": SEARCH,
    "evomerge.search.loop": SEARCH,
    "evomerge.search.driver": SEARCH,
    "evomerge.plan": PLAN,
    "evomerge.pick_export": PLAN,  # a run's pick (reports) materialized (engine)
    "evomerge.cli": CLI,
}


class Edge(NamedTuple):
    """``source`` imports ``target`` (name ``name``, or the module itself: None) at ``line``."""

    source: str
    target: str
    name: str | None
    line: int

    def __str__(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.source} (line {self.line}) imports {what}"


def modules(root: Path = PACKAGE, package: str = "evomerge") -> dict[str, Path]:
    """Every module and package under ``root`` by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def imports(name: str, source: str, is_package: bool) -> Iterator[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import statement in ``source``, relative
    ones resolved against ``name``."""
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                yield base, alias.name, node.lineno


def _known(dotted: str, known: Iterable[str]) -> str | None:
    """The longest prefix of ``dotted`` that is a known module."""
    known = set(known)
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def edges(sources: Mapping[str, str], packages: Iterable[str] = ()) -> list[Edge]:
    """The import graph of ``sources`` (module name -> its text; ``packages``: the names that are
    packages): an edge to each module an import runs, the packages above it included, leaving
    out packages the importer is inside (they are running already)."""
    packages = set(packages)
    out = []
    for source, text in sources.items():
        for module, name, line in imports(source, text, source in packages):
            if name and f"{module}.{name}" in sources:  # from a.b import c: the submodule a.b.c
                module, name = f"{module}.{name}", None
            target = _known(module, sources)
            if target is None or (source + ".").startswith(target + "."):
                continue  # outside the package, or a package the importer is inside
            if target != module:  # a submodule that is not Python (data) or does not exist
                name = None
            parts = target.split(".")
            for end in range(1, len(parts)):
                above = ".".join(parts[:end])
                if above in sources and not (source + ".").startswith(above + "."):
                    out.append(Edge(source, above, None, line))
            out.append(Edge(source, target, name, line))
    return out


def upward(graph: Iterable[Edge], layers: Mapping[str, int]) -> list[str]:
    return [f"{e} from layer {layers[e.target]} above its own ({layers[e.source]})"
            for e in graph if layers[e.target] > layers[e.source]]


def private(graph: Iterable[Edge]) -> list[str]:
    return [f"{e}, a private name" for e in graph
            if e.name and e.name.startswith("_") and not e.name.startswith("__")]


def unplaced(names: Iterable[str], layers: Mapping[str, int]) -> list[str]:
    return [f"{n} is in no layer: add it to LAYERS in tests/test_layers.py" for n in sorted(names)
            if n not in layers]


def cycles(graph: Iterable[Edge]) -> list[str]:
    """One line per import cycle found (each strongly connected part of the graph once),
    spelled as the loop of edges."""
    following: dict[str, dict[str, Edge]] = {}
    for e in graph:
        following.setdefault(e.source, {}).setdefault(e.target, e)
    found, done = [], set()
    for start in sorted(following):
        if start in done:
            continue
        path = _loop(start, following)
        if path:
            found.append(" -> ".join(str(e) for e in path))
            done.update(e.source for e in path)
    return found


def _loop(start: str, following: Mapping[str, Mapping[str, Edge]]) -> list[Edge] | None:
    """The shortest loop of edges from ``start`` back to it (breadth first), None if none."""
    previous: dict[str, Edge] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target, e in sorted(following.get(node, {}).items()):
            if target == start:
                path = [e]
                while path[0].source != start:
                    path.insert(0, previous[path[0].source])
                return path
            if target not in previous:
                previous[target] = e
                queue.append(target)
    return None


def problems(sources: Mapping[str, str], packages: Iterable[str], layers: Mapping[str, int]) -> list[str]:
    graph = edges(sources, packages)
    return (unplaced(sources, layers) + [f"{n} is in LAYERS but not in the package" for n in sorted(layers)
                                         if n not in sources]
            + cycles(graph) + (upward(graph, layers) if all(n in layers for n in sources) else [])
            + private(graph))


def test_the_package_is_layered():
    found = modules()
    sources = {name: path.read_text() for name, path in found.items()}
    packages = {name for name, path in found.items() if path.name == "__init__.py"}
    found = problems(sources, packages, LAYERS)
    assert not found, "\n".join(found)


def test_package_inits_hold_only_their_docstring():
    """So importing one module never loads its siblings (torch with them)."""
    for name, path in modules().items():
        if path.name == "__init__.py":
            body = ast.parse(path.read_text()).body
            assert all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body), name


# --- the checker itself, on small made-up packages -------------------------------------------
FAKE_LAYERS = {"p": 0, "p.low": 0, "p.sub": 0, "p.sub.mid": 1, "p.high": 2}


def fake(**texts: str) -> dict[str, str]:
    sources = {"p": "", "p.low": "", "p.sub": "", "p.sub.mid": "", "p.high": ""}
    sources.update({"p." + k.replace("__", "."): v for k, v in texts.items()})  # sub__mid: p.sub.mid
    return sources


def test_a_layered_fake_package_passes():
    sources = fake(high="import p.sub.mid\nfrom p import low", sub__mid="from ..low import thing\n")
    assert problems(sources, {"p", "p.sub"}, FAKE_LAYERS) == []


@pytest.mark.parametrize("texts, complaint", [
    ({"low": "from p.high import thing"}, "p.low (line 1) imports p.high.thing from layer 2 above its own (0)"),
    ({"low": "def f():\n    import p.sub.mid"}, "p.low (line 2) imports p.sub.mid from layer 1"),
    ({"sub__mid": "from . import low\nfrom ..high import x"}, "p.sub.mid (line 2) imports p.high.x from layer 2"),
    ({"low": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.sub import mid"},
     "p.low (line 3) imports p.sub.mid from layer 1"),
    ({"low": "from p.sub import mid"}, "imports p.sub.mid from layer 1"),
    ({"high": "from p.sub.mid import _helper"}, "p.high (line 1) imports p.sub.mid._helper, a private name"),
    ({"low": "import p.sub", "sub": "from p import low"},
     "p.low (line 1) imports p.sub -> p.sub (line 1) imports p.low"),
    ({"high": "import p.new", "new": ""}, "p.new is in no layer"),
])
def test_the_checker_names_each_offending_edge(texts, complaint):
    found = problems(fake(**texts), {"p", "p.sub"}, FAKE_LAYERS)
    assert any(complaint in line for line in found), found


def test_importing_a_module_reaches_the_packages_above_it():
    # p.sub's __init__ runs when p.low imports p.sub.mid: an upward import if p.sub sat high
    found = problems(fake(low="import p.sub.mid"), {"p", "p.sub"}, {**FAKE_LAYERS, "p.sub": 2, "p.sub.mid": 0})
    assert any("p.low (line 1) imports p.sub from layer 2" in line for line in found), found
