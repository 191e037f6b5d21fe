"""Raw products on a weight (``x @ w``, ``jnp.matmul``, ``jnp.tensordot``, ``jnp.inner``,
``jax.lax.dot``), adapted as the ``dot_general`` they compute.

Qwix intercepts ``jax.lax.dot_general`` and ``jnp.einsum``; a model written with raw
products would otherwise get adapters on some of them only, depending on what ran before:
``@`` and ``jnp.matmul`` run a ``jax.jit`` of their own, whose cached trace hides the
weight. The provider intercepts each before that jit and calls its own ``dot_general``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import qwix

from nnx_peft import _adapter_ops, _products, _qwix_internals, _transposed
from nnx_peft._errors import UnsupportedLayerError
from nnx_peft._quantized import QuantizedTranspose, QuantizedWeight

#: A QLoRA weight, or one transposed: operands that are no array until their product.
_QUANTIZED = (QuantizedWeight, QuantizedTranspose)

_here = _adapter_ops.module_path


class RawProducts:
    """The provider's raw products (a mixin of ``_qwix_bridge.PeftLoraProvider``)."""

    _dry_run: bool
    _targeted_here: Callable[..., qwix.LoraRule | None]
    dot_general: Callable[..., jax.Array]

    def raw_product_intercepts(self) -> dict[str, Callable[..., Any]]:
        """The functions intercepted, by the name Qwix's interception replaces."""
        return {
            "jax.numpy.matmul": self.matmul,
            _qwix_internals.INTERCEPT_OPERATOR_MATMUL: self._matmul_operator,
            _qwix_internals.INTERCEPT_OPERATOR_RMATMUL: self._rmatmul_operator,
            "jax.numpy.tensordot": self.tensordot,
            "jax.numpy.inner": self.inner,
            "jax.lax.dot": self.lax_dot,
        }

    def _contract(
        self,
        name: str,
        a: Any,
        b: Any,
        dims: _products.Dims | None,
        original: Callable[[], jax.Array],
        **kwargs: Any,
    ) -> jax.Array:
        """``a`` times ``b`` as ``dot_general(a, b, dims)``, or ``original()`` if ``dims`` is None.

        Refuses (``UnsupportedLayerError``) a product that cannot be written so
        on a targeted module's own weight: a weight on the left, or a matmul
        broadcasting a weight's batch axes.
        """
        a = a if isinstance(a, _QUANTIZED) else jax.numpy.asarray(a)
        b = b if isinstance(b, _QUANTIZED) else jax.numpy.asarray(b)
        targeted = self._targeted_here() is not None
        transposed = _transposed.own_source(b) is not None
        weight_right = targeted and (
            transposed or _adapter_ops.find_weight(b, self._dry_run) is not None
        )
        weight_left = (  # looked up only where it matters
            targeted
            and not weight_right
            and (
                _transposed.own_source(a) is not None
                or _adapter_ops.find_weight(a, self._dry_run) is not None
            )
        )
        if weight_left:
            raise UnsupportedLayerError(
                f"Module {_here()!r} is targeted and multiplies its own weight from the left "
                f"({name}(weight, x)); adapters need the weight as the right operand. Write "
                "x @ weight (transposing the result if needed) or a jnp.einsum, or exclude "
                "the module with LoraConfig.exclude."
            )
        if dims is None:
            if weight_right:
                raise UnsupportedLayerError(
                    f"Module {_here()!r} is targeted and runs {name} on its weight of shape "
                    f"{tuple(b.shape)} with an input of shape {tuple(a.shape)}, a product "
                    "broadcasting batch axes, which adapters do not support. Write it with "
                    "jnp.einsum, or exclude the module with LoraConfig.exclude."
                )
            return original()
        if not isinstance(a, _QUANTIZED) and not isinstance(b, _QUANTIZED):
            dtype = jax.numpy.result_type(a, b)
            a = a if a.dtype == dtype else a.astype(dtype)
            if b.dtype != dtype:  # a transposed weight stays known as one
                b = _transposed.cast(b, dtype) if transposed else b.astype(dtype)
        return self.dot_general(a, b, dims, **kwargs)

    def matmul(self, a: Any, b: Any, **kwargs: Any) -> jax.Array:
        """``jnp.matmul`` (and ``@``) as a ``dot_general`` where its axes allow."""
        np_ = jax.numpy
        dims = _products.matmul_dims(np_.ndim(a), np_.ndim(b), np_.shape(a), np_.shape(b))
        return self._contract(
            "jnp.matmul", a, b, dims, lambda: np_.matmul(a, b, **kwargs), **kwargs
        )

    def _matmul_operator(self, a: Any, b: Any) -> Any:
        """``a @ b`` for a JAX array ``a``."""
        b = _products.as_operand(b)
        if b is None:  # not a JAX operand: JAX's own answer (NotImplemented, say)
            return _qwix_internals.operator_matmul(a, b)
        return self.matmul(a, b)

    def _rmatmul_operator(self, a: Any, b: Any) -> Any:
        """``b @ a`` for a JAX array ``a``."""
        operand = _products.as_operand(b)
        if operand is None:
            return _qwix_internals.operator_rmatmul(a, b)
        return self.matmul(operand, a)

    def tensordot(self, a: Any, b: Any, axes: Any = 2, **kwargs: Any) -> jax.Array:
        """``jnp.tensordot`` as a ``dot_general``."""
        dims = _products.tensordot_dims(jax.numpy.ndim(a), jax.numpy.ndim(b), axes)
        original = lambda: jax.numpy.tensordot(a, b, axes, **kwargs)  # noqa: E731
        return self._contract("jnp.tensordot", a, b, dims, original, **kwargs)

    def inner(self, a: Any, b: Any, **kwargs: Any) -> jax.Array:
        """``jnp.inner`` as a ``dot_general`` contracting both last axes."""
        dims = _products.last_axes_dims(jax.numpy.ndim(a), jax.numpy.ndim(b), -1)
        original = lambda: jax.numpy.inner(a, b, **kwargs)  # noqa: E731
        return self._contract("jnp.inner", a, b, dims, original, **kwargs)

    def lax_dot(self, a: Any, b: Any, *args: Any, **kwargs: Any) -> jax.Array:
        """``jax.lax.dot`` as a ``dot_general`` (its default contraction)."""
        if args or kwargs.get("dimension_numbers") is not None:
            original = lambda: jax.lax.dot(a, b, *args, **kwargs)  # noqa: E731
            return self._contract("jax.lax.dot", a, b, None, original)
        kwargs.pop("dimension_numbers", None)
        dims = _products.last_axes_dims(jax.numpy.ndim(a), jax.numpy.ndim(b), 0)
        original = lambda: jax.lax.dot(a, b, **kwargs)  # noqa: E731
        return self._contract("jax.lax.dot", a, b, dims, original, **kwargs)
