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
