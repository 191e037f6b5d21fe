"""The Qwix provider: which products of a targeted module get an adapter, and their update.

``PeftLoraProvider`` is a ``qwix.PtqProvider`` (QLoRA base weights are quantized by
Qwix's own PTQ path) whose products add a low-rank update. What it replaces in
``qwix.LoraProvider``:

- the weight operand of a product is looked up among the module's base weights only
  (Qwix's lookup by shape also counts the adapters, and silently skips the update
  when a factor has the weight's shape);
- adapters are :class:`~nnx_peft.AdapterParam`, with a mode-aware ``nnx.Dropout``, an
  :class:`AdapterState`, a recorded layout for merging, each module's rank, scale,
  variant and initializer from an ``AdapterPlan``, and stacked adapters for a layer
  of a scanned stack (``_adapter_ops``, ``_stacked_adapters``);
- the update is two matrix products over merged axes (``_delta``), cheaper to differentiate;
- raw products (``x @ w``, ``jnp.matmul``, ...: ``_raw_products``), embedding lookups
  (``_lookups``) and a QLoRA weight cast before use (``_quantized``) are intercepted too;
- QLoRA with a tile size not dividing a weight, or on a convolution, is refused; a layer of
  a stack is quantized after the sample call, all layers at once (``_stacked_adapters``);
- a recording provider lists the sample call's products and output sizes, and a dry run
  looks weights up as an eager call does (``'all-linear'``, ``inspect_targets``).

The Qwix internals this needs are all in ``_qwix_internals``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import flax.errors
import jax
import qwix
from flax import nnx

from nnx_peft import (
    _adapter_ops,
    _delta,
    _factors,
    _products,
    _quantized,
    _qwix_internals,
    _stacked_adapters,
    _stacks,
    _transposed,
)
from nnx_peft._errors import QuantizationError, UnsupportedLayerError
from nnx_peft._factors import Subscripts
from nnx_peft._layout import CallRecord, LoraLayout
from nnx_peft._lookups import Lookups
from nnx_peft._products import FactorShapes
from nnx_peft._quantized import QuantizedWeight
from nnx_peft._qwix_internals import (
    QWIX_PATH,
    QWIX_RNGS,
    current_rule,
    get_current_module,
)
from nnx_peft._raw_products import RawProducts
from nnx_peft._variants import AdapterPlan, AdapterSpec

_here = _adapter_ops.module_path


class PeftLoraProvider(RawProducts, Lookups, _transposed.Transposes, qwix.PtqProvider):
    """A Qwix PTQ provider whose targeted products add a low-rank update.

    Args:
        rules: The Qwix rules (``qwix.LoraRule``: which modules; QLoRA settings).
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
        # QLoRA weights of transformed copies (layers of a stack), quantized after the
        # sample call: how Qwix quantizes one layer, by (module path, weight name).
        self._quantize_later: dict[tuple[str, str], Any] = {}
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
                rngs = vars(module).get(QWIX_RNGS)
                if isinstance(rngs, nnx.Rngs):
                    self._rngs = rngs
                    setattr(module, QWIX_RNGS, None)
        return super().process_model_inputs(model, model_args, model_kwargs)

    def process_model_output(self, method_name: str, model_output: Any) -> Any:
        """Records the output sizes, creates pending stacked adapters, lets Qwix end the call."""
        if self._record is not None:
            leaves = jax.tree.leaves(model_output)
            self._record.output_sizes = [x.size for x in leaves if hasattr(x, "size")]
        if self._pending:
            root = self._root() if self._root is not None else None
            _stacked_adapters.create_pending(list(self._pending.values()), root, self._rngs)
            self._pending, self._quantize_later = {}, {}
        return super().process_model_output(method_name, model_output)

    def note_reached(self, paths: set[Any]) -> None:
        """Records the Qwix paths of the modules the sample call ran, if recording."""
        if self._record is not None:
            self._record.reached = {"/".join(map(str, p)) for p in paths if p is not None}

    def _owner(self) -> nnx.Module | None:
        """The model's module that the current module is a transformed copy of, if it is one.

        Inside ``nnx.scan`` / ``nnx.vmap`` / ``nnx.remat``, or a ``jax.lax.scan``
        body that merges split state, the module running is a copy of one of
        the model's modules (a layer of a stack), with Qwix's path attribute.
        """
        module = get_current_module()
        path = getattr(module, QWIX_PATH, None)
        root = self._root() if self._root is not None else None
        if path is None or root is None:
            return None
        if self._modules is None:
            paths = ((getattr(m, QWIX_PATH, None), m) for _, m in nnx.iter_modules(root))
            self._modules = {p: m for p, m in paths if p is not None}
        owner = self._modules.get(path)
        return None if owner is None or owner is module else owner

    def _note(self, weight_name: str | None, res: jax.Array) -> None:
        if self._record is not None:
            self._record.ops.append((_here(), weight_name, res.size))

    # --- Rules ----------------------------------------------------------------------------

    def _rule(self, op_name: str) -> qwix.LoraRule | None:
        """The rule of the current call of ``op_name``, if it is a LoRA rule."""
        rule, _ = current_rule(self, op_name, repeated_call=True)
        return rule if isinstance(rule, qwix.LoraRule) else None

    def _targeted_here(self, op_name: str = "dot_general") -> qwix.LoraRule | None:
        """The LoRA rule of the current module, without counting a call; ``None`` outside."""
        try:
            rule, _ = current_rule(self, op_name, only_rule=True)
        except ValueError:  # outside any module
            return None
        return rule if isinstance(rule, qwix.LoraRule) else None

    def _runs_as_written(self, op_name: str, moved: _transposed.Transposed) -> bool:
        """Whether the base product on a transposed weight runs as the model wrote it.

        It does (bit for bit the base's) unless the weight is QLoRA's: that product
        runs quantized, on the weight as stored. An embedding table multiplied
        transposed (a tied head) is never quantized: lookups need it as it is.
        """
        rule = self._targeted_here(op_name)
        if rule is None or rule.weight_qtype is None:
            return True
        if isinstance(moved.weight, QuantizedWeight):
            return False
        name = _adapter_ops.find_weight(moved.weight, self._dry_run)
        return _adapter_ops.multiplies_lookup_table(name, moved.weight, self._dry_run)

    def _quantizes_later(self, op_name: str, rhs: Any, how: Callable[..., Any]) -> bool:
        """Whether a QLoRA weight's product in a layer of a stack runs unquantized in the
        sample call, its stack quantized after it (``_stacked_adapters.quantizes_later``)."""
        rule = self._targeted_here(op_name)
        later = self._quantize_later
        if not _stacked_adapters.quantizes_later(rule, rhs, how, self._owner, later, self._dry_run):
            return False
        current_rule(self, op_name)  # counts the call, as Qwix's own product would
        return True

    def _check_tiling(self, op_name: str, rhs: Any, how: Callable[..., Any]) -> None:
        """Refuses a QLoRA tile size that does not divide the tiled axis of the weight ``rhs``."""
        rule = self._targeted_here(op_name)
        if rule is None or isinstance(rhs, QuantizedWeight):  # not targeted, or quantized
            return
        if _adapter_ops.find_weight(rhs, self._dry_run) is not None:
            _quantized.check_tile_size(rule, rhs, how, where=_here())

    # --- Adapters -------------------------------------------------------------------------

    def _adapter(
        self,
        name: str,
        rule: qwix.LoraRule,
        spec: AdapterSpec,
        shapes: FactorShapes,
        layout: LoraLayout,
        sub: Subscripts,
        operand: Any,
    ) -> bool:
        """Whether this call created the adapter, or left it pending (in a transformed copy
        of a module): either way its update is zero for this call."""
        module = get_current_module()
        args = (name, rule, spec, shapes, layout, sub, operand)
        if _adapter_ops.has_adapter(module, name):  # every call but the first
            return False
        owner = self._owner()
        if owner is not None:
            quantize = self._quantize_later.get((_here(), name))
            later = _stacked_adapters.pending_adapter(
                owner, name, rule, spec, shapes, layout, sub, quantize
            )
            self._pending[(later.path, name)] = later
            return True
        try:
            setattr(module, QWIX_RNGS, self._rngs)  # lent for creating the adapter
        except flax.errors.TraceContextError as error:
            raise _adapter_ops.traced_weight_error(name) from error
        try:
            _adapter_ops.adapter(*args)
            _adapter_ops.dropout_layer(name, rule)
        finally:
            setattr(module, QWIX_RNGS, None)
        return True

    # --- The intercepted functions --------------------------------------------------------

    def get_intercept_map(self) -> dict[str, Callable[..., Any]]:
        """Qwix's map, plus raw products, casts of a QLoRA weight and embedding lookups."""
        return {
            **super().get_intercept_map(),
            "jax.numpy.astype": _transposed.astype,
            _qwix_internals.INTERCEPT_WITH_AUX_ASTYPE: _quantized.cast_quantized,
            **self.raw_product_intercepts(),
            **self.lookup_intercepts(),
            **self.transpose_intercepts(),
        }

    def dot_general(
        self,
        lhs: jax.Array,
        rhs: Any,
        dimension_numbers: jax.lax.DotDimensionNumbers,
        precision: jax.lax.PrecisionLike = None,
        preferred_element_type: jax.typing.DTypeLike | None = None,
        out_sharding: Any = None,
        *,
        base_product: Callable[[], jax.Array] | None = None,
    ) -> jax.Array:
        """``jax.lax.dot_general`` plus the low-rank update of the weight operand.

        ``base_product`` (nnx_peft's own calls only): the unquantized base product,
        computed otherwise, as a transposed weight's is below.
        """
        moved = _transposed.own_source(rhs)
        if moved is not None and out_sharding is None:
            # A transposed weight (``x @ w.T``): the product on the weight as stored.
            on = _transposed.dot_general_on_source(dimension_numbers, moved.perm, lhs.ndim)

            def as_written() -> jax.Array:  # bit for bit the model's product, on w's axes
                numbers, types = dimension_numbers, preferred_element_type
                return on.unrestore(jax.lax.dot_general(lhs, rhs, numbers, precision, types))

            res = self.dot_general(  # the source is no transpose: this does not recurse again
                lhs,
                moved.weight,
                on.dimension_numbers,
                precision,
                preferred_element_type,
                base_product=as_written if self._runs_as_written("dot_general", moved) else None,
            )
            return on.restore(res)
        if base_product is not None:  # not quantized
            current_rule(self, "dot_general")  # counts the call, as Qwix's own product would
            res = base_product()
        else:
            how = functools.partial(
                _qwix_internals.dot_general_how_to_quantize,
                dimension_numbers=dimension_numbers,
                ndims=(lhs.ndim, rhs.ndim),
            )
            self._check_tiling("dot_general", rhs, how)
            later = self._quantizes_later("dot_general", rhs, how)
            res = (jax.lax.dot_general if later else super().dot_general)(
                lhs,
                rhs,
                dimension_numbers,
                precision,
                preferred_element_type,
                out_sharding=out_sharding,
            )
        self.mark_tied_elsewhere(rhs)
        rule = self._rule("dot_general")
        weight_name = _adapter_ops.find_weight(rhs, self._dry_run) if rule else None
        if rule is not None:
            self._note(weight_name, res)
        if rule is None or _adapter_ops.multiplies_lookup_table(weight_name, rhs, self._dry_run):
            return res  # not targeted, or a tied head (a lookup table times x, found by value)
        if weight_name is None:
            return res
        (_, rhs_ca), (_, rhs_ba) = dimension_numbers
        sub = _factors.dot_general_subscripts(rhs.ndim, tuple(rhs_ca), tuple(rhs_ba))
        spec = self._plan.spec(_here())
        shapes = _products.dot_general_factors(tuple(rhs.shape), dimension_numbers, spec.rank)
        layout = LoraLayout("dot_general", contracting=tuple(rhs_ca), batch=tuple(rhs_ba))
        adapter = self._adapter(weight_name, rule, spec, shapes, layout, sub, rhs)
        update = functools.partial(
            _delta.dot_general_update,
            sub,
            lhs.ndim,
            dimension_numbers,
            tuple(rhs.shape),
            precision=precision,
        )
        template = _factors.dot_general_output(sub, res.ndim)
        return _adapter_ops.add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)

    def einsum(
        self,
        einsum_str: str,
        *operands: Any,
        base_product: Callable[[], jax.Array] | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        """``jnp.einsum`` plus the low-rank update of the weight operand.

        ``base_product`` (nnx_peft's own calls only): the unquantized base product,
        computed otherwise, as a transposed weight's is below.
        """
        moved = _transposed.own_source(operands[-1]) if len(operands) == 2 else None
        on_source = _transposed.einsum_on_source(einsum_str, moved.perm) if moved else None
        if moved is not None and on_source is not None:
            # A transposed weight: the product on the weight as stored.

            def as_written() -> jax.Array:  # bit for bit the model's product
                return jax.numpy.einsum(einsum_str, *operands, **kwargs)

            written = as_written if self._runs_as_written("einsum", moved) else None
            lhs = operands[0]  # the source is no transpose: this does not recurse again
            return self.einsum(on_source, lhs, moved.weight, base_product=written, **kwargs)
        later = False
        if len(operands) == 2 and base_product is None:
            lhs, rhs = operands
            how = functools.partial(
                _qwix_internals.einsum_how_to_quantize,
                einsum_str=einsum_str,
                ndims=(lhs.ndim, rhs.ndim),
            )
            self._check_tiling("einsum", rhs, how)
            later = self._quantizes_later("einsum", rhs, how)
        if base_product is not None:
            current_rule(self, "einsum")  # counts the call, as Qwix's own product would
            res = base_product()
        else:
            res = (jax.numpy.einsum if later else super().einsum)(einsum_str, *operands, **kwargs)
        if len(operands) == 2:
            self.mark_tied_elsewhere(operands[1])
        rule = self._rule("einsum")
        if rule is None:
            return res
        if len(operands) != 2:
            raise UnsupportedLayerError(
                f"Module {_here()!r} is targeted but calls einsum {einsum_str!r} with "
                f"{len(operands)} operands; adapters support two-operand einsums only. "
                "Exclude this module with LoraConfig.exclude."
            )
        lhs, rhs = operands
        weight_name = _adapter_ops.find_weight(rhs, self._dry_run)
        self._note(weight_name, res)
        if weight_name is None:
            return res
        if _adapter_ops.multiplies_lookup_table(weight_name, rhs, self._dry_run):
            return res
        spec = self._plan.spec(_here())
        shapes, lora_einsum_str, info = _products.einsum_factors(
            lhs.ndim, tuple(rhs.shape), einsum_str, spec.rank
        )
        sub = _factors.einsum_subscripts(lora_einsum_str, info.rhs, info.out)
        layout = LoraLayout("einsum", einsum_str=lora_einsum_str, weight_str=info.rhs)
        adapter = self._adapter(weight_name, rule, spec, shapes, layout, sub, rhs)
        update = functools.partial(_delta.einsum_update, lora_einsum_str, **kwargs)
        template = _factors.einsum_output(sub, info.out)
        return _adapter_ops.add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)

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
        rule = self._targeted_here("conv_general_dilated")
        if rule is not None and rule.weight_qtype is not None:
            raise QuantizationError(
                f"Module {_here()!r} is a convolution and LoraConfig.weight_qtype="
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
        res = super().conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            dimension_numbers=dimension_numbers,
            out_sharding=out_sharding,
            **conv_kwargs,
        )
        rule = self._rule("conv_general_dilated")
        weight_name = _adapter_ops.find_weight(rhs, self._dry_run) if rule else None
        if rule is not None:
            self._note(weight_name, res)
        if rule is None or weight_name is None:
            return res
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if numbers.rhs_spec[0] != rhs.ndim - 1 or numbers.out_spec[1] != lhs.ndim - 1:
            raise UnsupportedLayerError(
                f"Module {_here()!r} runs a convolution whose output features are not the last "
                f"axis of kernel and output ({numbers}); adapters need the NNX layout (features "
                "last). Exclude this module with LoraConfig.exclude."
            )
        spec = self._plan.spec(_here())
        shapes = _products.conv_factors(tuple(rhs.shape), spec.rank)
        sub = _factors.conv_subscripts(rhs.ndim)
        layout = LoraLayout(
            "conv", feature_group_count=feature_group_count, batch_group_count=batch_group_count
        )
        adapter = self._adapter(weight_name, rule, spec, shapes, layout, sub, rhs)

        def update(scale: float) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
            def scaled(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
                projected = jax.lax.conv_general_dilated(
                    x, lora_a, window_strides, padding, dimension_numbers=numbers, **conv_kwargs
                )
                return (projected @ lora_b) * scale

            return scaled

        template = _factors.conv_output(sub, res.ndim)
        return _adapter_ops.add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)
