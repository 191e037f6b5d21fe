"""The package's module structure: imports between ``nnx_peft`` modules point down only.

Every import counts, wherever it is written: at the top, inside a function, or under
``if TYPE_CHECKING:``. An import cycle hidden in a function still couples the two
modules, and makes the import order matter.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import nnx_peft

PACKAGE = Path(nnx_peft.__file__).parent


def _imported(tree: ast.Module, modules: set[str]) -> set[str]:
    """The ``nnx_peft`` modules ``tree`` imports, by short name."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue
            module = node.module or ""
            if node.level == 0 and module != "nnx_peft" and not module.startswith("nnx_peft."):
                continue
            parts = module.split(".")[1:] if node.level == 0 else module.split(".")
            parts = [p for p in parts if p]
            if parts:
                found.add(parts[0])
            else:  # from nnx_peft import _config, _errors
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nnx_peft."):
                    found.add(alias.name.split(".")[1])
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Each ``nnx_peft`` module (but ``__init__``) to the package modules it imports."""
    files = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    modules = set(files)
    return {
        name: _imported(ast.parse(path.read_text()), modules) - {name}
        for name, path in files.items()
    }


def test_the_graph_sees_every_kind_of_import() -> None:
    tree = ast.parse(
        "import nnx_peft._a\n"
        "from nnx_peft import _b\n"
        "from nnx_peft._c import x\n"
        "from . import _d\n"
        "from ._e import y\n"
        "import jax\n"
        "if TYPE_CHECKING:\n    from nnx_peft._f import z\n"
        "def g():\n    from nnx_peft import _g\n"
    )
    names = {"_a", "_b", "_c", "_d", "_e", "_f", "_g", "_h"}
    assert _imported(tree, names) == names - {"_h"}


def test_no_import_cycles_among_nnx_peft_modules() -> None:
    graph = import_graph()
    assert {"_qwix_bridge", "_peft_model", "_config"} <= set(graph)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        cycle = " -> ".join(err.args[1])
        raise AssertionError(
            f"import cycle among nnx_peft modules: {cycle}. Imports must point down only: "
            "move what both sides need into a lower module, or pass it as an argument."
        ) from None
    assert order.index("_errors") < order.index("_config") < order.index("_peft_model")


def test_the_configuration_does_not_pull_in_variant_maths() -> None:
    graph = import_graph()
    below_config: set[str] = set()
    pending = ["_config"]
    while pending:
        for dep in graph[pending.pop()] - below_config:
            below_config.add(dep)
            pending.append(dep)
    assert below_config.isdisjoint({"_variants", "_qwix_bridge", "_injection", "_delta"})


#: The modules that may name an adapter's parts by their attribute suffix: the names
#: themselves, the adapter concept, the code that creates adapters inside Qwix's
#: interception (Qwix's ``get_or_create_param`` takes the attribute name), DoRA's variant
#: (which names its one extra trained part), and ``shard_adapters`` (whose error messages
#: name each part's state path). Everything else reads an ``_adapter.Adapter``.
PART_NAMERS = {
    "_parts",
    "_adapter",
    "_adapter_ops",
    "_stacked_adapters",
    "_variants",
    "_resharding",
}


def _names_of_parts(tree: ast.Module) -> set[str]:
    """The part-name constants of ``_parts`` that ``tree`` imports or uses."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_parts"):
            names.update(alias.name for alias in node.names if "SUFFIX" in alias.name)
        elif (
            isinstance(node, ast.Attribute)
            and "SUFFIX" in node.attr
            and isinstance(node.value, ast.Name)
            and node.value.id == "_parts"
        ):
            names.add(node.attr)
    return names


def test_only_the_adapter_concept_names_an_adapters_parts() -> None:
    tree = ast.parse("from nnx_peft._parts import LORA_A_SUFFIX\nx = _parts.STATE_SUFFIX\n")
    assert _names_of_parts(tree) == {"LORA_A_SUFFIX", "STATE_SUFFIX"}
    naming = {
        path.stem
        for path in PACKAGE.glob("*.py")
        if path.stem not in PART_NAMERS and _names_of_parts(ast.parse(path.read_text()))
    }
    assert not naming, (
        f"{sorted(naming)} name adapter parts by attribute suffix; read them through "
        "nnx_peft._adapter.Adapter (its properties a, b, layout, state, ...) instead"
    )
    # Nor does any module spell a part's suffix out as a string.
    for path in PACKAGE.glob("*.py"):
        if path.stem in {"_parts", "_qwix_internals"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not (node.value.startswith("_lora_") and " " not in node.value), (
                    f"{path.name} spells the part suffix {node.value!r}; import it from _parts"
                )
