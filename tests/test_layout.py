"""The package's shape: the import-linter layers hold, every package installs, no private names cross modules."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# A module at the top of flaxdose/ is a command (what users type after `python -m flaxdose.`) or one of a
# few core modules; libraries live in packages named by their concern (README, Code layout).
COMMANDS = {"train", "predict", "evaluate", "synth", "import_dicom", "qa", "assess_style", "convert_openkbp",
            "export_model"}
CORE = {"__init__", "cli", "config", "errors", "io", "provenance", "model", "convolution", "checkpoint", "run",
        "metrics", "plots"}


def test_import_linter_contracts_hold():
    pytest.importorskip("importlinter", reason="pip install -e '.[test]' installs import-linter")
    run = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    proc = subprocess.run([sys.executable, "-c", run, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, as pyproject.toml's package-dir maps them."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    return {name: REPO / mapping.get(name, name.replace(".", "/")) for name in PYPROJECT["tool"]["setuptools"]["packages"]}


def test_every_package_of_the_tree_is_installed():
    listed = package_dirs()
    assert all((folder / "__init__.py").is_file() for folder in listed.values()), listed
    found = {p.parent for p in (REPO / "flaxdose").rglob("__init__.py")}
    assert found <= set(listed.values()), sorted(found - set(listed.values()))


def python_files():
    for folder in {*package_dirs().values()}:
        yield from folder.glob("*.py")


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flaxdose"):
                offenders += [f"{path.relative_to(REPO)}: from {node.module} import {a.name}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_nothing_under_flaxdose_imports_the_configs_or_the_launchers():
    offenders = []
    for path in (REPO / "flaxdose").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.startswith(("flaxdose.configs", "flaxdose.launch", "configs", "launch"))]
    assert not offenders, offenders


def test_library_modules_define_no_flags():
    faces = {f"{name}.py" for name in COMMANDS} | {"__main__.py", "cli.py"}
    offenders = [str(p.relative_to(REPO)) for p in python_files()
                 if p.name not in faces and "launch" not in p.parts and "flags.DEFINE" in p.read_text()]
    assert not offenders, offenders



def test_top_level_modules_are_commands_or_core():
    found = {p.stem for p in (REPO / "flaxdose").glob("*.py")}
    assert found == COMMANDS | CORE, f"new top-level modules {sorted(found - COMMANDS - CORE)}: put a library in its " \
        f"package, or name it here as a command or core module; gone: {sorted(COMMANDS | CORE - found)}"


def test_launch_has_one_import_name():
    proc = subprocess.run([sys.executable, "-c", "import launch"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("flaxdose: error: ") and "python -m flaxdose.launch." in proc.stderr
    assert "Traceback" not in proc.stderr
    offenders = [str(p.relative_to(REPO)) for p in [*REPO.glob("tests/*.py"), *REPO.glob("launch/*.py")]
                 if any(line.startswith(("from launch", "import launch")) for line in p.read_text().splitlines())]
    assert not offenders, offenders
