"""Dependency direction: kernels <- layers <- model <- train / latent <- commands, and a module
that measures layers (flownp.stability, verification) imports them, never the reverse.

Every module of ``flownp/layers/`` is imported alone in a fresh interpreter; afterwards no
module above the layers may have been loaded (``docs/architecture.md``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER_MODULES = sorted(
    "flownp.layers" + ("" if p.stem == "__init__" else f".{p.stem}")
    for p in (ROOT / "flownp" / "layers").glob("*.py")
)
#: What flownp.layers may load from the package besides itself.
ALLOWED = ("flownp", "flownp.errors", "flownp._numba", "flownp.kernels")


def test_every_layer_module_is_listed():
    assert "flownp.layers.cinc" in LAYER_MODULES and "flownp.layers.guard" in LAYER_MODULES
    assert "flownp.layers._linalg" in LAYER_MODULES and "flownp.layers" in LAYER_MODULES


@pytest.mark.parametrize("module", LAYER_MODULES)
def test_layer_module_imports_nothing_above_the_layers(module):
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('flownp', 'verification'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert "flownp.stability" not in loaded
    above = [
        m
        for m in loaded
        if not m.startswith("flownp.layers")
        and not any(m == a or m.startswith(a + ".") for a in ALLOWED)
    ]
    assert not above, f"{module} loads {above}"


# -------------------------------------------------------------------- the whole package
#: The layers of docs/architecture.md, bottom first. A module may import modules of a lower
#: rank, and modules of its own group (e.g. one layer another); nothing else.
RANKS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("flownp", "flownp.errors", "flownp._numba", "flownp.threads",
                "flownp.progress", "flownp.testing", "flownp.files", "flownp.limits")),
    ("distributed", ("flownp.distributed",)),
    ("kernels", ("flownp.kernels",)),
    ("layers", ("flownp.layers",)),
    ("data", ("flownp.data",)),
    ("optim", ("flownp.optim",)),
    ("model", ("flownp.model",)),
    ("stability", ("flownp.stability",)),
    ("figures", ("flownp.figures",)),
    ("checkpoint", ("flownp.checkpoint",)),
    ("digits", ("flownp.digits",)),
    ("train / latent", ("flownp.train", "flownp.latent")),
    ("experiment", ("flownp.experiment",)),
    ("verification", ("verification",)),
    ("commands", ("flownp.commands", "flownp.cli", "flownp.__main__")),
]  # fmt: skip


def _group(module: str) -> tuple[int, str]:
    best = None
    for rank, (name, prefixes) in enumerate(RANKS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[2]):
                best = (rank, name, len(p))
    assert best is not None, f"{module} is in no rank of RANKS"
    return best[0], best[1]


def _imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("flownp", "verification")}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("flownp", "verification"):
        for p in sorted((ROOT / top).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def test_every_import_points_down():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        rank, name = _group(module)
        for dep in _imports(path):
            if dep not in modules:  # ``from pkg import name`` of a non-module name
                continue
            dep_rank, dep_name = _group(dep)
            if dep_rank < rank or dep_name == name:
                continue
            bad.append(f"{module} ({name}) imports {dep} ({dep_name})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_the_rank_check_can_fail():
    assert _group("flownp.layers.cinc")[0] < _group("flownp.model")[0]
    assert _group("flownp.stability")[0] > _group("flownp.layers.guard")[0]
    assert _group("flownp.commands.train")[1] == "commands"
