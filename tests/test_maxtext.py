"""nnx_peft on MaxText's own NNX decoder (optional: needs MaxText 0.2.5, Python 3.12).

A tiny llama2 decoder, built by MaxText with ``scan_layers=True`` (its default layout:
every layer's weights stacked on ``param_scan_axis``, applied with ``jax.lax.scan``
over split state, ``nnx.merge`` inside the body) and with ``scan_layers=False``
(``layers_0``, ``layers_1``, ...), is wrapped with nnx_peft on its attention and MLP
projections. Skipped when MaxText is not installed; the recipe is in docs/scanned.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnx_peft

pytest.importorskip("maxtext")
# MaxText's layers read the mesh from the older `with mesh:` context, deprecated in JAX.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*context manager has been deprecated:DeprecationWarning"
)
nn = pytest.importorskip("flax.linen")
pyconfig = pytest.importorskip("maxtext.configs.pyconfig")
models = pytest.importorskip("maxtext.models.models")
quantizations = pytest.importorskip("maxtext.layers.quantizations")
maxtext_utils = pytest.importorskip("maxtext.utils.maxtext_utils")
globals_ = pytest.importorskip("maxtext.utils.globals")

LAYERS, SEQ, VOCAB = 2, 16, 128
TARGET = r"decoder/layers(_\d+)?/(self_attention/(query|key|value|out)|mlp/(wi_0|wi_1|wo))"
CONFIG = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=TARGET)
TOKENS = jax.random.randint(jax.random.key(3), (1, SEQ), 0, VOCAB)
POSITIONS = jnp.broadcast_to(jnp.arange(SEQ), (1, SEQ))
CALL = {"enable_dropout": False}


class MaxText:
    """A tiny MaxText llama2 Transformer, with the mesh and axis rules to call it under."""

    def __init__(self, scan_layers: bool) -> None:
        self.cfg = pyconfig.initialize(
            ["test", os.path.join(globals_.MAXTEXT_PKG_DIR, "configs", "base.yml")],
            decoder_block="llama2",
            scan_layers=scan_layers,
            attention="dot_product",
            hardware="cpu",
            skip_jax_distributed_system=True,
            base_num_decoder_layers=LAYERS,
            base_emb_dim=64,
            base_num_query_heads=4,
            base_num_kv_heads=4,
            head_dim=16,
            base_mlp_dim=128,
            vocab_size=VOCAB,
            max_target_length=SEQ,
            per_device_batch_size=1,
            enable_checkpointing=False,
            dtype="float32",
            weight_dtype="float32",
            run_name="nnx_peft_test",
            enable_dropout=False,
        )
        self.mesh = jax.sharding.Mesh(
            maxtext_utils.create_device_mesh(self.cfg), self.cfg.mesh_axes
        )
        with self.context():
            self.model = models.Transformer(
                self.cfg,
                self.mesh,
                quant=quantizations.configure_quantization(self.cfg),
                rngs=nnx.Rngs(params=0, dropout=1),
                model_mode="train",
            )

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and MaxText's logical axis rules, which its layers read when called."""
        with self.mesh, nn.logical_axis_rules(self.cfg.logical_axis_rules):
            yield


@pytest.fixture(scope="module")
def scanned() -> MaxText:
    return MaxText(scan_layers=True)


@pytest.fixture(scope="module")
def unscanned() -> MaxText:
    return MaxText(scan_layers=False)


def call(model: Any) -> jax.Array:
    return model(TOKENS, POSITIONS, **CALL)


def wrap(mt: MaxText) -> nnx_peft.PeftModel:
    return nnx_peft.PeftModel(
        mt.model, CONFIG, TOKENS, POSITIONS, rngs=nnx.Rngs(1), sample_kwargs=CALL
    )


def flat(model: nnx.Module, kind: type = nnx.Param) -> dict[str, nnx.Variable[Any]]:
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, kind))}


def as_scanned(path: str) -> tuple[str, int | None]:
    """``'decoder/layers_1/mlp/wo/kernel'`` -> (``'decoder/layers/mlp/wo/kernel'``, 1)."""
    match = re.fullmatch(r"decoder/layers_(\d+)/(.*)", path)
    return (
        (path, None) if match is None else (f"decoder/layers/{match.group(2)}", int(match.group(1)))
    )


def copy_layers(source: nnx.Module, target: nnx.Module, axis: int) -> None:
    """Sets every parameter of the unscanned ``target`` to its slice of the scanned ``source``."""
    ours = flat(source)
    for path, variable in flat(target).items():
        name, index = as_scanned(path)
        value = ours[name].get_value()
        variable.set_value(value if index is None else jnp.take(value, index, axis=axis))


def trained(peft: nnx_peft.PeftModel, mt: MaxText, steps: int = 5) -> Iterator[float]:
    """Adam steps on next-token cross-entropy, adapters only; yields the losses."""
    optimizer = nnx.Optimizer(peft, optax.adam(1e-2), wrt=peft.trainable_filter)
    labels = jnp.roll(TOKENS, -1, axis=1)

    @nnx.jit
    def step(peft: nnx_peft.PeftModel, optimizer: nnx.Optimizer) -> jax.Array:
        def loss(model: nnx_peft.PeftModel) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(call(model), labels).mean()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, peft.trainable_filter))(
            peft
        )
        optimizer.update(peft, grads)
        return value

    for _ in range(steps):
        yield float(step(peft, optimizer))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_wrap_train_merge(scan_layers: bool, request: pytest.FixtureRequest) -> None:
    """Fresh output is the base's bit for bit; training lowers the loss and moves only the
    adapters; merge_and_unload gives the adapted output."""
    mt: MaxText = request.getfixturevalue("scanned" if scan_layers else "unscanned")
    with mt.context():
        base_out = call(mt.model)
        peft = wrap(mt)
        infos = list(peft.adapters())
        assert len(infos) == 7 * (1 if scan_layers else LAYERS)
        if scan_layers:
            axis = mt.cfg.param_scan_axis
            assert {(i.layers, i.layer_axis) for i in infos} == {(LAYERS, axis)}
        assert bool(jnp.array_equal(call(peft), base_out))
        frozen = {k: np.asarray(v.get_value()) for k, v in flat(peft.model).items()}
        losses = list(trained(peft, mt))
        assert losses[-1] < losses[0]
        after = flat(peft.model)
        changed = {k for k, v in frozen.items() if not np.array_equal(v, after[k].get_value())}
        adapters = set(flat(peft.model, nnx_peft.AdapterParam))
        assert changed and changed <= adapters
        assert all(re.search(r"_lora_[ab]$", k) for k in changed)
        adapted = call(peft)
        merged = call(peft.merge_and_unload())
    scale = float(jnp.max(jnp.abs(adapted)))
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5 * scale)


def test_sharding_names_of_stacked_adapters(scanned: MaxText) -> None:
    """The layer axis keeps MaxText's 'layers' name; no factor takes the kernel's other names."""
    with scanned.context():
        peft = wrap(scanned)
    variables = flat(peft.model, nnx_peft.AdapterParam)
    a = variables["decoder/layers/self_attention/key/kernel_lora_a"]
    b = variables["decoder/layers/self_attention/key/kernel_lora_b"]
    # The kernel is (embed_attn, layers, kv_heads, kv_head_dim), 'layers' at
    # param_scan_axis 1; MaxText's DenseGeneral multiplies by it flattened to
    # (embed, heads * head_dim), so B's last axis stands for (kv_heads, kv_head_dim)
    # and keeps the name of the one the rules map to a mesh axis.
    assert a.get_value().shape == (64, LAYERS, 4) and b.get_value().shape == (4, LAYERS, 64)
    assert tuple(a.get_metadata()["out_sharding"]) == ("embed_attn", "layers", None)
    assert tuple(b.get_metadata()["out_sharding"]) == (None, "layers", "kv_heads")


def test_scanned_matches_unscanned_layer_by_layer(scanned: MaxText, unscanned: MaxText) -> None:
    """With the same weights and the same per-layer adapters, the scanned and unscanned
    MaxText decoders give the same adapted and merged outputs."""
    axis = scanned.cfg.param_scan_axis
    copy_layers(scanned.model, unscanned.model, axis)
    with scanned.context():
        base = call(scanned.model)
        peft_scanned = wrap(scanned)
        for seed, (name, variable) in enumerate(
            flat(peft_scanned.model, nnx_peft.AdapterParam).items()
        ):
            if name.endswith("_lora_b"):
                key = jax.random.key(seed)
                variable.set_value(0.05 * jax.random.normal(key, variable.get_value().shape))
        adapted_scanned = call(peft_scanned)
        merged_scanned = call(peft_scanned.merge_and_unload())
    with unscanned.context():
        np.testing.assert_allclose(call(unscanned.model), base, rtol=1e-5, atol=1e-5)
        peft_unscanned = wrap(unscanned)
        ours = flat(peft_scanned.model, nnx_peft.AdapterParam)
        for path, variable in flat(peft_unscanned.model, nnx_peft.AdapterParam).items():
            name, index = as_scanned(path)
            assert index is not None
            variable.set_value(jnp.take(ours[name].get_value(), index, axis=axis))
        adapted_unscanned = call(peft_unscanned)
        merged_unscanned = call(peft_unscanned.merge_and_unload())
    assert not np.allclose(adapted_scanned, base, atol=1e-3)  # the adapters do something
    np.testing.assert_allclose(adapted_scanned, adapted_unscanned, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged_scanned, merged_unscanned, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_on_maxtexts_stack_is_refused(scanned: MaxText) -> None:
    """MaxText stacks weights on param_scan_axis 1, where per-layer RNG keys cannot go."""
    config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=TARGET, dropout=0.1)
    with scanned.context(), pytest.raises(nnx_peft.LayerStackError, match="stacked on axis 1"):
        nnx_peft.PeftModel(
            scanned.model, config, TOKENS, POSITIONS, rngs=nnx.Rngs(1), sample_kwargs=CALL
        )
