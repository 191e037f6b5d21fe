"""Embedding lookups on a targeted module's table, adapted as the matmul of one-hot ids.

Qwix intercepts no lookups. The provider intercepts ``jnp.take`` (``nnx.Embed``) and the
indexing of a module's own ``nnx.Param`` by integer ids (``self.table[ids]``); a lookup
of rows of a targeted module's 2-D weight gets ``A (vocab, r)`` and ``B (r, features)``
and the update ``scale * A[ids] @ B`` (see ``_embedding``), without any one-hot array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import qwix
from flax import nnx

from nnx_peft import _adapter_ops, _embedding, _factors, _qwix_internals
from nnx_peft._adapter import Adapter
from nnx_peft._errors import UnsupportedLayerError
from nnx_peft._layout import CallRecord
from nnx_peft._products import FactorShapes
from nnx_peft._qwix_internals import QWIX_PATH
from nnx_peft._variants import AdapterPlan

_here = _adapter_ops.module_path


class Lookups:
    """The provider's lookups (a mixin of ``_qwix_bridge.PeftLoraProvider``)."""

    _dry_run: bool
    _plan: AdapterPlan
    _record: CallRecord | None
    _targeted_here: Callable[..., qwix.LoraRule | None]
    _adapter: Callable[..., bool]

    def lookup_intercepts(self) -> dict[str, Callable[..., Any]]:
        """The functions intercepted, by the name Qwix's interception replaces."""
        return {
            "jax.numpy.take": self.take,
            _qwix_internals.INTERCEPT_VARIABLE_GETITEM: self.variable_getitem,
        }

    def _tables(self) -> list[tuple[nnx.Module, str]]:
        """The lookup adapters the sample call created so far, as (module, table name)."""
        tables: list[tuple[nnx.Module, str]] = vars(self).setdefault("_lookup_tables", [])
        return tables

    def mark_tied_elsewhere(self, operand: Any) -> None:
        """Marks a lookup adapter ``tied`` when another module multiplies by its table.

        A tied output head computed outside the embedding (``x @ embed.embedding[...].T``
        in the model's own code) gets no update, as one inside it does (``Embed.attend``,
        see ``_adapter_ops.multiplies_lookup_table``), and merging then refuses the
        adapter instead of silently changing the head. Checked on the sample call only:
        by value on concrete arrays, by shape under tracing, never for a weight of the
        module running the product (its own head).
        """
        if getattr(_adapter_ops.WRAP_TIME, "provider", None) is None:
            return
        current = _qwix_internals.get_current_module()
        shapes = {tuple(operand.shape), tuple(operand.shape[::-1])}
        candidates = [
            (_qwix_internals.unbox(getattr(module, name)), module, name)
            for module, name in self._tables()
            if module is not current
        ]
        candidates = [c for c in candidates if tuple(c[0].shape) in shapes]
        # The weight lookup runs only for a product shaped like a table, not for every one.
        if not candidates or _adapter_ops.find_weight(operand, self._dry_run) is not None:
            return
        for table, module, name in candidates:
            adapter = Adapter("/".join(map(str, getattr(module, QWIX_PATH, ()))), module, name)
            layout = adapter.layout
            if not layout.tied and _embedding.multiplies_table(operand, table, traced=False):
                adapter.set_layout(dataclasses.replace(layout, tied=True))

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
        table = _qwix_internals.unbox(variable)
        if not _embedding.is_lookup(table, ids, 0):
            return res
        return self._lookup(table, ids, res, {})

    def _lookup(self, table: Any, ids: Any, res: jax.Array, take_kwargs: dict[str, Any]) -> Any:
        """``res``, the rows ``ids`` of ``table``, plus their low-rank update if adapted."""
        if self._record is not None:  # 'all-linear' adapts linear layers only, as in HF PEFT
            return res
        rule = self._targeted_here("take")
        if rule is None:
            return res
        weight_name = _adapter_ops.find_weight(table, self._dry_run)
        if weight_name is None:
            return res
        existing = Adapter(_here(), _qwix_internals.get_current_module(), weight_name)
        if existing.exists and not existing.layout.lookup:
            raise UnsupportedLayerError(
                f"Module {_here()!r} multiplies by its weight {weight_name!r} and then looks up "
                "rows of it (an output head tied to an embedding, called before the lookup); "
                "one adapter cannot be both. Look the rows up before the matmul, or exclude "
                "the module with LoraConfig.exclude."
            )
        spec = self._plan.spec(_here())
        if spec.update.extra_suffixes:
            raise UnsupportedLayerError(
                f"Module {_here()!r} looks up rows of its weight {weight_name!r} (an embedding) "
                f"and LoraConfig asks for the {spec.update.name!r} variant, which nnx_peft "
                "supports on matmuls only. Use plain LoRA on embeddings (use_dora=False, or "
                "exclude the embedding with LoraConfig.exclude)."
            )
        rule = dataclasses.replace(rule, dropout=0.0)  # ids have nothing to drop, as in HF PEFT
        vocab, features = table.shape
        shapes = FactorShapes(
            (vocab, spec.rank), (spec.rank, features), _embedding.A_GROUPS, _embedding.B_GROUPS
        )
        sub = _factors.dot_general_subscripts(2, (0,), ())
        layout = _embedding.LOOKUP_LAYOUT
        created = self._adapter(weight_name, rule, spec, shapes, layout, sub, table)
        if created:  # watch for its table multiplied elsewhere
            self._tables().append((_qwix_internals.get_current_module(), weight_name))

        def update(scale: float) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
            def scaled(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
                del x  # the ids, cast to the compute dtype: the lookup takes them as they are
                return _embedding.lookup_update(ids, lora_a, lora_b, scale, **take_kwargs)

            return scaled

        template = _factors.dot_general_output(sub, res.ndim)
        return _adapter_ops.add_update(
            res, weight_name, rule, ids, table, created, update, template
        )
