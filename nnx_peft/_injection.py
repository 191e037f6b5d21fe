"""Injecting adapters into an NNX model through Qwix, and finding them again."""

from __future__ import annotations

import dataclasses
import functools
import linecache
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

import jax
import qwix
from flax import nnx

from nnx_peft import _abstract, _saved_modules, _stacks
from nnx_peft._adapter import AdapterInfo, adapters
from nnx_peft._config import ALL_LINEAR, LoraConfig
from nnx_peft._errors import (
    NoAdapterCreatedError,
    PeftError,
    QuantizationError,
    SampleInputsError,
    TargetNotFoundError,
    UnreachedTargetError,
    UnsupportedLayerError,
)
from nnx_peft._interception import LAYERS_WITH_LAYOUTS, apply_lora, unwrapped_type
from nnx_peft._layout import CallRecord
from nnx_peft._paths import is_under, module_paths, path_string
from nnx_peft._qwix_bridge import PeftLoraProvider
from nnx_peft._qwix_internals import QWIX_PATH
from nnx_peft._variables import AdapterParam
from nnx_peft._variants import AdapterPlan


def is_all_linear(config: LoraConfig) -> bool:
    """Whether ``config`` targets ``'all-linear'``."""
    return config.target == (ALL_LINEAR,)


def matches(config: LoraConfig, pattern: str, path: str) -> bool:
    """Whether ``pattern`` (one of ``config.target``) selects ``path`` after exclusions."""
    return re.fullmatch(pattern, path) is not None and not any(
        re.fullmatch(excluded, path) for excluded in config.exclude
    )


def matching_pattern(config: LoraConfig, path: str) -> str | None:
    """The first ``config.target`` pattern that selects ``path`` (first match wins).

    For ``target='all-linear'`` this is ``'all-linear'`` for every path: call
    it for adapted paths only.
    """
    if is_all_linear(config):
        return ALL_LINEAR
    return next((p for p in config.target if matches(config, p, path)), None)


def _owns_weight(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def weight_holders(modules: dict[str, nnx.Module]) -> list[str]:
    """Paths of modules that own an ``nnx.Param`` directly (candidates for adapters)."""
    return [path for path, module in modules.items() if _owns_weight(module)]


def check_targets_exist(config: LoraConfig, model: nnx.Module) -> None:
    """Raises :class:`TargetNotFoundError` if a target pattern selects no module."""
    modules = module_paths(model)
    for pattern in config.target:
        if not any(matches(config, pattern, path) for path in modules):
            excluded = [p for p in modules if re.fullmatch(pattern, p)]
            raise TargetNotFoundError(
                f"LoraConfig.target pattern {pattern!r} matches no module path"
                + (
                    f" (it matches {excluded} but exclude={list(config.exclude)} removes them)"
                    if excluded
                    else ""
                )
                + ". Patterns are matched in full (re.fullmatch) against '/'-joined paths.\n"
                f"Module paths that hold weights: {weight_holders(modules)}\n"
                f"All module paths: {list(modules)}\n"
                "Fix the pattern, e.g. r'.*q_proj' to match 'layers/0/attn/q_proj'."
            )


def rules(config: LoraConfig, targets: Iterable[str]) -> list[qwix.QuantizationRule]:
    """Qwix rules selecting ``targets``: exclusions first (Qwix applies the first match).

    Rank and alpha here are placeholders: the provider takes each module's
    from the :class:`AdapterPlan`.
    """
    skip = [qwix.QuantizationRule(module_path=pattern) for pattern in config.exclude]
    lora = [
        qwix.LoraRule(
            module_path=pattern,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            weight_qtype=config.weight_qtype,
            tile_size=config.tile_size,
        )
        for pattern in targets
    ]
    return [*skip, *lora]


def iter_adapters(model: nnx.Module) -> Iterator[AdapterInfo]:
    """Yields the summary of every adapter nnx_peft created in ``model``, in module order."""
    for adapter in adapters(model):
        yield adapter.info()


# --- Running the provider ------------------------------------------------------------------


def sample_keywords(
    sample_kwargs: Mapping[str, Any] | None, keywords: dict[str, Any], where: str
) -> dict[str, Any]:
    """The sample call's keywords: ``sample_kwargs`` (any names) and ``**keywords`` together.

    Raises:
        SampleInputsError: ``sample_kwargs`` is no mapping of names, or names a
            keyword that ``**keywords`` gives too.
    """
    if sample_kwargs is None:
        return dict(keywords)
    if not isinstance(sample_kwargs, Mapping) or not all(isinstance(k, str) for k in sample_kwargs):
        raise SampleInputsError(
            f"{where}(sample_kwargs=...) takes a dict of the sample call's keyword inputs by "
            f"name; got {type(sample_kwargs).__qualname__} {sample_kwargs!r}. Example: "
            "sample_kwargs={'rngs': nnx.Rngs(dropout=0), 'deterministic': False}."
        )
    both = sorted(set(sample_kwargs) & set(keywords))
    if both:
        raise SampleInputsError(
            f"{where} got the sample keyword(s) {both} both in sample_kwargs and as keyword "
            "arguments; give each once, in sample_kwargs."
        )
    return {**keywords, **sample_kwargs}


def run(
    model: nnx.Module,
    config: LoraConfig,
    targets: Iterable[str],
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
    *,
    record: CallRecord | None = None,
    traced: bool = False,
) -> nnx.Module:
    """``qwix.apply_lora_to_model`` with nnx_peft's provider: an adapted clone of ``model``.

    ``traced`` says that the call runs under ``jax.eval_shape`` to mirror an eager one.
    """
    targets = tuple(targets)
    source = ProviderKey(config, targets)
    plan = AdapterPlan.from_config(config)
    provider = PeftLoraProvider(rules(config, targets), plan, record=record, dry_run=traced)

    def unreached(adapted: nnx.Module, reached: set[Any]) -> list[tuple[str, nnx.Module]]:
        """Targeted modules owning a weight that the sample call gave no adapter:
        NNX layers declaring their layouts (``LAYERS_WITH_LAYOUTS``), and other
        modules the call did not run (``reached`` holds the Qwix paths of those
        it ran).

        A module that ran and got no adapter may do no matmul at all (a norm);
        so may one of Flax's other layers (``nnx.LayerNorm``): those are left alone.
        """
        return [
            (path, module)
            for path, module in module_paths(adapted).items()
            if any(matches(config, pattern, path) for pattern in targets)
            and not any(isinstance(v, AdapterParam) for v in vars(module).values())
            and (
                isinstance(module, LAYERS_WITH_LAYOUTS)
                or (
                    getattr(module, QWIX_PATH, None) not in reached
                    and _owns_weight(module)
                    and not unwrapped_type(module).__module__.startswith("flax.")
                )
            )
        ]

    # A recording run (the probe of 'all-linear') reads the sample call's own matmuls only.
    reach = unreached if record is None else None
    return apply_lora(model, provider, source, sample_args, sample_kwargs, rngs, reach)


@dataclasses.dataclass(frozen=True)
class ProviderKey:
    """What an adapted model's provider is built from; equal configs give equal keys.

    Stored on the adapted root module (a static attribute, so part of its graph
    definition, and picklable), so that identical wraps have equal graph
    definitions and share one provider.
    """

    config: LoraConfig
    targets: tuple[str, ...]
    #: The configs and targets of the adapters added later (``PeftModel.add_adapter``).
    added: tuple[tuple[LoraConfig, tuple[str, ...]], ...] = ()

    def provider(self) -> PeftLoraProvider:
        return _provider(self)


@functools.cache
def _provider(key: ProviderKey) -> PeftLoraProvider:
    plan = AdapterPlan.from_config(key.config)
    if not key.added:
        return PeftLoraProvider(rules(key.config, key.targets), plan)
    # Several adapters: a product is intercepted where any of them targets its module. Each
    # adapter's update comes from its own recorded layout, not from the rules or the plan.
    entries = ((key.config, key.targets), *key.added)
    return PeftLoraProvider([_union_rule(config, targets) for config, targets in entries], plan)


def _union_rule(config: LoraConfig, targets: tuple[str, ...]) -> qwix.LoraRule:
    """One Qwix rule selecting what ``rules(config, targets)`` selects (exclusions folded in)."""
    pattern = "(?:" + "|".join(targets) + ")"
    if config.exclude:
        pattern = "(?!(?:" + "|".join(config.exclude) + r")\Z)" + pattern
    return qwix.LoraRule(
        module_path=pattern,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        weight_qtype=config.weight_qtype,
        tile_size=config.tile_size,
    )


def dry_run(
    model: nnx.Module,
    config: LoraConfig,
    targets: Iterable[str],
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    *,
    record: CallRecord | None = None,
) -> list[AdapterInfo]:
    """The adapters :func:`run` would create, found without computing anything.

    The injection runs on a copy of ``model`` under ``jax.eval_shape``: only
    shapes are traced (no weight is read, no factor drawn, no SVD computed),
    and ``model`` is left exactly as it was.
    """
    graphdef, state = nnx.split(model)
    found: list[AdapterInfo] = []

    def traced(state: nnx.State) -> None:
        clone = nnx.merge(graphdef, state)
        rngs = nnx.Rngs(0)  # only shapes come out of this trace
        args, kwargs = _abstract.traced_inputs(_copy_nnx_inputs((sample_args, sample_kwargs)))
        adapted = run(clone, config, targets, args, kwargs, rngs, record=record, traced=True)
        found.extend(iter_adapters(adapted))

    if not _abstract.has_abstract((sample_args, sample_kwargs)):
        jax.eval_shape(traced, state)
        return found
    with _abstract.sample_shape_errors((sample_args, sample_kwargs), _failing_module_line):
        jax.eval_shape(traced, state)
    return found


@dataclasses.dataclass(frozen=True)
class AllLinear:
    """What ``target='all-linear'`` resolves to on one model.

    Attributes:
        candidates: Modules that multiply by one of their own weights during
            the sample call, and targeted layers it did not reach (NNX's linear
            layers, and the user's modules owning a weight), in module order.
        head: The output head, left out: the module of the sample call's last
            intercepted matmul, if that matmul is on one of its own weights and
            its result has as many elements as the model's output (or one of
            its outputs); ``None`` otherwise (e.g. logits computed with a tied,
            transposed embedding).
        targets: The candidates adapted: all but the head, ``exclude`` and
            modules inside ``modules_to_save``.
    """

    candidates: tuple[str, ...]
    head: str | None
    targets: tuple[str, ...]


def all_linear(
    model: nnx.Module,
    config: LoraConfig,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    saved: Iterable[str],
) -> AllLinear:
    """Resolves ``target='all-linear'`` on ``model`` with a dry run that records call order."""
    probe = dataclasses.replace(
        config,
        target=".*",
        exclude=(),
        dropout=0.0,
        weight_qtype=None,
        tile_size=None,
        use_dora=False,
        init="default",
        rank_pattern=(),
        alpha_pattern=(),
        modules_to_save=(),
    )
    record = CallRecord()
    found = dry_run(model, probe, (".*",), sample_args, sample_kwargs, record=record)
    # Layers the sample call missed are candidates too: NNX's linear layers (their
    # adapters come from their declared layouts), and the user's own modules owning a
    # weight (the final wrap then refuses them, unless excluded, with UnreachedTargetError).
    adapted = {info.module_path for info in found}
    missed = [
        path
        for path, module in module_paths(model).items()
        if path not in adapted
        and _owns_weight(module)
        and not isinstance(module, nnx.Embed)  # 'all-linear' leaves embeddings out, as HF PEFT
        and (
            isinstance(module, LAYERS_WITH_LAYOUTS)
            or (path not in record.reached and not type(module).__module__.startswith("flax."))
        )
    ]
    candidates = tuple(path for path in module_paths(model) if path in adapted or path in missed)
    head = None
    if record.ops:
        path, weight, size = record.ops[-1]
        if weight is not None and size in record.output_sizes:
            head = path
    saved = tuple(saved)
    targets = tuple(
        path
        for path in candidates
        if path != head
        and not any(re.fullmatch(pattern, path) for pattern in config.exclude)
        and not any(is_under(path, root) for root in saved)
    )
    return AllLinear(candidates, head, targets)


def as_pattern(paths: Iterable[str]) -> str:
    """One regex matching exactly ``paths``."""
    return "(?:" + "|".join(re.escape(path) for path in paths) + ")"


def inject(
    model: nnx.Module,
    config: LoraConfig,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Returns an adapted clone of ``model``; ``model`` itself is not modified.

    Raises:
        TargetNotFoundError: A target, ``rank_pattern``, ``alpha_pattern`` or
            ``modules_to_save`` pattern selects nothing.
        NoAdapterCreatedError: A target pattern matches modules but none got an
            adapter during the sample forward pass.
        ConfigError: A saved module is, or holds, an adapted module.
        SampleShapeError: Abstract sample inputs (``jax.ShapeDtypeStruct``) have a
            shape or dtype the model cannot take.
    """
    if _abstract.has_abstract((sample_args, sample_kwargs)):
        return _abstract.inject_abstract(
            inject, model, config, sample_args, sample_kwargs, rngs, _failing_module_line
        )
    saved = _saved_modules.select(config, model)
    if is_all_linear(config):
        resolved = all_linear(model, config, sample_args, sample_kwargs, saved)
        if not resolved.targets:
            raise NoAdapterCreatedError(
                f"LoraConfig.target={ALL_LINEAR!r} found no module to adapt: modules that "
                f"multiply by their own weight: {list(resolved.candidates)}, output head "
                f"{resolved.head!r} (left out), exclude={list(config.exclude)}. Target "
                "modules by regex instead."
            )
        targets: tuple[str, ...] = (as_pattern(resolved.targets),)
    else:
        check_targets_exist(config, model)
        targets = tuple(config.target)
    adapted = run(model, config, targets, sample_args, sample_kwargs, rngs)
    if config.dropout:  # first: a scan that cannot carry dropout keys fails to trace too

        def sample_call() -> None:
            args, kwargs = _copy_nnx_inputs((sample_args, sample_kwargs))
            adapted(*args, **kwargs)

        _stacks.check_dropout_carried(adapted, sample_call)
    _check_next_call(adapted, sample_args, sample_kwargs, quantized=config.weight_qtype is not None)
    # The sample call ran in whatever mode the model was in: it may have advanced
    # dropout RNG counters or updated batch statistics. Put every non-parameter
    # variable back as the base model has it, so the wrapper starts where it did.
    nnx.update(adapted, nnx.state(model, nnx.Not(nnx.Param)))
    infos = list(iter_adapters(adapted))
    adapted_paths = {info.module_path for info in infos}
    if not is_all_linear(config):
        _check_every_target_adapted(config, adapted, adapted_paths)
    stacks = {i.module_path: i.layers for i in infos if i.layers is not None}
    _check_patterns_used(config, adapted_paths, stacks)
    _saved_modules.check_disjoint(saved, adapted_paths)
    _saved_modules.mark(adapted, saved)
    return adapted


def _copy_nnx_inputs(tree: Any) -> Any:
    """``tree`` with its NNX objects (a model's call-time ``rngs=``) cloned.

    Inside a trace, the sample call may advance the clones; the caller's stay as they are.
    """
    return jax.tree.map(
        lambda x: nnx.clone(x) if isinstance(x, nnx.Pytree) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nnx.Pytree),
    )


#: What a model that reads concrete values (a router in Python) raises when traced.
_UNTRACEABLE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def _check_next_call(
    adapted: nnx.Module,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    *,
    quantized: bool,
) -> None:
    """Refuses a model whose next call would meet a targeted weight the wrap could not follow.

    The sample call runs eagerly, where a matmul's operand is matched to a
    weight by identity, value or shape, and through transposes
    (``_transposed``); a weight reshaped to another shape is then not
    recognised and gets no adapter. A traced call finds it through that
    operation, so the next call, traced here (``jax.eval_shape``: nothing
    computed), tells. With QLoRA (``quantized``) the sample call also
    quantized the weights at their matmuls, and a transform a quantized weight
    does not support fails here too. A model that cannot be traced as a whole
    (a router on concrete values) is left to its eager calls.

    Raises:
        UnsupportedLayerError, QuantizationError: Naming the module and the
            line of its operation.
    """
    graphdef, state = nnx.split(adapted)

    def call(state: nnx.State) -> None:
        args, kwargs = _copy_nnx_inputs((sample_args, sample_kwargs))
        nnx.merge(graphdef, state)(*args, **kwargs)

    try:
        jax.eval_shape(call, state)
    except _UNTRACEABLE:
        return
    except UnreachedTargetError as err:
        # A transformed weight reaches its matmul unrecognised, and would want a new adapter.
        _refuse_transform(err, quantized)
    except PeftError:
        raise
    except (AttributeError, TypeError, ValueError) as err:
        if quantized:
            _refuse_transform(err, quantized)


def _refuse_transform(err: Exception, quantized: bool) -> NoReturn:
    """Raises ``QuantizationError`` (``quantized``) or ``UnsupportedLayerError`` for ``err``,
    from a call on the adapted model (``err`` itself if no adapted module is in its traceback)."""
    where = _failing_module_line(err)
    if where is None:
        raise err
    path, line = where
    if not quantized:
        raise UnsupportedLayerError(
            f"Module {path!r} is targeted and multiplies by a transform of its weight that the "
            f"wrap cannot follow: {line!r}. The sample call matches a matmul's operand to a "
            "weight as stored, cast, transposed (.T, jnp.transpose, swapaxes, moveaxis) or "
            "reshaped to its own shape; a weight reshaped to another shape gets no adapter, so "
            "the call would run without one. Multiply by the weight as stored (jnp.einsum can "
            "name its axes instead of a reshape), or exclude the module with "
            "LoraConfig.exclude."
        ) from err
    raise QuantizationError(
        f"Module {path!r} transforms its QLoRA weight before the matmul in a way a "
        f"quantized weight does not support: {line!r} failed with {type(err).__name__}: "
        f"{str(err).rstrip('.')}. Casts (jnp.astype, jnp.asarray, .astype), transposes (.T, "
        "jnp.transpose, swapaxes, moveaxis) and reshapes to the same shape are followed; "
        "reshapes to another shape and other operations on the weight are not. Multiply by "
        "the weight as stored (e.g. with jnp.einsum naming its axes), exclude the module "
        "with LoraConfig.exclude, or use weight_qtype=None."
    ) from err


def _failing_module_line(err: BaseException) -> tuple[str, str] | None:
    """The path of the innermost adapted module in ``err``'s traceback, and its source line."""
    found = None
    tb = err.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if isinstance(module, nnx.Module) and hasattr(module, QWIX_PATH):
            line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
            found = (path_string(getattr(module, QWIX_PATH)), line)
        tb = tb.tb_next
    return found


def _check_every_target_adapted(
    config: LoraConfig, adapted: nnx.Module, adapted_paths: set[str]
) -> None:
    modules = module_paths(adapted)
    for pattern in config.target:
        selected = [path for path in modules if matches(config, pattern, path)]
        if not adapted_paths.intersection(selected):
            raise NoAdapterCreatedError(
                f"LoraConfig.target pattern {pattern!r} matches modules {selected}, but none "
                "of them got an adapter: during the sample call of __call__ none of them ran a "
                "matmul (dot_general, two-operand einsum or convolution) on an nnx.Param it "
                "owns directly, nor looked up rows of one (an embedding). Norms and container "
                "modules get no adapter. Modules that did get one: "
                f"{sorted(adapted_paths)}. Target the modules that own the projection weights, "
                "e.g. r'.*(q_proj|v_proj)'."
            )


def unused_value_patterns(config: LoraConfig, adapted_paths: set[str]) -> list[tuple[str, str]]:
    """``(field, regex)`` of each ``rank_pattern`` / ``alpha_pattern`` key that applies to no
    adapted module: it matches none in full, or only ones an earlier key takes."""
    unused = []
    for field in ("rank_pattern", "alpha_pattern"):
        pairs = getattr(config, field)
        for index, (pattern, _) in enumerate(pairs):
            earlier = [e for e, _ in pairs[:index]]
            if not any(
                re.fullmatch(pattern, p) and not any(re.fullmatch(e, p) for e in earlier)
                for p in adapted_paths
            ):
                unused.append((field, pattern))
    return unused


def _check_patterns_used(
    config: LoraConfig, adapted_paths: set[str], stacks: dict[str, int]
) -> None:
    """Raises for a rank or alpha pattern no adapter uses.

    Args:
        config: The config.
        adapted_paths: The adapted modules' paths.
        stacks: Of those, the stacked ones, with their number of layers.

    Raises:
        StackedPatternError: The pattern names a layer of a stacked module.
        TargetNotFoundError: Otherwise.
    """
    for field, pattern in unused_value_patterns(config, adapted_paths):
        _stacks.check_pattern_names_no_layer(field, pattern, stacks)
        raise TargetNotFoundError(
            f"LoraConfig.{field} key {pattern!r} applies to no adapted module: it matches "
            "none of them in full, or only ones an earlier key already took (the first match "
            f"wins). Adapted modules: {sorted(adapted_paths)}. Fix or remove the key."
        )
