"""Paths that used to save, load or train the wrong values silently (issue: reliability).

Invariants checked here:
- inside ``disable_adapter()`` nothing saves or loads the saved modules' values from
  before training, and a change to them inside the block is not silently undone;
- a merged model's ``nnx.state`` put into an unmerged wrapper is recognised as merged,
  so the update is never applied twice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_peft
from nnx_peft.toy import TinyDecoder
from tests.test_checkpoint import (
    CONFIG,
    SAMPLE,
    TINY,
    TOKENS,
    description_file,
    edit_description,
    randomize,
    snapshot,
    wrap,
)
from tests.test_targeting import SAVE, Classifier, X, _step, _trained

# --- disable_adapter() with modules_to_save ----------------------------------------------


def _saves(model: nnx_peft.PeftModel, tmp_path: Path) -> dict[str, Any]:
    optimizer = model.make_optimizer(optax.adam(1e-2))

    def training_checkpoint() -> None:
        with ocp.CheckpointManager((tmp_path / "t").absolute()) as manager:
            model.save_training_checkpoint(manager, 1, optimizer)

    return {
        "save_adapter": lambda: model.save_adapter(tmp_path / "a"),
        "save_safetensors": lambda: model.save_safetensors(tmp_path / "a.safetensors"),
        "save_training_checkpoint": training_checkpoint,
    }


@pytest.mark.parametrize("action", ["save_adapter", "save_safetensors", "save_training_checkpoint"])
def test_saving_inside_disable_adapter_is_refused(tmp_path: Path, action: str) -> None:
    _, model = _trained()
    save = _saves(model, tmp_path)[action]
    with model.disable_adapter():
        with pytest.raises(nnx_peft.AdapterStateError, match="disable_adapter") as info:
            save()
        assert action in str(info.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.safetensors").exists()
    assert not (tmp_path / "t").exists() or not list((tmp_path / "t").iterdir())


def test_loading_inside_disable_adapter_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    _, trained = _trained()
    trained.save_adapter(tmp_path / "a")
    trained.save_safetensors(tmp_path / "a.safetensors")
    trained.eval()
    model = nnx_peft.PeftModel(Classifier(rngs=nnx.Rngs(0)), SAVE, X, rngs=nnx.Rngs(1))
    model.eval()
    before = np.asarray(model(X))
    with model.disable_adapter():
        for load in (
            lambda: model.load_adapter(tmp_path / "a"),
            lambda: model.load_safetensors(tmp_path / "a.safetensors"),
        ):
            with pytest.raises(nnx_peft.AdapterStateError, match="disable_adapter"):
                load()
    np.testing.assert_array_equal(model(X), before)
    model.load_adapter(tmp_path / "a")  # after the block, it loads
    np.testing.assert_array_equal(model(X), trained(X))


def test_optimizer_updates_to_saved_modules_inside_disable_adapter_are_not_lost_silently() -> None:
    _, model = _trained()
    optimizer = model.make_optimizer(optax.sgd(1e-1))
    head = model.model.head.kernel.get_value()
    with (
        pytest.raises(nnx_peft.AdapterStateError, match="head/kernel") as info,
        model.disable_adapter(),
    ):
        _step(model, optimizer, X)
    assert "bn/mean" in str(info.value)  # the training forward's batch statistics too
    np.testing.assert_array_equal(model.model.head.kernel.get_value(), head)  # trained values back


def test_eval_forwards_inside_disable_adapter_are_fine() -> None:
    base, model = _trained()
    model.eval()
    base.eval()
    out = np.asarray(model(X))
    with model.disable_adapter():
        np.testing.assert_array_equal(model(X), base(X))
    np.testing.assert_array_equal(model(X), out)


# --- A merged state put into an unmerged wrapper -------------------------------------------


def _randomized() -> nnx_peft.PeftModel:
    model = nnx_peft.PeftModel(
        nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*"),
        jnp.ones((1, 4)),
        rngs=nnx.Rngs(1),
    )
    model.model.kernel_lora_b.set_value(jnp.ones((2, 3)))
    return model


def test_merged_state_updated_into_an_unmerged_wrapper_is_merged() -> None:
    model = _randomized()
    clone = nnx.clone(model)
    x = jnp.ones((2, 4))
    out = np.asarray(model(x))
    model.merge_adapter()
    nnx.update(clone, nnx.state(model))
    assert clone.merged
    np.testing.assert_allclose(clone(x), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(nnx_peft.AdapterStateError, match="already merged"):
        clone.merge_adapter()
    clone.unmerge_adapter()
    assert not clone.merged
    np.testing.assert_allclose(clone(x), out, rtol=1e-5, atol=1e-6)
    with clone.disable_adapter():
        np.testing.assert_array_equal(clone(x), nnx.Linear(4, 3, rngs=nnx.Rngs(0))(x))


# --- The description is covered by a checksum and cross-checked ----------------------------


def _flip_alpha_bit(path: Path) -> None:
    """Bit 0 of the first digit of alpha's value: 4.0 becomes 5.0, still valid JSON."""
    file = description_file(path)
    raw = bytearray(file.read_bytes())
    at = raw.index(b'"alpha": ') + len(b'"alpha": ')
    assert raw[at : at + 3] == b"4.0"
    raw[at] ^= 1
    file.write_bytes(bytes(raw))


def test_a_flipped_bit_in_the_description_is_caught(tmp_path: Path) -> None:
    randomize(wrap(), seed=3).save_adapter(tmp_path / "a")
    _flip_alpha_bit(tmp_path / "a")
    with pytest.raises(nnx_peft.CorruptCheckpointError, match="does not match its own checksum"):
        nnx_peft.PeftModel.from_pretrained(
            TinyDecoder(TINY, rngs=nnx.Rngs(0)), tmp_path / "a", SAMPLE, rngs=nnx.Rngs(2)
        )
    model = wrap(seed=5)
    before = snapshot(model)
    with pytest.raises(nnx_peft.CorruptCheckpointError):
        model.load_adapter(tmp_path / "a")
    assert snapshot(model) == before


def _as_version_1(data: dict[str, object]) -> None:
    data.pop("description_checksum")
    data["format_version"] = 1


def test_format_version_1_still_loads(tmp_path: Path) -> None:
    saved = randomize(wrap(), seed=3)
    saved.save_adapter(tmp_path / "a")
    edit_description(tmp_path / "a", _as_version_1)
    loaded = nnx_peft.PeftModel.from_pretrained(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), tmp_path / "a", SAMPLE, rngs=nnx.Rngs(2)
    )
    np.testing.assert_array_equal(loaded(TOKENS), saved(TOKENS))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["config"].update(alpha=5.0), "scale: recorded 2.0, model 2.5"),
        (lambda d: d["adapters"][0].update(rank=3), "rank: recorded 3, model 2"),
        (lambda d: d["adapters"][0].update(a_shape=[8, 3]), "a_shape: recorded [8, 3]"),
        (lambda d: d["adapters"].pop(), "not recorded"),
    ],
)
def test_recorded_adapters_are_cross_checked_against_the_rebuilt_model(
    tmp_path: Path, edit: object, field: str
) -> None:
    """Without a description checksum (format 1), the recorded adapters still catch edits."""
    randomize(wrap(), seed=3).save_adapter(tmp_path / "a")
    edit_description(tmp_path / "a", lambda d: (_as_version_1(d), edit(d)))  # type: ignore[operator]
    with pytest.raises(nnx_peft.CorruptCheckpointError, match=re.escape(field)):
        nnx_peft.PeftModel.from_pretrained(
            TinyDecoder(TINY, rngs=nnx.Rngs(0)), tmp_path / "a", SAMPLE, rngs=nnx.Rngs(2)
        )
    if not field.startswith("scale"):  # config unchanged: load_adapter reaches the check too
        model = wrap(CONFIG, seed=5)
        before = snapshot(model)
        with pytest.raises(nnx_peft.CorruptCheckpointError, match=re.escape(field)):
            model.load_adapter(tmp_path / "a")
        assert snapshot(model) == before


def test_safetensors_descriptions_are_checked_too(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    import safetensors.numpy

    randomize(wrap(), seed=3).save_safetensors(tmp_path / "a.safetensors")
    with open(tmp_path / "a.safetensors", "rb") as f:
        tensors = safetensors.numpy.load(f.read())
    from safetensors import safe_open

    with safe_open(tmp_path / "a.safetensors", framework="np") as f:
        metadata = f.metadata()
    data = json.loads(metadata["nnx_peft"])
    data["config"]["dropout"] = 0.5
    safetensors.numpy.save_file(
        tensors, tmp_path / "b.safetensors", metadata={"nnx_peft": json.dumps(data)}
    )
    with pytest.raises(nnx_peft.CorruptCheckpointError, match="own checksum"):
        wrap(seed=5).load_safetensors(tmp_path / "b.safetensors")


# --- State adapter checkpoints used to drop ------------------------------------------------

BASE_BN = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="embed|hidden", modules_to_save=["head"])


@pytest.mark.parametrize("kind", ["orbax", "safetensors"])
def test_base_batch_statistics_changed_by_training_reload_bit_for_bit(
    tmp_path: Path, kind: str
) -> None:
    _, model = _trained(BASE_BN)  # training-mode forwards moved the base's BatchNorm statistics
    model.eval()
    out = np.asarray(model(X))
    fresh = nnx_peft.PeftModel(Classifier(rngs=nnx.Rngs(0)), BASE_BN, X, rngs=nnx.Rngs(9))
    assert not np.array_equal(fresh.model.bn.mean.get_value(), model.model.bn.mean.get_value())
    if kind == "orbax":
        model.save_adapter(tmp_path / "a")
        fresh.load_adapter(tmp_path / "a")
    else:
        model.save_safetensors(tmp_path / "a.safetensors")
        fresh.load_safetensors(tmp_path / "a.safetensors")
    assert np.asarray(fresh(X)).tobytes() == out.tobytes()


def test_save_adapter_never_replaces_a_training_run(tmp_path: Path) -> None:
    model = randomize(wrap(), seed=3)
    optimizer = model.make_optimizer(optax.adam(1e-3))
    with ocp.CheckpointManager(tmp_path.absolute()) as manager:
        for step in (100, 200, 300):
            model.save_training_checkpoint(manager, step, optimizer)
        manager.wait_until_finished()
    with pytest.raises(nnx_peft.CheckpointExistsError, match=r"training run \(steps \[100, 200"):
        model.save_adapter(tmp_path, overwrite=True)
    with ocp.CheckpointManager(tmp_path.absolute()) as manager:
        assert sorted(manager.all_steps()) == [100, 200, 300]
        assert model.restore_training_checkpoint(manager, optimizer) == 300


@pytest.mark.parametrize("optimizer", [None, "adam", optax.adam(1e-3)])
def test_training_checkpoints_need_an_optimizer(tmp_path: Path, optimizer: object) -> None:
    model = wrap()
    with ocp.CheckpointManager(tmp_path.absolute()) as manager:
        with pytest.raises(nnx_peft.OptimizerError, match=r"nnx\.Optimizer"):
            model.save_training_checkpoint(manager, 1, optimizer)  # type: ignore[arg-type]
        assert not manager.all_steps()
        model.save_training_checkpoint(manager, 1, model.make_optimizer(optax.adam(1e-3)))
        manager.wait_until_finished()
        with pytest.raises(nnx_peft.OptimizerError, match=r"nnx\.Optimizer"):
            model.restore_training_checkpoint(manager, optimizer)  # type: ignore[arg-type]


# --- Raw exceptions and misleading messages ---------------------------------------------------


def test_a_file_in_the_way_of_a_checkpoint_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep me")
    model = wrap()
    with pytest.raises(nnx_peft.CheckpointExistsError, match="is a file"):
        model.save_adapter(tmp_path / "file" / "sub")
    with pytest.raises(nnx_peft.CheckpointExistsError, match="is a file"):
        model.save_safetensors(tmp_path / "file" / "a.safetensors")
    assert (tmp_path / "file").read_text() == "keep me"


def test_safetensors_export_makes_its_folder_like_save_adapter(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model = randomize(wrap(), seed=3)
    model.save_safetensors(tmp_path / "new" / "folder" / "a.safetensors")
    other = wrap(seed=5)
    other.load_safetensors(tmp_path / "new" / "folder" / "a.safetensors")
    np.testing.assert_array_equal(other(TOKENS), model(TOKENS))


def test_url_without_its_file_system_package(tmp_path: Path) -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    model = wrap()
    for call in (
        lambda: model.save_adapter("gs://no-bucket/adapter"),
        lambda: model.load_adapter("gs://no-bucket/adapter"),
    ):
        with pytest.raises(nnx_peft.MissingDependencyError, match="pip install gcsfs") as info:
            call()
        assert isinstance(info.value, ImportError)


def test_home_directory_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    model = randomize(wrap(), seed=3)
    model.save_adapter("~/adapter")
    assert (tmp_path / "adapter" / "0").is_dir()
    loaded = nnx_peft.PeftModel.from_pretrained(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), "~/adapter", SAMPLE, rngs=nnx.Rngs(2)
    )
    np.testing.assert_array_equal(loaded(TOKENS), model(TOKENS))
    if importlib.util.find_spec("safetensors") is not None:
        model.save_safetensors("~/adapter.safetensors")
        assert (tmp_path / "adapter.safetensors").is_file()
        loaded.load_safetensors("~/adapter.safetensors")


@pytest.mark.parametrize(
    ("rngs", "stream"),
    [(lambda: nnx.Rngs(dropout=0), "'params'"), (lambda: nnx.Rngs(params=0), "'dropout'")],
)
def test_rngs_without_the_streams_the_adapters_need(rngs: object, stream: str) -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*q_proj", dropout=0.1)
    with pytest.raises(nnx_peft.RngsError, match=f"has no {stream} stream"):
        nnx_peft.PeftModel(
            TinyDecoder(TINY, rngs=nnx.Rngs(0)),
            config,
            SAMPLE,
            rngs=rngs(),  # type: ignore[operator]
        )
    # Named streams are fine, and so is params alone without dropout.
    nnx_peft.PeftModel(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), config, SAMPLE, rngs=nnx.Rngs(params=0, dropout=1)
    )(TOKENS)
    no_dropout = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*q_proj")
    nnx_peft.PeftModel(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), no_dropout, SAMPLE, rngs=nnx.Rngs(params=0)
    )


@pytest.mark.parametrize("step", [0.0, "0", True, None])
def test_a_step_that_is_not_an_int_is_named_as_such(tmp_path: Path, step: object) -> None:
    model = wrap()
    model.save_adapter(tmp_path / "a")
    if step is None:
        model.load_adapter(tmp_path / "a", step=np.int64(0))  # type: ignore[arg-type]
        return
    with pytest.raises(nnx_peft.StepError, match=f"got {type(step).__name__} {step!r}"):
        model.load_adapter(tmp_path / "a", step=step)  # type: ignore[arg-type]


def test_numpy_scalars_are_accepted_in_lora_config() -> None:
    config = nnx_peft.LoraConfig(
        rank=np.int64(4),  # type: ignore[arg-type]
        alpha=np.float32(2.0),  # type: ignore[arg-type]
        dropout=np.float64(0.5),  # type: ignore[arg-type]
        target=".*",
        rank_pattern={".*q": np.int32(2)},  # type: ignore[dict-item]
        alpha_pattern={".*q": np.float16(3.0)},  # type: ignore[dict-item]
    )
    assert config == nnx_peft.LoraConfig(
        rank=4,
        alpha=2.0,
        dropout=0.5,
        target=".*",
        rank_pattern={".*q": 2},
        alpha_pattern={".*q": 3.0},
    )
    assert type(config.rank) is int and type(config.alpha) is float
    assert nnx_peft.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(nnx_peft.ConfigError, match="rank"):
        nnx_peft.LoraConfig(rank=np.bool_(True), alpha=2.0, target=".*")  # type: ignore[arg-type]


# --- shard_adapters moves DoRA magnitudes and modules_to_save parameters ----------------------


def _on_mesh(config: nnx_peft.LoraConfig) -> nnx_peft.PeftModel:
    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            init = nnx.initializers.lecun_normal()
            self.body = nnx.Linear(
                8, 4, kernel_init=nnx.with_partitioning(init, ("fsdp", "tp")), rngs=rngs
            )
            self.head = nnx.Linear(
                4, 4, kernel_init=nnx.with_partitioning(init, (None, None)), rngs=rngs
            )

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(self.body(x))

    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        return nnx_peft.PeftModel(Net(nnx.Rngs(0)), config, jnp.ones((1, 8)), rngs=nnx.Rngs(1))


def _spec(variable: nnx.Variable[Any]) -> tuple[Any, Any]:
    return variable.get_value().sharding.spec, variable.get_metadata().get("out_sharding")


DORA = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="body", use_dora=True)


def test_shard_adapters_moves_dora_magnitudes_with_b() -> None:
    model = _on_mesh(DORA)
    magnitude = model.model.body.kernel_lora_magnitude
    assert _spec(magnitude)[0] == P("tp")
    values = np.asarray(magnitude.get_value())
    model.shard_adapters({"body": (P("tp", None), P(None, "fsdp"))})
    assert _spec(model.model.body.kernel_lora_b)[0] == P(None, "fsdp")
    assert _spec(magnitude) == (P("fsdp"), ("fsdp",))  # follows B's output axis
    np.testing.assert_array_equal(magnitude.get_value(), values)
    model.shard_adapters({"body": (P(), P(), P(None))})  # or given explicitly
    assert _spec(magnitude) == (P(None), (None,))
    optimizer = model.make_optimizer(optax.adam(1e-3))  # its state follows
    assert optimizer is not None


def test_shard_adapters_moves_modules_to_save_parameters() -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="body", modules_to_save="head")
    model = _on_mesh(config)
    kernel = model.model.head.kernel
    assert _spec(kernel)[0] == P(None, None)
    model.shard_adapters({"body": (P(), P()), "head": {"kernel": P("tp", None), "bias": P()}})
    assert _spec(kernel) == (P("tp", None), ("tp", None))
    with pytest.raises(nnx_peft.ShardingError, match="lacks; its variables are"):
        model.shard_adapters({"head": {"kernal": P()}})
    with pytest.raises(nnx_peft.ShardingError, match="map its parameter paths to specs"):
        model.shard_adapters({"head": (P(), P())})
    assert _spec(kernel) == (P("tp", None), ("tp", None))  # nothing moved by a refused rule


# --- Concurrent saves to one path --------------------------------------------------------------

_RACER = """
import json, os, sys, time, traceback
import jax.numpy as jnp
import numpy as np
from flax import nnx
import nnx_peft

path, seed, start, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
config = nnx_peft.LoraConfig(rank=8, alpha=4.0, target=".*")
model = nnx_peft.PeftModel(
    nnx.Linear(256, 256, rngs=nnx.Rngs(0)), config, jnp.ones((1, 256)), rngs=nnx.Rngs(seed)
)
model.model.kernel_lora_b.set_value(jnp.full((8, 256), float(seed)))
open(start + f".{seed}", "w").close()
while not all(os.path.exists(start + f".{s}") for s in (1, 2)):
    time.sleep(0.01)
outcomes = []
for _ in range(rounds):
    try:
        model.save_adapter(path, overwrite=True)
        outcomes.append("saved")
    except nnx_peft.ConcurrentSaveError:
        outcomes.append("conflict")
    except Exception:
        traceback.print_exc()
        outcomes.append("raw")
print(json.dumps(outcomes))
"""


def test_concurrent_saves_never_lose_the_checkpoint_and_conflicts_raise(tmp_path: Path) -> None:
    """Two processes save to one path at once, repeatedly: every call saves or says why."""
    path = tmp_path / "adapter"
    wrap_linear = lambda seed: nnx_peft.PeftModel(  # noqa: E731
        nnx.Linear(256, 256, rngs=nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=8, alpha=4.0, target=".*"),
        jnp.ones((1, 256)),
        rngs=nnx.Rngs(seed),
    )
    first = wrap_linear(9)
    first.save_adapter(path)  # a previous good checkpoint
    env = {**os.environ, "PYTHONPATH": str(Path(nnx_peft.__file__).parents[1])}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(path), str(seed), str(tmp_path / "go"), "6"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outcomes = []
    try:
        for racer in racers:
            out, err = racer.communicate(timeout=300)  # a hang fails the test
            assert racer.returncode == 0, err[-3000:]
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for racer in racers:
            racer.kill()
    flat = [o for racer in outcomes for o in racer]
    assert "raw" not in flat, outcomes  # every failure is a ConcurrentSaveError
    assert "saved" in flat
    check = wrap_linear(5)
    check.load_adapter(path)  # the checkpoint is complete and passes its checksums
    b = np.asarray(check.model.kernel_lora_b.get_value())
    assert b.min() == b.max() and b.flat[0] in (1.0, 2.0), b.flat[:4]


# --- DoRA precision -------------------------------------------------------------------------


def _dora_linear(dtype: Any = jnp.float32) -> nnx_peft.PeftModel:
    base = nnx.Linear(2, 2, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*", use_dora=True)
    return nnx_peft.PeftModel(base, config, jnp.ones((1, 2), dtype), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("ratio", [1e-2, 1e-3, 1e-4])
def test_dora_norm_does_not_cancel_when_the_adapter_nearly_cancels_the_weight(
    ratio: float,
) -> None:
    """``||W + s A B||`` much smaller than ``||W||``: the error stays that of float32 itself.

    Any float32 evaluation of ``x W + s x A B`` cancels, to a relative error of about
    ``eps / ratio``; the expanded norm used to add ``eps / ratio**2`` on top.
    """
    model = _dora_linear()
    w = np.asarray(model.model.kernel.get_value(), np.float64)
    a = np.array([[1.0, 0.3], [-0.2, 0.9]])
    b = -(1 - ratio) * np.linalg.solve(a, w)  # scale 1: W + A B = ratio * W
    model.model.kernel_lora_a.set_value(jnp.asarray(a, jnp.float32))
    model.model.kernel_lora_b.set_value(jnp.asarray(b, jnp.float32))
    m = np.array([0.7, 1.3])
    model.model.kernel_lora_magnitude.set_value(jnp.asarray(m, jnp.float32))
    x = np.array([[0.5, -1.0], [2.0, 0.25]])
    # float64 reference from the float32 values the model holds
    a32, b32 = (
        np.asarray(v.get_value(), np.float64)
        for v in (model.model.kernel_lora_a, model.model.kernel_lora_b)
    )
    adapted = w + a32 @ b32
    want = (x @ adapted) * m / np.linalg.norm(adapted, axis=0)
    bound = 8 * 2.0**-24 / ratio
    got = np.asarray(model(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < bound
    merged = np.asarray(model.merge_and_unload()(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.abs(merged - want).max() / np.abs(want).max() < bound


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fresh_dora_in_low_precision_gives_the_base_outputs(dtype: Any) -> None:
    base = nnx.Linear(16, 8, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=".*", use_dora=True)
    model = nnx_peft.PeftModel(base, config, jnp.ones((1, 16), dtype), rngs=nnx.Rngs(1))
    assert model.model.kernel_lora_magnitude.get_value().dtype == jnp.float32
    x = jax.random.normal(jax.random.key(3), (4, 16), dtype)
    np.testing.assert_array_equal(np.asarray(model(x), np.float32), np.asarray(base(x), np.float32))
    np.testing.assert_array_equal(
        np.asarray(nnx.jit(lambda m, x: m(x))(model, x), np.float32),
        np.asarray(base(x), np.float32),
    )
