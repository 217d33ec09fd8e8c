"""The builtin corpus: English prose from this Python installation's own documentation.

It lets every command run with no network and no data files. Documents, in this order:

1. One document per public docstring of the standard library's source files (module, class,
   function and method docstrings), read with `ast` from the ``.py`` files under
   ``sysconfig.get_paths()["stdlib"]`` in sorted path order — nothing is imported. Skipped, so that
   the text is prose rather than boilerplate: test suites, private modules and packages
   (``_pydecimal``), private definitions (``_helper``; dunders are kept), the deprecated or tool-only
   packages idlelib, lib2to3, distutils, turtledemo, ensurepip, docstrings shorter than 40
   characters and exact repeats of an earlier docstring.
2. One document per topic of ``pydoc_data.topics`` (the language reference pages behind
   ``help("if")``), in sorted topic order.

About 1.7 MB on CPython 3.11; the text depends only on the Python version, so it is deterministic
for a given installation.
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import sysconfig
import warnings

_SKIPPED_DIRECTORIES = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "pydoc_data",  # its topics are added whole, below
        "idlelib",
        "lib2to3",
        "distutils",
        "turtledemo",
        "ensurepip",
    }
)
_MIN_DOCSTRING_CHARS = 40


def builtin_identity() -> str:
    """A string that changes exactly when the builtin corpus can change: the Python version."""
    return f"builtin python={platform.python_implementation()}-{platform.python_version()}"


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """All documents of the builtin corpus, in their fixed order (computed once per process)."""
    documents = stdlib_docstrings(sysconfig.get_paths()["stdlib"])
    documents.extend(pydoc_topics())
    return tuple(documents)


def stdlib_docstrings(stdlib_root: str | os.PathLike[str]) -> list[str]:
    """Public docstrings of the Python files under `stdlib_root`, deduplicated, in sorted order."""
    documents: list[str] = []
    seen: set[str] = set()
    for path in _source_files(os.fspath(stdlib_root)):
        with open(path, "rb") as handle:
            source = handle.read()
        with warnings.catch_warnings():
            # Old escape sequences in some stdlib files warn on parse; the docstrings are fine.
            warnings.simplefilter("ignore")
            try:
                tree = ast.parse(source, filename=path)
            except (SyntaxError, ValueError):
                continue
        for docstring in _docstrings(tree):
            if len(docstring) >= _MIN_DOCSTRING_CHARS and docstring not in seen:
                seen.add(docstring)
                documents.append(docstring)
    return documents


def pydoc_topics() -> list[str]:
    """The language-reference topics that `help()` shows, one document each, by topic name."""
    from pydoc_data import topics

    return [topics.topics[name].strip() for name in sorted(topics.topics)]


def _source_files(root: str) -> list[str]:
    files: list[str] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(
            name
            for name in subdirectories
            if name not in _SKIPPED_DIRECTORIES and not name.startswith((".", "_"))
        )
        files.extend(
            os.path.join(directory, name)
            for name in names
            if name.endswith(".py") and (name == "__init__.py" or not name.startswith("_"))
        )
    return sorted(files)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _docstrings(tree: ast.Module) -> list[str]:
    found: list[str] = []
    module_docstring = ast.get_docstring(tree)
    if module_docstring:
        found.append(module_docstring)
    _collect_definitions(tree.body, found)
    return found


def _collect_definitions(body: list[ast.stmt], found: list[str]) -> None:
    # Module and class bodies, plus the if/try blocks that hold platform-specific definitions;
    # function bodies are not entered (nested helpers rarely document anything for a reader).
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if _is_private(node.name):
                continue
            docstring = ast.get_docstring(node)
            if docstring:
                found.append(docstring)
            if isinstance(node, ast.ClassDef):
                _collect_definitions(node.body, found)
        elif isinstance(node, ast.If):
            _collect_definitions(node.body, found)
            _collect_definitions(node.orelse, found)
        elif isinstance(node, ast.Try):
            _collect_definitions(node.body, found)
            for handler in node.handlers:
                _collect_definitions(handler.body, found)
            _collect_definitions(node.orelse, found)
