"""The shape of the code base, checked from its source: short functions, no import cycle, a
small package root and a short README. The layering itself is lint-imports' (pyproject.toml,
[tool.importlinter]; run by .ci/run)."""

import ast

import grimp

from tests.conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "fgrpo_pipeline"
MAX_FUNCTION_LINES = 80
MAX_ROOT_ENTRIES = 18
MAX_README_LINES = 150


def _functions(path):
    """(qualified name, first line, length in lines) of every function and method of a file,
    nested ones included; the length runs from ``def`` to the last line of the body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name[:-1], child.lineno, child.end_lineno - child.lineno + 1
            yield from visit(child, name)

    yield from visit(tree, "")


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} {name} ({length} lines)"
        for path in sorted((PROJECT_ROOT / "src").rglob("*.py"))
        for name, line, length in _functions(path)
        if length > MAX_FUNCTION_LINES
    ]
    assert not long, "functions longer than 80 lines:\n" + "\n".join(long)


def test_the_modules_import_no_cycle():
    graph = grimp.build_graph("fgrpo_pipeline", exclude_type_checking_imports=True, cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_package_root_holds_at_most_18_entries():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= MAX_ROOT_ENTRIES, entries


def test_the_readme_is_at_most_150_lines():
    lines = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, len(lines)
