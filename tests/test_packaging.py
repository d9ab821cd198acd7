"""The wheel a user installs ships every package and data file of the source tree.

An editable install reads the source tree directly, so a package left out of the wheel goes
unnoticed until a user runs ``pip install .``. This test builds the wheel the way pip does and
compares it with the tree: every directory holding an ``__init__.py`` under ``flownp/`` and
``verification/`` must be in the wheel, with all its modules and the bundled data files.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("flownp", "verification")
DATA_SUFFIXES = (".gz", ".h5", ".npz")


def _source_files() -> list[str]:
    out = []
    for top in SHIPPED:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            if path.suffix == ".py" or path.suffix in DATA_SUFFIXES:
                out.append(rel.as_posix())
    return out


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    # Build from a copy: a stale build/ directory in the checkout would otherwise fill gaps.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    for top in SHIPPED:
        shutil.copytree(ROOT / top, src / top, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*cmd, str(src), "-w", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (whl,) = out.glob("flownp-*.whl")
    return set(zipfile.ZipFile(whl).namelist())


def test_every_package_directory_is_in_the_wheel(wheel_names: set[str]) -> None:
    packages = sorted(
        p.parent.relative_to(ROOT).as_posix()
        for top in SHIPPED
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    )
    assert "flownp/commands" in packages  # the walk itself sees subpackages
    missing = [pkg for pkg in packages if f"{pkg}/__init__.py" not in wheel_names]
    assert not missing, f"packages missing from the wheel: {missing}"


def test_every_module_and_data_file_is_in_the_wheel(wheel_names: set[str]) -> None:
    files = _source_files()
    assert any(f.endswith(".gz") for f in files) and any(f.endswith(".h5") for f in files)
    assert "flownp/data/digit_classifier.npz" in files  # the digit classifier's weights
    missing = [f for f in files if f not in wheel_names]
    assert not missing, f"files missing from the wheel: {missing}"


def test_every_console_script_target_is_importable_from_the_wheel(wheel_names: set[str]) -> None:
    entry_points = next(n for n in wheel_names if n.endswith("entry_points.txt"))
    assert entry_points  # the flownp command is declared
    from flownp.cli import COMMANDS

    for module in COMMANDS.values():
        assert module.replace(".", "/") + ".py" in wheel_names, module


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for top in SHIPPED:
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    root = name.split(".")[0]
                    if root not in stdlib and root not in SHIPPED:
                        found.add(root)
    return found


# import name -> distribution name, where they differ
_DIST = {"PIL": "pillow", "yaml": "pyyaml"}
# imported only inside an optional code path that checks for them first (the extras
# declare them: torch for the benchmark baseline, mpi4py for several processes)
_OPTIONAL = {"torch", "mpi4py"}


def test_every_import_is_a_declared_dependency() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {
        d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for d in project["dependencies"]
    }
    needed = {_DIST.get(m, m).lower() for m in _third_party_imports() - _OPTIONAL}
    assert "numpy" in needed and "numba" in needed  # the scan sees real imports
    assert needed <= declared, f"imported but not declared: {sorted(needed - declared)}"
