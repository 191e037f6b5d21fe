"""A wrapper whose base weights are read from disk one at a time: QLoRA bigger than memory.

:meth:`PeftModel.from_base_weights` never builds the base model in float. It

1. traces the base model's creation (``nnx.eval_shape``) for the names, shapes,
   dtypes and shardings of its variables, and checks them against the
   checkpoint's own metadata, reading no weight;
2. builds the wrapper once under ``jax.jit`` and keeps only what the wrap
   makes itself (adapters, RNG state): the base weights it would compute are
   dead code that XLA removes, and a QLoRA tile that does not fit a weight is
   refused while tracing, still before any weight is read;
3. reads each base weight into its sharded layout and, where the wrap
   quantizes it, quantizes it right away as Qwix does (``weight_values``), so
   at most one float weight is in memory besides the quantized model.

Sources are read through their own lazy APIs: an Orbax checkpoint of
``nnx.state(base)`` one array at a time (``partial_restore``), or safetensors
files by tensor (``safe_open``), keyed by the ``/``-joined variable paths.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nnx_peft import _abstract, _safetensors
from nnx_peft._adapted import Adapted, AdaptedT
from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    BaseWeightsMismatchError,
    NeedsBaseWeightsError,
    NotACheckpointError,
    NotAModuleError,
)
from nnx_peft._event_loops import finishing_pending_tasks
from nnx_peft._quantized import QuantizedWeight, weight_values

Path_ = tuple[Any, ...]


def _key(path: Path_) -> str:
    return "/".join(map(str, path))


# --- Sources ---------------------------------------------------------------------------------


class _Orbax:
    """An Orbax checkpoint of ``nnx.state(base)``, read one array at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checkpointer = ocp.PyTreeCheckpointer()
        try:
            tree = self._checkpointer.metadata(path).item_metadata.tree
        except Exception as err:
            raise NotACheckpointError(
                f"{path} is no Orbax checkpoint of a model state ({type(err).__name__}: {err}). "
                "Save the base with ocp.StandardCheckpointer().save(path, nnx.state(base)), or "
                "pass a .safetensors file (or a directory of them)."
            ) from err
        self._stored: dict[str, tuple[str, ...]] = {}
        self.specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for key_path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
            name = "/".join(keys[:-1] if keys[-1] == "value" else keys)  # a Variable's value
            self._stored[name] = keys
            self.specs[name] = (tuple(meta.shape), str(np.dtype(meta.dtype)))

    def read(self, name: str, sharding: jax.sharding.Sharding | None) -> jax.Array:
        keys = self._stored[name]
        item: Any = jax.ShapeDtypeStruct(*self.specs[name])
        args: Any = ocp.ArrayRestoreArgs(sharding=sharding or _default_sharding())
        for key in reversed(keys):
            item, args = {key: item}, {key: args}
        with finishing_pending_tasks():
            restored = self._checkpointer.restore(
                self.path,
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
            )
        for key in keys:
            restored = restored[key]
        return restored


class _Safetensors:
    """Safetensors files keyed by ``/``-joined variable paths, read one tensor at a time."""

    def __init__(self, files: list[Path]) -> None:
        self._safetensors = _safetensors._safetensors()
        self._file: dict[str, Path] = {}
        self.specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in files:
            with self._safetensors.safe_open(file, framework="np") as opened:
                for name in opened.keys():  # noqa: SIM118 (a safetensors handle)
                    tensor = opened.get_slice(name)
                    self._file[name] = file
                    dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
                    self.specs[name] = (tuple(tensor.get_shape()), dtype)

    def read(self, name: str, sharding: jax.sharding.Sharding | None) -> jax.Array:
        with self._safetensors.safe_open(self._file[name], framework="np") as opened:
            tensor = opened.get_tensor(name)
        return _safetensors._placed(tensor, sharding or _default_sharding())


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def open_source(path: Path) -> _Orbax | _Safetensors:
    """The weights at ``path``: a ``.safetensors`` file, a directory of them, or Orbax."""
    if path.is_file() and path.suffix == ".safetensors":
        return _Safetensors([path])
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        return _Safetensors(files) if files else _Orbax(path)
    raise NotACheckpointError(
        f"No base weights at {path}: expected an Orbax checkpoint directory of "
        "nnx.state(base), a .safetensors file, or a directory of .safetensors files."
    )


# --- Building --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Fill:
    """One base variable, and where its value goes in the wrapper."""

    source: str  # the variable's path in the base, ``/``-joined
    paths: tuple[Path_, ...]  # wrapper paths: the variable itself, or a quantized weight's parts
    specs: tuple[Any, ...]  # each path's partition spec (``None``: not on a mesh)
    kinds: tuple[tuple[type[nnx.Variable[Any]], dict[str, Any]], ...]  # each's type, metadata
    quantized: Any = None  # the abstract quantized weight, if the wrap quantizes it

    def variables(self, values: list[jax.Array]) -> dict[Path_, nnx.Variable[Any]]:
        return {
            path: kind.from_metadata(value, metadata)
            for path, (kind, metadata), value in zip(self.paths, self.kinds, values, strict=True)
        }


def _refuse_weight_dependent(config: LoraConfig) -> None:
    needs = [
        f"{name}={value!r}"
        for name, value, dependent in (
            ("use_dora", config.use_dora, config.use_dora),
            ("init", config.init, config.init in ("pissa", "olora")),
            ("modules_to_save", config.modules_to_save, bool(config.modules_to_save)),
        )
        if dependent
    ]
    if needs:
        raise NeedsBaseWeightsError(
            f"PeftModel.from_base_weights builds the adapters before any base weight is read, "
            f"but LoraConfig {', '.join(needs)} starts the trained arrays from the base "
            "weights. Use the defaults (use_dora=False, init='default' or 'gaussian', no "
            "modules_to_save), or build the base in memory and wrap it with PeftModel."
        )


def _loaded(abstract_base: nnx.Module) -> dict[str, Any]:
    """The base variables read from the source: all but RNG state (the wrap seeds its own)."""
    state = nnx.state(abstract_base, nnx.Not(nnx.RngState))
    return {_key(path): v.get_value() for path, v in nnx.to_flat_state(state)}


def _check_source(expected: Mapping[str, Any], found: Mapping[str, Any], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        name
        for name in set(expected) & set(found)
        if found[name] != (tuple(expected[name].shape), str(expected[name].dtype))
    )
    if not (missing or unexpected or mismatched):
        return
    described = [
        f"{name} (checkpoint {found[name][0]} {found[name][1]}, model "
        f"{tuple(expected[name].shape)} {expected[name].dtype})"
        for name in mismatched
    ]
    problems = [
        f"{title}: {', '.join(names)}"
        for title, names in (
            ("missing from the checkpoint", missing),
            ("in the checkpoint but not in the model", unexpected),
            ("of another shape or dtype", described),
        )
        if names
    ]
    raise BaseWeightsMismatchError(
        f"The base weights at {where} do not fit the model make_base builds; nothing was "
        "read.\n  " + "\n  ".join(problems) + "\nSave the checkpoint from the same "
        "architecture and dtype (nnx.state(base), variable paths joined by '/'); nothing is "
        "cast or renamed for you.",
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
    )


def _specs(state: nnx.State, paths: list[Path_]) -> dict[Path_, Any]:
    flat = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    return {path: _spec_of(flat[path]) for path in paths}


def _spec_of(entry: Any) -> Any:
    value = entry.get_value() if isinstance(entry, nnx.Variable) else entry
    return value if isinstance(value, jax.sharding.PartitionSpec) else None


def _build(
    create: Callable[[nnx.Rngs], tuple[Adapted, nnx.Module]], rngs: nnx.Rngs
) -> tuple[nnx.GraphDef[Any], list[Path_], dict[Path_, Any], list[_Fill]]:
    """Builds the wrapper under ``jax.jit``: its graph, its variable order, what the wrap
    makes (computed), and what the base weights fill in."""
    rngs_graphdef, rngs_state = nnx.split(rngs)
    found: dict[str, Any] = {}

    def build(rngs_state: nnx.State) -> tuple[nnx.State, nnx.State]:
        inner = nnx.merge(rngs_graphdef, rngs_state)
        model, base = create(inner)
        from_base = {
            id(v.get_value()): _key(path)
            for path, v in nnx.to_flat_state(nnx.state(base, nnx.Not(nnx.RngState)))
        }
        quantized = {
            ("model", *path, name): value
            for path, module in nnx.iter_modules(model.model)
            for name, value in vars(module).items()
            if isinstance(value, QuantizedWeight)
        }
        graphdef, state = nnx.split(model)
        flat = list(nnx.to_flat_state(state))
        specs = _specs(state, [path for path, _ in flat])
        kinds = {path: (type(v), dict(v.get_metadata())) for path, v in flat}
        made, fills = [], []
        for path, variable in flat:
            source = from_base.get(id(variable.get_value()))
            if source is not None:
                fills.append(_Fill(source, (path,), (specs[path],), (kinds[path],)))
            elif not any(path[: len(prefix)] == prefix for prefix in quantized):
                made.append((path, variable))
        for prefix, weight in quantized.items():
            paths = tuple(p for p, _ in flat if p[: len(prefix)] == prefix)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), weight)
            fills.append(
                _Fill(
                    _key(prefix[1:]),
                    paths,
                    tuple(specs[p] for p in paths),
                    tuple(kinds[p] for p in paths),
                    abstract,
                )
            )
        found.update(graphdef=graphdef, order=[p for p, _ in flat], fills=fills)
        return nnx.from_flat_state(made), nnx.state(inner)

    made, rngs_after = jax.jit(build)(rngs_state)
    nnx.update(rngs, rngs_after)
    return found["graphdef"], found["order"], dict(nnx.to_flat_state(made)), found["fills"]


def _quantize(quantized: Any, value: jax.Array) -> list[jax.Array]:
    """``weight_values(quantized, value)`` in one compiled program.

    Qwix's eager nf4 rounding compares every element with every level (16
    times the weight's size in temporaries); compiled, XLA fuses that away. The
    result is the same, bit for bit (``tests/test_abstract.py`` checks).
    """
    key = (repr(jax.tree.map(lambda x: (x.shape, x.dtype), quantized)), value.shape, value.dtype)
    compiled = _QUANTIZERS.get(key)
    if compiled is None:
        compiled = _QUANTIZERS[key] = jax.jit(functools.partial(weight_values, quantized))
    return list(compiled(value))


#: Compiled quantizers by weight structure, shape and dtype (a model repeats a few).
_QUANTIZERS: dict[Any, Callable[[jax.Array], Any]] = {}


def _release_freed_heap() -> None:
    """Returns the memory freed so far to the operating system, where glibc allows it.

    Compiling the wrapper's build takes heap (measured: about 190 MiB for a
    12-layer, width-1024 decoder) that XLA frees, but that glibc keeps mapped;
    the weights read next would then add to it instead of reusing it.
    ``malloc_trim`` hands it back. Elsewhere (no glibc) this does nothing.
    """
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def _sharding(spec: Any) -> jax.sharding.Sharding | None:
    mesh = jax.sharding.get_mesh()
    if spec is None or mesh.empty:
        return None
    return jax.sharding.NamedSharding(mesh, spec)


def from_base_weights(
    cls: Callable[..., AdaptedT],
    make_base: Callable[[], nnx.Module],
    path: Path,
    config: LoraConfig,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
) -> AdaptedT:
    """See :meth:`PeftModel.from_base_weights`."""
    if isinstance(config, LoraConfig):
        _refuse_weight_dependent(config)
    abstract_base = nnx.eval_shape(make_base)
    if not isinstance(abstract_base, nnx.Module):
        raise NotAModuleError(
            f"make_base must return the base model, an nnx.Module; it returned "
            f"{type(abstract_base).__qualname__}. Pass the constructor call as a function: "
            "make_base=lambda: Model(config, rngs=nnx.Rngs(0))."
        )
    source = open_source(path)
    _check_source(_loaded(abstract_base), source.specs, path)

    def create(inner: nnx.Rngs) -> tuple[AdaptedT, nnx.Module]:
        base = make_base()
        args, kwargs = _abstract.traced_inputs((sample_args, sample_kwargs))
        return cls(base, config, *args, rngs=inner, sample_kwargs=kwargs), base

    graphdef, order, variables, fills = _build(create, rngs)
    gc.collect()
    _release_freed_heap()
    for fill in fills:  # one float weight in memory at a time
        # The previous float weight can stay alive in a reference cycle until the garbage
        # collector runs (measured: all of them did, without this): collect it first.
        gc.collect()
        value = source.read(fill.source, _sharding(fill.specs[0]))
        if fill.quantized is None:
            variables.update(fill.variables([value]))
            continue
        parts = []
        for leaf, spec in zip(_quantize(fill.quantized, value), fill.specs, strict=True):
            sharding = _sharding(spec)
            parts.append(leaf if sharding is None else jax.device_put(leaf, sharding))
        del value
        variables.update(fill.variables(parts))
    model: AdaptedT = nnx.merge(graphdef, nnx.from_flat_state([(p, variables[p]) for p in order]))
    return model
