"""Chapters read along the package: they must not redefine or re-type what minillm defines.

(STYLE.md habit 8.) Two checks, both static (``ast``, nothing is run):

- no ``def``/``class`` in a chapter shadows a minillm name;
- no chapter cell re-types a package function: for every function and method
  in minillm, the calls of minillm functions in its body, in order, are its
  *call signature* (``transformer.block_forward``: block_dims, attention_kind,
  layernorm_forward, linear_forward, linear_forward, layernorm_forward,
  linear_forward, gelu_forward, linear_forward). A cell that repeats, in order
  (other calls may come in between), at least ``MIN_CALLS`` and at least
  ``RETYPED_SHARE`` of a signature re-types that function. Signatures shorter
  than ``MIN_CALLS`` do not count: calling a few package functions is use, not a copy.

The notebooks themselves are executed by ``pytest --nbmake chapters``.
"""
import ast
import functools
import importlib
import json
import pkgutil
import textwrap
from pathlib import Path

import pytest

import minillm

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("[0-9][0-9]_*.ipynb"))
MIN_CALLS = 4          # a signature shorter than this is ordinary use of the package
RETYPED_SHARE = 2 / 3  # the share of a signature a cell must repeat, in order, to copy it


@functools.lru_cache(maxsize=None)
def minillm_modules() -> tuple:
    """Every module of the minillm package, imported."""
    return tuple(importlib.import_module(f"minillm.{info.name}")
                 for info in pkgutil.iter_modules(minillm.__path__))


@functools.lru_cache(maxsize=None)
def minillm_names() -> frozenset[str]:
    """Every public function/class name defined by a minillm module."""
    names = set()
    for module in minillm_modules():
        names |= {n for n, v in vars(module).items()
                  if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", "").startswith("minillm")}
    return frozenset(names)


def code_cells(nb_path: Path) -> list[tuple[int, ast.Module]]:
    """(cell index, parsed source) of every code cell; IPython magics and shell lines dropped."""
    nb = json.loads(Path(nb_path).read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        out.append((i, ast.parse(src)))
    return out


def defined_names(nb_path: Path) -> list[tuple[str, int]]:
    """(name, cell index) of every def/class in the notebook's code cells."""
    return [(node.name, i) for i, tree in code_cells(nb_path) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


# --- call signatures ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def minillm_functions() -> frozenset[str]:
    """The public *function* names of minillm: a call of a class (a config, a cache
    NamedTuple, ``GPT``) builds a value and is not part of a call signature."""
    return frozenset(n for module in minillm_modules() for n, v in vars(module).items()
                     if n in minillm_names() and not isinstance(v, type))


class _Calls(ast.NodeVisitor):
    """Every call in evaluation order (arguments before the call they feed), as
    (called name, root name of the attribute chain or None): ``layers.linear_forward(x)``
    -> ("linear_forward", "layers"), ``gelu_forward(x)`` -> ("gelu_forward", None).
    With ``nested=False``, lambdas and inner defs are skipped (they do not run where they stand)."""

    def __init__(self, nested: bool = True):
        self.calls: list[tuple[str, str | None]] = []
        self.nested = nested

    def generic_visit(self, node):
        if self.nested or not isinstance(
                node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            super().generic_visit(node)

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Name):
            self.calls.append((f.id, None))
        elif isinstance(f, ast.Attribute):
            root = f.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                root = root.func if isinstance(root, ast.Call) else root.value
            self.calls.append((f.attr, root.id if isinstance(root, ast.Name) else None))


def calls_of(nodes, nested: bool = True) -> list[tuple[str, str | None]]:
    """The calls of ``nodes`` (one node or a list of statements), see ``_Calls``."""
    visitor = _Calls(nested)
    for node in nodes if isinstance(nodes, list) else [nodes]:
        visitor.visit(node)
    return visitor.calls


def foreign_aliases(trees) -> set[str]:
    """Names bound by imports from outside minillm (``np``, ``plt``, ``display``, ...):
    ``np.split`` is NumPy's, not ``minillm.data.split``."""
    out = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {(a.asname or a.name).split(".")[0] for a in node.names
                        if not a.name.startswith("minillm")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 \
                    and not (node.module or "").startswith("minillm"):
                out |= {a.asname or a.name for a in node.names}
    return out


def minillm_calls(calls, foreign: set[str]) -> list[str]:
    """The names of the calls that call a minillm function (not a foreign module's)."""
    names = minillm_functions()
    return [name for name, root in calls if name in names and root not in foreign]


@functools.lru_cache(maxsize=None)
def package_signatures() -> dict[str, tuple[str, ...]]:
    """'minillm.<module>.<function or Class.method>' -> its call signature (the minillm
    function calls of its body, in order), for every signature of at least MIN_CALLS.

    Decorators and default values are not the body; calls of the module's private
    helpers (``_forward``, ``self._step``) are replaced by the helper's own calls,
    so moving a step into a helper hides nothing.
    """
    names = minillm_functions()
    out = {}
    for module in minillm_modules():
        tree = ast.parse(Path(module.__file__).read_text())
        foreign = foreign_aliases([tree])
        defs = {}                                            # qualified name -> def node
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs[node.name] = node
            elif isinstance(node, ast.ClassDef):
                defs |= {f"{node.name}.{f.name}": f for f in node.body
                         if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        private = {q.rsplit(".", 1)[-1]: d for q, d in defs.items()
                   if q.rsplit(".", 1)[-1].startswith("_") and not q.endswith("__")}

        def signature(node, seen):
            sig = []
            for name, root in calls_of(node.body, nested=False):
                if name in private and root in (None, "self", "cls") and name not in seen:
                    sig += signature(private[name], seen | {name})
                elif name in names and root not in foreign:
                    sig.append(name)
            return sig

        for qual, node in defs.items():
            sig = signature(node, {qual.rsplit(".", 1)[-1]})
            if len(sig) >= MIN_CALLS:
                out[f"{module.__name__}.{qual}"] = tuple(sig)
    return out


def common_in_order(calls, signature) -> int:
    """How many of ``signature``'s calls ``calls`` repeats in the same order, other
    calls allowed in between (the longest common subsequence)."""
    row = [0] * (len(signature) + 1)
    for c in calls:
        prev = 0                                             # row[j] of the previous call
        for j, s in enumerate(signature):
            prev, row[j + 1] = row[j + 1], prev + 1 if c == s else max(row[j + 1], row[j])
    return row[-1]


def is_retyped(calls, signature) -> bool:
    """A cell re-types a function when it repeats, in order, at least MIN_CALLS and at
    least RETYPED_SHARE of its signature: the plumbing of the package (looking up a
    kind, the block's dims) need not be copied for the computation to be a copy."""
    k = common_in_order(calls, signature)
    return k >= MIN_CALLS and k >= RETYPED_SHARE * len(signature)


def retyped_functions(nb_path: Path) -> list[tuple[int, str]]:
    """(cell index, package function) for every cell that re-types a package function."""
    cells = code_cells(nb_path)
    foreign = foreign_aliases(tree for _, tree in cells)
    out = []
    for i, tree in cells:
        calls = minillm_calls(calls_of(tree), foreign)
        out += [(i, qual) for qual, sig in package_signatures().items() if is_retyped(calls, sig)]
    return out


# --- the chapters ------------------------------------------------------------------
def test_there_are_chapters():
    assert [p.name for p in CHAPTERS][:1] == ["00_the_model.ipynb"]


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_does_not_shadow_minillm(nb_path):
    shadows = [(n, i) for n, i in defined_names(nb_path) if n in minillm_names()]
    assert not shadows, f"{nb_path.name} redefines minillm names (name, cell): {shadows}"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_does_not_retype_package_code(nb_path):
    copies = retyped_functions(nb_path)
    assert not copies, (
        f"{nb_path.name} re-types package code (cell, function whose calls it repeats in order): "
        f"{copies}; call the function and read its cache instead")


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_first_cell_imports_minillm(nb_path):
    nb = json.loads(nb_path.read_text())
    first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert "minillm" in first and "backend" in first, \
        f"{nb_path.name}: the first code cell must import minillm and print versions and backend"


# --- the detectors themselves --------------------------------------------------------
def write_notebook(path: Path, *cells: str) -> Path:
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "source": c.splitlines(True)}
                                          for c in cells]}))
    return path


def test_shadow_detector_catches_a_redefinition(tmp_path):
    p = write_notebook(tmp_path / "99_bad.ipynb", "def layernorm_forward(x):\n    return x\n")
    assert ("layernorm_forward", 0) in defined_names(p)
    assert "layernorm_forward" in minillm_names()


RETYPED_BLOCK = '''\
from minillm import attention, layers
p, h, eps = model.params, "h.0.", cfg.ln_eps
a, _ = layers.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
qkv, _ = layers.linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
y, _ = attention.self_attention_forward(qkv, cfg.n_head)
y, _ = layers.linear_forward(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
x1 = x + y
n, _ = layers.layernorm_forward(x1, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
fc, _ = layers.linear_forward(n, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
g, _ = layers.gelu_forward(fc)
m, _ = layers.linear_forward(g, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
print((x1 + m).shape)
'''

CALLS_THE_BLOCK = '''\
import numpy as np
from minillm import transformer
x_out, cache = transformer.block_forward(x, model.params, 0, cfg)
print(x_out.shape, np.split(x_out, 2)[0].shape)
for name, c in cache._asdict().items():
    print(name, type(c).__name__)
'''


def test_retype_detector_catches_a_retyped_block(tmp_path):
    p = write_notebook(tmp_path / "99_bad.ipynb", "import numpy as np\n", RETYPED_BLOCK)
    assert (1, "minillm.transformer.block_forward") in retyped_functions(p)
    # inside a helper of the chapter's own (not a minillm name) it is still a copy
    wrapped = "def my_block(x):\n" + textwrap.indent(RETYPED_BLOCK, "    ")
    p = write_notebook(tmp_path / "98_bad.ipynb", wrapped)
    assert (0, "minillm.transformer.block_forward") in retyped_functions(p)


def test_retype_detector_allows_calling_the_block(tmp_path):
    p = write_notebook(tmp_path / "99_good.ipynb", CALLS_THE_BLOCK)
    assert retyped_functions(p) == []


def test_retype_detector_rules():
    sig = ("a", "b", "c", "d", "e", "f")
    assert common_in_order(["a", "x", "b", "c", "y", "d"], sig) == 4     # others in between
    assert common_in_order(["d", "c", "b", "a"], sig) == 1               # order matters
    assert is_retyped(["a", "b", "x", "d", "e"], sig)                    # 4 of 6, in order
    assert not is_retyped(["a", "b", "e"], sig)                          # too few
    assert not is_retyped(["a", "b", "c", "d"], sig + ("g", "h"))        # 4 of 8: not most of it
    assert all(len(s) >= MIN_CALLS for s in package_signatures().values())
    # a foreign module's function of the same name is not a minillm call; classes are not either
    tree = ast.parse("import numpy as np\nnp.split(x, 2)\nsplit(x)\nGPTConfig()\n")
    assert minillm_calls(calls_of(tree), foreign_aliases([tree])) == ["split"]
