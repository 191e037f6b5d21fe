"""Every private name of Qwix (and of Flax and JAX) that nnx_peft uses, each listed once.

nnx_peft builds on Qwix's public provider API (``qwix.PtqProvider``, ``qwix.LoraRule``,
``qwix.quantize`` ...). What that API does not offer is read here, and only here:
no other module of the package imports ``qwix._src``, ``jax._src`` or names a private
attribute of Qwix or Flax (``tests/test_qwix_bridge.py`` checks that, and that every name
below still exists with the signature nnx_peft calls it with).

If a release moves one of these, importing nnx_peft fails with an ``ImportError`` naming
the missing piece, instead of adapters going silently wrong.
"""

from __future__ import annotations

import importlib
from typing import Any


def _private(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"nnx_peft needs {module}.{name}, which the installed Qwix, Flax or JAX does not "
            "have. Install the versions nnx_peft supports (see its pyproject.toml), or "
            "report this at nnx_peft's issue tracker with `pip list` attached."
        ) from error


# --- Qwix's helpers for NNX modules (qwix._src.utils.flax_util) ----------------------------
_FLAX_UTIL = "qwix._src.utils.flax_util"
#: The module whose intercepted method is running.
get_current_module = _private(_FLAX_UTIL, "get_current_module")
#: That module's path from the root (a tuple), as Qwix's rules match it.
get_current_module_path = _private(_FLAX_UTIL, "get_current_module_path")
#: The name of the current module's parameter an operand is (identity, unary ops, shape).
find_param = _private(_FLAX_UTIL, "find_param")
#: Creates a parameter on the current module with Qwix's RNGs (or returns it).
get_or_create_param = _private(_FLAX_UTIL, "get_or_create_param")
#: The raw array of a Variable, without hooks or sharding constraints.
unbox = _private(_FLAX_UTIL, "unbox")

# --- Interception of one method (qwix._src.model) ------------------------------------------
_MODEL = "qwix._src.model"
#: Runs a method with the provider's interceptors (what ``apply_lora_to_model`` installs).
apply_interceptors = _private(_MODEL, "_apply_interceptors")
#: The provider's processing of that method's output (``process_model_output``).
output_transform_nnx = _private(_MODEL, "_output_transform_nnx")

# --- QLoRA quantization --------------------------------------------------------------------
#: A quantized base weight with how it was quantized (Qwix's PTQ weight type).
WithAux = _private("qwix._src.providers.ptq", "WithAux")
#: How Qwix quantizes the weight of a ``dot_general`` / ``einsum`` (its tiled axes).
dot_general_how_to_quantize = _private("qwix._src.core.dot_general", "get_how_to_quantize")
einsum_how_to_quantize = _private("qwix._src.core.einsum", "get_how_to_quantize")
#: Qwix's parse of a two-operand einsum (ellipses and implicit outputs resolved).
EinsumInfo = _private("qwix._src.core.einsum_info", "EinsumInfo")

# --- JAX's ``@`` (jax._src.numpy.array_methods) --------------------------------------------
#: ``@`` runs these inside a jax.jit of their own; they are intercepted before it.
_ARRAY_METHODS = "jax._src.numpy.array_methods"
operator_matmul = _private(_ARRAY_METHODS, "_operator_matmul")
operator_rmatmul = _private(_ARRAY_METHODS, "_operator_rmatmul")

#: Names of functions Qwix's interception replaces (keys of ``get_intercept_map``) that
#: are private.
INTERCEPT_OPERATOR_MATMUL = f"{_ARRAY_METHODS}._operator_matmul"
INTERCEPT_OPERATOR_RMATMUL = f"{_ARRAY_METHODS}._operator_rmatmul"
INTERCEPT_WITH_AUX_ASTYPE = "qwix._src.providers.ptq.WithAux.astype"
INTERCEPT_VARIABLE_GETITEM = "flax.nnx.variablelib.Variable.__getitem__"
#: ``jnp.swapaxes`` is jitted; ``.swapaxes()`` calls this alias of it.
INTERCEPT_LAX_NUMPY_SWAPAXES = "jax._src.numpy.lax_numpy.swapaxes"

# --- Auxiliary data on arrays (qwix._src.aux_data) ----------------------------------------
#: Data attached to an array or tracer (which take no attributes), dropped with the object.
aux_data_set = _private("qwix._src.aux_data", "set")
aux_data_get = _private("qwix._src.aux_data", "get")

#: The names :func:`add_with_aux_methods` gives ``WithAux`` (``tests/test_qwix_bridge.py``
#: checks that Qwix does not define them itself).
WITH_AUX_ARRAY_METHODS = ("T", "mT", "transpose", "swapaxes")


def add_with_aux_methods(methods: dict[str, Any]) -> None:
    """Gives Qwix's ``WithAux`` (a QLoRA weight) the array methods ``methods`` it lacks.

    Model code calls ``w.T`` on a weight, which for QLoRA is a ``WithAux``; see
    ``_transposed``. Only names in :data:`WITH_AUX_ARRAY_METHODS` that ``WithAux``
    does not have are set.
    """
    for name, method in methods.items():
        if name not in WITH_AUX_ARRAY_METHODS:
            raise AssertionError(f"{name!r} is not listed in WITH_AUX_ARRAY_METHODS")
        if not hasattr(WithAux, name):
            setattr(WithAux, name, method)


def unary_sources(x: Any) -> Any:
    """``x`` and, under tracing, each array it was computed from by one unary operation.

    JAX's private ``Tracer.parent`` (its ``in_tracers``), walked as Qwix's
    ``find_param`` does; a JAX without it yields ``x`` only.
    """
    while True:
        yield x
        parent = getattr(x, "parent", None)
        inputs: Any = getattr(parent, "in_tracers", ()) if parent is not None else ()
        if len(inputs) != 1:
            return
        x = inputs[0]


def current_rule(provider: Any, op_name: str, **kwargs: Any) -> tuple[Any, Any]:
    """The Qwix rule (and op id) that applies to ``op_name`` in the current module.

    ``QuantizationProvider._get_current_rule_and_op_id``, with its keywords
    (``only_rule``, ``repeated_call``). Raises ``ValueError`` outside any module.
    """
    return provider._get_current_rule_and_op_id(op_name, **kwargs)


# --- Private attributes Qwix and Flax set ---------------------------------------------------
#: On a class Qwix created when wrapping: the class it wraps.
UNQUANTIZED_TYPE = "_unquantized_type"
#: Set by Qwix on every module of a wrapped model: its path, whether quantization statistics
#: are frozen (True during the first call), and the RNGs adapters are created with.
QWIX_PATH = "qwix_path"
DISABLE_QUANT_STATS_UPDATE = "disable_quant_stats_update"
QWIX_RNGS = "qwix_rngs"
QWIX_MODULE_ATTRIBUTES = (QWIX_PATH, DISABLE_QUANT_STATS_UPDATE, QWIX_RNGS)
#: Qwix's own record of a LoRA einsum, next to the weight (its provider sets it; ours does not).
QWIX_EINSUM_STR_SUFFIX = "_lora_einsum_str"
#: Flax's record, on a module, of which attributes are graph nodes (``object.__setattr__``
#: changes it without recording a ``__setattr__`` of its own).
FLAX_PYTREE_NODES = "_pytree__nodes"
#: A module class's ``pytree=`` keyword (NNX does not pass it on to subclasses).
FLAX_PYTREE_IS_PYTREE = "_pytree__is_pytree"

#: Every private callable above: (module, name, the parameters nnx_peft passes, in order).
#: ``tests/test_qwix_bridge.py`` checks each against the installed packages.
CALLABLES = (
    (_FLAX_UTIL, "find_param", ("x", "ptq_array_type")),
    (_FLAX_UTIL, "get_current_module", ()),
    (_FLAX_UTIL, "get_current_module_path", ()),
    (_FLAX_UTIL, "get_or_create_param", ("name", "init_fn", "nnx_param_type", "need_rng")),
    (_FLAX_UTIL, "unbox", ("maybe_boxed",)),
    (_MODEL, "_apply_interceptors", ("method", "provider", "output_transform")),
    (_MODEL, "_output_transform_nnx", ("provider", "method_name", "output")),
    ("qwix._src.providers.ptq", "WithAux", None),
    (
        "qwix._src.core.dot_general",
        "get_how_to_quantize",
        ("dimension_numbers", "ndims", "for_lhs", "tile_size"),
    ),
    (
        "qwix._src.core.einsum",
        "get_how_to_quantize",
        ("einsum_str", "ndims", "for_lhs", "tile_size"),
    ),
    ("qwix._src.core.einsum_info", "EinsumInfo", None),
    (_ARRAY_METHODS, "_operator_matmul", ("self", "other")),
    (_ARRAY_METHODS, "_operator_rmatmul", ("self", "other")),
    ("qwix._src.aux_data", "set", ("obj", "key", "value")),
    ("qwix._src.aux_data", "get", ("obj", "key", "default")),
)
