"""The package's floor plan (docs/ARCHITECTURE.md), checked on the source: imports run one way.

Read from the code's own import statements (those inside functions too), so a change that
imports a later stage of the data flow, or another module's private name, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megatron_rgm import lazy
from megatron_rgm.config import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_rgm"

# Lowest first; a unit may import its own layer and those below it. A unit is a top-level module or
# subpackage of megatron_rgm, or one of the modules named in UNITS (they sit apart from their package).
LAYERS = [
    ["config", "cli", "lazy", "faults", "ops", "cpu", "model.presets"],
    ["rl", "compat", "distributed", "launch", "tokenizer", "steps", "head"],
    ["checkpoint", "arguments", "data"],
    ["model"],
    ["model.load"],
    ["hf", "integration"],
    ["convert", "rollout"],
    ["evaluation", "inference"],
    ["training"],
    ["tasks", "pretrain"],
]
UNITS = {"model.presets", "model.load"}  # the model's geometry presets sit below arguments; load above it
EXTENSION = "_C"  # the compiled kernels, imported by ops only
# Units still longer than the ~400 lines a reader takes in one sitting (the open part of the re-plumbing).
LONG: dict[str, int] = {}
MAX_LINES = 400


def _unit(module: str) -> str:
    rest = module.removeprefix("megatron_rgm").lstrip(".")
    parts = rest.split(".")
    if ".".join(parts[:2]) in UNITS:
        return ".".join(parts[:2])
    return parts[0]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path):
    """(imported module, name or None) for every megatron_rgm import in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_rgm"):
                    yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_rgm"):
            for alias in node.names:
                if node.module == "megatron_rgm":  # `from megatron_rgm import distributed`
                    yield f"megatron_rgm.{alias.name}", None
                else:
                    yield node.module, alias.name


LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m, _ in _modules() if m != "megatron_rgm"}
    assert units - {EXTENSION} <= set(LEVEL), f"place {sorted(units - set(LEVEL))} in LAYERS and in ARCHITECTURE.md"


def test_imports_run_down_the_data_flow_only():
    upward = []
    for module, path in _modules():
        here = _unit(module)
        for target, _ in _imports(path):
            there = _unit(target)
            if there in (here, "", EXTENSION):
                continue
            if LEVEL[there] > LEVEL[here]:
                upward.append(f"{module} imports {target} (layer {LEVEL[here]} -> {LEVEL[there]})")
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_from_another_module():
    found = [f"{module} imports {name} from {target}" for module, path in _modules()
             for target, name in _imports(path)
             if name and name.startswith("_") and not name.startswith("__") and name != EXTENSION]
    assert not found, "\n".join(found)


# The packages a module may import on first use (megatron_rgm/lazy.py keeps the one list).
DEFERRED = lazy.DEFERRED


def _top_imports(path: Path) -> list[str]:
    """Modules a file imports at its top level (``from megatron_rgm import x`` counts as ``megatron_rgm.x``)."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += ([f"{node.module}.{a.name}" for a in node.names] if node.module == "megatron_rgm"
                    else [node.module])
    return out


def _pulls_deferred(module: str, files: dict[str, Path], seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` (its packages' ``__init__`` first) imports a DEFERRED package."""
    seen = set() if seen is None else seen
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in seen or name not in files:
            continue
        seen.add(name)
        for target in _top_imports(files[name]):
            if target.split(".")[0] in DEFERRED:
                return True
            if target.startswith("megatron_rgm") and _pulls_deferred(target, files, seen):
                return True
    return False


def _imports_in_functions(tree: ast.AST):
    """(function name, imported module) for each import statement inside a function."""
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                yield from ((fn.name, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield from ((fn.name, f"{node.module}.{a.name}" if node.module == "megatron_rgm" else node.module)
                            for a in node.names)


def test_imports_sit_at_file_tops_unless_deferred():
    # Inside a function: megatron-core (or a module of ours that pulls it), in a module that does not import it
    # already; the compiled extension, loaded lazily by ops. Other slow or optional packages go through lazy.load.
    files = dict(_modules())
    found = []
    for module, path in files.items():
        for fn, target in _imports_in_functions(ast.parse(path.read_text())):
            if target.endswith(EXTENSION):
                continue
            ours = target.startswith("megatron_rgm")
            if target.startswith("megatron.training"):  # Megatron-LM's loop: not every megatron-core install has it
                continue
            if (_pulls_deferred(target, files) if ours else target.split(".")[0] == "megatron") \
                    and not _pulls_deferred(module, files):
                continue
            found.append(f"{module}.{fn} imports {target} inside a function: move it to the top"
                         + ("" if ours or target.startswith("megatron") else ", or lazy.load it if it is slow or "
                            "optional"))
    assert not found, "\n".join(found)


def test_lazy_loads_name_a_package_it_knows():
    # lazy.load("x") of a package lazy.INSTALL does not list would raise ValueError at run time, on the path that
    # needed it: caught here for every call in the package.
    bad = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in
                    ("load", "available") and isinstance(node.func.value, ast.Name) and node.func.value.id == "lazy"):
                name = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
                if not (isinstance(name, str) and any(name == k or name.startswith(k + ".") for k in lazy.INSTALL)):
                    bad.append(f"{module}: lazy.{node.func.attr}({ast.unparse(node.args[0]) if node.args else ''})")
    assert not bad, "\n".join(bad)


def test_lazy_load_names_the_install_for_a_missing_package(monkeypatch):
    import importlib

    def missing(name, *a, **k):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ConfigError, match=r"--wandb-project needs wandb, which does not import here .*pip install wandb"):
        lazy.load("wandb", "--wandb-project")
    assert not lazy.available("transformer_engine")
    with pytest.raises(ValueError, match="numpy is not a deferred package: import it at the top"):
        lazy.load("numpy", "anything")


def test_serving_from_an_hf_export_needs_no_megatron_core():
    # RGMScorer runs where only torch and transformers are: neither it nor what it imports pulls megatron in.
    files = dict(_modules())
    assert not _pulls_deferred("megatron_rgm.hf", files) and _pulls_deferred("megatron_rgm.model", files)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_library_file_reads_in_one_sitting(path):
    rel = str(path.relative_to(PACKAGE))
    lines = len(path.read_text().splitlines())
    assert lines <= LONG.get(rel, MAX_LINES), f"{rel} has {lines} lines: split it by concern"


def test_the_import_check_fails_on_a_needless_deferred_import(tmp_path, monkeypatch):
    fake = tmp_path / "megatron_rgm"
    fake.mkdir()
    (fake / "config.py").write_text("X = 1\n")
    (fake / "steps.py").write_text("def f():\n    from megatron_rgm.config import X\n    return X\n\n\n"
                                   "def g():\n    import json\n    return json\n")
    # megatron-core deferred in a module that imports it at its top anyway
    (fake / "cpu.py").write_text("import megatron.core\n\n\ndef h():\n    from megatron.core import parallel_state\n")
    # ... and where it is deferred for a reason: no complaint
    (fake / "ops.py").write_text("def k():\n    from megatron.core import parallel_state\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    with pytest.raises(AssertionError) as failed:
        test_imports_sit_at_file_tops_unless_deferred()
    assert [line.strip() for line in str(failed.value).splitlines()[:3]] == [
        "megatron_rgm.cpu.h imports megatron.core inside a function: move it to the top",
        "megatron_rgm.steps.f imports megatron_rgm.config inside a function: move it to the top",
        "megatron_rgm.steps.g imports json inside a function: move it to the top, or lazy.load it if it is slow "
        "or optional"]
    assert "ops.k" not in str(failed.value)


def test_the_layering_check_fails_on_an_upward_import(tmp_path, monkeypatch):
    # The check itself must be able to fail: a model module that imports the trainer.
    fake = tmp_path / "megatron_rgm"
    (fake / "model").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "model" / "bad.py").write_text("from megatron_rgm.training.loop import Trainer\n")
    (fake / "training" / "loop.py").write_text("class Trainer: ...\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="megatron_rgm.model.bad imports megatron_rgm.training.loop"):
        test_imports_run_down_the_data_flow_only()
