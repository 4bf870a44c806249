"""An offline demo corpus: docstrings of the Python standard library of the running interpreter.

Every module is read with `ast` from its source file: nothing is imported or executed, so modules
with side effects (antigravity, this, idlelib, tkinter...) are harmless. The selection is
deterministic and broad: each module's own docstring first, then round-robin over modules for
their public functions and classes, so a few hundred modules all contribute.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# Folders of the stdlib that are tests, tools, vendored or platform-specific demo code.
SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "lib2to3", "ensurepip", "site-packages", "dist-packages",
    "turtledemo", "__pycache__", "config-3.11-x86_64-linux-gnu", "lib-dynload", "venv", "pydoc_data",
}
MIN_DOC_CHARS = 40


@dataclass(frozen=True)
class Doc:
    module: str  # e.g. "json.decoder"
    name: str  # e.g. "json.decoder.JSONDecoder" (module name for a module docstring)
    kind: str  # "module", "class" or "function"
    content: str  # signature (for functions/classes) + the docstring, trimmed


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for public modules under the stdlib directory, sorted."""
    found: list[tuple[str, Path]] = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = list(rel.parts)
        if any(p in SKIP_DIRS or p.startswith(("_", ".")) and p != "__init__.py" for p in parts):
            continue
        if any("-" in p for p in parts[:-1]):  # not importable package names (config dirs)
            continue
        if parts[-1] == "__init__.py":
            parts = parts[:-1]
            if not parts:
                continue
        else:
            parts[-1] = parts[-1][:-3]
        if parts[-1] in ("__main__", "setup", "conftest"):
            continue
        found.append((".".join(parts), path))
    yield from sorted(found)


def _trim(text: str, max_chars: int) -> str:
    """At most `max_chars`, cut at a paragraph (or sentence, or word) boundary."""
    text = inspect.cleandoc(text).strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    if cut < max_chars // 3:
        cut = text.rfind(". ", 0, max_chars)
        cut = cut + 1 if cut >= max_chars // 3 else text.rfind(" ", 0, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip()


def _signature(node: ast.AST) -> str:
    try:
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            return f"class {node.name}({bases})" if bases else f"class {node.name}"
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        return f"{prefix} {node.name}({ast.unparse(node.args)})"
    except Exception:  # exotic syntax: the name alone is enough
        return getattr(node, "name", "")


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def _member_docs(prefix: str, module: str, body: list[ast.stmt], max_chars: int) -> Iterator[tuple[ast.AST, Doc]]:
    """(node, Doc) of the public classes and functions in `body` that have a docstring."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(doc) < MIN_DOC_CHARS:
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        body_text = _trim(doc, max_chars)
        yield node, Doc(module, f"{prefix}.{node.name}", kind, f"{_signature(node)}\n\n{body_text}")


def module_docs(module: str, path: Path, max_chars: int = 600) -> list[Doc]:
    """The module's docstring, then its public top-level classes and functions, in file order."""
    tree = _parse(path)
    if tree is None:
        return []
    docs: list[Doc] = []
    doc = ast.get_docstring(tree, clean=True)
    if doc and len(doc) >= MIN_DOC_CHARS:
        docs.append(Doc(module, module, "module", _trim(doc, max_chars)))
    docs.extend(d for _, d in _member_docs(module, module, tree.body, max_chars))
    return docs


def stdlib_docs(limit: int = 1200, max_chars: int = 600, root: Path | None = None) -> list[Doc]:
    """Up to `limit` docs, deterministic for a given Python installation: the first doc of every
    module (in module order), then the second of every module, and so on."""
    if limit < 1:
        return []
    per_module: list[list[Doc]] = []
    picked: list[Doc] = []
    for module, path in _module_files(root or stdlib_dir()):
        docs = module_docs(module, path, max_chars)
        if docs:
            per_module.append(docs)
            picked.append(docs[0])
            if len(picked) == limit:
                return picked  # a small corpus: no need to parse the rest
    depth = 1
    while len(picked) < limit and any(len(d) > depth for d in per_module):
        for docs in per_module:
            if depth < len(docs):
                picked.append(docs[depth])
                if len(picked) == limit:
                    break
        depth += 1
    return picked


@dataclass(frozen=True)
class LongDoc:
    module: str  # e.g. "json"
    content: str  # the module's docstring, then every public class/function: signature + whole docstring


def module_text(module: str, path: Path) -> str | None:
    """One long document per module (for chunked pipelines): the module docstring, then every
    public class, its public methods and every public function, each with its signature and whole
    docstring, as paragraph-separated sections under title lines. None when it has no docs."""
    tree = _parse(path)
    if tree is None:
        return None
    sections = [f"# {module}"]
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        sections.append(doc)
    for node, d in _member_docs(module, module, tree.body, 10**9):
        sections.append(f"## {d.name}\n\n{d.content}")
        if isinstance(node, ast.ClassDef):
            sections.extend(f"### {m.name}\n\n{m.content}" for _, m in _member_docs(d.name, module, node.body, 10**9))
    return "\n\n".join(sections) if len(sections) > 1 else None


def stdlib_long_docs(limit: int = 300, min_chars: int = 2000, root: Path | None = None) -> list[LongDoc]:
    """Up to `limit` whole-module documents of at least `min_chars` characters, in module order
    (deterministic for a given Python installation). Nothing is imported or downloaded."""
    picked: list[LongDoc] = []
    for module, path in _module_files(root or stdlib_dir()):
        if len(picked) >= limit:
            break
        text = module_text(module, path)
        if text is not None and len(text) >= min_chars:
            picked.append(LongDoc(module, text))
    return picked


def named_long_docs(modules: Sequence[str], root: Path | None = None) -> list[LongDoc]:
    """The whole-module documents of these modules, in this order (a module that does not exist in
    this Python or has no docs is left out)."""
    files = dict(_module_files(root or stdlib_dir()))
    picked = []
    for module in modules:
        text = module_text(module, files[module]) if module in files else None
        if text is not None:
            picked.append(LongDoc(module, text))
    return picked
