"""Module paths: the ``/``-joined strings that ``LoraConfig`` patterns are matched against."""

from __future__ import annotations

from typing import Any

from flax import nnx


def path_string(path: tuple[Any, ...]) -> str:
    """Joins a graph path with ``/``, the form ``LoraConfig.target`` is matched against."""
    return "/".join(map(str, path))


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every module of ``model`` by ``/``-joined path (the root is ``''``)."""
    return {path_string(path): module for path, module in nnx.iter_modules(model)}


def is_under(path: str, root: str) -> bool:
    """Whether module ``path`` is ``root`` or inside it (every path is inside the root ``''``)."""
    return root == "" or path == root or path.startswith(root + "/")
