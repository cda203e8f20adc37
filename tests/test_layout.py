"""The code's shape: one concern per file, imports flowing one way (README 'Code map')."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted(path.stem for path in ROOT.glob("*.py"))
ENTRY_POINTS = {"main", "benchmark", "visualize", "plot_results", "sweep", "predict"}
LOOP = "train"  # below the entry points, above everything else
MAX_LINES = 450


def imported_modules(path: Path) -> set[str]:
    """The product modules a file imports anywhere (top level, functions, TYPE_CHECKING blocks alike)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PRODUCT)


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(ROOT / f"{name}.py") - {name} for name in PRODUCT}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # absent: unvisited; "open": on the current path; "done": no circle below

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child, path + [child])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_layered_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"main": {"train", "config"}, "train": {"config"}, "config": set()}) is None
    assert imported_modules(ROOT / "train.py") >= {"algorithms", "config", "results", "run_control"}


def test_no_import_circle_among_the_product_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_flow_down_from_the_entry_points_through_the_loop():
    for module, imports in import_graph().items():
        if module in ENTRY_POINTS:
            continue
        upward = imports & (ENTRY_POINTS | ({LOOP} if module != LOOP else set()))
        assert not upward, f"{module}.py imports {sorted(upward)}, which sit above it"


@pytest.mark.parametrize("name", PRODUCT)
def test_each_module_is_short_and_starts_with_a_docstring_saying_its_job(name):
    source = (ROOT / f"{name}.py").read_text()
    assert ast.get_docstring(ast.parse(source)), f"{name}.py has no module docstring"
    lines = source.count("\n")
    assert lines <= MAX_LINES, f"{name}.py has {lines} lines (more than {MAX_LINES}): split a concern out"


def test_the_readme_code_map_names_every_file():
    readme = (ROOT / "README.md").read_text()
    code_map = readme[readme.index("## Code map"):]
    code_map = code_map[:code_map.index("\n## ", 1)]
    for name in PRODUCT:
        assert f"`{name}.py`" in code_map, f"README's Code map does not mention {name}.py"


@pytest.mark.parametrize("module", ["figures", "plot_results", "cli", "predict"])
def test_the_picture_modules_never_import_torch(module):
    done = subprocess.run([sys.executable, "-c", f"import sys, {module}; assert 'torch' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", ["main", "visualize", "benchmark", "predict"])
def test_help_never_shows_a_meaningless_default_none(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default:" in shown  # defaults are still shown where they mean something
    assert "(default: None)" not in shown


BLOCK_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]\n"  # import torch now fails
               "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize(("script", "bad"), [("main.py", ["--epochs", "0"]), ("sweep.py", ["launch", "--pairs", "a:b"]),
                                             ("sweep.py", ["launch", "--methods", "nope"]),
                                             ("visualize.py", ["x.pt", "--images", "0"]),
                                             ("benchmark.py", ["--method", "nope"]), ("predict.py", ["x.pt"]),
                                             ("plot_results.py", [])])
def test_every_entry_point_answers_help_and_a_bad_flag_without_torch(script, bad):
    for argv, code in (([*bad[:1], "--help"] if script == "sweep.py" else ["--help"], 0), (bad, 2)):
        done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, script, *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == code, (argv, done.stderr[-500:])
        assert "(default" in done.stdout if code == 0 else done.stderr.count("\n") == 1, (argv, done.stderr)


def test_the_names_flags_accept_are_the_registries_keys():
    """config.py declares the names (so that flags are read without torch); the code is keyed by exactly these."""
    import algorithms
    import config
    import datasets
    import models
    import validators

    assert config.METHODS == tuple(algorithms.ALGORITHMS) and config.DISCREPANCIES == tuple(algorithms.DISCREPANCIES)
    assert config.DATASETS == tuple(datasets.DOMAINS) and config.FOLDER == datasets.FOLDER
    assert config.NETWORKS == tuple(models.NETWORKS) and config.BATCHNORM_INITS == models.BATCHNORM_INITS
    assert config.VALIDATORS == tuple(validators.VALIDATORS)


def test_sweep_status_and_table_never_import_torch(tmp_path):
    import sweep

    out = tmp_path / "sweep"
    out.mkdir()
    sweep.save_jobs(out, sweep.expand_grid(["mnist:usps"], ["mcd"], ["1-2"], ["--epochs", "3"]))
    assert sweep.load_jobs(out)[0].epochs == 3  # resolved at launch, read back by status and table
    for command in ("status", "table"):
        done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "sweep.py", command, str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-500:]
    assert "mnist_usps_mcd: not started" in done.stdout or "mnist→usps" in done.stdout
