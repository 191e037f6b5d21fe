"""Adapter checkpoints: Orbax save/load, resumable training, safetensors, and their safety.

Invariants checked here:
- save then load into a fresh wrapper of a freshly built base model is bitwise exact
  (outputs and every trainable leaf), for random models and configs too;
- a load that fails, for any reason, leaves the model exactly as it was (same graph
  definition, same bits in every variable), and raises an error naming the problem;
- an interrupted save (an exception inside the write, or a killed process) leaves the
  previous checkpoint at that path intact and loadable; nothing is replaced unless asked;
- training stopped and resumed from a checkpoint ends bitwise equal to training
  straight through on the same data.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder, next_token_loss

TINY = DecoderConfig(
    vocab_size=11, num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=16, max_len=16
)
TWO_LAYERS = dataclasses.replace(TINY, num_layers=2)
SAMPLE = jnp.zeros((1, 4), jnp.int32)
TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], jnp.int32)
CONFIG = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(q_proj|down_proj)")
Q_A = "layers/0/attn/q_proj/kernel_lora_a"


# --- Helpers ------------------------------------------------------------------------------


def wrap(
    config: nnx_peft.LoraConfig = CONFIG, cfg: DecoderConfig = TINY, *, seed: int = 1
) -> nnx_peft.PeftModel:
    """A wrapper of a freshly built tiny decoder (base weights always from seed 0)."""
    return nnx_peft.PeftModel(
        TinyDecoder(cfg, rngs=nnx.Rngs(0)), config, SAMPLE, rngs=nnx.Rngs(seed)
    )


def adapter_variables(model: nnx_peft.PeftModel) -> dict[str, nnx.Variable[Any]]:
    return {
        "/".join(map(str, path)): variable
        for path, variable in nnx.iter_graph(model.model)
        if isinstance(variable, nnx_peft.AdapterParam)
    }


def randomize(model: nnx_peft.PeftModel, seed: int) -> nnx_peft.PeftModel:
    """Gives every adapter random values (B is zero at init, which would hide mistakes)."""
    rng = np.random.default_rng(seed)  # numpy: no compilation for each new shape
    for variable in adapter_variables(model).values():
        value = variable.get_value()
        variable.set_value(jnp.asarray(rng.standard_normal(value.shape), value.dtype))
    return model


def adapter_bytes(model: nnx_peft.PeftModel) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every adapter's dtype, shape and raw bytes, by path."""
    return {
        path: (str(v.get_value().dtype), v.get_value().shape, np.asarray(v.get_value()).tobytes())
        for path, v in adapter_variables(model).items()
    }


def out_bytes(model: nnx.Module) -> bytes:
    return np.asarray(model(TOKENS)).tobytes()


def _raw(x: Any) -> np.ndarray:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def snapshot(node: Any) -> tuple[Any, list[tuple[str, tuple[int, ...], bytes]]]:
    """Graph definition (static attributes, modes) and the bits of every variable."""
    graphdef, state = nnx.split(node)
    leaves = [_raw(x) for x in jax.tree.leaves(state)]
    return graphdef, [(str(a.dtype), a.shape, a.tobytes()) for a in leaves]


def description_file(path: Path, step: int = 0) -> Path:
    return path / str(step) / "description" / "metadata"


def edit_description(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    file = description_file(path)
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nnx_peft.PeftModel]:
    """An adapter checkpoint of a wrapper with random adapters, and that wrapper."""
    model = randomize(wrap(), seed=3)
    model.save_adapter(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


# --- Round trips ----------------------------------------------------------------------------


def test_round_trip_into_fresh_base_is_bitwise(saved: tuple[Path, nnx_peft.PeftModel]) -> None:
    path, model = saved
    model.eval()
    base = TinyDecoder(TINY, rngs=nnx.Rngs(0))
    base_before = snapshot(base)
    loaded = nnx_peft.PeftModel.from_pretrained(base, path, SAMPLE, rngs=nnx.Rngs(99))
    assert loaded.config == model.config
    assert adapter_bytes(loaded) == adapter_bytes(model)
    assert out_bytes(loaded) == out_bytes(model)
    assert out_bytes(loaded) != out_bytes(base)  # the adapters do change the outputs
    assert snapshot(base)[1] == base_before[1]  # the base model is not modified


def test_load_adapter_into_existing_wrapper_is_bitwise(
    saved: tuple[Path, nnx_peft.PeftModel],
) -> None:
    path, model = saved
    target = wrap(seed=42)
    assert adapter_bytes(target) != adapter_bytes(model)
    target.load_adapter(path)
    assert adapter_bytes(target) == adapter_bytes(model)
    model.eval()
    assert out_bytes(target) == out_bytes(model)


def test_description_is_self_contained(saved: tuple[Path, nnx_peft.PeftModel]) -> None:
    path, model = saved
    data = json.loads(description_file(path).read_text())
    assert data["format"] == "nnx_peft.adapter_checkpoint"
    assert data["nnx_peft_version"] == nnx_peft.__version__
    assert data["base_model"] == "nnx_peft.toy.TinyDecoder"
    assert nnx_peft.LoraConfig.from_dict(data["config"]) == model.config
    assert data["adapters"] == [
        {
            "module_path": info.module_path,
            "weight": info.weight,
            "a_shape": list(info.a_shape),
            "b_shape": list(info.b_shape),
            "dtype": info.dtype,
            "rank": 2,
            "scale": 2.0,
            "variant": "lora",
            "magnitude_shape": None,
        }
        for info in model.adapters()
    ]
    stored = {
        path: (spec["shape"], spec["dtype"]) for path, spec in data["arrays"]["adapter"].items()
    }
    assert stored == {p: (list(s), d) for p, (d, s, _) in adapter_bytes(model).items()}
    assert list(data["arrays"]) == ["adapter"]  # only the adapters, never the base weights


class _Stack(nnx.Module):
    """Linear layers and an optional einsum head: a random small model for property tests."""

    def __init__(self, widths: list[int], dtype: Any, head: bool, *, rngs: nnx.Rngs) -> None:
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(a, b, **kw) for a, b in itertools.pairwise(widths)])
        self.head = nnx.Einsum("bd,dk->bk", (widths[-1], 3), **kw) if head else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.tanh(layer(x))
        return self.head(x) if self.head is not None else x


@st.composite
def _models_and_configs(draw: st.DrawFn) -> dict[str, Any]:
    widths = draw(st.lists(st.sampled_from([4, 6]), min_size=2, max_size=3))
    head = draw(st.booleans())
    names = [f"layers/{i}" for i in range(len(widths) - 1)] + (["head"] if head else [])
    targets = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    return {
        "widths": widths,
        "head": head,
        "dtype": draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        "config": nnx_peft.LoraConfig(
            rank=draw(st.integers(1, 3)),
            alpha=draw(st.sampled_from([1.0, 3.5, 16.0])),
            target=[re.escape(t) for t in targets],
        ),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(case=_models_and_configs())
def test_property_save_load_preserves_every_trainable_leaf(
    case: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    def build(seed: int) -> nnx.Module:
        return _Stack(case["widths"], case["dtype"], case["head"], rngs=nnx.Rngs(seed))

    sample = jnp.ones((1, case["widths"][0]), case["dtype"])
    model = nnx_peft.PeftModel(build(0), case["config"], sample, rngs=nnx.Rngs(1))
    randomize(model, case["seed"])
    path = tmp_path_factory.mktemp("property") / "ckpt"
    model.save_adapter(path)
    loaded = nnx_peft.PeftModel.from_pretrained(build(0), path, sample, rngs=nnx.Rngs(2))
    assert loaded.config == model.config
    trainable = nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam))
    restored = dict(nnx.to_flat_state(nnx.state(loaded, nnx_peft.AdapterParam)))
    assert len(restored) == len(trainable) > 0
    for key, variable in trainable:
        a, b = np.asarray(variable.get_value()), np.asarray(restored[key].get_value())
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), key


# --- Inference or training -------------------------------------------------------------------


def test_loading_for_inference_freezes_adapters(saved: tuple[Path, nnx_peft.PeftModel]) -> None:
    path, _ = saved
    model = nnx_peft.PeftModel.from_pretrained(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), path, SAMPLE, rngs=nnx.Rngs(2)
    )
    assert model.trainable_filter == nnx.Nothing()
    assert not nnx.state(model, model.trainable_filter)
    with pytest.raises(nnx_peft.NothingTrainableError, match=r"loaded for inference") as info:
        model.make_optimizer(optax.adam(1e-3))
    assert "trainable=True" in str(info.value)


def test_loading_for_training_keeps_adapters_trainable(
    saved: tuple[Path, nnx_peft.PeftModel],
) -> None:
    path, _ = saved
    dropout = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*q_proj", dropout=0.5)
    source = randomize(wrap(dropout), seed=4)
    source.save_adapter(path.parent / "dropout")
    model = nnx_peft.PeftModel.from_pretrained(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)),
        path.parent / "dropout",
        SAMPLE,
        rngs=nnx.Rngs(2),
        trainable=True,
    )
    assert model.trainable_filter is nnx_peft.AdapterParam
    dropouts = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)]
    assert dropouts and not any(d.deterministic for d in dropouts)  # training mode
    optimizer = model.make_optimizer(optax.sgd(0.1))
    before = adapter_bytes(model)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, model.trainable_filter))
    optimizer.update(model, grads)
    assert adapter_bytes(model) != before
    model.load_adapter(path.parent / "dropout")  # default: inference
    assert all(d.deterministic for d in dropouts)
    assert model.trainable_filter == nnx.Nothing()


# --- Overwriting ------------------------------------------------------------------------------


def test_existing_checkpoint_is_not_overwritten_unless_asked(
    saved: tuple[Path, nnx_peft.PeftModel],
) -> None:
    path, model = saved
    other = randomize(wrap(), seed=8)
    with pytest.raises(nnx_peft.CheckpointExistsError, match=r"already holds .*overwrite=True"):
        other.save_adapter(path)
    check = wrap(seed=5)
    check.load_adapter(path)
    assert adapter_bytes(check) == adapter_bytes(model)
    other.save_adapter(path, overwrite=True)
    check.load_adapter(path)
    assert adapter_bytes(check) == adapter_bytes(other)
    assert sorted(p.name for p in path.iterdir()) == ["1"]  # the old step is gone


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_that_are_not_a_checkpoint_are_never_replaced(
    tmp_path: Path, overwrite: bool
) -> None:
    model = wrap()
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(nnx_peft.CheckpointExistsError, match=r"is a file"):
        model.save_adapter(file, overwrite=overwrite)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "data.csv").write_text("1,2")
    with pytest.raises(nnx_peft.CheckpointExistsError, match=r"data\.csv.*even with overwrite"):
        model.save_adapter(tmp_path / "dir", overwrite=overwrite)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "orbax", options=options) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)})))
    with pytest.raises(nnx_peft.CheckpointExistsError, match=r"not an nnx_peft adapter"):
        model.save_adapter(tmp_path / "orbax", overwrite=overwrite)
    assert file.read_text() == "keep me"
    assert (tmp_path / "dir" / "data.csv").read_text() == "1,2"
    assert sorted(p.name for p in (tmp_path / "orbax").iterdir()) == ["0"]


# --- Interrupted saves -----------------------------------------------------------------------


def _fail_after_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes Orbax write the adapter data, then fail before the step is committed."""
    original = ocp.StandardCheckpointHandler.async_save

    async def write_then_fail(self: Any, directory: Any, *args: Any, **kwargs: Any) -> Any:
        futures = await original(self, directory, *args, **kwargs)
        for future in futures or []:
            future.result()
        raise OSError("simulated: disk full")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", write_then_fail)


def test_interrupted_overwrite_leaves_previous_checkpoint_loadable(
    saved: tuple[Path, nnx_peft.PeftModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model = saved
    newer = randomize(wrap(), seed=9)
    with monkeypatch.context() as patch:
        _fail_after_writing(patch)
        with pytest.raises(OSError, match="simulated"):
            newer.save_adapter(path, overwrite=True)
    assert any(ocp.path.step.TMP_DIR_SUFFIX in p.name for p in path.iterdir())  # it did write
    check = wrap(seed=5)
    check.load_adapter(path)
    assert adapter_bytes(check) == adapter_bytes(model)
    newer.save_adapter(path, overwrite=True)  # a later save succeeds and cleans up
    check.load_adapter(path)
    assert adapter_bytes(check) == adapter_bytes(newer)
    assert not any(ocp.path.step.TMP_DIR_SUFFIX in p.name for p in path.iterdir())


def test_interrupted_first_save_leaves_nothing_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = randomize(wrap(), seed=2)
    with monkeypatch.context() as patch:
        _fail_after_writing(patch)
        with pytest.raises(OSError, match="simulated"):
            model.save_adapter(tmp_path / "ckpt")
    with pytest.raises(nnx_peft.NotACheckpointError, match="No checkpoint found"):
        wrap().load_adapter(tmp_path / "ckpt")
    model.save_adapter(tmp_path / "ckpt")  # no overwrite needed: nothing was committed
    check = wrap(seed=5)
    check.load_adapter(tmp_path / "ckpt")
    assert adapter_bytes(check) == adapter_bytes(model)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx
    import nnx_peft

    original = ocp.StandardCheckpointHandler.async_save

    async def die_after_writing(self, directory, *args, **kwargs):
        futures = await original(self, directory, *args, **kwargs)
        for future in futures or []:
            future.result()
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.StandardCheckpointHandler.async_save = die_after_writing
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
    model = nnx_peft.PeftModel(
        nnx.Linear(4, 3, rngs=nnx.Rngs(0)), config, jnp.ones((1, 4)), rngs=nnx.Rngs(7)
    )
    model.save_adapter(sys.argv[1], overwrite=True)
    """
)


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")

    def linear_wrapper(seed: int) -> nnx_peft.PeftModel:
        base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        return nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(seed))

    model = randomize(linear_wrapper(1), seed=6)
    model.save_adapter(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": str(Path(nnx_peft.__file__).parents[1])}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert any(ocp.path.step.TMP_DIR_SUFFIX in p.name for p in (tmp_path / "ckpt").iterdir())
    check = linear_wrapper(3)
    check.load_adapter(tmp_path / "ckpt")
    assert adapter_bytes(check) == adapter_bytes(model)


# --- Bad input: each refused with its own error, the model left exactly as it was -----------


def _swap_in_other_data(path: Path) -> None:
    """Replaces the arrays with those of another save: readable, but not what was described."""
    other = path.parent / "other"
    randomize(wrap(), seed=77).save_adapter(other)
    shutil.rmtree(path / "0" / "adapter")
    shutil.copytree(other / "0" / "adapter", path / "0" / "adapter")


def _foreign_orbax(path: Path) -> None:
    shutil.rmtree(path)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(path, options=options) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)})))


def _other_model(config: nnx_peft.LoraConfig, cfg: DecoderConfig) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        shutil.rmtree(path)
        randomize(wrap(config, cfg), seed=11).save_adapter(path)

    return save


def _other_arrays(change: Callable[[jax.Array], jax.Array]) -> Callable[[Path], None]:
    """Saves adapters of another shape or dtype (as a model of other width or dtype would)."""

    def save(path: Path) -> None:
        shutil.rmtree(path)
        model = randomize(wrap(), seed=11)
        for name, variable in adapter_variables(model).items():
            if name in (Q_A, "layers/0/mlp/down_proj/kernel_lora_b"):
                variable.set_value(change(variable.get_value()))
        model.save_adapter(path)

    return save


BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "missing path": (shutil.rmtree, nnx_peft.NotACheckpointError, r"No checkpoint found"),
    "empty directory": (
        lambda p: (shutil.rmtree(p), p.mkdir()),
        nnx_peft.NotACheckpointError,
        r"No checkpoint found",
    ),
    "other orbax checkpoint": (
        _foreign_orbax,
        nnx_peft.NotACheckpointError,
        r"is an Orbax checkpoint but not an nnx_peft one",
    ),
    "other format": (
        lambda p: edit_description(p, lambda d: d.update(format="something.else")),
        nnx_peft.NotACheckpointError,
        r"format 'something\.else', expected 'nnx_peft\.adapter_checkpoint'",
    ),
    "newer format version": (
        lambda p: edit_description(p, lambda d: d.update(format_version=3, nnx_peft_version="9.1")),
        nnx_peft.NotACheckpointError,
        r"format version 3, written by nnx_peft '9\.1'; .* reads versions 1 to 2\. Upgrade "
        r"nnx_peft to 9\.1 or newer",
    ),
    "description not json": (
        lambda p: description_file(p).write_text('{"format": "nnx_peft.adapter_checkp'),
        nnx_peft.CorruptCheckpointError,
        r"description of .* cannot be read",
    ),
    "description malformed": (
        lambda p: edit_description(p, lambda d: d["arrays"]["adapter"][Q_A].pop("checksum")),
        nnx_peft.CorruptCheckpointError,
        r"description of .* is malformed \(KeyError: 'checksum'\)",
    ),
    "saved config invalid": (
        lambda p: edit_description(p, lambda d: d["config"].update(rank=0)),
        nnx_peft.CorruptCheckpointError,
        r"is malformed \(ConfigError: LoraConfig\.rank",
    ),
    "arrays replaced": (
        _swap_in_other_data,
        nnx_peft.CorruptCheckpointError,
        rf"does not match the checksums in its description: adapter/{Q_A}",
    ),
    "data files truncated": (
        lambda p: [f.write_bytes(f.read_bytes()[:10]) for f in (p / "0" / "adapter").rglob("d/*")],
        nnx_peft.CorruptCheckpointError,
        r"arrays of .* cannot be read",
    ),
    "other alpha": (
        _other_model(nnx_peft.LoraConfig(rank=2, alpha=8.0, target=CONFIG.target), TINY),
        nnx_peft.ConfigMismatchError,
        r"differing fields: alpha: checkpoint 8\.0, model 4\.0",
    ),
    "unexpected keys": (
        _other_model(CONFIG, TWO_LAYERS),
        nnx_peft.CheckpointMismatchError,
        r"in the checkpoint but not in the model \(4\): layers/1/attn/q_proj/kernel_lora_a",
    ),
    "other targets": (
        _other_model(nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*down_proj"), TINY),
        nnx_peft.ConfigMismatchError,
        r"target: checkpoint \['\.\*down_proj'\]",
    ),
    "other shapes": (
        _other_arrays(lambda x: jnp.concatenate([x, x])),
        nnx_peft.CheckpointMismatchError,
        rf"of another shape or dtype \(2\): {Q_A} \(checkpoint \(16, 2\) float32, model "
        r"\(8, 2\) float32\), layers/0/mlp/down_proj/kernel_lora_b",
    ),
    "other dtype": (
        _other_arrays(lambda x: x.astype(jnp.bfloat16)),
        nnx_peft.CheckpointMismatchError,
        rf"{Q_A} \(checkpoint \(8, 2\) bfloat16, model \(8, 2\) float32\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_and_model_unchanged(
    saved: tuple[Path, nnx_peft.PeftModel], case: str
) -> None:
    path, _ = saved
    damage, error, message = BAD_CHECKPOINTS[case]
    damage(path)
    model = wrap(seed=21)  # fresh: trainable, in training mode, its own adapter values
    before = snapshot(model)
    with pytest.raises(error, match=message) as info:
        model.load_adapter(path)
    assert isinstance(info.value, nnx_peft.PeftError) and isinstance(info.value, ValueError)
    assert snapshot(model) == before


def test_a_failed_read_leaves_no_read_waking_a_closed_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orbax closes its event loop when one read fails, the others still running; each of
    those then woke the closed loop ("Event loop is closed", printed as an exception
    ignored in a TensorStore thread) after the load had raised. Many arrays make the
    failing read's siblings certain to be in flight."""
    config = nnx_peft.LoraConfig(rank=8, alpha=8.0, target=".*")

    def wide_wrapper(seed: int) -> nnx_peft.PeftModel:
        base = nnx.List([nnx.Linear(64, 64, rngs=nnx.Rngs(i)) for i in range(8)])
        model = nnx.Sequential(*base)
        return nnx_peft.PeftModel(model, config, jnp.ones((1, 64)), rngs=nnx.Rngs(seed))

    ignored: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(u.exc_value))
    for attempt in range(3):
        path = tmp_path / str(attempt)
        wide_wrapper(1).save_adapter(path)
        for data in (path / "0" / "adapter").rglob("d/*"):
            data.write_bytes(data.read_bytes()[:10])
        model = wide_wrapper(2)
        before = snapshot(model)
        with pytest.raises(nnx_peft.CorruptCheckpointError, match=r"arrays of .* cannot be read"):
            model.load_adapter(path)
        assert snapshot(model) == before
    time.sleep(1.0)  # a straggling read, if any, reports within milliseconds
    assert ignored == []


def test_flipped_data_byte_is_caught_by_checksum(tmp_path: Path) -> None:
    """Orbax restores a flipped byte in its data files silently; the checksums catch it."""
    config = nnx_peft.LoraConfig(rank=8, alpha=8.0, target=".*")

    def linear_wrapper(seed: int) -> nnx_peft.PeftModel:
        base = nnx.Linear(64, 64, rngs=nnx.Rngs(0))  # large enough for out-of-line data
        return nnx_peft.PeftModel(base, config, jnp.ones((1, 64)), rngs=nnx.Rngs(seed))

    randomize(linear_wrapper(1), seed=7).save_adapter(tmp_path / "ckpt")
    data = max((tmp_path / "ckpt" / "0" / "adapter").rglob("d/*"), key=lambda p: p.stat().st_size)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x10
    data.write_bytes(bytes(content))
    model = linear_wrapper(2)
    before = snapshot(model)
    with pytest.raises(nnx_peft.CorruptCheckpointError, match=r"does not match the checksums"):
        model.load_adapter(tmp_path / "ckpt")
    assert snapshot(model) == before


def test_mismatch_error_lists_every_offending_path(tmp_path: Path) -> None:
    """Missing keys with an equal config: the checkpoint's base model had fewer layers."""
    wrap(CONFIG, TINY).save_adapter(tmp_path / "one_layer")
    model = wrap(CONFIG, TWO_LAYERS)
    before = snapshot(model)
    with pytest.raises(nnx_peft.CheckpointMismatchError, match=r"missing from the checkpoint") as e:
        model.load_adapter(tmp_path / "one_layer")
    layer_1 = [
        f"layers/1/{m}/kernel_lora_{f}" for m in ("attn/q_proj", "mlp/down_proj") for f in "ab"
    ]
    assert e.value.missing == tuple(sorted(layer_1))
    assert e.value.unexpected == () and e.value.mismatched == ()
    assert all(p in str(e.value) for p in layer_1)
    assert snapshot(model) == before


def test_missing_step_is_refused(saved: tuple[Path, nnx_peft.PeftModel]) -> None:
    path, _ = saved
    model = wrap()
    before = snapshot(model)
    with pytest.raises(nnx_peft.NotACheckpointError, match=r"has no step 7; its steps are \[0\]"):
        model.load_adapter(path, step=7)
    assert snapshot(model) == before


def test_merged_model_refuses_to_load(saved: tuple[Path, nnx_peft.PeftModel]) -> None:
    path, _ = saved
    model = wrap()
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(nnx_peft.AdapterStateError, match=r"unmerge_adapter\(\) first"):
        model.load_adapter(path)
    assert snapshot(model) == before


def test_config_that_does_not_fit_the_base_model(saved: tuple[Path, nnx_peft.PeftModel]) -> None:
    path, _ = saved
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    before = snapshot(base)
    with pytest.raises(nnx_peft.ConfigMismatchError, match=r"does not fit this base model") as e:
        nnx_peft.PeftModel.from_pretrained(base, path, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
    assert "saved from nnx_peft.toy.TinyDecoder" in str(e.value)
    assert isinstance(e.value.__cause__, nnx_peft.TargetNotFoundError)
    assert snapshot(base) == before


def test_from_pretrained_refuses_arrays_that_do_not_fit(tmp_path: Path) -> None:
    wrap(CONFIG, TWO_LAYERS).save_adapter(tmp_path / "two_layers")
    with pytest.raises(nnx_peft.CheckpointMismatchError, match=r"layers/1/mlp/down_proj"):
        nnx_peft.PeftModel.from_pretrained(
            TinyDecoder(TINY, rngs=nnx.Rngs(0)), tmp_path / "two_layers", SAMPLE, rngs=nnx.Rngs(1)
        )


# --- Resumable training ----------------------------------------------------------------------


Trainer = Callable[[nnx_peft.PeftModel, nnx.Optimizer, jax.Array], None]


def _trainer(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer) -> Trainer:
    """A compiled training step for this pair and every pair of the same structure.

    ``nnx.jit`` would compile again for each new wrapper (Qwix gives each its own
    class); running each pair's state through one graph definition computes the
    same thing and compiles once.
    """
    graphdef = nnx.graphdef((model, optimizer))

    @jax.jit
    def step(state: nnx.State, batch: jax.Array) -> nnx.State:
        m, o = nnx.merge(graphdef, state)
        grads = nnx.grad(
            lambda m: next_token_loss(m(batch[:, :-1]), batch[:, 1:]),
            argnums=nnx.DiffState(0, m.trainable_filter),
        )(m)
        o.update(m, grads)
        return nnx.state((m, o))

    def train(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer, batch: jax.Array) -> None:
        nnx.update((model, optimizer), step(nnx.state((model, optimizer)), batch))

    return train


def _batch(step: int) -> jax.Array:
    return jax.random.randint(jax.random.key(step), (2, 6), 0, TINY.vocab_size)


def _manager(path: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep)
    )
    return ocp.CheckpointManager(path, options=options)


DROPOUT = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(q_proj|down_proj)", dropout=0.2)


def test_resumed_training_equals_straight_through(tmp_path: Path) -> None:
    straight = wrap(DROPOUT, seed=1)
    straight_opt = straight.make_optimizer(optax.adam(1e-2))
    _train_step = _trainer(straight, straight_opt)
    for step in range(6):
        _train_step(straight, straight_opt, _batch(step))

    first = wrap(DROPOUT, seed=1)
    first_opt = first.make_optimizer(optax.adam(1e-2))
    with _manager(tmp_path / "run", keep=2) as manager:
        for step in range(3):
            _train_step(first, first_opt, _batch(step))
            assert first.save_training_checkpoint(manager, step + 1, first_opt)
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3]  # the last two are kept
        assert not first.save_training_checkpoint(manager, 3, first_opt)  # never overwritten

    # A new process: fresh base model, fresh wrapper with other random adapters and RNG state.
    resumed = wrap(DROPOUT, seed=123)
    resumed_opt = resumed.make_optimizer(optax.adam(1e-2))
    assert snapshot(resumed)[1] != snapshot(first)[1]
    with _manager(tmp_path / "run", keep=2) as manager:
        start = resumed.restore_training_checkpoint(manager, resumed_opt)
    assert start == 3 and int(resumed_opt.step[...]) == 3
    for step in range(start, 6):
        _train_step(resumed, resumed_opt, _batch(step))

    assert adapter_bytes(resumed) == adapter_bytes(straight)
    assert snapshot(resumed)[1] == snapshot(straight)[1]  # every variable, RNG state included
    assert snapshot(resumed_opt)[1] == snapshot(straight_opt)[1]


def test_training_checkpoint_refuses_other_optimizer(tmp_path: Path) -> None:
    model = wrap()
    with _manager(tmp_path / "run", keep=1) as manager:
        model.save_training_checkpoint(manager, 1, model.make_optimizer(optax.adam(1e-3)))
        manager.wait_until_finished()
        sgd = model.make_optimizer(optax.sgd(1e-3))
        before = snapshot(model), snapshot(sgd)
        with pytest.raises(nnx_peft.CheckpointMismatchError, match=r"The optimizer arrays") as e:
            model.restore_training_checkpoint(manager, sgd)
    assert any("mu" in p for p in e.value.unexpected)
    assert (snapshot(model), snapshot(sgd)) == before


def test_adapter_checkpoint_has_no_optimizer_state(
    saved: tuple[Path, nnx_peft.PeftModel],
) -> None:
    path, _ = saved
    model = wrap()
    optimizer = model.make_optimizer(optax.adam(1e-3))
    before = snapshot(model), snapshot(optimizer)
    with (
        _manager(path, keep=1) as manager,
        pytest.raises(
            nnx_peft.NotACheckpointError, match=r"holds no 'optimizer' item .* load_adapter"
        ),
    ):
        model.restore_training_checkpoint(manager, optimizer)
    assert (snapshot(model), snapshot(optimizer)) == before


def test_training_checkpoint_loads_as_adapter(tmp_path: Path) -> None:
    model = randomize(wrap(), seed=5)
    with _manager(tmp_path / "run", keep=3) as manager:
        model.save_training_checkpoint(manager, 10, model.make_optimizer(optax.adam(1e-3)))
    loaded = nnx_peft.PeftModel.from_pretrained(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), tmp_path / "run", SAMPLE, rngs=nnx.Rngs(2)
    )
    assert adapter_bytes(loaded) == adapter_bytes(model)


# --- safetensors -------------------------------------------------------------------------------


def test_safetensors_round_trip_is_bitwise(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = randomize(wrap(), seed=12)
    file = tmp_path / "adapter.safetensors"
    model.save_safetensors(file)
    with safe_open(file, framework="np") as opened:
        assert sorted(opened.keys()) == sorted(adapter_variables(model))
        description = json.loads(opened.metadata()["nnx_peft"])
    assert nnx_peft.LoraConfig.from_dict(description["config"]) == model.config
    loaded = wrap(seed=30)
    loaded.load_safetensors(file)
    assert adapter_bytes(loaded) == adapter_bytes(model)
    model.eval()
    assert out_bytes(loaded) == out_bytes(model)


def test_safetensors_from_other_tools_are_checked_by_keys_shapes_dtypes(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    source = randomize(wrap(), seed=13)
    tensors = {path: np.asarray(v.get_value()) for path, v in adapter_variables(source).items()}
    save_file(tensors, tmp_path / "plain.safetensors")
    model = wrap(seed=31)
    model.load_safetensors(tmp_path / "plain.safetensors")
    assert adapter_bytes(model) == adapter_bytes(source)

    save_file({**tensors, "extra/kernel_lora_a": tensors[Q_A]}, tmp_path / "extra.safetensors")
    del tensors[Q_A]
    save_file(tensors, tmp_path / "missing.safetensors")
    before = snapshot(model)
    with pytest.raises(nnx_peft.CheckpointMismatchError, match=r"not in the model \(1\): extra"):
        model.load_safetensors(tmp_path / "extra.safetensors")
    with pytest.raises(nnx_peft.CheckpointMismatchError, match=rf"missing .* \(1\): {Q_A}"):
        model.load_safetensors(tmp_path / "missing.safetensors")
    assert snapshot(model) == before


def test_bad_safetensors_are_refused_and_model_unchanged(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    source = randomize(wrap(), seed=14)
    good = tmp_path / "good.safetensors"
    source.save_safetensors(good)
    (tmp_path / "junk.safetensors").write_bytes(b"\x07not a safetensors file")
    other_alpha = nnx_peft.LoraConfig(rank=2, alpha=1.0, target=CONFIG.target)
    wrap(other_alpha).save_safetensors(tmp_path / "alpha.safetensors")
    from safetensors import safe_open

    with safe_open(good, framework="np") as opened:
        metadata = opened.metadata()
        tensors = {k: opened.get_tensor(k) * 2 for k in opened.keys()}  # noqa: SIM118
    save_file(tensors, tmp_path / "tampered.safetensors", metadata=metadata)

    model = wrap(seed=32)
    before = snapshot(model)
    cases = [
        ("absent.safetensors", nnx_peft.NotACheckpointError, r"No safetensors file"),
        ("junk.safetensors", nnx_peft.CorruptCheckpointError, r"cannot be read as a safetensors"),
        ("alpha.safetensors", nnx_peft.ConfigMismatchError, r"alpha: checkpoint 1\.0"),
        ("tampered.safetensors", nnx_peft.CorruptCheckpointError, r"does not match the checksums"),
    ]
    for name, error, message in cases:
        with pytest.raises(error, match=message):
            model.load_safetensors(tmp_path / name)
        assert snapshot(model) == before, name


def test_safetensors_overwrite_and_interrupted_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    file = tmp_path / "adapter.safetensors"
    old = randomize(wrap(), seed=15)
    old.save_safetensors(file)
    new = randomize(wrap(), seed=16)
    with pytest.raises(nnx_peft.CheckpointExistsError, match=r"already exists.*overwrite=True"):
        new.save_safetensors(file)

    def write_half_then_fail(tensors: Any, filename: Any, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("simulated: disk full")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.numpy, "save_file", write_half_then_fail)
        with pytest.raises(OSError, match="simulated"):
            new.save_safetensors(file, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no partial file
    check = wrap(seed=33)
    check.load_safetensors(file)
    assert adapter_bytes(check) == adapter_bytes(old)
    new.save_safetensors(file, overwrite=True)
    check.load_safetensors(file)
    assert adapter_bytes(check) == adapter_bytes(new)


def test_missing_safetensors_package_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(
        nnx_peft.MissingDependencyError, match=r"pip install 'nnx_peft\[safetensors\]'"
    ) as e:
        wrap().save_safetensors(tmp_path / "adapter.safetensors")
    assert isinstance(e.value, nnx_peft.PeftError) and isinstance(e.value, ImportError)
    assert not (tmp_path / "adapter.safetensors").exists()
