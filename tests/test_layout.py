"""The package's layout holds (README "Layout", core/__init__.py): every import inside the package
names a module that exists (lazy imports in function bodies too, which no import of the module
would run), no module imports itself back through others, core/ has no Dagster import, and
core's stages import only the stages before them. Static: reads the source, runs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "autoembed_dagster"
# core's stages in order: each may import only those before it (core/__init__.py says why).
STAGES = ["config", "db", "embed", "targets", "pipelines", "queue", "drain", "health", "migrate", "search", "api"]
# Modules outside core/ that core may import: leaves that import nothing of the package.
CORE_MAY_IMPORT = {f"{PACKAGE}.packaged"}  # the files the package carries (sql/, ...)


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every `from ... import` of the package in module `name`."""
    path, is_package = MODULES[name]
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == PACKAGE or source.startswith(PACKAGE + "."):
                out.append((node.lineno, source, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names if a.name.startswith(PACKAGE + "."))
    return out


def _edges(name: str) -> set[str]:
    """The package modules `name` imports (a submodule imported by name counts as itself)."""
    out = set()
    for _, source, names in _imports(name):
        for n in names or [""]:
            target = f"{source}.{n}" if n and f"{source}.{n}" in MODULES else source
            if target in MODULES and target != name:
                out.add(target)
    return out


def _defined_names(name: str) -> set[str]:
    path, _ = MODULES[name]
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in sub.names)
                elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
    return names


def test_every_import_in_the_package_names_a_module_and_a_name_that_exist():
    missing = []
    for name in sorted(MODULES):
        for line, source, names in _imports(name):
            where = f"{MODULES[name][0].relative_to(ROOT)}:{line}"
            if source not in MODULES:
                missing.append(f"{where}: no module {source}")
                continue
            defined = _defined_names(source)
            missing.extend(f"{where}: {source} has no {n}" for n in names
                           if n != "*" and f"{source}.{n}" not in MODULES and n not in defined)
    assert not missing, "\n".join(missing)


def test_no_module_imports_itself_back():
    graph = {name: _edges(name) for name in MODULES}
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for name, targets in graph.items():
        for t in list(targets):
            parts = t.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in MODULES and not name.startswith(parent + ".") and parent != name:
                    targets.add(parent)
    cycles, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "core" else None


def test_core_stages_import_only_the_stages_before_them_and_never_dagster():
    assert {_stage(n) for n in MODULES if _stage(n)} <= set(STAGES), "a core module outside the known stages"
    wrong = []
    for name in sorted(MODULES):
        stage = _stage(name)
        if stage is None:
            continue
        path = MODULES[name][0]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong.extend(f"{path.relative_to(ROOT)}: imports {m}" for m in mods if m.split(".")[0] == "dagster")
        for target in _edges(name):
            other = _stage(target)
            if target.startswith(f"{PACKAGE}.core") and other is None and target != f"{PACKAGE}.core":
                wrong.append(f"{name} imports {target}")
            elif other is not None and other != stage and STAGES.index(other) > STAGES.index(stage):
                wrong.append(f"{name} ({stage}) imports {target} ({other}), a later stage")
            elif not target.startswith(f"{PACKAGE}.core") and target not in CORE_MAY_IMPORT:
                wrong.append(f"{name} imports {target}, outside core")
    assert not wrong, "\n".join(wrong)
    assert all(not _edges(leaf) for leaf in CORE_MAY_IMPORT), "a module core may import imports the package"


@pytest.mark.parametrize("package", ["core.db", "core.embed", "core.targets", "core.queue", "core.drain",
                                     "core.migrate", "demo"])
def test_each_stage_package_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((ROOT / PACKAGE / package.replace(".", "/") / "__init__.py").read_text()))
    assert doc and "May import" in doc, package


def test_the_readme_layout_names_every_module_of_core():
    """README "Layout" is the map a newcomer walks: every module of core's stage packages is on it."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    words = set(layout.replace("/", " ").replace(",", " ").replace("(", " ").replace(")", " ").split())
    missing = [name for name in sorted(MODULES) if _stage(name) and name.count(".") == 3
               and not name.endswith("__init__") and name.rsplit(".", 1)[1] not in words]
    assert not missing, f"not on README's Layout: {missing}"
