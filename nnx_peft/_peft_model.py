"""`PeftModel`: an NNX module wrapping any NNX model with LoRA adapters."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optax
import orbax.checkpoint as ocp
from flax import nnx

from nnx_peft import (
    _base_weights,
    _checkpoint,
    _hf_peft,
    _merging,
    _named,
    _resharding,
    _safetensors,
    _sharding,
)
from nnx_peft._adapter import AdapterInfo, OfAdapters
from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    AlreadyWrappedError,
    ConfigError,
    NotAModuleError,
    NothingTrainableError,
    RngsError,
    SampleInputsError,
)
from nnx_peft._injection import inject, iter_adapters, sample_keywords
from nnx_peft._interception import PROVIDER_ATTRIBUTE, is_qwix_wrapped
from nnx_peft._named import Entry, NamedAdapters, check_new_name, resolve
from nnx_peft._parts import DEFAULT_ADAPTER
from nnx_peft._summary import ParameterSummary, summarize
from nnx_peft._variables import AdapterParam


class PeftModel(NamedAdapters, nnx.Module):
    """Any Flax NNX model with LoRA adapters injected through Qwix.

    The wrapper holds an adapted *clone* of ``base_model`` in ``self.model``.
    The clone has new module and variable objects that share the base model's
    (immutable) ``jax.Array`` buffers, so wrapping costs no extra memory for
    the base weights, and ``base_model`` itself stays exactly as it was: same
    class, same attributes, same outputs. Training replaces arrays inside the
    wrapper only. Two consequences worth knowing: to free the base weights'
    memory (say, after a QLoRA wrap quantized them), drop your own reference
    to ``base_model``; and donating the wrapper's *frozen* arrays to a jitted
    function (``donate_argnums``) invalidates them in ``base_model`` too, so
    donate only the trainable state and the optimizer state.

    Every public method of the clone's class (``__call__``, ``encode``,
    ``generate``, ...) runs with the active adapters, and the wrapper forwards
    attributes it does not have itself to the clone, so ``model.encode(x)``
    works as ``model.model.encode(x)`` does. A method of a *submodule* called
    directly (``model.model.encoder(x)``) is not intercepted and runs without
    adapters: call it through a method of the model.

    Args:
        base_model: The model to adapt, any ``nnx.Module``.
        config: What to adapt and how.
        *sample_args: Positional inputs for one sample call of
            ``base_model(*sample_args, **sample_kwargs)``; adapters are created
            during that call, for the modules it reaches (a batch of one is
            enough, unless routing depends on the values).
        rngs: Random state for the adapter initialisation (and dropout). Required:
            nnx_peft never falls back to a fixed seed.
        sample_kwargs: Keyword inputs for the sample call by name, including
            names the wrapper takes itself: a model whose ``__call__`` takes
            its own ``rngs=`` gets them as ``sample_kwargs={'rngs': ...}``.
        **keywords: More keyword inputs for the sample call.

    Raises:
        NotAModuleError: ``base_model`` is not an ``nnx.Module``.
        AlreadyWrappedError: ``base_model`` already has adapters.
        RngsError: ``rngs`` is not an ``nnx.Rngs``.
        SampleInputsError: No sample inputs were given, or ``sample_kwargs``
            is no dict of names or repeats a keyword argument.
        TargetNotFoundError: A target pattern matches no module.
        NoAdapterCreatedError: A target pattern matched modules that got no adapter.
        QuantizationError: QLoRA settings do not fit a targeted weight.
        UnsupportedLayerError: A targeted module cannot be adapted as configured
            (e.g. DoRA or PiSSA on a grouped convolution).
        ConfigError: A ``modules_to_save`` module holds an adapted module.

    Variants (rsLoRA, DoRA, PiSSA and OLoRA, per-module rank and alpha,
    ``modules_to_save``, ``target='all-linear'``) are set in ``config``; see
    ``docs/variants.md``. :func:`nnx_peft.inspect_targets` shows what a config
    adapts without wrapping.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import nnx_peft
        >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
        >>> model(jnp.ones((2, 4))).shape
        (2, 3)
        >>> [info.module_path for info in model.adapters()]
        ['']
    """

    def __init__(
        self,
        base_model: nnx.Module,
        config: LoraConfig,
        *sample_args: Any,
        rngs: nnx.Rngs,
        sample_kwargs: Mapping[str, Any] | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        **keywords: Any,
    ) -> None:
        sample_kwargs = sample_keywords(sample_kwargs, keywords, "PeftModel")
        check_new_name(adapter_name, ())
        if not isinstance(base_model, nnx.Module):
            raise NotAModuleError(
                f"PeftModel wraps Flax NNX modules; got {type(base_model).__module__}."
                f"{type(base_model).__qualname__}. Build the model with flax.nnx (a Linen "
                "module can be bridged with flax.nnx.bridge.ToNNX)."
            )
        if (
            isinstance(base_model, PeftModel)
            or is_qwix_wrapped(base_model)
            or any(True for _ in iter_adapters(base_model))
        ):
            raise AlreadyWrappedError(
                f"The model ({type(base_model).__qualname__}) already has LoRA adapters. "
                "Wrap the original base model instead, or use the existing PeftModel "
                "(merge_and_unload() gives a plain model to wrap again)."
            )
        if not isinstance(config, LoraConfig):
            raise ConfigError(
                f"config must be an nnx_peft.LoraConfig; got {type(config).__qualname__}. "
                "Example: nnx_peft.LoraConfig(rank=8, alpha=16.0, target=r'.*(q_proj|v_proj)')."
            )
        if not isinstance(rngs, nnx.Rngs):
            raise RngsError(
                f"rngs must be an nnx.Rngs; got {type(rngs).__qualname__}. Pass "
                "rngs=nnx.Rngs(seed) to initialise the adapters (there is no default seed)."
            )
        _check_streams(rngs, config)
        if not sample_args and not sample_kwargs:
            raise SampleInputsError(
                "PeftModel needs sample inputs for one call of the base model, during "
                "which the adapters are created: PeftModel(base_model, config, x, rngs=...) "
                "with x shaped like a real batch (a batch of one is enough)."
            )
        self.config = config
        self.model = inject(base_model, config, sample_args, sample_kwargs, rngs)
        targets = vars(self.model)[PROVIDER_ATTRIBUTE].targets
        self._entries = (Entry(DEFAULT_ADAPTER, config, targets),)
        self._rename(adapter_name)
        self._remember_samples(sample_args, sample_kwargs)
        # Made False by loading for inference (load_adapter, from_pretrained): see trainable_filter.
        self._trainable = True

    def __call__(self, *args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        """Runs the adapted model.

        Args:
            *args: The model's inputs.
            adapter_ids: ``None`` runs the active adapters. Otherwise one integer per
                example of the batch (the leading axis of the inputs), an index into
                :attr:`adapter_names`: each example runs with that adapter alone, active
                or not, in one call that batches them all (see
                ``docs/named-adapters.md``). Under ``jax.jit`` an index out of range
                gives NaN outputs for its example; called eagerly, it raises. Inside
                :meth:`disable_adapter`, every example runs the base model.
            **kwargs: The model's keyword inputs.

        Raises:
            AdapterIdsError: ``adapter_ids`` is not a vector of integers, an index is out
                of range (eager calls), or an adapter it reaches cannot be batched so.
        """
        if adapter_ids is None:
            return self.model(*args, **kwargs)
        return _named.per_example(self.model, self.adapter_names, adapter_ids, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the adapted model, as in HF PEFT.

        So ``model.encode(x)`` or ``model.generate(...)`` run the adapted model's
        method, with the active adapters.
        """
        # Private names (NNX's and pickle's probes) and a wrapper still being built: no model.
        if name.startswith("_") or "model" not in vars(self):
            raise AttributeError(f"{type(self).__qualname__!r} object has no attribute {name!r}")
        return getattr(self.model, name)

    @property
    def trainable_filter(self) -> nnx.filterlib.Filter:
        """An NNX filter selecting exactly the trainable variables (the adapters).

        That is every :class:`AdapterParam`: the factors ``A`` and ``B``, DoRA
        magnitudes, and the parameters of ``modules_to_save`` (a
        :class:`~nnx_peft.SavedParam` each). Use it wherever NNX takes a filter:
        ``nnx.state(model, f)``, ``nnx.DiffState(0, f)`` for gradients,
        ``nnx.Optimizer(..., wrt=f)``. Do not use ``nnx.Param`` or
        ``nnx.LoRAParam`` for this: adapters are ``nnx.Param`` subclasses, and
        ``nnx.Param`` selects the base weights too.

        After loading for inference (``trainable=False`` in :meth:`load_adapter`,
        :meth:`from_pretrained` or :meth:`load_safetensors`) nothing is
        trainable, and this is ``nnx.Nothing()``.
        """
        if not self._trainable:
            return nnx.Nothing()
        if len(self._entries) == 1 and self.active_adapters:
            return AdapterParam
        return nnx.All(AdapterParam, OfAdapters(self.active_adapters))

    def adapters(self) -> list[AdapterInfo]:
        """Every adapted weight: module path (relative to ``self.model``), name and shapes."""
        return list(iter_adapters(self.model))

    def make_optimizer(self, tx: optax.GradientTransformation) -> nnx.Optimizer:
        """An ``nnx.Optimizer`` whose state covers the trainable variables only.

        Args:
            tx: Any optax transformation, e.g. ``optax.adamw(1e-4)``.

        Returns:
            ``nnx.Optimizer(self, tx, wrt=self.trainable_filter)``. Update it with
            gradients taken w.r.t. ``self.trainable_filter``.

        Raises:
            NothingTrainableError: The model has no trainable variable, or was
                loaded for inference.
        """
        if not self._trainable:
            raise NothingTrainableError(
                "This PeftModel was loaded for inference (trainable=False), so its adapters "
                "are frozen and make_optimizer has nothing to optimise. To train, load it for "
                "training: PeftModel.from_pretrained(base_model, path, *sample_inputs, "
                "rngs=..., trainable=True), or model.load_adapter(path, trainable=True)."
            )
        if not nnx.state(self, self.trainable_filter):
            raise NothingTrainableError(
                "make_optimizer found no trainable variable in this PeftModel (no "
                "AdapterParam left, e.g. after nnx.pop). Optimising nothing is almost "
                "certainly a mistake: wrap the base model again to get fresh adapters."
            )
        # Its state is created with the adapters' sharding metadata, which NNX places on the
        # current mesh: the mesh of the adapters when none is set.
        sharding = _sharding.first_named_sharding(nnx.state(self, self.trainable_filter))
        with _sharding.mesh_of(sharding):
            return nnx.Optimizer(self, tx, wrt=self.trainable_filter)

    def shard_adapters(self, rules: _sharding.Rules) -> None:
        """Moves the adapters of the modules ``rules`` select to the given shardings.

        By default each adapter is sharded like its base weight: A over the
        mesh axes of the weight's input-side axes, B over those of its
        output-side axes (see ``docs/sharding.md``). This overrides that for the
        selected modules, moving the arrays and setting their NNX sharding
        metadata (``out_sharding``), so that ``nnx.get_partition_spec`` and the
        optimizer state follow. Call it before :meth:`make_optimizer`. The
        layout is not part of the ``LoraConfig`` or of checkpoints, which load
        onto any mesh.

        Args:
            rules: Module-path regex (matched in full, like ``LoraConfig.target``)
                to the partition specs ``(A spec, B spec)`` of that module's
                adapters, each a ``jax.sharding.PartitionSpec`` or a list of
                entries (``None``, a mesh axis name, or a list of names), at most
                one per axis; missing trailing entries are ``None``. The first
                matching rule wins; adapters no rule selects keep their sharding.
                A DoRA magnitude follows B's spec without the rank axis, where B
                holds its axes unflattened; otherwise (or to choose) give a triple
                ``(A spec, B spec, magnitude spec)``. A rule selecting a
                ``modules_to_save`` module maps its parameter paths to specs instead,
                e.g. ``{'head': {'kernel': P(None, 'tp'), 'bias': P('tp')}}``.

        Raises:
            ShardingError: A rule is malformed or selects no adapted module, an
                adapter is not on a mesh, or a spec does not fit its adapter
                (more entries than axes, a mesh axis the mesh lacks or used
                twice, a dimension the mesh axes do not divide). Nothing is
                moved then.

        Example:
            >>> import jax
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from jax.sharding import PartitionSpec as P
            >>> import nnx_peft
            >>> mesh = jax.make_mesh((1,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
            >>> with jax.set_mesh(mesh):
            ...     init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "tp"))
            ...     base = nnx.Linear(4, 8, kernel_init=init, use_bias=False, rngs=nnx.Rngs(0))
            ...     config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            ...     model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> model.model.kernel_lora_b.get_value().sharding.spec
            P(None, 'tp')
            >>> model.shard_adapters({".*": (P("tp", None), P())})
            >>> model.model.kernel_lora_a.get_value().sharding.spec
            P('tp', None)
        """
        _resharding.shard_adapters(self.model, rules)

    def split_trainable(self) -> tuple[nnx.GraphDef[PeftModel], nnx.State, nnx.State]:
        """Splits the model into graph definition, trainable state and the rest.

        The rest holds everything that is not trained: frozen base weights,
        quantized weights, batch statistics, RNG state. ``nnx_peft.merge`` of
        the three gives back an equal model.

        Returns:
            ``(graphdef, trainable, rest)``.
        """
        graphdef, trainable, *rest = nnx.split(self, self.trainable_filter, ...)
        return graphdef, trainable, rest[0]

    def trainable_parameters(self) -> ParameterSummary:
        """Trainable and total parameter counts, with one entry per adapted weight."""
        return summarize(self.model, self.config, self.trainable_filter)

    def print_trainable_parameters(self) -> None:
        """Prints the per-target table and the trainable fraction."""
        print(self.trainable_parameters().format())

    def merge_and_unload(
        self, *, dtype: Any = None, adapter_names: Sequence[str] | None = None
    ) -> nnx.Module:
        """A plain model of the base model's class with the adapters folded into its weights.

        Each adapted weight becomes ``W + (alpha / rank) * delta``, ``delta``
        being ``A @ B`` laid out like ``W``, so the result computes what this
        model computes (up to rounding) with the base model's cost. This
        wrapper is not changed; weights without an adapter share its buffers.

        Args:
            dtype: Dtype of the merged weights. ``None`` keeps each weight's
                own dtype; a QLoRA weight is dequantized, into the dtype of its
                quantization scale (the dtype it had before quantization)
                unless ``dtype`` says otherwise.
            adapter_names: The adapters to fold in (their updates add up); ``None``:
                the active ones (:attr:`active_adapters`). The others are dropped.

        Returns:
            An ``nnx.Module`` of the base model's class and structure: no
            interception, no adapter variables.

        Raises:
            DtypeError: ``dtype`` is not a floating-point dtype.
            UnmergeableAdapterError: An adapter's update has no exact form as a
                weight change (a grouped convolution, or a weight the module
                transforms before its matmul).
            AdapterStateError: Called inside ``disable_adapter()``.
            AdapterNameError: A name in ``adapter_names`` is unknown.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> plain = model.merge_and_unload()
            >>> type(plain) is nnx.Linear
            True
        """
        names = None
        if adapter_names is not None:
            names = resolve(adapter_names, self.adapter_names, "merge_and_unload")
        return _merging.merge_and_unload(self.model, dtype=dtype, names=names)

    @property
    def merged(self) -> bool:
        """Whether the adapters are merged into the base weights (:meth:`merge_adapter`)."""
        return _merging.is_merged(self.model)

    def merge_adapter(self) -> None:
        """Folds the adapters into the base weights in place; :meth:`unmerge_adapter` undoes it.

        While merged, the forward pass costs what the base model's does, the
        original weights are kept for an exact unmerge (one more copy of every
        adapted weight in memory while merged), and taking gradients
        with respect to the adapters raises ``AdapterStateError``: unmerge
        before training. A QLoRA weight is dequantized, updated and quantized
        again, so its merged outputs differ from the unmerged ones by up to
        the quantization's own rounding; use :meth:`merge_and_unload` for an
        exact float model.

        Raises:
            AdapterStateError: Already merged, or inside ``disable_adapter()``.
            UnmergeableAdapterError: An adapter's update has no exact form as a
                weight change.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> model.merge_adapter()
            >>> model.merged
            True
            >>> model.unmerge_adapter()
            >>> model.merged
            False
        """
        _merging.merge_adapter(self.model)

    def unmerge_adapter(self) -> None:
        """Takes the adapters out of the base weights, restoring them bit for bit.

        Raises:
            AdapterStateError: Not merged, or inside ``disable_adapter()``.
        """
        _merging.unmerge_adapter(self.model)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the model computes exactly what the base model computes.

        The adapters are restored when the block ends, also when it raises;
        merged adapters are unmerged for the block and merged again after it.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> x = jnp.ones((2, 4))
            >>> with model.disable_adapter():
            ...     bool((model(x) == base(x)).all())
            True
        """
        return _merging.disable_adapter(self.model)

    # --- Checkpoints: nnx_peft/_checkpoint.py (Orbax), nnx_peft/_safetensors.py ---

    def save_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        """Saves the adapter weights and their JSON description with Orbax, atomically.

        ``path`` becomes an Orbax ``CheckpointManager`` directory with one step.
        Its ``adapter`` item holds the adapter weights keyed by variable path
        relative to ``self.model``; its ``description`` item is JSON: the full
        ``LoraConfig``, the nnx_peft version, every adapter's module path,
        shapes and dtype, and each array's checksum. The base weights are not
        saved. See ``docs/checkpoints.md``.

        Args:
            path: A directory that does not exist, is empty, or holds an adapter
                checkpoint to replace.
            overwrite: Replace an adapter checkpoint already at ``path``. The new
                one is complete on disk before the old one is deleted, so an
                interrupted save leaves the old one loadable.
            adapter_name: The adapter to save, with its own config; ``None``: the
                model's only one. A checkpoint holds one adapter, whatever its name.

        Raises:
            AdapterNameError: ``adapter_name`` is unknown, or ``None`` while the model
                has several adapters.
            CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite``
                is False; or ``path`` is a file or a directory with other
                content, which is never replaced.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> tmp = tempfile.TemporaryDirectory()
            >>> model.save_adapter(f"{tmp.name}/adapter")
            >>> loaded = nnx_peft.PeftModel.from_pretrained(
            ...     base, f"{tmp.name}/adapter", jnp.ones((1, 4)), rngs=nnx.Rngs(2)
            ... )
            >>> bool((loaded(jnp.ones((2, 4))) == model(jnp.ones((2, 4)))).all())
            True
            >>> tmp.cleanup()
        """
        with self._only(adapter_name, "save_adapter"):
            _checkpoint.save_adapter(self, path, overwrite=overwrite)

    def load_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        step: int | None = None,
        trainable: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        """Loads an adapter checkpoint into this wrapper, after checking all of it.

        The checkpoint must be an nnx_peft checkpoint saved with a ``LoraConfig``
        equal to ``self.config``, hold exactly this model's adapter arrays with
        the same shapes and dtypes (nothing is cast), and every array must
        match its checksum. All of this is checked before anything changes:
        if a check fails, the model is left exactly as it was.

        Args:
            path: A directory written by :meth:`save_adapter` (or by
                :meth:`save_training_checkpoint`, whose adapters are loaded).
            step: The step to load; ``None`` loads the newest.
            trainable: ``False`` loads for inference: ``self.eval()``, and the
                adapters are frozen (:attr:`trainable_filter` selects nothing and
                :meth:`make_optimizer` raises). ``True`` loads for further
                training: ``self.train()``, adapters trainable.
            adapter_name: The adapter to load into; ``None``: the model's only one. A
                name the model has no adapter of adds one (:meth:`add_adapter`, with the
                saved config and the wrapper's sample inputs), outside the active set.

        Raises:
            AdapterNameError: ``adapter_name`` is ``None`` while the model has several.
            NotACheckpointError: No nnx_peft checkpoint, or no such step, at ``path``.
            CorruptCheckpointError: Its files are unreadable or malformed, or
                fail their checksums.
            ConfigMismatchError: It was saved with another ``LoraConfig``; the
                message names the differing fields.
            CheckpointMismatchError: Arrays are missing, unexpected, or of another
                shape or dtype; the message lists their paths.
            AdapterStateError: The adapters are merged; unmerge them first.
        """
        added = adapter_name is not None and adapter_name not in self.adapter_names
        if adapter_name is not None and added:
            config = _checkpoint.saved_config(path, step)
            self.add_adapter(adapter_name, config, rngs=nnx.Rngs(0))  # values loaded next
        try:
            with self._only(adapter_name, "load_adapter"):
                _checkpoint.load_adapter(self, path, step=step)
        except BaseException:
            if adapter_name is not None and added:  # the model as it was
                self.delete_adapter(adapter_name)
            raise
        self._set_trainable(trainable)

    @classmethod
    def from_base_weights(
        cls,
        make_base: Callable[[], nnx.Module],
        path: str | os.PathLike[str],
        config: LoraConfig,
        *sample_args: Any,
        rngs: nnx.Rngs,
        sample_kwargs: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> PeftModel:
        """Wraps a base model that is never built in float, reading its weights from ``path``.

        The QLoRA path for models larger than memory: equal, bitwise, to
        ``PeftModel(make_base() with the weights at path, config, *sample_args, rngs=rngs)``,
        but ``make_base`` is only traced (its float weights are never computed),
        and the base weights are read one at a time, each placed straight into
        its sharded layout and, where ``config.weight_qtype`` quantizes it,
        quantized before the next is read. Peak memory is the quantized model
        plus the adapters plus about one float weight. Without ``weight_qtype``
        the same path loads a plain LoRA wrapper straight onto the mesh. Call
        it under ``jax.set_mesh(mesh)`` for a model annotated with sharding
        metadata. See ``docs/qlora.md``.

        Args:
            make_base: A function building the base model, e.g.
                ``lambda: Model(cfg, rngs=nnx.Rngs(0))``; its initialisation is traced
                only. Its RNG state (``nnx.Rngs`` kept by dropout layers) is its own.
            path: The base weights: an Orbax checkpoint directory of
                ``nnx.state(base)`` (``ocp.StandardCheckpointer().save(path, state)``),
                a ``.safetensors`` file or a directory of them, keyed by the
                ``/``-joined variable paths (``layers/0/attn/q_proj/kernel``). It
                holds every variable of the base but its RNG state, with the
                base's shapes and dtypes.
            config: As for :class:`PeftModel`.
            *sample_args: As for :class:`PeftModel`; ``jax.ShapeDtypeStruct`` is best.
            rngs: As for :class:`PeftModel`.
            sample_kwargs: As for :class:`PeftModel`.
            **keywords: As for :class:`PeftModel`.

        Returns:
            A new :class:`PeftModel`.

        Raises:
            NeedsBaseWeightsError: ``config`` starts trained arrays from the base
                weights (DoRA, PiSSA, OLoRA, ``modules_to_save``).
            NotACheckpointError: ``path`` holds no Orbax checkpoint or safetensors file.
            BaseWeightsMismatchError: A variable of the base is missing from
                ``path``, or has another shape or dtype there, or ``path`` holds
                one the base lacks; raised before any weight is read.
            TileSizeError: ``config.tile_size`` does not divide a weight; raised
                before any weight is read.
            Any error :class:`PeftModel` raises for ``config`` and the sample inputs.

        Example:
            >>> import tempfile
            >>> import jax
            >>> import jax.numpy as jnp
            >>> import orbax.checkpoint as ocp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> from nnx_peft import toy
            >>> cfg = toy.DecoderConfig(vocab_size=11)
            >>> tmp = tempfile.TemporaryDirectory()
            >>> base = toy.TinyDecoder(cfg, rngs=nnx.Rngs(0))
            >>> with ocp.StandardCheckpointer() as saver:
            ...     saver.save(f"{tmp.name}/base", nnx.state(base))
            >>> config = nnx_peft.LoraConfig(
            ...     rank=2, alpha=4.0, target=r".*proj", weight_qtype="nf4"
            ... )
            >>> model = nnx_peft.PeftModel.from_base_weights(
            ...     lambda: toy.TinyDecoder(cfg, rngs=nnx.Rngs(0)),
            ...     f"{tmp.name}/base",
            ...     config,
            ...     jax.ShapeDtypeStruct((1, 8), jnp.int32),
            ...     rngs=nnx.Rngs(1),
            ... )
            >>> model(jnp.zeros((2, 5), jnp.int32)).shape
            (2, 5, 11)
            >>> tmp.cleanup()
        """
        sample_kwargs = sample_keywords(sample_kwargs, keywords, "PeftModel.from_base_weights")
        return _base_weights.from_base_weights(
            cls, make_base, Path(path).expanduser(), config, sample_args, sample_kwargs, rngs
        )

    @classmethod
    def from_pretrained(
        cls,
        base_model: nnx.Module,
        path: str | os.PathLike[str],
        *sample_args: Any,
        rngs: nnx.Rngs,
        step: int | None = None,
        trainable: bool = False,
        sample_kwargs: Mapping[str, Any] | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        **keywords: Any,
    ) -> PeftModel:
        """Wraps ``base_model`` with the config saved at ``path`` and loads the saved adapters.

        Rank, alpha, targets, dropout and quantization all come from the
        checkpoint. ``base_model`` is not modified.

        Args:
            base_model: A model of the architecture the adapters were trained
                on, with the same base weights (they are not in the checkpoint).
            path: A directory written by :meth:`save_adapter` or
                :meth:`save_training_checkpoint`.
            *sample_args: Sample positional inputs, as for :class:`PeftModel`.
            rngs: Random state, as for :class:`PeftModel` (the initial adapter
                values are replaced; dropout streams start from it).
            step: The step to load; ``None`` loads the newest.
            trainable: ``False`` loads for inference, ``True`` for further
                training; see :meth:`load_adapter`.
            sample_kwargs: Sample keyword inputs by name, as for
                :class:`PeftModel` (``step``, ``trainable`` and ``rngs`` of the
                model's own call go here).
            adapter_name: The name of the loaded adapter in the new wrapper.
            **keywords: More sample keyword inputs.

        Returns:
            A new :class:`PeftModel` holding the saved adapters.

        Raises:
            ConfigMismatchError: The saved config does not fit ``base_model``
                (e.g. a target pattern matches none of its modules).
            NotACheckpointError: As for :meth:`load_adapter`.
            CorruptCheckpointError: As for :meth:`load_adapter`.
            CheckpointMismatchError: As for :meth:`load_adapter`.
            NotAModuleError: As for :class:`PeftModel` (likewise ``AlreadyWrappedError``,
                ``RngsError`` and ``SampleInputsError``).
        """
        sample_kwargs = sample_keywords(sample_kwargs, keywords, "PeftModel.from_pretrained")
        check_new_name(adapter_name, ())
        model = _checkpoint.from_pretrained(
            cls, base_model, path, sample_args, sample_kwargs, rngs=rngs, step=step
        )
        model._rename(adapter_name)
        model._set_trainable(trainable)
        return model

    def save_training_checkpoint(
        self, manager: ocp.AbstractCheckpointManager, step: int, optimizer: nnx.Optimizer
    ) -> bool:
        """Saves adapters, optimizer state and other model state as ``step`` of ``manager``.

        Restoring it with :meth:`restore_training_checkpoint` and feeding the
        same data from ``step`` on gives the same parameters as training
        straight through. Each step holds the ``adapter`` and ``description``
        items of :meth:`save_adapter`, plus ``optimizer`` (every array of
        ``optimizer``: step count and optax state) and ``model_state`` (the
        wrapped model's array variables that are not ``nnx.Param``, e.g.
        dropout RNG state). Base weights are not saved. ``manager`` decides
        which steps are saved and kept (keep the last 3 with
        ``preservation_policy=ocp.checkpoint_managers.LatestN(3)``) and whether
        saving is asynchronous (then call ``manager.wait_until_finished()``
        before reading). A step is committed atomically.

        Args:
            manager: An ``orbax.checkpoint.CheckpointManager`` on the checkpoint directory.
            step: The training step.
            optimizer: The optimizer training this model, e.g. from :meth:`make_optimizer`.

        Returns:
            Whether a save was started: ``False`` when ``manager``'s policy skips
            ``step``, and for a step not newer than the newest saved one (Orbax
            never overwrites a step).

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> import optax
            >>> import orbax.checkpoint as ocp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> optimizer = model.make_optimizer(optax.adam(1e-3))
            >>> tmp = tempfile.TemporaryDirectory()
            >>> options = ocp.CheckpointManagerOptions(
            ...     preservation_policy=ocp.checkpoint_managers.LatestN(3)
            ... )
            >>> with ocp.CheckpointManager(tmp.name, options=options) as manager:
            ...     model.save_training_checkpoint(manager, 100, optimizer)
            ...     manager.wait_until_finished()
            ...     model.restore_training_checkpoint(manager, optimizer)
            True
            100
            >>> tmp.cleanup()
        """
        self._require_one_adapter("save_training_checkpoint")
        return _checkpoint.save_training_checkpoint(self, manager, step, optimizer)

    def restore_training_checkpoint(
        self,
        manager: ocp.AbstractCheckpointManager,
        optimizer: nnx.Optimizer,
        *,
        step: int | None = None,
    ) -> int:
        """Restores a :meth:`save_training_checkpoint` step into this model and ``optimizer``.

        Checked as fully as :meth:`load_adapter`, for the optimizer and model
        state too, before anything changes. Build the model with the same
        config (or with :meth:`from_pretrained` and ``trainable=True``) and the
        optimizer with the same optax transformation, then restore, then go on
        from the returned step.

        Args:
            manager: An ``orbax.checkpoint.CheckpointManager`` on the checkpoint directory.
            optimizer: The optimizer to restore into, e.g. from :meth:`make_optimizer`.
            step: The step to restore; ``None`` restores the newest.

        Returns:
            The restored step.

        Raises:
            NotACheckpointError: No such step, or it holds no optimizer state (a
                :meth:`save_adapter` checkpoint).
            CorruptCheckpointError: As for :meth:`load_adapter`.
            ConfigMismatchError: As for :meth:`load_adapter`.
            CheckpointMismatchError: As for :meth:`load_adapter`; a different optax
                transformation shows as mismatched ``optimizer`` arrays.
            AdapterStateError: As for :meth:`load_adapter`.
        """
        self._require_one_adapter("restore_training_checkpoint")
        return _checkpoint.restore_training_checkpoint(self, manager, optimizer, step=step)

    def save_safetensors(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        """Exports the adapter weights to one safetensors file, for tools outside JAX.

        Tensors are keyed by variable path relative to ``self.model`` (e.g.
        ``layers/0/attn/q_proj/kernel_lora_a``); the file's metadata holds the
        JSON description under ``'nnx_peft'``. Written under a temporary name
        and renamed over ``path`` when complete. Needs the optional
        ``safetensors`` package (``pip install 'nnx_peft[safetensors]'``).
        In a multi-process job, call it on every process: adapters spread over
        several processes are gathered, and the first process writes the file.

        Args:
            path: The file to write.
            overwrite: Replace an existing file at ``path``.
            adapter_name: The adapter to export; ``None``: the model's only one.

        Raises:
            MissingDependencyError: safetensors is not installed.
            CheckpointExistsError: ``path`` exists and ``overwrite`` is False, or
                is a directory.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> tmp = tempfile.TemporaryDirectory()
            >>> model.save_safetensors(f"{tmp.name}/adapter.safetensors")
            >>> model.load_safetensors(f"{tmp.name}/adapter.safetensors", trainable=True)
            >>> tmp.cleanup()
        """
        with self._only(adapter_name, "save_safetensors"):
            _safetensors.save_safetensors(self, path, overwrite=overwrite)

    def load_safetensors(
        self,
        path: str | os.PathLike[str],
        *,
        trainable: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        """Loads adapter weights from a safetensors file, after checking all of it.

        Keys, shapes and dtypes must match this model's adapters exactly. A
        file written by :meth:`save_safetensors` is also checked for its
        ``LoraConfig`` and checksums, like :meth:`load_adapter`; a file from
        another tool, without that description, only for keys, shapes and
        dtypes. If a check fails, the model is left exactly as it was.

        Args:
            path: The safetensors file.
            trainable: ``False`` loads for inference, ``True`` for further
                training; see :meth:`load_adapter`.
            adapter_name: The adapter to load into; ``None``: the model's only one.

        Raises:
            MissingDependencyError: safetensors is not installed.
            NotACheckpointError: There is no file at ``path``.
            CorruptCheckpointError: It is not a readable safetensors file, or
                disagrees with its own description.
            ConfigMismatchError, CheckpointMismatchError, AdapterStateError:
                As for :meth:`load_adapter`.
        """
        with self._only(adapter_name, "load_safetensors"):
            _safetensors.load_safetensors(self, path)
        self._set_trainable(trainable)

    # --- Hugging Face PEFT folders: nnx_peft/_hf_peft.py ---

    @classmethod
    def from_hf_peft(
        cls,
        base_model: nnx.Module,
        path: str | os.PathLike[str],
        *sample_args: Any,
        rngs: nnx.Rngs,
        module_map: _hf_peft.ModuleMap,
        trainable: bool = False,
        **sample_kwargs: Any,
    ) -> PeftModel:
        """Wraps ``base_model`` with a Hugging Face PEFT LoRA adapter folder.

        The folder is what ``peft_model.save_pretrained(path)`` writes:
        ``adapter_config.json`` and ``adapter_model.safetensors``. Exactly the
        modules with tensors in the file are adapted; rank, alpha, rsLoRA,
        DoRA, ``rank_pattern`` / ``alpha_pattern`` (with PEFT's key semantics)
        and dropout come from the config. Each tensor is laid out like its NNX
        weight: PEFT's ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` are
        reshaped onto the weight's contracted and kept axes, heads flattened
        head-major as PyTorch does. No torch is needed; ``base_model`` is not
        modified, and a failed load returns nothing. See ``docs/hf-peft.md``.

        Args:
            base_model: The NNX model, with the base weights the adapter was
                trained on.
            path: The PEFT adapter folder.
            *sample_args: Sample positional inputs, as for :class:`PeftModel`.
            rngs: Random state, as for :class:`PeftModel`.
            module_map: NNX module path to PEFT module name: a sequence of
                ``(nnx_path_regex, hf_name_template)`` pairs (the first full
                match wins; the template is expanded with the match's groups,
                as ``re.Match.expand`` does) or a function ``str -> str | None``.
            trainable: ``False`` loads for inference, ``True`` for further
                training; see :meth:`load_adapter`.
            **sample_kwargs: Sample keyword inputs, as for :class:`PeftModel`.

        Returns:
            A new :class:`PeftModel` holding the adapter.

        Raises:
            HfConfigError: ``adapter_config.json`` is missing or invalid.
            UnsupportedPeftFieldError: The config or the tensors use a feature
                nnx_peft cannot reproduce (``fan_in_fan_out``, ``bias``,
                ``layers_to_transform``, another ``peft_type``, LoRA on
                embeddings, ``modules_to_save`` ...).
            HfTensorPlacementError: ``module_map`` places tensors on no module of
                the model, or one name on several modules.
            HfShapeError: A tensor's shape does not fit its NNX weight.
            FusedWeightError: A mapped weight is no single PyTorch ``Linear``
                (e.g. a fused ``(2, K, D, H)`` ``kv_einsum``).
            NotACheckpointError: There is no ``adapter_model.safetensors``.
            CorruptCheckpointError: The tensors cannot be read, or disagree with
                the config.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> from nnx_peft import toy
            >>> base = toy.TinyDecoder(toy.DecoderConfig(vocab_size=11), rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*mlp/up_proj")
            >>> ids = jnp.zeros((1, 4), jnp.int32)
            >>> model = nnx_peft.PeftModel(base, config, ids, rngs=nnx.Rngs(1))
            >>> module_map = [(r"layers/(\\d+)/mlp/up_proj", r"model.layers.\\1.mlp.up_proj")]
            >>> tmp = tempfile.TemporaryDirectory()
            >>> model.save_hf_peft(f"{tmp.name}/adapter", module_map=module_map)
            >>> loaded = nnx_peft.PeftModel.from_hf_peft(
            ...     base, f"{tmp.name}/adapter", ids, rngs=nnx.Rngs(2), module_map=module_map
            ... )
            >>> [info.module_path for info in loaded.adapters()]
            ['layers/0/mlp/up_proj', 'layers/1/mlp/up_proj']
            >>> tmp.cleanup()
        """
        model = _hf_peft.from_hf_peft(
            cls, base_model, path, sample_args, sample_kwargs, rngs=rngs, module_map=module_map
        )
        model._set_trainable(trainable)
        return model

    def save_hf_peft(
        self,
        path: str | os.PathLike[str],
        *,
        module_map: _hf_peft.ModuleMap,
        overwrite: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        """Exports the adapters as a Hugging Face PEFT folder, atomically.

        Writes ``adapter_config.json`` and ``adapter_model.safetensors`` with
        PEFT's key names (``base_model.model.<name>.lora_A.weight``, ...) and
        layouts, which ``peft.PeftModel.from_pretrained(hf_model, path)`` loads
        onto the PyTorch model with the same base weights. ``target_modules``,
        ``rank_pattern`` and ``alpha_pattern`` select exactly the adapted
        modules. The folder is written under a temporary name and renamed
        into place; an existing one is replaced only once the new one is complete.

        Args:
            path: The folder to write.
            module_map: NNX module path to PEFT module name; see :meth:`from_hf_peft`.
            overwrite: Replace a PEFT adapter folder already at ``path``.
            adapter_name: The adapter to export; ``None``: the model's only one.

        Raises:
            HfTensorPlacementError: ``module_map`` names no PEFT module for an
                adapted module, or one name for several.
            FusedWeightError: An adapted weight is no single PyTorch ``Linear``.
            UnsupportedPeftFieldError: The config uses ``modules_to_save`` or a
                PiSSA / OLoRA initialisation, which PEFT's format cannot hold.
            CheckpointExistsError: ``path`` holds an adapter and ``overwrite`` is
                False, or is a file or a folder with other content.
            AdapterStateError: The adapters are merged.
            MissingDependencyError: safetensors is not installed.
            ShardingError: Some adapter is spread over several hosts' devices.
        """
        with self._only(adapter_name, "save_hf_peft"):
            _hf_peft.save_hf_peft(self, path, module_map=module_map, overwrite=overwrite)

    def _set_trainable(self, trainable: bool) -> None:
        """Unfreezes the adapters and sets training mode, or freezes them and sets eval mode."""
        self._trainable = trainable
        if trainable:
            self.train()
        else:
            self.eval()


def _check_streams(rngs: nnx.Rngs, config: LoraConfig) -> None:
    """Raises :class:`RngsError` if ``rngs`` lacks a stream the adapters draw from.

    The factors are initialised from the ``params`` stream and adapter dropout
    draws from ``dropout`` (each falls back to ``default``, which ``nnx.Rngs(seed)`` makes).
    """
    needed = ["params"] + (["dropout"] if config.dropout > 0 else [])
    missing = [name for name in needed if name not in rngs and "default" not in rngs]
    if missing:
        raise RngsError(
            f"rngs has no {' or '.join(repr(n) for n in missing)} stream (it has "
            f"{sorted(rngs)}), and no 'default' stream to fall back on: the adapters are "
            "initialised from 'params'"
            + (" and dropout draws from 'dropout'" if config.dropout > 0 else "")
            + ". Pass rngs=nnx.Rngs(seed), or name every stream: "
            "nnx.Rngs(params=0, dropout=1)."
        )


def merge(graphdef: nnx.GraphDef[PeftModel], trainable: nnx.State, rest: nnx.State) -> PeftModel:
    """Rebuilds a :class:`PeftModel` from :meth:`PeftModel.split_trainable` output.

    The exact inverse of ``split_trainable``: same variables, same outputs. Use
    it inside a pure ``jax.jit`` step to call the model on the current
    trainable state.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import nnx_peft
        >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
        >>> graphdef, trainable, rest = model.split_trainable()
        >>> same = nnx_peft.merge(graphdef, trainable, rest)
        >>> bool((same(jnp.ones((1, 4))) == model(jnp.ones((1, 4)))).all())
        True
    """
    # copy=True: the model gets Variables of its own, so it can be built from states
    # traced outside the current transform (``rest`` inside ``jax.grad``, say) and
    # still update its RNG counters and batch statistics there.
    return nnx.merge(graphdef, trainable, rest, copy=True)
