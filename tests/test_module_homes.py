"""Modules live where their job is, and the old public paths still import."""

import ast
from pathlib import Path

import zerojax.config.xla_flags as flags
import zerojax.xla_flags as old_flags

ROOT = Path(__file__).parents[1]


def test_xla_flags_moved_into_the_config_layer_and_still_imports_from_its_old_path():
    assert (old_flags.FLAG_NAMES, old_flags.merge_flags, old_flags.xla_flags) == (
        flags.FLAG_NAMES, flags.merge_flags, flags.xla_flags)


def _package(module: str) -> str:
    """The package a `zerojax` module belongs to: its folder (top-level modules: 'zerojax')."""
    path = ROOT.joinpath(*module.split("."))
    return module if path.is_dir() else module.rpartition(".")[0]


def test_no_module_imports_another_packages_private_names():
    crossings = []
    for file in sorted((ROOT / "zerojax").rglob("*.py")):
        module = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        home = module if file.name == "__init__.py" else _package(module)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("zerojax."):
                if _package(node.module) != home:
                    crossings += [f"{file.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                                  for a in node.names if a.name.startswith("_")]
    assert not crossings, "shared helpers belong in a private module (zerojax/_*.py): " + "; ".join(crossings)
