"""The architecture rules of docs/design.md that a change can break silently: no import circles
in src/safedistill (bench/structure.py computes them from the source with ast)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def structure():
    spec = importlib.util.spec_from_file_location("bench_structure", ROOT / "bench" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lazy", [False, True])
def test_no_import_circles(structure, lazy):
    graph = structure.import_graph(structure.read_modules(structure.SRC), lazy)
    assert structure.circles(graph) == []


def test_circles_and_floors_of_a_small_package(structure, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .c import thing\n")
    (pkg / "c.py").write_text("def thing():\n    from . import a\n")
    (pkg / "d.py").write_text("import os\n")
    eager = structure.import_graph(structure.read_modules(pkg), lazy=False)
    assert structure.circles(eager) == []
    assert structure.floors(eager, []) == {"pkg": 0, "pkg.a": 2, "pkg.b": 1, "pkg.c": 0, "pkg.d": 0}
    lazy = structure.import_graph(structure.read_modules(pkg), lazy=True)
    assert structure.circles(lazy) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert [name for _, name in structure.functions(structure.read_modules(pkg))] == ["pkg.c:thing"]


def test_no_function_in_src_is_longer_than_a_screen(structure):
    """docs/design.md: a step, and every other function in src, fits one screen (60 lines)."""
    longest = structure.functions(structure.read_modules(structure.SRC))
    over = [(n, name) for n, name in longest if n > 60]
    assert over == [], over
    assert longest and longest[0][0] > 20  # the scan found real functions


def test_config_is_on_the_ground_floor(structure):
    """config.py imports nothing of the package but errors, counting imports inside functions,
    type-only ones and importlib strings: reading a YAML file loads no plug point."""
    graph = structure.import_graph(structure.read_modules(structure.SRC), lazy=True)
    assert graph["safedistill.config"] == {"safedistill.errors"}


# No arrow runs back up (issue 23 removed the last two: data/rephrase.py -> engine.rollout, models).
def test_no_arrow_runs_back_up(structure):
    """Counting imports inside functions, type-only ones and importlib strings: a module imports
    only its own layer of bench/structure.LAYERS and those below it."""
    graph = structure.import_graph(structure.read_modules(structure.SRC), lazy=True)
    assert len(graph) > 50  # the scan read the package
    assert structure.upward(graph) == []


def test_upward_arrows_of_a_small_package(structure, tmp_path):
    pkg = tmp_path / "safedistill"
    for folder in ("", "data", "engine"):
        (pkg / folder).mkdir(exist_ok=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        "def f():\n    import importlib\n    importlib.import_module('safedistill.engine.x')\n"
    )
    (pkg / "engine" / "x.py").write_text("from ..data import y\n")
    (pkg / "data" / "y.py").write_text("def g(cfg):\n    from ..engine import x\n")
    graph = structure.import_graph(structure.read_modules(pkg), lazy=True)
    assert structure.upward(graph) == [
        ("safedistill.config", "safedistill.engine.x"),
        ("safedistill.data.y", "safedistill.engine.x"),
    ]
    assert structure.whole_config(structure.read_modules(pkg)) == ["data.y:g:1"]


def test_few_functions_take_the_whole_config(structure):
    """Components take their settings section or named values; only the CLI, config.py and the
    recipe (train.py) see the whole RunConfig. The bound only goes down."""
    assert len(structure.whole_config(structure.read_modules(structure.SRC))) <= 5
