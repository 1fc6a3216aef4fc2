"""The layers point one way: webshards imports nothing above it (nor torch/open_clip), pretrain imports
data_tools nowhere (make demo's data comes from webshards.demo_data), data_tools reaches pretrain only
through data_tools.models."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEBSHARDS_MODULES = sorted(
    f"webshards.{p.stem}" for p in (ROOT / "webshards").glob("*.py") if p.stem != "__init__"
)
HEAVY = ("torch", "open_clip", "pretrain", "data_tools")


def imported_packages(path: Path) -> set[str]:
    """Top-level package names that a file imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def importers(package: str, of: str) -> list[str]:
    """Files of ``package`` (relative to the repository root) that import ``of``."""
    files = sorted((ROOT / package).rglob("*.py"))
    return [str(f.relative_to(ROOT)) for f in files if of in imported_packages(f)]


def test_the_module_list_is_not_empty():
    assert {"webshards.atomic", "webshards.layout", "webshards.spec", "webshards.urls"} <= set(
        WEBSHARDS_MODULES
    )


@pytest.mark.parametrize("module", ["webshards", *WEBSHARDS_MODULES])
def test_webshards_imports_nothing_heavy(module):
    """A fresh interpreter that imports the module has none of the packages above it loaded."""
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []


def test_webshards_imports_neither_package_above():
    assert importers("webshards", "pretrain") == [] and importers("webshards", "data_tools") == []


def test_pretrain_imports_data_tools_nowhere():
    assert importers("pretrain", "data_tools") == []


def test_data_tools_reaches_pretrain_only_through_models():
    assert importers("data_tools", "pretrain") == ["data_tools/models.py"]


def test_every_module_imports_on_its_own():
    """No import cycle: each module of pretrain and data_tools can be the first one a process imports (torch and
    the other outside packages stay loaded between them, so this is one interpreter, not one per module)."""
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in ("pretrain", "data_tools")
        for p in sorted((ROOT / package).rglob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('pretrain', 'data_tools')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        print(f'{name}: {e}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout == ""


PRETRAIN_LAYERS = (
    ("config", "config_sections"),
    ("parallel",),
    ("models",),
    ("data",),
    ("loss",),
    ("objectives",),
    ("generate",),
    ("evaluation",),
    ("training",),
    ("publish",),
    ("adapt",),
    ("train", "torchrun", "demo"),
    ("commands",),
    ("cli",),
)
"""pretrain's subpackages and top-level modules, bottom first: each imports only its own layer and those below."""
LAYER_DOORS = {("pretrain/config_sections/run.py", "objectives")}
"""Upward imports on purpose: the config lists the names of `pretrain.objectives.specs` (torch-free, nothing in
them imported) so that a typo in loss.name fails when the config loads."""


def pretrain_layer(name: str) -> int:
    """The layer of pretrain's module or subpackage `name` (the part after `pretrain.`)."""
    return next(i for i, layer in enumerate(PRETRAIN_LAYERS) if name in layer)


def test_pretrain_layers_name_every_subpackage_and_module():
    names = {p.stem for p in (ROOT / "pretrain").glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in (ROOT / "pretrain").glob("*/__init__.py")}
    assert names == {name for layer in PRETRAIN_LAYERS for name in layer}


def test_pretrain_subpackages_import_only_downward():
    upward = []
    for path in sorted((ROOT / "pretrain").rglob("*.py")):
        parts = path.relative_to(ROOT / "pretrain").with_suffix("").parts
        if parts == ("__init__",):
            continue
        own = pretrain_layer(parts[0])
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for module in modules:
                target = module.split(".")[1] if module.startswith("pretrain.") else ""
                known = any(target in layer for layer in PRETRAIN_LAYERS)
                if known and pretrain_layer(target) > own and (rel, target) not in LAYER_DOORS:
                    upward.append(f"{rel} imports {module}")
    assert upward == []
