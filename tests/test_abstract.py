"""Abstract sample inputs and abstract wrapping (``nnx_peft/_abstract.py``).

Invariants checked here:
- wrapping with ``jax.ShapeDtypeStruct`` sample inputs (alone or mixed with concrete
  ones) gives exactly the wrapper that zeros of the same shapes give: same graph
  definition, bitwise equal arrays, the same RNG draws, and the base weights the wrap
  leaves alone are the caller's own arrays (no copy);
- ``inspect_targets`` takes abstract inputs and reports what wrapping creates;
- ``nnx.eval_shape`` of a wrapper's creation gives every variable's shape and dtype
  (QLoRA: the quantized ones) as the concrete wrapper has them;
- abstract inputs a model cannot take raise ``SampleShapeError`` naming the module;
- ``PeftModel.from_base_weights`` (an Orbax checkpoint or safetensors files) gives, bitwise,
  the wrapper of the eager wrap (QLoRA and plain LoRA), with the same variable types and
  metadata, without using the base's own initial values; base weights that do not fit,
  and a QLoRA tile that does not divide a weight, are refused before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hypothesis import given

import nnx_peft
from nnx_peft import _base_weights
from nnx_peft.toy import DecoderConfig, TinyDecoder
from tests.strategies import Case, cases

CFG = DecoderConfig(vocab_size=11)
TOKENS = jax.ShapeDtypeStruct((2, 5), jnp.int32)


def _flat(model: nnx.Module) -> list[tuple[Any, Any]]:
    return [(path, v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))]


def _assert_same(a: nnx.Module, b: nnx.Module) -> None:
    assert nnx.graphdef(a) == nnx.graphdef(b)
    flat_a, flat_b = _flat(a), _flat(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert bool((x == y).all()), path


@pytest.mark.parametrize("weight_qtype", [None, "nf4"])
def test_abstract_inputs_wrap_as_zeros_do(weight_qtype: str | None) -> None:
    config = nnx_peft.LoraConfig(
        rank=2, alpha=4.0, target=r".*(proj|lm_head)", weight_qtype=weight_qtype
    )
    base = TinyDecoder(CFG, rngs=nnx.Rngs(0))
    rngs_eager, rngs_abstract = nnx.Rngs(1), nnx.Rngs(1)
    eager = nnx_peft.PeftModel(base, config, jnp.zeros((2, 5), jnp.int32), rngs=rngs_eager)
    abstract = nnx_peft.PeftModel(base, config, TOKENS, rngs=rngs_abstract)
    _assert_same(eager, abstract)
    assert rngs_abstract.params.count.get_value() == rngs_eager.params.count.get_value()
    # Weights the wrap does not change are the base model's arrays, not copies.
    assert abstract.model.embed.embedding.get_value() is base.embed.embedding.get_value()
    tokens = jnp.arange(6, dtype=jnp.int32).reshape(1, 6)
    assert bool((abstract(tokens) == eager(tokens)).all())


@given(case=cases())
def test_abstract_inputs_on_random_models(case: Case) -> None:
    base = case.build()
    x = case.sample()
    eager = nnx_peft.PeftModel(base, case.config, jnp.zeros_like(x), rngs=nnx.Rngs(1))
    sds = jax.ShapeDtypeStruct(x.shape, x.dtype)
    abstract = nnx_peft.PeftModel(base, case.config, sds, rngs=nnx.Rngs(1))
    _assert_same(eager, abstract)


class TwoInputs(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.a = nnx.Linear(4, 3, rngs=rngs)
        self.b = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x: jax.Array, *, y: jax.Array) -> jax.Array:
        return self.a(x) + self.b(y)


def test_mixed_concrete_and_abstract_inputs() -> None:
    base = TwoInputs(nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="a|b")
    x, y = jnp.ones((2, 4)), jnp.zeros((2, 6))
    eager = nnx_peft.PeftModel(base, config, x, y=y, rngs=nnx.Rngs(1))
    mixed = nnx_peft.PeftModel(
        base, config, x, y=jax.ShapeDtypeStruct((2, 6), jnp.float32), rngs=nnx.Rngs(1)
    )
    _assert_same(eager, mixed)


def test_inspect_targets_takes_abstract_inputs() -> None:
    base = TinyDecoder(CFG, rngs=nnx.Rngs(0))
    for target in (r".*mlp/.*", "all-linear"):
        config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=target)
        report = nnx_peft.inspect_targets(base, config, TOKENS)
        model = nnx_peft.PeftModel(base, config, TOKENS, rngs=nnx.Rngs(1))
        assert set(report.adapted) == {info.module_path for info in model.adapters()}


def test_from_pretrained_takes_abstract_inputs(tmp_path: Any) -> None:
    base = TinyDecoder(CFG, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*q_proj")
    model = nnx_peft.PeftModel(base, config, TOKENS, rngs=nnx.Rngs(1))
    model.save_adapter(tmp_path / "adapter")
    loaded = nnx_peft.PeftModel.from_pretrained(
        base, tmp_path / "adapter", TOKENS, rngs=nnx.Rngs(2)
    )
    for (p, x), (_, y) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)),
        nnx.to_flat_state(nnx.state(loaded, nnx.LoRAParam)),
        strict=True,
    ):
        assert bool((x.get_value() == y.get_value()).all()), p


@pytest.mark.parametrize("weight_qtype", [None, "nf4"])
@pytest.mark.parametrize("sample", [jnp.zeros((1, 4), jnp.int32), TOKENS])
def test_eval_shape_of_a_wrapper(weight_qtype: str | None, sample: Any) -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*proj", weight_qtype=weight_qtype)

    def create() -> nnx_peft.PeftModel:
        return nnx_peft.PeftModel(
            TinyDecoder(CFG, rngs=nnx.Rngs(0)), config, sample, rngs=nnx.Rngs(1)
        )

    abstract = nnx.eval_shape(create)
    concrete = create()
    assert nnx.graphdef(abstract) == nnx.graphdef(concrete)
    shapes = [(p, x.shape, x.dtype) for p, x in _flat(abstract)]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for _, x in _flat(abstract))
    assert shapes == [(p, x.shape, x.dtype) for p, x in _flat(concrete)]
    assert [i.module_path for i in abstract.adapters()] == [
        i.module_path for i in concrete.adapters()
    ]


class Wide(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.inner = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


@pytest.mark.parametrize("traced", [False, True])
def test_abstract_inputs_of_a_wrong_shape(traced: bool) -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="inner")
    bad = jax.ShapeDtypeStruct((2, 5), jnp.float32)

    def wrap() -> nnx_peft.PeftModel:
        return nnx_peft.PeftModel(Wide(nnx.Rngs(0)), config, bad, rngs=nnx.Rngs(1))

    with pytest.raises(nnx_peft.SampleShapeError, match=r"float32\[2, 5\].*module 'inner'"):
        nnx.eval_shape(wrap) if traced else wrap()
    with pytest.raises(nnx_peft.SampleShapeError, match="ShapeDtypeStruct must have a shape"):
        nnx_peft.inspect_targets(Wide(nnx.Rngs(0)), config, bad)


# --- PeftModel.from_base_weights ------------------------------------------------------------

QLORA = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(proj|lm_head)", weight_qtype="nf4")


def _make_base(seed: int = 5) -> Any:
    return lambda: TinyDecoder(CFG, rngs=nnx.Rngs(seed))


def _tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model))
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyDecoder, Path]:
    """A base model, saved as an Orbax checkpoint (``orbax``) and as safetensors (``st``)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("base")
    base = TinyDecoder(CFG, rngs=nnx.Rngs(0))
    with ocp.StandardCheckpointer() as saver:
        saver.save(folder / "orbax", nnx.state(base))
    (folder / "st").mkdir()
    tensors = _tensors(base)
    names = sorted(tensors)
    # Two files, as large models are split.
    save_file({k: tensors[k] for k in names[::2]}, str(folder / "st" / "part-1.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]}, str(folder / "st" / "part-2.safetensors"))
    return base, folder


@pytest.mark.parametrize("source", ["orbax", "st"])
@pytest.mark.parametrize("weight_qtype", [None, "nf4"])
def test_from_base_weights_equals_the_eager_wrap(
    saved: tuple[TinyDecoder, Path], source: str, weight_qtype: str | None
) -> None:
    base, folder = saved
    config = dataclasses.replace(QLORA, weight_qtype=weight_qtype)
    eager = nnx_peft.PeftModel(base, config, jnp.zeros((1, 8), jnp.int32), rngs=nnx.Rngs(1))
    # make_base's own initialisation (seed 5) is never used: every weight comes from disk.
    loaded = nnx_peft.PeftModel.from_base_weights(
        _make_base(),
        folder / source,
        config,
        jax.ShapeDtypeStruct((1, 8), jnp.int32),
        rngs=nnx.Rngs(1),
    )
    _assert_same(eager, loaded)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(eager)), nnx.to_flat_state(nnx.state(loaded)), strict=True
    ):
        assert type(a) is type(b) and a.get_metadata() == b.get_metadata(), path


class Reads:
    """Counts the weights read from any source."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for cls in (_base_weights._Orbax, _base_weights._Safetensors):
            original = cls.read

            def read(source: Any, *args: Any, _original: Any = original) -> Any:
                self.count += 1
                return _original(source, *args)

            monkeypatch.setattr(cls, "read", read)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda t: t.pop("lm_head/kernel"), "missing from the checkpoint: lm_head/kernel"),
        (
            lambda t: t.update({"lm_head/kernels": t.pop("lm_head/kernel")}),
            "missing from the checkpoint: lm_head/kernel\n.*not in the model: lm_head/kernels",
        ),
        (
            lambda t: t.update({"layers/1/mlp/up_proj/kernel": np.ones((64, 130), np.float32)}),
            r"layers/1/mlp/up_proj/kernel \(checkpoint \(64, 130\) float32, model \(64, 128\)",
        ),
        (
            lambda t: t.update({"final_norm/scale": np.ones(64, np.float16)}),
            r"final_norm/scale \(checkpoint \(64,\) float16, model \(64,\) float32\)",
        ),
    ],
)
def test_base_weights_that_do_not_fit(
    saved: tuple[TinyDecoder, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Any,
    named: str,
) -> None:
    from safetensors.numpy import save_file

    tensors = _tensors(saved[0])
    change(tensors)
    save_file(tensors, str(tmp_path / "base.safetensors"))
    reads = Reads(monkeypatch)
    with pytest.raises(nnx_peft.BaseWeightsMismatchError, match=named) as info:
        nnx_peft.PeftModel.from_base_weights(
            _make_base(), tmp_path / "base.safetensors", QLORA, TOKENS, rngs=nnx.Rngs(1)
        )
    assert isinstance(info.value, nnx_peft.CheckpointMismatchError)
    assert "nothing was read" in str(info.value)
    assert reads.count == 0


def test_a_tile_that_does_not_divide_a_weight(
    saved: tuple[TinyDecoder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Reads(monkeypatch)
    config = dataclasses.replace(QLORA, tile_size=48)
    with pytest.raises(nnx_peft.TileSizeError, match="tile_size=48 does not divide axis 0"):
        nnx_peft.PeftModel.from_base_weights(
            _make_base(), saved[1] / "orbax", config, TOKENS, rngs=nnx.Rngs(1)
        )
    assert reads.count == 0
    with pytest.raises(nnx_peft.TileSizeError):  # the eager wrap raises the same type
        nnx_peft.PeftModel(saved[0], config, TOKENS, rngs=nnx.Rngs(1))


@pytest.mark.parametrize(
    "change", [{"use_dora": True}, {"init": "olora"}, {"modules_to_save": ("lm_head",)}]
)
def test_configs_that_start_from_the_base_weights(
    saved: tuple[TinyDecoder, Path], change: dict[str, Any]
) -> None:
    config = dataclasses.replace(QLORA, weight_qtype=None, target=r".*q_proj", **change)
    with pytest.raises(nnx_peft.NeedsBaseWeightsError, match=f"LoraConfig {next(iter(change))}"):
        nnx_peft.PeftModel.from_base_weights(
            _make_base(), saved[1] / "orbax", config, TOKENS, rngs=nnx.Rngs(1)
        )


def test_no_base_weights_at_the_path(tmp_path: Path) -> None:
    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(nnx_peft.NotACheckpointError):
            nnx_peft.PeftModel.from_base_weights(
                _make_base(), path, QLORA, TOKENS, rngs=nnx.Rngs(1)
            )
    with pytest.raises(nnx_peft.NotAModuleError, match="make_base must return the base model"):
        nnx_peft.PeftModel.from_base_weights(
            lambda: {"w": jnp.ones(2)}, tmp_path, QLORA, TOKENS, rngs=nnx.Rngs(1)
        )


def test_on_an_eight_device_mesh(tmp_path: Path) -> None:
    """On a 2 x 4 mesh (a subprocess, ``tests/multidevice_abstract.py``): ``nnx.eval_shape``
    of a sharded creation gives every variable as a ShapeDtypeStruct with the sharding the
    eager wrap gives; the NNX sharded-init pattern under ``nnx.jit`` and
    ``from_base_weights`` (Orbax, safetensors) place every array there too, LoRA and QLoRA;
    abstract sample inputs and ``from_base_weights`` equal the eager wrap bitwise."""
    import os
    import subprocess
    import sys

    out = tmp_path / "report.json"
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, str(root / "tests" / "multidevice_abstract.py"), str(out)],
        check=True,
        env=env,
        timeout=1200,
    )
    report = json.loads(out.read_text())
    assert report["device_count"] == 8
    for qtype in ("None", "nf4"):
        runs = report[qtype]
        eager = runs["eager"]
        assert runs["eval_shape"]["abstract"]
        # Sharded for real: adapters and (QLoRA) quantized values over both mesh axes.
        assert eager["specs"]["model/layers/0/attn/q_proj/kernel_lora_b"] == [None, "tp", None]
        q_proj = "model/layers/0/attn/q_proj/kernel" + ("/array/qvalue" if qtype == "nf4" else "")
        assert eager["specs"][q_proj] == ["fsdp", "tp", None]
        for name, run in runs.items():
            assert run["specs"] == eager["specs"], (qtype, name)
            assert run["metadata"] == eager["metadata"], (qtype, name)
        for name in ("abstract_inputs", "orbax", "safetensors"):
            assert runs[name]["equal"] and runs[name]["max_diff"] == 0.0, (qtype, name)
        # Built inside one jit, the base's own initialisation may round differently.
        assert runs["jit"]["max_diff"] < 1e-4
