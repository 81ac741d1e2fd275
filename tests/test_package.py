"""The package's shape: no import cycles between minillm modules, no accelerator imports.

An import cycle makes module order matter and hides which layer depends on
which; the seams (``minillm.seams``) exist so that the model, the KV cache and
the generation loop import each other in one direction only:
layers/attention <- seams <- transformer <- kv_cache <- generation <- model.
"""
import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import minillm

PKG = Path(minillm.__file__).parent


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    """minillm module stems that ``path`` imports (module level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:                                   # from .x import y
                out.add(node.module.split(".")[0])
            else:                                             # from . import x, y
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minillm."):
            out.add(node.module.split(".")[1])
    return out & {m.name for m in pkgutil.iter_modules(minillm.__path__)}


def find_cycle(graph: dict) -> list | None:
    """One cycle of the directed graph, or None (depth-first search)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None
    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def graph(top_level_only: bool) -> dict:
    return {m.name: imports_of(PKG / f"{m.name}.py", top_level_only)
            for m in pkgutil.iter_modules(minillm.__path__)}


def test_no_module_level_import_cycle():
    assert find_cycle(graph(top_level_only=True)) is None


def test_the_model_generation_cache_chain_has_no_circle_even_through_lazy_imports():
    g = graph(top_level_only=False)
    for module in ("transformer", "kv_cache", "generation", "sampling", "seams"):
        assert "model" not in g[module], f"{module} imports model"
    assert find_cycle({k: g[k] for k in ("model", "generation", "kv_cache", "sampling",
                                         "transformer", "seams", "layers", "attention")}) is None


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("code, exported, expect", [
    ("import minillm", None, "20"),                  # before NumPy: the short spin is set
    ("import minillm", "8", "8"),                    # the user's value wins
    ("import numpy; import minillm", None, None),    # too late for OpenBLAS: left alone
])
def test_import_sets_openblas_thread_timeout_only_before_numpy(code, exported, expect):
    """``import minillm`` sets OPENBLAS_THREAD_TIMEOUT=20 when it can still take effect."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if exported is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = exported
    code += "; import os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=PKG.parent)
    assert out.stdout.strip() == str(expect)
