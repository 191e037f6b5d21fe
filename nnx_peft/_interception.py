"""One adapted class per base class, whose methods run with the adapters; wrapping and unwrapping.

``qwix.apply_lora_to_model`` makes a new class on every call, with the provider in a
closure of its ``__call__``: two identical wraps then have unequal graph definitions
(jitted functions retrace for each), the graph definition cannot be pickled, and only
``__call__`` is intercepted. nnx_peft makes one class per base class instead, named so
that pickle finds it again (see ``__getattr__`` below). Every public method of it (and
``__call__``) runs under interception; the provider comes from the instance: a hashable
:data:`PROVIDER_ATTRIBUTE` on the root module (equal for equal configs), or, during the
wrapper's sample call, the wrap-time provider (which records, or runs dry). Every module on
the way from the root to an adapted weight gets its adapted class and the attribute too, so
that calling a submodule directly (``model.encoder.encode(x)``) also runs with the adapters;
inside an intercepted call, the nested ones run as they are (Qwix's interception does not nest).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from typing import Any, Protocol

import jax
from flax import nnx

from nnx_peft import _qwix_internals
from nnx_peft._adapter_ops import WRAP_TIME
from nnx_peft._errors import UnreachedTargetError
from nnx_peft._qwix_bridge import PeftLoraProvider
from nnx_peft._variables import AdapterParam


def is_qwix_wrapped(model: nnx.Module) -> bool:
    """Whether ``model`` is an instance of a class Qwix created when wrapping."""
    return hasattr(type(model), _qwix_internals.UNQUANTIZED_TYPE)


def unwrapped_type(model: nnx.Module) -> type:
    """The model's class before Qwix wrapped it (the class itself if never wrapped)."""
    return getattr(type(model), _qwix_internals.UNQUANTIZED_TYPE, type(model))


def unwrap(model: nnx.Module) -> None:
    """Undoes, in place, what ``qwix.apply_lora_to_model`` did to the module tree.

    Removes the attributes Qwix set on every module and gives the root module
    its original class back, so calls are no longer intercepted. Adapters are
    left alone; remove them first.
    """
    for _, module in nnx.iter_modules(model):
        for name in (*_qwix_internals.QWIX_MODULE_ATTRIBUTES, PROVIDER_ATTRIBUTE):
            if name in vars(module):
                delattr(module, name)
        object.__setattr__(module, "__class__", unwrapped_type(module))
    # Qwix assigned its class through nnx's __setattr__, which also recorded
    # `__class__` as a static attribute; drop it so that the graph definition
    # is the base model's again.
    nodes = vars(model)[_qwix_internals.FLAX_PYTREE_NODES]
    if "__class__" in nodes:
        kept = {name: is_node for name, is_node in nodes.items() if name != "__class__"}
        object.__setattr__(model, _qwix_internals.FLAX_PYTREE_NODES, type(nodes)(kept))


#: Static attribute of the adapted root module: what builds its provider (``.provider()``).
PROVIDER_ATTRIBUTE = "_nnx_peft_provider"
_CLASS_PREFIX = "_nnx_peft_adapted_"
_ADAPTED_CLASSES: dict[type, type] = {}


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
    wrap_time = getattr(WRAP_TIME, "provider", None)
    if wrap_time is not None:
        return wrap_time
    source: ProviderSource | None = vars(module).get(PROVIDER_ATTRIBUTE)
    return None if source is None else source.provider()


def _intercepting(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def method(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        reached = getattr(WRAP_TIME, "reached", None)
        if reached is not None:  # the sample call: note which modules it runs
            reached.add(getattr(self, _qwix_internals.QWIX_PATH, None))
        provider = _current_provider(self)
        if provider is None:  # not an adapted instance (e.g. being unwrapped)
            return func(self, *args, **kwargs)
        output = functools.partial(_qwix_internals.output_transform_nnx, provider, name)
        intercepted = _qwix_internals.apply_interceptors(func, provider, output_transform=output)
        return intercepted(self, *args, **kwargs)

    return method


def adapted_class(base: type) -> type:
    """The one class, for ``base``, whose methods run with adapters (made once, cached)."""
    cached = _ADAPTED_CLASSES.get(base)
    if cached is None:
        fields: dict[str, Any] = {
            _qwix_internals.UNQUANTIZED_TYPE: base,
            "__module__": __name__,
            "__qualname__": _class_name(base),
        }
        fields.update(
            (name, _intercepting(name, func)) for name, func in _intercepted_methods(base).items()
        )
        # The base's own ``pytree=`` setting (a class keyword NNX does not inherit).
        is_pytree = getattr(base, _qwix_internals.FLAX_PYTREE_IS_PYTREE, None)
        options = {} if is_pytree is None else {"pytree": is_pytree}
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
    modules on the way to an adapter keep it (see ``settle_classes``).

    Raises:
        UnreachedTargetError: ``unreached`` lists modules whose input cannot
            be known without a call (all of them named).
    """
    model = nnx.clone(model)
    for path, module in nnx.iter_modules(model):
        if module is model or type(module) not in _CONTAINERS:
            object.__setattr__(module, "__class__", adapted_class(unwrapped_type(module)))
        setattr(module, _qwix_internals.QWIX_PATH, path)
        setattr(module, _qwix_internals.DISABLE_QUANT_STATS_UPDATE, True)
        setattr(module, _qwix_internals.QWIX_RNGS, rngs)
    setattr(model, PROVIDER_ATTRIBUTE, source)
    saved = getattr(WRAP_TIME, "provider", None), getattr(WRAP_TIME, "reached", None)
    WRAP_TIME.provider, WRAP_TIME.reached = provider, set()
    try:
        model(*sample_args, **sample_kwargs)
        provider.note_reached(WRAP_TIME.reached)
        missed = unreached(model, WRAP_TIME.reached) if unreached is not None else []
        unknown = [(where, layer) for where, layer in missed if layer_input(layer) is None]
        if unknown:
            raise _unreached_error(unknown)
        for _, layer in missed:
            _call_alone(layer, provider)
    finally:
        WRAP_TIME.provider, WRAP_TIME.reached = saved
    for _, module in nnx.iter_modules(model):  # the first call is over
        setattr(module, _qwix_internals.DISABLE_QUANT_STATS_UPDATE, False)
        setattr(module, _qwix_internals.QWIX_RNGS, None)
    settle_classes(model, source)
    return model


#: Flax's containers: their methods (``append``, ``items``, ...) compute nothing.
_CONTAINERS = (nnx.List, nnx.Dict)


def settle_classes(model: nnx.Module, source: ProviderSource) -> None:
    """Gives the modules on the way to an adapter the adapted class, with ``source``.

    Their methods then run with the adapters when called directly, not only
    through the root (``model.encoder(x)``, ``model.layers[0].attn(x)``). The
    other modules get their own classes back. Run again when adapters are added or
    deleted (``PeftModel.add_adapter``), with the provider of them all.
    """
    setattr(model, PROVIDER_ATTRIBUTE, source)
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
            object.__setattr__(module, "__class__", adapted_class(unwrapped_type(module)))
            setattr(module, PROVIDER_ATTRIBUTE, source)
        else:
            if PROVIDER_ATTRIBUTE in vars(module):
                delattr(module, PROVIDER_ATTRIBUTE)
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
    output = functools.partial(_qwix_internals.output_transform_nnx, provider, "__call__")
    _qwix_internals.apply_interceptors(func, provider, output_transform=output)(module, x)
