"""The one module that uses Qwix internals (``qwix._src``).

Why this exists: Qwix's public ``LoraProvider`` intercepts the model's matmuls,
quantizes QLoRA base weights and derives adapter shapes and shardings, and
nnx_peft keeps all of that. It replaces these decisions Qwix makes inside the
provider, which needs Qwix's private helpers:

- adapters are created as :class:`~nnx_peft.AdapterParam`, not plain
  ``nnx.LoRAParam``, so the trainable filter never picks up weights of the base;
- dropout on the adapter input is an ``nnx.Dropout`` submodule, so it follows
  ``model.train()`` / ``model.eval()`` (Qwix applies it in evaluation too) and
  costs nothing at rate 0;
- a QLoRA tile size that does not divide a weight's contracting axis, or a
  quantized convolution, is refused with a message naming the module, instead
  of failing deep inside Qwix's quantization;
- the weight operand of a matmul is looked up among the base weights only
  (Qwix's lookup by shape also counts the adapters, and silently skips the
  update when an adapter factor has the weight's shape);
- each adapted weight has an :class:`AdapterState`, a static attribute the
  provider reads on every call: it adds the update only while ``ACTIVE``, so
  adapters can be disabled, or merged into the base weight, without a second
  copy of the model and without breaking ``nnx.jit`` (a state change changes
  the graph definition, so jitted functions retrace);
- each module's rank, scale, update variant (LoRA or DoRA) and initializer
  come from an ``AdapterPlan`` (``_variants``), resolved per module path; the
  variant decides how the update enters the output, and its maths lives there
  and in ``_factors``, not here. Only creating the extra arrays (DoRA's
  magnitude) and replacing a weight by its PiSSA/OLoRA residual happen here;
- the update itself is computed by ``_delta.low_rank_update`` as two matrix
  products over merged axes, which XLA differentiates without the transposed
  copies Qwix's formulation costs; a call that creates an adapter skips its
  (zero) update;
- a recording provider lists the sample call's matmuls and output sizes,
  and a dry run (under ``jax.eval_shape``) looks weights up as an eager call
  does, for ``target='all-linear'`` and ``inspect_targets``.

It also records, per adapted weight, the :class:`LoraLayout` merging needs,
and holds the helpers that read, dequantize and requantize a QLoRA base
weight and that undo what ``qwix.apply_lora_to_model`` did to the module tree.

If a Qwix release moves any name used here, ``tests/test_qwix_bridge.py``
(and, for the names merging reads, ``tests/test_merging.py``) fails first and
says which.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax.errors
import jax
import numpy as np
import qwix
from flax import nnx
from jax._src.numpy import array_methods as _jax_array_methods
from qwix._src import model as _qwix_model
from qwix._src.core import dot_general as _qwix_dot_general
from qwix._src.core import einsum as _qwix_einsum
from qwix._src.core import einsum_info as _qwix_einsum_info
from qwix._src.providers import lora as _qwix_lora
from qwix._src.providers import ptq as _qwix_ptq
from qwix._src.utils import flax_util as _flax_util

from nnx_peft import _delta, _embedding, _factors, _sharding, _stacks
from nnx_peft._adapter_state import (
    STATE_SUFFIX,
    AdapterState,
    adapter_state,
    refuse_adapter_gradients,
)
from nnx_peft._errors import (
    QuantizationError,
    TileSizeError,
    UnreachedTargetError,
    UnsupportedLayerError,
)
from nnx_peft._factors import Subscripts
from nnx_peft._layout import CallRecord, LoraLayout
from nnx_peft._variables import AdapterParam, InitialFactor
from nnx_peft._variants import MAGNITUDE_SUFFIX, AdapterPlan, AdapterSpec, check_supported

#: Suffixes of the attributes Qwix and nnx_peft add next to an adapted weight.
LORA_A_SUFFIX = "_lora_a"
LORA_B_SUFFIX = "_lora_b"
DROPOUT_SUFFIX = "_lora_dropout"

#: The type of a quantized (QLoRA) base weight inside an adapted module.
QuantizedWeight = _qwix_ptq.WithAux

LAYOUT_SUFFIX = "_lora_layout"
INITIAL_A_SUFFIX = "_lora_initial_a"
INITIAL_B_SUFFIX = "_lora_initial_b"

#: Qwix's own record of the update einsum (its provider sets it; ours does not).
_QWIX_EINSUM_STR_SUFFIX = "_lora_einsum_str"
#: Attributes ``qwix.apply_lora_to_model`` sets on every module of the model.
_QWIX_MODULE_ATTRIBUTES = ("qwix_path", "disable_quant_stats_update", "qwix_rngs")


def is_qwix_wrapped(model: nnx.Module) -> bool:
    """Whether ``model`` is an instance of a class Qwix created when wrapping."""
    return hasattr(type(model), "_unquantized_type")


def unwrapped_type(model: nnx.Module) -> type:
    """The model's class before Qwix wrapped it (the class itself if never wrapped)."""
    return getattr(type(model), "_unquantized_type", type(model))


def _module_path() -> str:
    return "/".join(map(str, _flax_util.get_current_module_path()))


def _qwix_paths(root: nnx.Module) -> dict[str, nnx.Module]:
    """The modules of ``root`` by their Qwix path, as ``_module_path`` writes it."""
    paths = ((getattr(m, "qwix_path", None), m) for _, m in nnx.iter_modules(root))
    return {"/".join(map(str, path)): m for path, m in paths if path is not None}


class PeftLoraProvider(qwix.LoraProvider):
    """A ``qwix.LoraProvider`` creating :class:`AdapterParam` weights and mode-aware dropout.

    Args:
        rules: The Qwix rules (which modules; QLoRA settings).
        plan: Each module path's rank, scale, variant and initializer.
        record: If given, filled with the intercepted matmuls, in call order,
            and the sizes of the model's outputs (the ``'all-linear'`` target
            finds the output head this way).
        dry_run: The sample call is traced (``jax.eval_shape``) to find what an
            eager call would create: weights are then looked up as in an eager
            call, by identity and then by shape, not through traced unary
            operations (which would also find, say, a transposed weight).
    """

    def __init__(
        self,
        rules: Sequence[qwix.QuantizationRule],
        plan: AdapterPlan,
        *,
        record: CallRecord | None = None,
        dry_run: bool = False,
    ) -> None:
        super().__init__(rules)
        self._plan = plan
        self._record = record
        self._dry_run = dry_run
        # The model being called, and its modules by Qwix path: a module a transform
        # (a scan over layers) copies is found in the model by its path.
        self._root: weakref.ref[nnx.Module] | None = None
        self._modules: dict[Any, nnx.Module] | None = None
        self._pending: dict[tuple[str, str], _stacks.Pending] = {}
        self._rngs: nnx.Rngs | None = None

    def process_model_inputs(
        self, model: Any, model_args: Sequence[Any], model_kwargs: dict[str, Any]
    ) -> tuple[Any, Sequence[Any], dict[str, Any]]:
        """Notes the model called, takes Qwix's RNGs off its modules, then lets Qwix start.

        Qwix sets its ``nnx.Rngs`` on every module for the first call; as a
        module attribute it is state, which a scan over a stacked module would
        try to slice along the layer axis. The provider keeps it instead and
        lends it to the module an adapter is created in.
        """
        if isinstance(model, nnx.Module):
            self._root, self._modules = weakref.ref(model), None
            for _, module in nnx.iter_modules(model):
                rngs = vars(module).get("qwix_rngs")
                if isinstance(rngs, nnx.Rngs):
                    self._rngs = rngs
                    module.qwix_rngs = None  # type: ignore[attr-defined]
        return super().process_model_inputs(model, model_args, model_kwargs)

    def _owner(self) -> nnx.Module | None:
        """The model's module that the current module is a transformed copy of, if it is one.

        Inside ``nnx.scan`` / ``nnx.vmap`` / ``nnx.remat``, or a ``jax.lax.scan``
        body that merges split state, the module running is a copy of one of
        the model's modules (a layer of a stack), with Qwix's path attribute.
        """
        module = _flax_util.get_current_module()
        path = getattr(module, "qwix_path", None)
        root = self._root() if self._root is not None else None
        if path is None or root is None:
            return None
        if self._modules is None:
            self._modules = {
                m.qwix_path: m for _, m in nnx.iter_modules(root) if hasattr(m, "qwix_path")
            }
        owner = self._modules.get(path)
        return None if owner is None or owner is module else owner

    def _check_copy(self, op_name: str) -> None:
        """Refuses QLoRA on a module that a transform (a scan over layers) copies."""
        rule, _ = self._get_current_rule_and_op_id(op_name, only_rule=True)
        if not isinstance(rule, qwix.LoraRule) or rule.weight_qtype is None:
            return
        module = _flax_util.get_current_module()
        if getattr(module, "disable_quant_stats_update", False) and self._owner() is not None:
            raise QuantizationError(
                f"Module {_module_path()!r} runs inside a transform (a scan over layers, "
                f"nnx.vmap or nnx.remat) and LoraConfig.weight_qtype={rule.weight_qtype!r}; "
                "QLoRA cannot quantize weights inside a transform, where the stored weight "
                "is a traced copy. Use weight_qtype=None, or exclude the stacked modules "
                "with LoraConfig.exclude."
            )

    def _adapter(
        self,
        name: str,
        rule: qwix.LoraRule,
        spec: AdapterSpec,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        a_transpose: _sharding.Groups,
        b_transpose: _sharding.Groups,
        layout: LoraLayout,
        sub: Subscripts,
        operand: Any,
    ) -> tuple[jax.Array, jax.Array] | None:
        """``_adapter``, or, in a transformed copy of a module, a pending stacked adapter.

        Returns ``None`` when this call created the adapter or left it pending:
        either way its update is zero for this call.
        """
        module = _flax_util.get_current_module()
        args = (name, rule, spec, a_shape, b_shape, a_transpose, b_transpose, layout, sub, operand)
        if getattr(module, name + LORA_A_SUFFIX, None) is not None:  # every call but the first
            return _adapter(*args)
        owner = self._owner()
        if owner is None:
            try:
                module.qwix_rngs = self._rngs
            except flax.errors.TraceContextError as error:
                raise _traced_weight_error(name) from error
            try:
                made = _adapter(*args)
                if made is None:
                    _dropout_layer(name, rule)  # while the RNGs are lent
            finally:
                module.qwix_rngs = None
            return made
        path = _module_path()
        where = f"the weight {name!r} of module {path!r}"
        check_supported(
            spec,
            groups=(layout.feature_group_count, layout.batch_group_count),
            transformed=lambda: False,  # traced: Qwix's match is trusted, as under jit
            where=where,
        )
        axes = _stacks.layer_axes(owner, module, path)
        self._pending[(path, name)] = _stacks.Pending(
            module=owner,
            path=path,
            name=name,
            axes=axes,
            shapes=_stacks.describe_shapes(owner, module),
            spec=spec,
            a_shape=a_shape,
            b_shape=b_shape,
            a_groups=a_transpose,
            b_groups=b_transpose,
            layout=dataclasses.replace(
                layout, scale=spec.scale, update=spec.update, subscripts=sub
            ),
            dropout=rule.dropout,
        )
        return None

    def _create_pending(self) -> None:
        """Creates the stacked adapters recorded during the sample call (see ``_stacks``).

        Each goes on the module at its path in the model as the call left it:
        a scan may put a new stacked module in place of the one it sliced
        (MaxText assigns its scan's output state, merged anew, to the
        decoder's ``layers`` while Qwix wraps).
        """
        pending, self._pending = list(self._pending.values()), {}
        root = self._root() if self._root is not None else None
        now = {} if root is None else _qwix_paths(root)
        for item in _stacks.resolve(pending):
            item = dataclasses.replace(item, module=now.get(item.path, item.module))
            _create_stacked(item, self._rngs)

    def _note(self, weight_name: str | None, res: jax.Array) -> None:
        if self._record is not None:
            self._record.ops.append((_module_path(), weight_name, res.size))

    def note_reached(self, paths: set[Any]) -> None:
        """Records the Qwix paths of the modules the sample call ran, if recording."""
        if self._record is not None:
            self._record.reached = {"/".join(map(str, p)) for p in paths if p is not None}

    def process_model_output(self, method_name: str, model_output: Any) -> Any:
        """Records the output sizes, then lets Qwix end its first call."""
        if self._record is not None:
            leaves = jax.tree.leaves(model_output)
            self._record.output_sizes = [x.size for x in leaves if hasattr(x, "size")]
        if self._pending:
            self._create_pending()
        return super().process_model_output(method_name, model_output)

    def get_intercept_map(self) -> dict[str, Callable[..., Any]]:
        """Qwix's map, plus dtype casts that follow a QLoRA weight (see ``_cast_quantized``)."""
        return super().get_intercept_map() | {
            "jax.numpy.astype": _astype,
            "qwix._src.providers.ptq.WithAux.astype": _cast_quantized,
            # Raw matmuls, as dot_general: ``@`` and jnp.matmul run a jax.jit of their own,
            # whose cached trace would hide the weight (so adapters would depend on
            # what ran before); they are intercepted before it.
            "jax.numpy.matmul": self.matmul,
            "jax._src.numpy.array_methods._operator_matmul": self._operator_matmul,
            "jax._src.numpy.array_methods._operator_rmatmul": self._operator_rmatmul,
            "jax.numpy.tensordot": self.tensordot,
            "jax.numpy.inner": self.inner,
            "jax.lax.dot": self.lax_dot,
            # Embedding lookups (see ``_embedding``): Qwix intercepts no lookups.
            "jax.numpy.take": self.take,
            "flax.nnx.variablelib.Variable.__getitem__": self.variable_getitem,
        }

    def _contract(
        self,
        name: str,
        a: Any,
        b: Any,
        dims: jax.lax.DotDimensionNumbers | None,
        original: Callable[[], jax.Array],
        **kwargs: Any,
    ) -> jax.Array:
        """``a`` times ``b`` as ``dot_general(a, b, dims)``, or ``original()`` if ``dims`` is None.

        Refuses (``UnsupportedLayerError``) a product that cannot be written so
        on a targeted module's own weight: a weight on the left, or a matmul
        broadcasting a weight's batch axes.
        """
        if not isinstance(a, QuantizedWeight):
            a = jax.numpy.asarray(a)
        if not isinstance(b, QuantizedWeight):
            b = jax.numpy.asarray(b)
        targeted = self._targeted_here()
        weight_left = targeted and _find_weight(a, self._dry_run) is not None
        if weight_left and _find_weight(b, self._dry_run) is None:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} is targeted and multiplies its own weight from the "
                f"left ({name}(weight, x)); adapters need the weight as the right operand. "
                "Write x @ weight (transposing the result if needed) or a jnp.einsum, or "
                "exclude the module with LoraConfig.exclude."
            )
        if dims is None:
            if targeted and _find_weight(b, self._dry_run) is not None:
                raise UnsupportedLayerError(
                    f"Module {_module_path()!r} is targeted and runs {name} on its weight of "
                    f"shape {tuple(b.shape)} with an input of shape {tuple(a.shape)}, a "
                    "product broadcasting batch axes, which adapters do not support. Write it "
                    "with jnp.einsum, or exclude the module with LoraConfig.exclude."
                )
            return original()
        if not isinstance(a, QuantizedWeight) and not isinstance(b, QuantizedWeight):
            dtype = jax.numpy.result_type(a, b)
            a = a if a.dtype == dtype else a.astype(dtype)
            b = b if b.dtype == dtype else b.astype(dtype)
        return self.dot_general(a, b, dims, **kwargs)

    def _targeted_here(self) -> bool:
        try:
            rule, _ = self._get_current_rule_and_op_id("dot_general", only_rule=True)
        except ValueError:  # outside any module
            return False
        return isinstance(rule, qwix.LoraRule)

    def matmul(self, a: Any, b: Any, **kwargs: Any) -> jax.Array:
        """``jnp.matmul`` (and ``@``) as a ``dot_general`` where its axes allow."""
        dims = _matmul_dims(
            jax.numpy.ndim(a), jax.numpy.ndim(b), jax.numpy.shape(a), jax.numpy.shape(b)
        )
        return self._contract(
            "jnp.matmul", a, b, dims, lambda: jax.numpy.matmul(a, b, **kwargs), **kwargs
        )

    def _operator_matmul(self, a: Any, b: Any) -> Any:
        """``a @ b`` for a JAX array ``a``."""
        b = _as_operand(b)
        if b is None:  # not a JAX operand: JAX's own answer (NotImplemented, say)
            return _jax_array_methods._operator_matmul(a, b)
        return self.matmul(a, b)

    def _operator_rmatmul(self, a: Any, b: Any) -> Any:
        """``b @ a`` for a JAX array ``a``."""
        operand = _as_operand(b)
        if operand is None:
            return _jax_array_methods._operator_rmatmul(a, b)
        return self.matmul(operand, a)

    def tensordot(self, a: Any, b: Any, axes: Any = 2, **kwargs: Any) -> jax.Array:
        """``jnp.tensordot`` as a ``dot_general`` (its output order is the same)."""
        a_ndim, b_ndim = jax.numpy.ndim(a), jax.numpy.ndim(b)
        if isinstance(axes, int):
            contract = (tuple(range(a_ndim - axes, a_ndim)), tuple(range(axes)))
        else:
            a_axes, b_axes = axes
            a_axes = (a_axes,) if isinstance(a_axes, int) else tuple(a_axes)
            b_axes = (b_axes,) if isinstance(b_axes, int) else tuple(b_axes)
            contract = (tuple(i % a_ndim for i in a_axes), tuple(i % b_ndim for i in b_axes))
        return self._contract(
            "jnp.tensordot",
            a,
            b,
            (contract, ((), ())),
            lambda: jax.numpy.tensordot(a, b, axes, **kwargs),
            **kwargs,
        )

    def inner(self, a: Any, b: Any, **kwargs: Any) -> jax.Array:
        """``jnp.inner`` as a ``dot_general`` contracting both last axes."""
        a_ndim, b_ndim = jax.numpy.ndim(a), jax.numpy.ndim(b)
        dims = None if 0 in (a_ndim, b_ndim) else (((a_ndim - 1,), (b_ndim - 1,)), ((), ()))
        return self._contract(
            "jnp.inner", a, b, dims, lambda: jax.numpy.inner(a, b, **kwargs), **kwargs
        )

    def lax_dot(self, a: Any, b: Any, *args: Any, **kwargs: Any) -> jax.Array:
        """``jax.lax.dot`` as a ``dot_general`` (its default contraction)."""
        if args or kwargs.get("dimension_numbers") is not None:
            return self._contract(
                "jax.lax.dot", a, b, None, lambda: jax.lax.dot(a, b, *args, **kwargs)
            )
        kwargs.pop("dimension_numbers", None)
        a_ndim = jax.numpy.ndim(a)
        dims = None if 0 in (a_ndim, jax.numpy.ndim(b)) else (((a_ndim - 1,), (0,)), ((), ()))
        return self._contract(
            "jax.lax.dot", a, b, dims, lambda: jax.lax.dot(a, b, **kwargs), **kwargs
        )

    def take(self, a: Any, indices: Any, axis: int | None = None, **kwargs: Any) -> Any:
        """``jnp.take``, plus the update of a row lookup in a targeted module's table."""
        res = jax.numpy.take(a, indices, axis=axis, **kwargs)
        if not _embedding.is_lookup(a, indices, axis):
            return res
        return self._lookup(a, indices, res, kwargs)

    def variable_getitem(self, variable: nnx.Variable[Any], index: Any) -> Any:
        """``variable[index]``, plus the update of ``table[ids]`` on a targeted module's table."""
        res = variable[index]  # not intercepted again: Qwix runs the original inside
        ids = _embedding.index_ids(index)
        if ids is None or not isinstance(variable, nnx.Param) or jax.numpy.ndim(res) < 1:
            return res
        table = _flax_util.unbox(variable)
        if not _embedding.is_lookup(table, ids, 0):
            return res
        return self._lookup(table, ids, res, {})

    def _lookup(self, table: Any, ids: Any, res: jax.Array, take_kwargs: dict[str, Any]) -> Any:
        """``res``, the rows ``ids`` of ``table``, plus their low-rank update if adapted."""
        if self._record is not None:  # 'all-linear' adapts linear layers only, as in HF PEFT
            return res
        try:
            rule, _ = self._get_current_rule_and_op_id("take", only_rule=True)
        except ValueError:  # outside any module
            return res
        if not isinstance(rule, qwix.LoraRule):
            return res
        weight_name = _find_weight(table, self._dry_run)
        if weight_name is None:
            return res
        layout = getattr(_flax_util.get_current_module(), weight_name + LAYOUT_SUFFIX, None)
        if layout is not None and not layout.lookup:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} multiplies by its weight {weight_name!r} and then "
                "looks up rows of it (an output head tied to an embedding, called before the "
                "lookup); one adapter cannot be both. Look the rows up before the matmul, or "
                "exclude the module with LoraConfig.exclude."
            )
        spec = self._spec()
        if spec.update.extra_suffixes:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} looks up rows of its weight {weight_name!r} (an "
                f"embedding) and LoraConfig asks for the {spec.update.name!r} variant, which "
                "nnx_peft supports on matmuls only. Use plain LoRA on embeddings (use_dora=False, "
                "or exclude the embedding with LoraConfig.exclude)."
            )
        rule = dataclasses.replace(rule, dropout=0.0)  # ids have nothing to drop, as in HF PEFT
        vocab, features = table.shape
        sub = _factors.dot_general_subscripts(2, (0,), ())
        adapter = self._adapter(
            weight_name,
            rule,
            spec,
            (vocab, spec.rank),
            (spec.rank, features),
            _embedding.A_GROUPS,
            _embedding.B_GROUPS,
            _embedding.LOOKUP_LAYOUT,
            sub,
            table,
        )

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            del x  # the ids, cast to the compute dtype: the lookup takes them as they are
            return _embedding.lookup_update(ids, lora_a, lora_b, spec.scale, **take_kwargs)

        template = _factors.dot_general_output(sub, res.ndim)
        return _add_update(res, weight_name, rule, ids, table, adapter, update, template)

    def _spec(self) -> AdapterSpec:
        return self._plan.spec(_module_path())

    def _current_rule(self, op_name: str) -> qwix.LoraRule | None:
        rule, _ = self._get_current_rule_and_op_id(op_name, repeated_call=True)
        return rule if isinstance(rule, qwix.LoraRule) else None

    def _check_tiling(self, op_name: str, rhs: Any, how: Callable[..., Any]) -> None:
        """Refuses a QLoRA tile size that does not divide the tiled axis of ``rhs``."""
        rule, _ = self._get_current_rule_and_op_id(op_name, only_rule=True)
        if rule is None or rule.weight_qtype is None or rule.tile_size is None:
            return
        if isinstance(rhs, QuantizedWeight) or _flax_util.find_param(rhs) is None:
            return  # already quantized, or not a weight
        tiled_axes = how(
            for_lhs=False,
            tile_size=rule.tile_size,
            qtype=rule.weight_qtype,
            calibration_method=rule.weight_calibration_method,
        ).tiled_axes
        for axis, tile in tiled_axes.items():
            if rhs.shape[axis] % tile:
                raise TileSizeError(
                    f"LoraConfig.tile_size={tile} does not divide axis {axis} (size "
                    f"{rhs.shape[axis]}) of the weight of shape {tuple(rhs.shape)} in module "
                    f"{_module_path()!r}. Choose a tile_size that divides {rhs.shape[axis]}, "
                    "set tile_size=None for per-channel quantization, or exclude the module."
                )

    def dot_general(
        self,
        lhs: jax.Array,
        rhs: Any,
        dimension_numbers: jax.lax.DotDimensionNumbers,
        precision: jax.lax.PrecisionLike = None,
        preferred_element_type: jax.typing.DTypeLike | None = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        """``jax.lax.dot_general`` plus the low-rank update of the weight operand."""
        self._check_copy("dot_general")
        self._check_tiling(
            "dot_general",
            rhs,
            lambda **kw: _qwix_dot_general.get_how_to_quantize(
                dimension_numbers=dimension_numbers, ndims=(lhs.ndim, rhs.ndim), **kw
            ),
        )
        res = _qwix_ptq.PtqProvider.dot_general(
            self,
            lhs,
            rhs,
            dimension_numbers,
            precision,
            preferred_element_type,
            out_sharding=out_sharding,
        )
        rule = self._current_rule("dot_general")
        weight_name = _find_weight(rhs, self._dry_run) if rule else None
        if rule is not None:
            self._note(weight_name, res)
        if rule is None or _multiplies_lookup_table(weight_name, rhs, self._dry_run):
            return res
        if weight_name is None:
            return res
        spec = self._spec()
        (_, rhs_ca), (_, rhs_ba) = dimension_numbers
        rhs_ra = tuple(i for i in range(rhs.ndim) if i not in rhs_ca and i not in rhs_ba)
        contract_shape = tuple(rhs.shape[i] for i in rhs_ca)
        batch_shape = tuple(rhs.shape[i] for i in rhs_ba)
        remain_shape = tuple(rhs.shape[i] for i in rhs_ra)
        a_shape, _, b_shape, _ = _qwix_lora._create_lora_layer_shapes(
            rhs_ca, rhs_ba, rhs_ra, contract_shape, batch_shape, remain_shape, spec.rank
        )
        sub = _factors.dot_general_subscripts(rhs.ndim, tuple(rhs_ca), tuple(rhs_ba))
        # The weight axes each adapter axis stands for. Qwix's own transposes keep
        # only the first of several flattened axes (see nnx_peft/_sharding.py).
        a_transpose = (*rhs_ba, tuple(rhs_ca), None)
        b_transpose = (*rhs_ba, None, tuple(rhs_ra))
        adapter = self._adapter(
            weight_name,
            rule,
            spec,
            a_shape,
            b_shape,
            a_transpose,
            b_transpose,
            LoraLayout("dot_general", contracting=tuple(rhs_ca), batch=tuple(rhs_ba)),
            sub,
            rhs,
        )

        update_sub = _delta.dot_general_update_subscripts(sub, lhs.ndim, dimension_numbers)
        weight_shape = tuple(rhs.shape)

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            a, b = sub.views(lora_a, lora_b, weight_shape)
            return _delta.low_rank_update(
                x, a, b, update_sub, scale=spec.scale, precision=precision
            )

        template = _factors.dot_general_output(sub, res.ndim)
        return _add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)

    def einsum(self, einsum_str: str, *operands: Any, **kwargs: Any) -> jax.Array:
        """``jnp.einsum`` plus the low-rank update of the weight operand."""
        self._check_copy("einsum")
        if len(operands) == 2:
            lhs, rhs = operands
            self._check_tiling(
                "einsum",
                rhs,
                lambda **kw: _qwix_einsum.get_how_to_quantize(
                    einsum_str=einsum_str, ndims=(lhs.ndim, rhs.ndim), **kw
                ),
            )
        res = _qwix_ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
        rule = self._current_rule("einsum")
        if rule is None:
            return res
        if len(operands) != 2:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} is targeted but calls einsum {einsum_str!r} with "
                f"{len(operands)} operands; adapters support two-operand einsums only. "
                "Exclude this module with LoraConfig.exclude."
            )
        lhs, rhs = operands
        weight_name = _find_weight(rhs, self._dry_run)
        self._note(weight_name, res)
        if weight_name is None or _multiplies_lookup_table(weight_name, rhs, self._dry_run):
            return res
        spec = self._spec()
        a_shape, b_shape, lora_einsum_str, a_transpose, b_transpose = (
            _qwix_lora._parse_einsum_str_for_lora(lhs.shape, rhs.shape, einsum_str, spec.rank)
        )
        info = _qwix_einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim))
        sub = _factors.einsum_subscripts(lora_einsum_str, info.rhs, info.out)
        adapter = self._adapter(
            weight_name,
            rule,
            spec,
            a_shape,
            b_shape,
            a_transpose,
            b_transpose,
            LoraLayout("einsum", einsum_str=lora_einsum_str, weight_str=info.rhs),
            sub,
            rhs,
        )

        operand_strs, out_str = lora_einsum_str.split("->")
        x_str, a_str, b_str = operand_strs.split(",")
        update_sub = _delta.UpdateSubscripts(x_str, a_str, b_str, out_str)

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            return _delta.low_rank_update(
                x,
                lora_a,
                lora_b,
                update_sub,
                scale=spec.scale,
                precision=kwargs.get("precision"),
                preferred_element_type=kwargs.get("preferred_element_type"),
                out_sharding=kwargs.get("out_sharding"),
            )

        template = _factors.einsum_output(sub, info.out)
        return _add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)

    def conv_general_dilated(
        self,
        lhs: jax.Array,
        rhs: Any,
        window_strides: Sequence[int],
        padding: str | Sequence[tuple[int, int]],
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision: jax.lax.PrecisionLike = None,
        preferred_element_type: jax.typing.DTypeLike | None = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        """``jax.lax.conv_general_dilated`` plus the low-rank update of the kernel."""
        rule, _ = self._get_current_rule_and_op_id("conv_general_dilated", only_rule=True)
        if isinstance(rule, qwix.LoraRule) and rule.weight_qtype is not None:
            raise QuantizationError(
                f"Module {_module_path()!r} is a convolution and LoraConfig.weight_qtype="
                f"{rule.weight_qtype!r}; Qwix quantizes convolution kernels only together with "
                "their activations, which QLoRA does not do. Exclude convolutions with "
                "LoraConfig.exclude, or use weight_qtype=None."
            )
        conv_kwargs: dict[str, Any] = dict(
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        res = _qwix_ptq.PtqProvider.conv_general_dilated(
            self,
            lhs,
            rhs,
            window_strides,
            padding,
            dimension_numbers=dimension_numbers,
            out_sharding=out_sharding,
            **conv_kwargs,
        )
        rule = self._current_rule("conv_general_dilated")
        weight_name = _find_weight(rhs, self._dry_run) if rule else None
        if rule is not None:
            self._note(weight_name, res)
        if rule is None or weight_name is None:
            return res
        spec = self._spec()
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if numbers.rhs_spec[0] != rhs.ndim - 1 or numbers.out_spec[1] != lhs.ndim - 1:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} runs a convolution whose output features are not "
                f"the last axis of kernel and output ({numbers}); adapters need the NNX layout "
                "(features last). Exclude this module with LoraConfig.exclude."
            )
        sub = _factors.conv_subscripts(rhs.ndim)
        adapter = self._adapter(
            weight_name,
            rule,
            spec,
            (*rhs.shape[:-1], spec.rank),
            (spec.rank, rhs.shape[-1]),
            (*range(rhs.ndim - 1), None),
            (None, rhs.ndim - 1),
            LoraLayout(
                "conv",
                feature_group_count=feature_group_count,
                batch_group_count=batch_group_count,
            ),
            sub,
            rhs,
        )

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            projected = jax.lax.conv_general_dilated(
                x, lora_a, window_strides, padding, dimension_numbers=numbers, **conv_kwargs
            )
            return (projected @ lora_b) * spec.scale

        template = _factors.conv_output(sub, res.ndim)
        return _add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)


def _as_operand(x: Any) -> Any:
    """``x`` as an operand of ``@`` (an ``nnx.Variable`` unwrapped), or ``None`` if it is none."""
    convert = getattr(x, "__jax_array__", None)
    if convert is not None:
        x = convert()
    if isinstance(x, jax.Array | QuantizedWeight | np.ndarray | int | float | complex):
        return x
    return None


def _matmul_dims(
    a_ndim: int, b_ndim: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> jax.lax.DotDimensionNumbers | None:
    """``jnp.matmul``'s contraction as dimension numbers, or ``None`` if it broadcasts."""
    if a_ndim == 0 or b_ndim == 0:
        return None
    if b_ndim <= 2:
        return (((a_ndim - 1,), (0,)), ((), ()))
    if a_ndim == b_ndim and a_shape[:-2] == b_shape[:-2]:
        batch = tuple(range(a_ndim - 2))
        return (((a_ndim - 1,), (b_ndim - 2,)), (batch, batch))
    return None


def _cast_quantized(weight: Any, dtype: Any) -> Any:
    """A QLoRA weight that dequantizes to ``dtype``: its scale cast, its values still quantized.

    Models cast their weight to the compute dtype before the matmul
    (``jnp.astype(w, dtype)``, ``w.astype(dtype)``; ``jnp.asarray(w, dtype)`` Qwix
    follows itself). Qwix's ``WithAux.astype`` fails on a quantized array and
    ``jnp.astype`` refuses it; this keeps the weight quantized in memory.
    """
    array = jax.tree.map(_flax_util.unbox, weight.array, is_leaf=_is_variable)
    return weight.replace(array=array.astype(dtype))


def _astype(x: Any, dtype: Any, *args: Any, **kwargs: Any) -> Any:
    """``jnp.astype`` that follows a QLoRA weight (``_cast_quantized``)."""
    if isinstance(x, QuantizedWeight):
        return _cast_quantized(x, dtype)
    return jax.numpy.astype(x, dtype, *args, **kwargs)


def _find_weight(operand: Any, as_if_eager: bool) -> str | None:
    """The name of the current module's base weight that ``operand`` is, or ``None``.

    Qwix's ``find_param`` matches by identity, then (under tracing) through
    unary operations, and otherwise by shape among all of the module's
    parameters, adapters included. When an adapter factor has the weight's
    shape (``rank == out_features`` in a Linear) that last match is ambiguous:
    Qwix returns ``None``, silently skipping the update (always for QLoRA,
    whose weight reaches the matmul as a copy; in eager mode for a weight cast
    to the compute dtype), or raises. An adapter is never the weight, so the
    shape match is redone among the base weights only. ``as_if_eager`` (a
    traced dry run) skips the match through unary operations, as eager calls do.
    """
    module = _flax_util.get_current_module()
    weights = {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, QuantizedWeight | nnx.Param) and not isinstance(value, AdapterParam)
    }
    if as_if_eager:
        name = next((n for n, v in weights.items() if _flax_util.unbox(v) is operand), None)
    else:
        try:
            name = _flax_util.find_param(operand, QuantizedWeight)
        except ValueError as err:
            if "Multiple candidate params" not in str(err):
                raise
            name = None
    if name in weights:
        return name
    same_shape = [n for n, v in weights.items() if tuple(v.shape) == tuple(operand.shape)]
    return same_shape[0] if len(same_shape) == 1 else None


def _multiplies_lookup_table(weight_name: str | None, operand: Any, traced: bool) -> bool:
    """Whether a matmul multiplies by a table the current module looks rows up from.

    A tied output head (``nnx.Embed.attend``: ``x @ table.T``) gets no update,
    as in HF PEFT; the lookup's adapter is marked ``tied`` (see ``_embedding``)
    during the wrapper's sample call, so that merging refuses it. An eager
    transposed table is found by value (Qwix does not find it), a traced one
    by Qwix's match through the transpose.
    """
    module = _flax_util.get_current_module()
    for name, layout in list(vars(module).items()):
        if not (name.endswith(LAYOUT_SUFFIX) and isinstance(layout, LoraLayout) and layout.lookup):
            continue
        table_name = name[: -len(LAYOUT_SUFFIX)]
        if weight_name is not None and weight_name != table_name:
            continue
        table = _flax_util.unbox(getattr(module, table_name))
        if weight_name is None and not _embedding.multiplies_table(
            operand, table, traced or layout.tied
        ):
            continue
        if not layout.tied and getattr(_WRAP_TIME, "provider", None) is not None:
            setattr(module, name, dataclasses.replace(layout, tied=True))
        return True
    return False


def _add_update(
    res: jax.Array,
    weight_name: str,
    rule: qwix.LoraRule,
    lhs: jax.Array,
    operand: Any,
    adapter: tuple[jax.Array, jax.Array] | None,
    update: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    template: str,
) -> jax.Array:
    """The adapted output, as the adapter's :class:`AdapterState` and variant ask.

    Args:
        res: The base matmul's output.
        weight_name: The adapted weight.
        rule: The Qwix rule (for the dropout rate).
        lhs: The matmul's input.
        operand: The matmul's weight operand.
        adapter: ``(A, B)``, or ``None`` when this call created them (see ``_adapter``).
        update: ``(x, A, B) -> scale * x A B``, shaped like ``res``.
        template: The output's axes (``_factors.dot_general_output`` and the like).
    """
    module = _flax_util.get_current_module()
    if adapter is None:
        # Created with the adapter, not inside a later jit; a layer of a stack (whose
        # RNGs are not lent) gets its slice of the stack's (see ``_create_stacked``).
        if getattr(module, "qwix_rngs", None) is not None:
            _dropout_layer(weight_name, rule)
        return res
    layout: LoraLayout = getattr(module, weight_name + LAYOUT_SUFFIX)
    extras = {
        suffix: _flax_util.unbox(getattr(module, weight_name + suffix))
        for suffix in layout.update.extra_suffixes
    }
    state = adapter_state(module, weight_name)
    compute = _compute_dtype(lhs, operand)

    def cast_update(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        # In the layer's compute dtype, then in the base output's: the adapted
        # output has exactly the base layer's dtype, whatever the adapters'.
        out = update(x.astype(compute), a.astype(compute), b.astype(compute))
        return out.astype(res.dtype)

    if state is AdapterState.ACTIVE:
        assert layout.subscripts is not None
        adapted = layout.update.apply(
            res,
            cast_update(_dropout(weight_name, rule, lhs), *adapter),
            sub=layout.subscripts,
            weight=lambda: _float_operand(module, weight_name, operand),
            a=adapter[0],
            b=adapter[1],
            scale=layout.scale,
            extras=extras,
            template=template,
        )
        return adapted.astype(res.dtype)
    if state is AdapterState.MERGED:
        return refuse_adapter_gradients(_module_path(), res, (*adapter, *extras.values()))
    initial = [getattr(module, weight_name + s, None) for s in (INITIAL_A_SUFFIX, INITIAL_B_SUFFIX)]
    if initial[0] is None or initial[1] is None:
        return res
    # The weight holds the residual W - scale * A0 B0: add the initial adapter back.
    return res + cast_update(lhs, initial[0].get_value(), initial[1].get_value())


def _compute_dtype(lhs: jax.Array, operand: Any) -> Any:
    """The dtype a matmul of ``lhs`` by ``operand`` computes in (a QLoRA weight: ``lhs``'s)."""
    if isinstance(operand, QuantizedWeight) or not hasattr(operand, "dtype"):
        return lhs.dtype
    return jax.numpy.promote_types(lhs.dtype, operand.dtype)


def _float_operand(module: nnx.Module, weight_name: str, operand: Any) -> jax.Array:
    """The matmul's weight operand as a float array (a QLoRA weight dequantized)."""
    if isinstance(operand, QuantizedWeight):
        return qwix.dequantize(operand.array)
    stored = getattr(module, weight_name)
    if isinstance(stored, QuantizedWeight):  # the first call quantizes its float operand
        return qwix.dequantize(stored.array)
    return jax.numpy.asarray(operand)


def _dropout_layer(weight_name: str, rule: qwix.LoraRule) -> nnx.Dropout | None:
    """The adapter's dropout submodule (``None`` at rate 0), created on the first call."""
    if rule.dropout == 0:
        return None
    module = _flax_util.get_current_module()
    name = weight_name + DROPOUT_SUFFIX
    layer = getattr(module, name, None)
    if layer is None:
        layer = nnx.Dropout(rule.dropout, rngs=module.qwix_rngs)
        setattr(module, name, layer)
    return layer


def _dropout(weight_name: str, rule: qwix.LoraRule, lhs: jax.Array) -> jax.Array:
    """Applies the adapter's dropout submodule (nothing at rate 0)."""
    layer = _dropout_layer(weight_name, rule)
    return lhs if layer is None else layer(lhs)


def _canonical_sharding(boxed: Any) -> jax.sharding.NamedSharding | None:
    """The base weight's ``NamedSharding`` with its spec padded to full rank, if any."""
    value = _flax_util.unbox(boxed)
    sharding = _sharding.sharding_of(value)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    return sharding.update(spec=sharding.spec + (None,) * (value.ndim - len(sharding.spec)))


def _adapter(
    name: str,
    rule: qwix.LoraRule,
    spec: AdapterSpec,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_transpose: _sharding.Groups,
    b_transpose: _sharding.Groups,
    layout: LoraLayout,
    sub: Subscripts,
    operand: Any,
) -> tuple[jax.Array, jax.Array] | None:
    """``(A, B)`` of the weight ``name`` of the current module, or ``None`` if this call
    created them, as ``spec`` says.

    A new adapter's update is zero: ``B`` starts at zero, or the weight becomes
    the residual ``W - scale * A @ B`` while this call's base output was computed
    from ``W``. The creating call (the wrapper's sample pass, or a dry run) so
    adds nothing, and skips compiling the update's operations one by one.

    On creation, the layout records the spec's scale, update variant and
    ``sub``; the spec's initializer starts ``A`` and ``B`` (one that starts
    from the weight also replaces the stored weight by its residual, keeping
    ``A0`` and ``B0`` as :class:`InitialFactor`); and the variant's extra
    trained arrays (DoRA's magnitude) are made from the weight the matmul
    will use from then on.
    """
    module = _flax_util.get_current_module()
    if getattr(module, name + LORA_A_SUFFIX, None) is not None:
        return _get_or_create_adapter(
            name, rule, a_shape, b_shape, a_transpose, b_transpose, layout, operand
        )
    if getattr(_WRAP_TIME, "provider", None) is None:
        raise UnreachedTargetError(
            f"Module {_module_path()!r} is targeted and a call after wrapping multiplies by its "
            f"weight {name!r}, which has no adapter: the sample call never ran this matmul, and "
            "adapters are created only while wrapping. Wrap with sample inputs that reach it "
            "(for routed experts, a batch that every expert receives), or exclude the module "
            "with LoraConfig.exclude."
        )
    param = getattr(module, name)
    layout = dataclasses.replace(layout, scale=spec.scale, update=spec.update, subscripts=sub)
    where = f"the weight {name!r} of module {_module_path()!r}"
    check_supported(
        spec,
        groups=(layout.feature_group_count, layout.batch_group_count),
        transformed=lambda: not _is_stored_weight(operand, param),
        where=where,
    )
    start = spec.init.start(
        sub=sub,
        weight=lambda: _flax_util.unbox(param),
        rank=spec.rank,
        scale=spec.scale,
        a_shape=a_shape,
        b_shape=b_shape,
        where=where,
    )
    rule = dataclasses.replace(
        rule,
        rank=spec.rank,
        alpha=spec.alpha,
        lora_a_initializer=start.a,
        lora_b_initializer=start.b,
    )
    try:
        lora_a, lora_b = _get_or_create_adapter(
            name, rule, a_shape, b_shape, a_transpose, b_transpose, layout, operand, spec.dtype
        )
    except flax.errors.TraceContextError as error:
        raise _traced_weight_error(name) from error
    weight = _float_operand(module, name, operand)
    if start.residual is not None:
        stored = _flax_util.unbox(param)
        residual = start.residual
        if not isinstance(stored, jax.core.Tracer):
            residual = jax.device_put(residual, stored.sharding)
        param.set_value(residual)  # in the wrapper's clone only
        setattr(module, name + INITIAL_A_SUFFIX, InitialFactor(lora_a))
        setattr(module, name + INITIAL_B_SUFFIX, InitialFactor(lora_b))
        weight = residual.astype(weight.dtype)
    extras = spec.update.extra_params(sub, weight, lora_a, lora_b, spec.scale)
    if extras:
        dtype, boxed = _dtype_and_boxed(param)
        dtype = spec.dtype or dtype
        sharding = _canonical_sharding(boxed)
        with _sharding.mesh_of(sharding):
            for suffix, (value, axes) in extras.items():
                # Kept in float32 at least (a DoRA magnitude): rounded to bfloat16, a
                # fresh adapter would not give the base model's outputs.
                stored = value.astype(jax.numpy.promote_types(dtype, jax.numpy.float32))
                placed = _sharding.adapter_value(stored, boxed, sharding, axes)
                _flax_util.get_or_create_param(
                    name + suffix, lambda placed=placed: placed, nnx_param_type=AdapterParam
                )
    return None


def _create_stacked(pending: _stacks.Pending, rngs: nnx.Rngs | None) -> None:
    """Creates a pending adapter on its (stacked) module, as ``_adapter`` does on a module."""
    module, name = pending.module, pending.name
    param = getattr(module, name)
    stored = _flax_util.unbox(param)
    if not isinstance(rngs, nnx.Rngs):
        raise AssertionError("the wrapper passes Qwix an nnx.Rngs")
    made = _stacks.stacked_values(pending, stored, rngs)
    sharding = _canonical_sharding(param)
    values = {LORA_A_SUFFIX: made.a, LORA_B_SUFFIX: made.b, **made.extras}
    groups = {LORA_A_SUFFIX: made.groups["a"], LORA_B_SUFFIX: made.groups["b"]}
    groups.update({suffix: made.groups[suffix] for suffix in made.extras})
    with _sharding.mesh_of(sharding):
        for suffix, value in values.items():
            placed = _sharding.adapter_value(value, param, sharding, groups[suffix])
            setattr(module, name + suffix, jax.tree.map(AdapterParam, placed))
    setattr(
        module, name + LAYOUT_SUFFIX, dataclasses.replace(pending.layout, layer_axis=pending.axis)
    )
    if pending.dropout:
        setattr(module, name + DROPOUT_SUFFIX, _stacks.stacked_dropout(pending, stored, rngs))
    if made.residual is not None:
        residual = made.residual
        if not isinstance(stored, jax.core.Tracer):
            residual = jax.device_put(residual, stored.sharding)
        param.set_value(residual)  # in the wrapper's clone only
        setattr(module, name + INITIAL_A_SUFFIX, InitialFactor(made.a))
        setattr(module, name + INITIAL_B_SUFFIX, InitialFactor(made.b))


def _traced_weight_error(name: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"Module {_module_path()!r} multiplies by its weight {name!r} inside a function that "
        "JAX traces on its own (a jax.jit inside the model's call), where no adapter can "
        "be added to the module. Multiply outside that jax.jit (the model is jitted as a "
        "whole anyway), or exclude the module with LoraConfig.exclude."
    )


def _dtype_and_boxed(param: Any) -> tuple[Any, Any]:
    """The adapters' dtype and the variable their sharding derives from (QLoRA: the qvalue)."""
    if isinstance(param, QuantizedWeight):
        return _flax_util.unbox(param.array.scale).dtype, param.array.qvalue
    return _flax_util.unbox(param).dtype, param


def _get_or_create_adapter(
    name: str,
    rule: qwix.LoraRule,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_transpose: _sharding.Groups,
    b_transpose: _sharding.Groups,
    layout: LoraLayout,
    operand: Any,
    adapter_dtype: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Qwix's ``_get_or_create_lora_params`` for NNX, creating :class:`AdapterParam`.

    New adapters are stored in ``adapter_dtype`` (``LoraConfig.adapter_dtype``),
    or, when it is ``None``, in the weight's dtype (a QLoRA weight: its scale's).

    Also records ``layout`` as ``<name>_lora_layout`` on the module, completed
    with whether ``operand`` (the matmul's weight operand) is the stored
    weight. ``a_transpose`` and ``b_transpose`` list, per adapter axis, the
    weight axes it stands for; the adapters are placed
    and annotated from them by ``_sharding.adapter_value``, on the base
    weight's mesh.
    """
    module = _flax_util.get_current_module()
    lora_a = getattr(module, name + LORA_A_SUFFIX, None)
    lora_b = getattr(module, name + LORA_B_SUFFIX, None)
    if lora_a is not None and lora_b is not None:
        return _flax_util.unbox(lora_a), _flax_util.unbox(lora_b)

    param = getattr(module, name)
    if isinstance(param, QuantizedWeight):  # quantized from ``operand`` in this very call
        _sharding.place_quantized(operand, weight_variables(param))
    layout = dataclasses.replace(layout, operand_is_weight=_is_stored_weight(operand, param))
    setattr(module, name + LAYOUT_SUFFIX, layout)
    if isinstance(param, QuantizedWeight):
        dtype, boxed = _flax_util.unbox(param.array.scale).dtype, param.array.qvalue
    else:
        dtype, boxed = _flax_util.unbox(param).dtype, param
    dtype = adapter_dtype or dtype
    sharding = _canonical_sharding(boxed)

    def init(initializer: Callable[..., jax.Array], shape: tuple[int, ...], transpose: Any):
        def create(rng: jax.Array) -> Any:
            return _sharding.adapter_value(
                initializer(rng, shape, dtype), boxed, sharding, transpose
            )

        return create

    with _sharding.mesh_of(sharding):  # NNX places annotated variables on the current mesh
        lora_a = _flax_util.get_or_create_param(
            name + LORA_A_SUFFIX,
            init(rule.lora_a_initializer, a_shape, a_transpose),
            nnx_param_type=AdapterParam,
            need_rng=True,
        )
        lora_b = _flax_util.get_or_create_param(
            name + LORA_B_SUFFIX,
            init(rule.lora_b_initializer, b_shape, b_transpose),
            nnx_param_type=AdapterParam,
            need_rng=True,
        )
    return lora_a, lora_b


def _is_stored_weight(operand: Any, param: Any) -> bool:
    """Whether a matmul's weight operand is ``param`` itself, possibly cast to another dtype.

    Qwix matches an operand to a weight by identity, through unary operations
    or, failing both, by shape alone; so a transposed square kernel, a flipped
    one (``nnx.ConvTranspose``) or a masked one (``nnx.Conv(mask=...)``) gets an
    adapter too, whose update then applies to the transform. The sample call
    runs eagerly, so the values can be compared; under tracing (a model that
    jits or scans inside ``__call__``) they cannot, and Qwix's match is trusted.
    """
    if isinstance(param, QuantizedWeight):
        return True  # Qwix hands the quantized weight itself to the matmul
    value = _flax_util.unbox(param)
    if isinstance(operand, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return True
    if operand is value:
        return True
    # Compared on the devices: a sharded weight is never gathered to the host.
    return operand.shape == value.shape and bool(
        jax.numpy.array_equal(operand, value.astype(operand.dtype))
    )


#: Attributes next to an adapted weight that belong to its adapter.
ADAPTER_SUFFIXES = (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LAYOUT_SUFFIX,
    STATE_SUFFIX,
    DROPOUT_SUFFIX,
    INITIAL_A_SUFFIX,
    INITIAL_B_SUFFIX,
    MAGNITUDE_SUFFIX,
    _QWIX_EINSUM_STR_SUFFIX,
)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def weight_variables(stored: Any) -> list[nnx.Variable[Any]]:
    """The variables holding a base weight: the ``nnx.Param`` itself, or a QLoRA weight's parts."""
    variables: list[nnx.Variable[Any]] = jax.tree.leaves(stored, is_leaf=_is_variable)
    return variables


def weight_value(stored: Any, values: Sequence[jax.Array]) -> jax.Array:
    """The floating-point weight that ``values`` of ``weight_variables(stored)`` hold.

    For a QLoRA weight this is ``qwix.dequantize`` of the quantized array, in
    the dtype of its scale: exactly the array Qwix multiplies with when the
    input is a floating-point array.
    """
    if not isinstance(stored, QuantizedWeight):
        (value,) = values
        return value
    unboxed = jax.tree.unflatten(jax.tree.structure(stored, is_leaf=_is_variable), values)
    return qwix.dequantize(unboxed.array)


def weight_values(stored: Any, value: jax.Array) -> list[jax.Array]:
    """Values for ``weight_variables(stored)`` that store the floating-point ``value``.

    For a QLoRA weight, ``value`` is quantized the way Qwix quantized the
    original (same type, channel axes, tiles and calibration), which rounds
    it to the quantization grid.
    """
    if not isinstance(stored, QuantizedWeight):
        return [value]
    how = stored.how
    quantized = qwix.quantize(
        value.astype(stored.array.scale.dtype),
        how.qtype,
        channelwise_axes=how.channelwise_axes,
        tiled_axes=how.tiled_axes,
        calibration_method=how.calibration_method,
    )
    expected: Any = jax.tree.structure(stored.array, is_leaf=_is_variable)
    if jax.tree.structure(quantized) != expected:
        raise AssertionError(f"Requantizing changed the structure of {stored.array!r}")
    return jax.tree.leaves(quantized)


def unwrap(model: nnx.Module) -> None:
    """Undoes, in place, what ``qwix.apply_lora_to_model`` did to the module tree.

    Removes the attributes Qwix set on every module and gives the root module
    its original class back, so calls are no longer intercepted. Adapters are
    left alone; remove them first.
    """
    for _, module in nnx.iter_modules(model):
        for name in (*_QWIX_MODULE_ATTRIBUTES, PROVIDER_ATTRIBUTE):
            if name in vars(module):
                delattr(module, name)
        object.__setattr__(module, "__class__", unwrapped_type(module))
    # Qwix assigned its class through nnx's __setattr__, which also recorded
    # `__class__` as a static attribute; drop it so that the graph definition
    # is the base model's again.
    nodes = vars(model)["_pytree__nodes"]
    if "__class__" in nodes:
        kept = {name: is_node for name, is_node in nodes.items() if name != "__class__"}
        object.__setattr__(model, "_pytree__nodes", type(nodes)(kept))


# --- One adapted class per base class -------------------------------------------------------
#
# ``qwix.apply_lora_to_model`` makes a new class on every call, with the provider in a
# closure of its ``__call__``: two identical wraps then have unequal graph definitions
# (jitted functions retrace for each), the graph definition cannot be pickled, and only
# ``__call__`` is intercepted. nnx_peft makes one class per base class instead, named so
# that pickle finds it again (see ``__getattr__`` below). Every public method of it (and
# ``__call__``) runs under interception; the provider comes from the instance: a hashable
# :data:`PROVIDER_ATTRIBUTE` on the root module (equal for equal configs), or, during the
# wrapper's sample call, the wrap-time provider (which records, or runs dry). Every module on
# the way from the root to an adapted weight gets its adapted class and the attribute too, so
# that calling a submodule directly (``model.encoder.encode(x)``) also runs with the adapters;
# inside an intercepted call, the nested ones run as they are (Qwix's interception does not nest).

#: Static attribute of the adapted root module: what builds its provider (``.provider()``).
PROVIDER_ATTRIBUTE = "_nnx_peft_provider"
_CLASS_PREFIX = "_nnx_peft_adapted_"
_ADAPTED_CLASSES: dict[type, type] = {}
_WRAP_TIME = threading.local()


class ProviderSource(Protocol):
    """A hashable description of a provider (``_injection.ProviderKey``)."""

    def provider(self) -> PeftLoraProvider: ...


def _class_name(base: type) -> str:
    """A dot-free attribute name of this module that stands for ``adapted_class(base)``."""
    return _CLASS_PREFIX + f"{base.__module__}:{base.__qualname__}".encode().hex()


def __getattr__(name: str) -> type:
    """Resolves the names of adapted classes (pickle looks classes up by module and name)."""
    if not name.startswith(_CLASS_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, _, qualname = bytes.fromhex(name[len(_CLASS_PREFIX) :]).decode().partition(":")
    base: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        base = getattr(base, part)
    return adapted_class(base)


def _intercepted_methods(base: type) -> dict[str, Callable[..., Any]]:
    """``__call__`` and every public method ``base`` defines beyond ``nnx.Module``'s own."""
    own = set(dir(nnx.Module)) - {"__call__"}
    methods: dict[str, Callable[..., Any]] = {}
    for name in dir(base):
        if (name.startswith("_") and name != "__call__") or name in own:
            continue
        static = inspect.getattr_static(base, name)
        if isinstance(static, types.FunctionType):
            methods[name] = static
    return methods


def _current_provider(module: nnx.Module) -> PeftLoraProvider | None:
    wrap_time = getattr(_WRAP_TIME, "provider", None)
    if wrap_time is not None:
        return wrap_time
    source: ProviderSource | None = vars(module).get(PROVIDER_ATTRIBUTE)
    return None if source is None else source.provider()


def _intercepting(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def method(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        reached = getattr(_WRAP_TIME, "reached", None)
        if reached is not None:  # the sample call: note which modules it runs
            reached.add(getattr(self, "qwix_path", None))
        provider = _current_provider(self)
        if provider is None:  # not an adapted instance (e.g. being unwrapped)
            return func(self, *args, **kwargs)
        output = functools.partial(_qwix_model._output_transform_nnx, provider, name)
        intercepted = _qwix_model._apply_interceptors(func, provider, output_transform=output)
        return intercepted(self, *args, **kwargs)

    return method


def adapted_class(base: type) -> type:
    """The one class, for ``base``, whose methods run with adapters (made once, cached)."""
    cached = _ADAPTED_CLASSES.get(base)
    if cached is None:
        fields: dict[str, Any] = {
            "_unquantized_type": base,
            "__module__": __name__,
            "__qualname__": _class_name(base),
        }
        fields.update(
            (name, _intercepting(name, func)) for name, func in _intercepted_methods(base).items()
        )
        # The base's own ``pytree=`` setting (a class keyword NNX does not inherit).
        options = {"pytree": base._pytree__is_pytree} if hasattr(base, "_pytree__is_pytree") else {}
        made = type(base.__name__, (base,), fields, **options)
        cached = _ADAPTED_CLASSES.setdefault(base, made)
    return cached


def apply_lora(
    model: nnx.Module,
    provider: PeftLoraProvider,
    source: ProviderSource,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
    unreached: Callable[[nnx.Module, set[Any]], list[tuple[str, nnx.Module]]] | None = None,
) -> nnx.Module:
    """``qwix.apply_lora_to_model`` with one class per base class: an adapted clone.

    The sample call ``model(*sample_args, **sample_kwargs)`` runs with ``provider``
    (any keyword, ``rngs`` included, goes to the model); later calls with
    ``source.provider()``. ``rngs`` initialises the adapters. ``unreached``
    lists, after the sample call and given the Qwix paths of the modules it
    ran, targeted modules that got no adapter; each is then called on its own
    on an input its declared layout gives (see ``layer_input``), so that it
    gets its adapter too.

    During the sample call every module (but Flax's containers) has its
    adapted class, which notes the modules the call runs; afterwards only the
    modules on the way to an adapter keep it (see ``_settle_classes``).

    Raises:
        UnreachedTargetError: ``unreached`` lists modules whose input cannot
            be known without a call (all of them named).
    """
    model = nnx.clone(model)
    for path, module in nnx.iter_modules(model):
        if module is model or type(module) not in _CONTAINERS:
            object.__setattr__(module, "__class__", adapted_class(unwrapped_type(module)))
        setattr(module, "qwix_path", path)  # noqa: B010 (attributes Qwix reads)
        setattr(module, "disable_quant_stats_update", True)  # noqa: B010
        setattr(module, "qwix_rngs", rngs)  # noqa: B010
    setattr(model, PROVIDER_ATTRIBUTE, source)
    saved = getattr(_WRAP_TIME, "provider", None), getattr(_WRAP_TIME, "reached", None)
    _WRAP_TIME.provider, _WRAP_TIME.reached = provider, set()
    try:
        model(*sample_args, **sample_kwargs)
        provider.note_reached(_WRAP_TIME.reached)
        missed = unreached(model, _WRAP_TIME.reached) if unreached is not None else []
        unknown = [(where, layer) for where, layer in missed if layer_input(layer) is None]
        if unknown:
            raise _unreached_error(unknown)
        for _, layer in missed:
            _call_alone(layer, provider)
    finally:
        _WRAP_TIME.provider, _WRAP_TIME.reached = saved
    model.set_attributes(disable_quant_stats_update=False, qwix_rngs=None)
    _settle_classes(model, source)
    return model


#: Flax's containers: their methods (``append``, ``items``, ...) compute nothing.
_CONTAINERS = (nnx.List, nnx.Dict)


def _settle_classes(model: nnx.Module, source: ProviderSource) -> None:
    """Keeps the adapted class, with ``source``, on the modules on the way to an adapter.

    Their methods then run with the adapters when called directly, not only
    through the root (``model.encoder(x)``, ``model.layers[0].attn(x)``). The
    other modules get their own classes back.
    """
    paths = [
        path
        for path, module in nnx.iter_modules(model)
        if any(isinstance(v, AdapterParam) for v in vars(module).values())
    ]
    on_the_way = {path[:i] for path in paths for i in range(1, len(path) + 1)}
    for path, module in nnx.iter_modules(model):
        if module is model:
            continue
        if path in on_the_way and type(module) not in _CONTAINERS:
            setattr(module, PROVIDER_ATTRIBUTE, source)
        else:
            object.__setattr__(module, "__class__", unwrapped_type(module))


#: NNX layers whose attributes give the shape of an input (``layer_input``).
LAYERS_WITH_LAYOUTS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


def layer_input(layer: nnx.Module) -> jax.Array | None:
    """A one-element batch for an NNX layer, from the layout it declares; ``None`` if unknown."""
    module: Any = layer  # its kind is told by its class before any adapted subclass
    dtype = getattr(module, "dtype", None) or getattr(module, "param_dtype", None)
    kind = unwrapped_type(module)
    if kind is nnx.Embed:
        return jax.numpy.zeros((1,), jax.numpy.int32)
    if kind is nnx.Linear:
        return jax.numpy.zeros((1, module.in_features), dtype)
    if kind is nnx.LinearGeneral and not module.batch_axis:
        axes, features = tuple(module.axis), tuple(module.in_features)
        ndim = max([len(axes) + 1, *(a + 1 for a in axes if a >= 0)])
        shape = [1] * ndim
        for axis, size in zip(axes, features, strict=True):
            shape[axis % ndim] = size
        return jax.numpy.zeros(shape, dtype)
    if kind is nnx.Einsum:
        operands, _ = module.einsum_str.replace(" ", "").split("->")
        lhs, rhs = operands.split(",")
        sizes = dict(zip(rhs.replace("...", ""), module.kernel_shape, strict=True))
        return jax.numpy.zeros([sizes.get(c, 1) for c in lhs.replace("...", "")], dtype)
    if kind is nnx.Conv:
        dilation = module.kernel_dilation or 1
        dilations = (dilation,) * len(module.kernel_size) if isinstance(dilation, int) else dilation
        spatial = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, dilations, strict=True)]
        return jax.numpy.zeros((1, *spatial, module.in_features), dtype)
    return None


def _unreached_error(modules: list[tuple[str, nnx.Module]]) -> UnreachedTargetError:
    kinds = sorted({unwrapped_type(m).__qualname__ for _, m in modules})
    return UnreachedTargetError(
        f"Targeted modules {[path for path, _ in modules]} own weights, but the sample call did "
        f"not reach them (none of their methods ran), and their layer types {kinds} do not "
        "declare the input an adapter's shapes follow from (nnx.Linear, nnx.LinearGeneral, "
        "nnx.Einsum, nnx.Conv and nnx.Embed do, and get their adapters anyway). Adapters are "
        "created only while wrapping, so wrap with sample inputs that reach every one of them "
        "(for routed experts, a batch that every expert receives), or exclude them with "
        "LoraConfig.exclude."
    )


def _call_alone(module: nnx.Module, provider: PeftLoraProvider) -> None:
    """Runs a targeted layer the sample call missed, intercepted, to create its adapter."""
    x = layer_input(module)
    func = unwrapped_type(module).__call__
    output = functools.partial(_qwix_model._output_transform_nnx, provider, "__call__")
    _qwix_model._apply_interceptors(func, provider, output_transform=output)(module, x)
