"""Training with PeftModel: nnx.jit with make_optimizer, and a pure jax.jit loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnx_peft
from nnx_peft.toy import TEXT_A, CharTokenizer, DecoderConfig, TinyDecoder, batches, next_token_loss

TOKENIZER = CharTokenizer(TEXT_A)
CONFIG = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=r".*(q_proj|v_proj|up_proj|down_proj)")
STEPS = 12


def _model(**config_kwargs: object) -> nnx_peft.PeftModel:
    base = TinyDecoder(
        DecoderConfig(vocab_size=TOKENIZER.vocab_size, num_layers=1, embed_dim=32, mlp_dim=64),
        rngs=nnx.Rngs(0),
    )
    config = nnx_peft.LoraConfig(**(CONFIG.to_dict() | config_kwargs))
    return nnx_peft.PeftModel(base, config, jnp.zeros((1, 8), jnp.int32), rngs=nnx.Rngs(1))


def _data() -> list[tuple[np.ndarray, np.ndarray]]:
    stream = batches(TOKENIZER.encode(TEXT_A), batch_size=4, seq_len=16, seed=0)
    return [next(stream) for _ in range(STEPS)]


@nnx.jit
def _nnx_step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer, x, y) -> jax.Array:
    def loss_fn(model: nnx_peft.PeftModel) -> jax.Array:
        return next_token_loss(model(x), y)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable_filter))
    loss, grads = grad_fn(model)
    optimizer.update(model, grads)
    return loss


def _train_nnx(model: nnx_peft.PeftModel, tx: optax.GradientTransformation) -> list[float]:
    optimizer = model.make_optimizer(tx)
    return [float(_nnx_step(model, optimizer, x, y)) for x, y in _data()]


def _train_pure(model: nnx_peft.PeftModel, tx: optax.GradientTransformation):
    graphdef, trainable, rest = model.split_trainable()
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, rest, opt_state, x, y):
        def loss_fn(trainable):
            m = nnx_peft.merge(graphdef, trainable, rest)
            loss = next_token_loss(m(x), y)
            return loss, nnx.state(m, nnx.Not(m.trainable_filter))  # RNG, stats, ...

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), rest, opt_state, loss

    losses = []
    for x, y in _data():
        trainable, rest, opt_state, loss = step(trainable, rest, opt_state, x, y)
        losses.append(float(loss))
    return losses, nnx_peft.merge(graphdef, trainable, rest)


def test_training_changes_only_trainable_leaves_and_lowers_the_loss() -> None:
    model = _model()
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(model.trainable_filter)))
    trainable_before = jax.tree.map(np.asarray, nnx.state(model, model.trainable_filter))
    losses = _train_nnx(model, optax.adam(3e-2))

    frozen_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(model.trainable_filter)))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    changed = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: not np.array_equal(a, b),
            nnx.state(model, model.trainable_filter),
            trainable_before,
        )
    )
    assert all(changed), "every adapter leaf should have been updated"
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "tx", [optax.adamw(1e-2), optax.sgd(0.5, momentum=0.9)], ids=["adamw", "sgd"]
)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_nnx_jit_loop_and_pure_jax_loop_agree(
    tx: optax.GradientTransformation, dropout: float
) -> None:
    # With dropout, both loops must also draw the same masks (RNG state threaded through).
    nnx_losses = _train_nnx(model_a := _model(dropout=dropout), tx)
    pure_losses, model_b = _train_pure(_model(dropout=dropout), tx)
    np.testing.assert_allclose(pure_losses, nnx_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
        nnx.state(model_b, model_b.trainable_filter),
        nnx.state(model_a, model_a.trainable_filter),
    )


def test_optimizer_state_covers_only_the_adapters() -> None:
    model = _model()
    optimizer = model.make_optimizer(optax.adam(1e-3))
    trainable_size = sum(x.size for x in jax.tree.leaves(nnx.state(model, model.trainable_filter)))
    moments = dict(nnx.to_flat_state(nnx.state(optimizer, nnx.OptVariable)))
    # adam keeps mu and nu, each shaped like the adapters and nothing else.
    assert {path[3:] for path in moments} == set(  # (opt_state, 0, mu|nu, *path)
        dict(nnx.to_flat_state(nnx.state(model, model.trainable_filter)))
    )
    assert sum(v.get_value().size for v in moments.values()) == 2 * trainable_size


def test_dropout_follows_train_and_eval() -> None:
    model = _model(dropout=0.5)
    for var in jax.tree.leaves(
        nnx.state(model, model.trainable_filter), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        var.set_value(jnp.ones_like(var.get_value()) * 0.1)
    x = jnp.asarray(_data()[0][0])
    model.eval()
    first, second = model(x), model(x)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    no_dropout = _model()
    nnx.update(no_dropout, nnx.state(model, model.trainable_filter))
    no_dropout.eval()
    np.testing.assert_array_equal(np.asarray(no_dropout(x)), np.asarray(first))
    model.train()
    a, b = model(x), model(x)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(first))


@pytest.mark.parametrize("qtype", nnx_peft.WEIGHT_QTYPES)
def test_qlora_trains_adapters_over_a_quantized_base(qtype: str) -> None:
    model = _model(weight_qtype=qtype, tile_size=16)
    rest = nnx.state(model, nnx.Not(model.trainable_filter))
    kernel_leaves = [
        (path, v) for path, v in nnx.to_flat_state(rest) if "q_proj" in path and "qvalue" in path
    ]
    assert kernel_leaves, "q_proj's kernel should be quantized"
    assert all(v.get_value().dtype != jnp.float32 for _, v in kernel_leaves)
    losses = _train_nnx(model, optax.adam(3e-2))
    assert losses[-1] < losses[0]
