"""Chapters read along the package: they must not redefine what minillm defines.

(STYLE.md habit 8.) The notebooks themselves are executed by ``pytest --nbmake chapters``.
"""
import ast
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import minillm

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("[0-9][0-9]_*.ipynb"))


def minillm_names() -> set[str]:
    """Every public function/class name defined by a minillm module."""
    names = set()
    for info in pkgutil.iter_modules(minillm.__path__):
        module = importlib.import_module(f"minillm.{info.name}")
        names |= {n for n, v in vars(module).items()
                  if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", "").startswith("minillm")}
    return names


def defined_names(nb_path: Path) -> list[tuple[str, int]]:
    """(name, cell index) of every top-level def/class in the notebook's code cells."""
    nb = json.loads(nb_path.read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append((node.name, i))
    return out


def test_there_are_chapters():
    assert [p.name for p in CHAPTERS][:1] == ["00_the_model.ipynb"]


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_does_not_shadow_minillm(nb_path):
    shadows = [(n, i) for n, i in defined_names(nb_path) if n in minillm_names()]
    assert not shadows, f"{nb_path.name} redefines minillm names (name, cell): {shadows}"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_first_cell_imports_minillm(nb_path):
    nb = json.loads(nb_path.read_text())
    first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert "minillm" in first and "backend" in first, \
        f"{nb_path.name}: the first code cell must import minillm and print versions and backend"


def test_shadow_detector_catches_a_redefinition(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ["def layernorm_forward(x):\n", "    return x\n"]}]}
    p = tmp_path / "99_bad.ipynb"
    p.write_text(json.dumps(nb))
    assert ("layernorm_forward", 0) in defined_names(p)
    assert "layernorm_forward" in minillm_names()
