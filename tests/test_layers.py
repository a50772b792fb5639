"""The toolkit's modules import one way, bottom to top, with no cycle.

Every import counts, those inside functions included (they only hide a cycle at load time),
and a package that imports all of its modules on import (the env and model registries) counts
as importing each of them. A module imports only from its own layer or the layers below it.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "tests", ".git", "datasets", "runs", "site"}

# bottom to top; a module belongs to the layer of the longest name here that it starts with
LAYERS = [
    ("errors", ["errors"]),
    ("system", ["files", "runtime"]),
    ("config", ["config"]),
    ("environment families", ["env"]),
    ("data", ["algorithm.history", "algorithm.journal", "tokens", "dataset"]),
    ("sources", ["algorithm"]),  # every other module of algorithm/ is part of a source of learning histories
    ("model", ["model"]),
    ("commands", ["cli", "collect", "train", "evaluate", "scripts", "bench"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if SKIP & set(rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The toolkit modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in parts + [base] if p)
            # `from package import module` imports that module (and the package's __init__,
            # which only counts where the name is defined there, not a submodule)
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    if "iter_modules(__path__)" in path.read_text():  # a registry package imports every module in it
        targets += [m for m in known if m.startswith(name + ".") and m.count(".") == name.count(".") + 1]
    found = set()
    for target in targets:
        module = _known_prefix(target, known, "")
        if module is None and package:  # scripts/ and bench/ put their folder on sys.path: `import report`
            module = _known_prefix(f"{package}.{target}", known, package)
        if module is not None and module != name:
            found.add(module)
    return found


def _known_prefix(target: str, known: dict, floor: str) -> str | None:
    """The longest module name in `known` that `target` starts with, longer than `floor`."""
    while len(target) > len(floor):
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return level


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_imports_inside_functions_are_counted(tmp_path):
    (tmp_path / "low.py").write_text("def f():\n    import high\n")
    (tmp_path / "high.py").write_text("import low\n")
    known = {"low": tmp_path / "low.py", "high": tmp_path / "high.py"}
    edges = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(edges) == [["high", "low"]]


def test_dataset_imports_nothing_from_the_model():
    assert not {t for t in graph()["dataset"] if t == "model" or t.startswith("model.")}
