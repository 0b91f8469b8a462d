"""The package's layers point one way (docs/architecture.md, "Layers"), checked over the AST of every module.

A module may import appo_jax modules of its own layer or of a lower one, never of a higher one; an import
inside a function body must say why on its line or the line before (a comment with "deferred"), because such
imports hide cycles unless they exist for start-up time.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "appo_jax"

#: Lowest first. A top-level module (appo_jax/<name>.py) or a subpackage (appo_jax/<name>/) per entry.
LAYERS = ("protocol", "progress", "compilation_cache", "core", "parallel", "kernels", "models", "data", "rewards", "tools",
          "rollout", "training", "evaluation", "serving", "cli")


def _layer_of(module: str) -> str:
    """``appo_jax.rollout.engine`` -> ``rollout``; ``appo_jax.cli`` -> ``cli``."""
    parts = module.split(".")
    assert parts[0] == "appo_jax", module
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(tree: ast.AST):
    """(imported module, line, inside a function) for every ``appo_jax`` import of a module's AST."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("appo_jax."):
                        yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("appo_jax"):
                names = [f"{child.module}.{a.name}" for a in child.names] if child.module == "appo_jax" \
                    else [child.module]
                for name in names:
                    yield name, child.lineno, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(rel.parts), path


def test_every_layer_is_listed():
    found = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_file() and p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert found == set(LAYERS), f"appo_jax/ has {sorted(found)}; LAYERS lists {sorted(LAYERS)}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in _modules():
        own = _layer_of(module)
        if own == "__init__":
            continue
        for target, line, _ in _imports(ast.parse(path.read_text())):
            other = _layer_of(target)
            if other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} imports {target} ({other})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def _says_deferred(lines: list[str], line: int) -> bool:
    """The import at ``line`` (1-based), or the block of imports / comments / blank lines just above it, carries
    a comment with "deferred"."""
    i = line - 1
    if "deferred" in lines[i]:
        return True
    while i > 0:
        i -= 1
        text = lines[i].strip()
        if "deferred" in text and text.startswith("#"):
            return True
        if text and not text.startswith(("#", "from ", "import ")):
            return False
    return False


def test_imports_inside_functions_say_why():
    silent = []
    for module, path in _modules():
        lines = path.read_text().splitlines()
        for target, line, in_function in _imports(ast.parse("\n".join(lines))):
            if in_function and not _says_deferred(lines, line):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not silent, "function-level imports without a 'deferred: ...' reason:\n" + "\n".join(silent)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a core module importing rollout is found, a deferred one is accepted."""
    tree = ast.parse("from appo_jax.rollout import engine\n\ndef f():\n    # deferred: start-up\n"
                     "    import appo_jax.training.trainer\n")
    found = list(_imports(tree))
    assert found == [("appo_jax.rollout", 1, False), ("appo_jax.training.trainer", 5, True)]
    assert LAYERS.index(_layer_of(found[0][0])) > LAYERS.index("core")


def test_no_function_is_longer_than_80_lines():
    """A function (docstring included) fits a screen; the longest ones are split into named steps."""
    long = []
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "functions longer than 80 lines:\n" + "\n".join(long)
