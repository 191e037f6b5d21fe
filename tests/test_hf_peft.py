"""Hugging Face PEFT folders: ``PeftModel.from_hf_peft`` / ``save_hf_peft``, ``LoraConfig.from_hf``.

Invariants checked here, without torch:
- an exported folder has PEFT's key names and layouts: ``scale * B @ A`` of every module
  is the change of its weight as PyTorch's ``Linear`` stores it (``(out, in)``, heads
  flattened head-major), the weight change ``merge_and_unload`` makes in NNX;
- export then import gives the same adapters, bit for bit, and the same outputs, for
  plain LoRA, rsLoRA, DoRA and per-module ranks and alphas;
- PEFT's name semantics (``target_modules``, pattern keys) are reproduced;
- every bad input raises its own error naming the key or field, and leaves the base
  model (and, on export, any existing folder) exactly as it was.

With tunix 0.1.7 installed, the adapter PEFT itself saved for a tiny Llama
(``../shared/fixtures/hf_peft_llama``) is checked against PEFT's logits.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft import _hf_config
from nnx_peft._adapter import adapters
from nnx_peft.toy import DecoderConfig, TinyDecoder
from tests import strategies

safetensors_numpy = pytest.importorskip("safetensors.numpy")

TOKENS = jnp.array([[1, 5, 2, 7, 3]], jnp.int32)
MAP = [
    (r"layers/(\d+)/attn/(q|k|v|o)_proj", r"model.layers.\1.self_attn.\2_proj"),
    (r"layers/(\d+)/mlp/(gate|up|down)_proj", r"model.layers.\1.mlp.\2_proj"),
]
PROJECTIONS = ["q", "k", "v", "o", "gate", "up", "down"]
D, N, H, F = 64, 4, 16, 128


def _decoder(embed_dim: int = D) -> TinyDecoder:
    return TinyDecoder(DecoderConfig(vocab_size=11, embed_dim=embed_dim), rngs=nnx.Rngs(0))


def _wrapped(**config: Any) -> nnx_peft.PeftModel:
    fields = {"rank": 2, "alpha": 4.0, "target": r".*_proj"} | config
    base = _decoder()
    return strategies.randomized_adapters(
        nnx_peft.PeftModel(base, nnx_peft.LoraConfig(**fields), TOKENS, rngs=nnx.Rngs(1))
    )


def _hf_name(path: str) -> str:
    layer, kind = re.fullmatch(r"layers/(\d+)/\w+/(\w+)_proj", path).groups()  # type: ignore[union-attr]
    block = "mlp" if kind in ("gate", "up", "down") else "self_attn"
    return f"model.layers.{layer}.{block}.{kind}_proj"


def _bits(model: nnx.Module) -> dict[str, bytes]:
    """Every array of ``model`` as bytes, by path: to check that nothing changed."""
    return {
        "/".join(map(str, path)): np.asarray(variable.get_value()).tobytes()
        for path, variable in nnx.iter_graph(model)
        if isinstance(variable, nnx.Variable) and isinstance(variable.get_value(), jax.Array)
    }


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, safetensors_numpy.load_file(folder / "adapter_model.safetensors")


def _write(folder: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _load(base: nnx.Module, folder: Path, **kwargs: Any) -> nnx_peft.PeftModel:
    return nnx_peft.PeftModel.from_hf_peft(
        base, folder, TOKENS, rngs=nnx.Rngs(2), **({"module_map": MAP} | kwargs)
    )


def _adapter_arrays(model: nnx_peft.PeftModel) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model.model, nnx_peft.AdapterParam))
    }


# --- Export: PEFT's names and layouts -----------------------------------------------------


def test_export_has_peft_names_and_shapes(tmp_path: Path) -> None:
    model = _wrapped(rank=3)
    model.save_hf_peft(tmp_path / "adapter", module_map=MAP)
    config, tensors = _read(tmp_path / "adapter")
    sizes = {"q": (D, N * H), "k": (D, N * H), "v": (D, N * H), "o": (N * H, D)}
    sizes |= {"gate": (D, F), "up": (D, F), "down": (F, D)}
    expected = {}
    for layer in (0, 1):
        for kind in PROJECTIONS:
            block = "mlp" if kind in ("gate", "up", "down") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{kind}_proj"
            n_in, n_out = sizes[kind]
            expected[f"{key}.lora_A.weight"] = (3, n_in)
            expected[f"{key}.lora_B.weight"] = (n_out, 3)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 4, False)
    assert config["target_modules"] == sorted(f"{k}_proj" for k in PROJECTIONS)
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False


def _torch_weight(kind: str, kernel: np.ndarray) -> np.ndarray:
    """A toy kernel as PyTorch's ``Linear.weight`` ``(out, in)``, heads flattened head-major."""
    if kind in ("q", "k", "v"):  # (D, N, H) -> (N*H, D)
        return kernel.reshape(kernel.shape[0], -1).T
    if kind == "o":  # (N, H, D) -> (D, N*H)
        return kernel.reshape(-1, kernel.shape[-1]).T
    return kernel.T  # nnx.Linear (in, out)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_exported_update_is_the_torch_linear_weight_change(
    tmp_path: Path, use_rslora: bool
) -> None:
    """``scale * B @ A`` of each exported module is the merge's weight change in torch layout."""
    model = _wrapped(rank=2, alpha=6.0, use_rslora=use_rslora)
    model.save_hf_peft(tmp_path / "adapter", module_map=MAP)
    config, tensors = _read(tmp_path / "adapter")
    scale = config["lora_alpha"] / (np.sqrt(config["r"]) if use_rslora else config["r"])
    base, merged = (
        dict(nnx.iter_modules(model.model)),
        dict(nnx.iter_modules(model.merge_and_unload())),
    )
    for path in (info.module_path for info in model.adapters()):
        key = ("layers", int(path.split("/")[1]), *path.split("/")[2:])
        kind = path.rsplit("/", 1)[-1].removesuffix("_proj")
        change = _torch_weight(kind, np.asarray(merged[key].kernel[...])) - _torch_weight(
            kind, np.asarray(base[key].kernel[...])
        )
        name = f"base_model.model.{_hf_name(path)}"
        update = scale * tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
        np.testing.assert_allclose(update, change, atol=2e-6, err_msg=path)


# --- Round trips ---------------------------------------------------------------------------


ROUND_TRIPS = {
    "lora": {},
    "rslora": {"use_rslora": True, "alpha": 3.0},
    "dora": {"use_dora": True},
    "patterns": {
        "rank_pattern": {r".*attn/q_proj": 4, r"layers/1/attn/k_proj": 3},
        "alpha_pattern": {r".*mlp/.*": 16.0},
    },
    "dropout": {"dropout": 0.1},
}


@pytest.mark.parametrize("config", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_export_then_import_is_exact(tmp_path: Path, config: dict[str, Any]) -> None:
    model = _wrapped(**config)
    model.save_hf_peft(tmp_path / "adapter", module_map=MAP)
    loaded = _load(_decoder(), tmp_path / "adapter")
    ours, theirs = _adapter_arrays(model), _adapter_arrays(loaded)
    assert ours.keys() == theirs.keys()
    for path, value in ours.items():
        np.testing.assert_array_equal(theirs[path], value, err_msg=path)
    assert [(i.module_path, i.rank, i.scale, i.variant) for i in loaded.adapters()] == [
        (i.module_path, i.rank, i.scale, i.variant) for i in model.adapters()
    ]
    assert loaded.config.dropout == model.config.dropout
    assert loaded.config.use_rslora == model.config.use_rslora
    assert loaded.config.use_dora == model.config.use_dora
    model.eval()
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))


def test_pattern_keys_round_trip_in_peft_semantics(tmp_path: Path) -> None:
    """A hand-written PEFT folder's pattern keys give PEFT's ranks and alphas, and come back."""
    r, ranks, alphas = 2, {"q_proj": 4, "layers.1.self_attn.k_proj": 3}, {"mlp\\..*": 16}
    tensors = {}
    rng = np.random.default_rng(0)
    names = []
    for layer in (0, 1):
        for kind in PROJECTIONS:
            path = (
                f"layers/{layer}/{'mlp' if kind in ('gate', 'up', 'down') else 'attn'}/{kind}_proj"
            )
            name = _hf_name(path)
            names.append((path, name))
            rank = _hf_config.HfSettings(
                r, 8.0, 0.0, False, False, tuple(ranks.items()), (), None, None, True
            ).rank(name)
            n_in, n_out = {"o": (N * H, D), "gate": (D, F), "up": (D, F), "down": (F, D)}.get(
                kind, (D, N * H)
            )
            tensors[f"base_model.model.{name}.lora_A.weight"] = rng.normal(size=(rank, n_in))
            tensors[f"base_model.model.{name}.lora_B.weight"] = rng.normal(size=(n_out, rank))
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"],
        "rank_pattern": ranks, "alpha_pattern": alphas, "task_type": "CAUSAL_LM",
    }  # fmt: skip
    loaded = _load(_decoder(), _write(tmp_path / "in", config, tensors))
    got = {info.module_path: (info.rank, info.scale) for info in loaded.adapters()}
    for path, name in names:
        rank = (
            4 if name.endswith("q_proj") else 3 if name == "model.layers.1.self_attn.k_proj" else r
        )
        alpha = 16 if ".mlp." in name else 8
        assert got[path] == (rank, alpha / rank), path
    loaded.save_hf_peft(tmp_path / "out", module_map=MAP)
    exported, again = _read(tmp_path / "out")
    assert exported["rank_pattern"] == ranks  # keys that end module names come back as typed
    assert exported["r"] == r and exported["lora_alpha"] == 8
    # A regex key comes back as keys of the same meaning: PEFT gives every module the same alpha.
    settings = _hf_config.parse(exported, "exported")
    assert all(settings.alpha(name) == (16 if ".mlp." in name else 8) for _, name in names)
    assert all(settings.rank(name) == got[path][0] for path, name in names)
    for key, value in tensors.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@given(
    layers=st.integers(1, 4),
    chosen=st.sets(st.tuples(st.integers(0, 3), st.sampled_from(PROJECTIONS)), min_size=1),
)
def test_selecting_key_selects_exactly_its_group(layers: int, chosen: set[tuple[int, str]]) -> None:
    names = [
        f"model.layers.{i}.{'mlp' if k in ('gate', 'up', 'down') else 'self_attn'}.{k}_proj"
        for i in range(layers)
        for k in PROJECTIONS
    ]
    group = [
        n
        for n in names
        if any(n.startswith(f"model.layers.{i}.") and n.endswith(f".{k}_proj") for i, k in chosen)
    ]
    if not group:
        return
    key = _hf_config.selecting_key(group, names)
    assert sorted(n for n in names if _hf_config.pattern_key([key], n)) == sorted(group)
    targets = _hf_config.target_modules(group, names)
    selected = [n for n in names if n in targets or any(n.endswith("." + t) for t in targets)]
    assert sorted(selected) == sorted(group)


def test_imported_adapter_trains_and_exports(tmp_path: Path) -> None:
    _wrapped().save_hf_peft(tmp_path / "adapter", module_map=MAP)
    frozen = _load(_decoder(), tmp_path / "adapter")
    with pytest.raises(nnx_peft.NothingTrainableError):
        frozen.make_optimizer(optax.sgd(0.1))
    model = _load(_decoder(), tmp_path / "adapter", trainable=True)
    before = _adapter_arrays(model)
    optimizer = model.make_optimizer(optax.adam(1e-2))

    def loss(m: nnx_peft.PeftModel) -> jax.Array:
        return jnp.mean(m(TOKENS) ** 2)

    for _ in range(3):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(model)
        optimizer.update(model, grads)
    trained = _adapter_arrays(model)
    assert all(not np.array_equal(trained[k], before[k]) for k in before)
    model.save_hf_peft(tmp_path / "trained", module_map=MAP)
    again = _load(_decoder(), tmp_path / "trained")
    model.eval()
    np.testing.assert_array_equal(np.asarray(again(TOKENS)), np.asarray(model(TOKENS)))


def test_callable_module_map(tmp_path: Path) -> None:
    model = _wrapped(target=r".*attn/q_proj")
    model.save_hf_peft(tmp_path / "adapter", module_map=lambda p: f"blocks.{p.replace('/', '.')}")
    _, tensors = _read(tmp_path / "adapter")
    assert sorted(tensors) == [
        f"base_model.model.blocks.layers.{i}.attn.q_proj.lora_{f}.weight"
        for i in (0, 1)
        for f in "AB"
    ]
    config, _ = _read(tmp_path / "adapter")
    assert config["target_modules"] == ["q_proj"]


def test_target_modules_name_each_module_when_a_suffix_would_select_more(tmp_path: Path) -> None:
    _wrapped(target=r"layers/0/attn/q_proj").save_hf_peft(tmp_path / "a", module_map=MAP)
    config, _ = _read(tmp_path / "a")
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


# --- LoraConfig.from_hf -------------------------------------------------------------------


def test_from_hf_translates_field_names_and_semantics() -> None:
    config = nnx_peft.LoraConfig.from_hf(
        {
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"],
            "use_rslora": True,
            "rank_pattern": {"v_proj": 2},
            "task_type": "CAUSAL_LM",
            "init_lora_weights": "gaussian",
        }
    )
    assert (config.rank, config.alpha, config.dropout, config.use_rslora, config.init) == (
        4, 8.0, 0.05, True, "gaussian"
    )  # fmt: skip
    model = nnx_peft.PeftModel(_decoder(), config, TOKENS, rngs=nnx.Rngs(0))
    got = {info.module_path: info.rank for info in model.adapters()}
    assert got == {f"layers/{i}/attn/{k}_proj": 2 if k == "v" else 4 for i in (0, 1) for k in "qv"}
    regex = nnx_peft.LoraConfig.from_hf({"target_modules": r".*mlp/up_proj"})
    assert regex.target == (r".*mlp/up_proj",)
    assert nnx_peft.LoraConfig.from_hf({"target_modules": "all-linear"}).target == ("all-linear",)


# --- Bad input: each its own error, nothing changed ---------------------------------------


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    _wrapped().save_hf_peft(tmp_path / "adapter", module_map=MAP)
    return tmp_path / "adapter"


def _edit_config(folder: Path, **fields: Any) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text()) | fields
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _edit_tensors(folder: Path, edit: Any) -> Path:
    tensors = safetensors_numpy.load_file(folder / "adapter_model.safetensors")
    safetensors_numpy.save_file(edit(tensors), folder / "adapter_model.safetensors")
    return folder


def _refused(base: nnx.Module, folder: Path, error: type[Exception], match: str, **kw: Any) -> None:
    before = _bits(base)
    graph_before = nnx.graphdef(base)
    with pytest.raises(error, match=match):
        _load(base, folder, **kw)
    assert _bits(base) == before and nnx.graphdef(base) == graph_before


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"peft_type": "IA3"}, "peft_type='IA3'.*LoRA adapters only"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True.*Conv1D"),
        ({"bias": "all"}, "bias='all'.*bias='none'"),
        ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\].*target_modules"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"a_future_field": 3}, "a_future_field=3 is not supported"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*Convert it in PEFT"),
    ],
)
def test_unsupported_peft_fields(exported: Path, fields: dict[str, Any], match: str) -> None:
    _refused(
        _decoder(), _edit_config(exported, **fields), nnx_peft.UnsupportedPeftFieldError, match
    )
    if "init_lora_weights" not in fields:  # LoraConfig.from_hf maps 'pissa' to init='pissa'
        with pytest.raises(nnx_peft.UnsupportedPeftFieldError, match=match):
            nnx_peft.LoraConfig.from_hf({"target_modules": ["q_proj"], **fields})


def test_missing_or_invalid_config(exported: Path) -> None:
    base = _decoder()
    (exported / "adapter_config.json").write_text("{not json")
    _refused(base, exported, nnx_peft.HfConfigError, "cannot be read as JSON")
    (exported / "adapter_config.json").write_text("[1, 2]")
    _refused(base, exported, nnx_peft.HfConfigError, "JSON list, not an object")
    (exported / "adapter_config.json").write_text(json.dumps({"r": "8"}))
    _refused(base, exported, nnx_peft.HfConfigError, "r must be a positive integer; got '8'")
    (exported / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": -1}))
    _refused(base, exported, nnx_peft.HfConfigError, "lora_alpha must be a positive number")
    (exported / "adapter_config.json").unlink()
    _refused(base, exported, nnx_peft.HfConfigError, "No adapter_config.json in")
    with pytest.raises(nnx_peft.HfConfigError, match="target_modules is missing"):
        nnx_peft.LoraConfig.from_hf({"r": 8})


def test_missing_or_damaged_weights(exported: Path) -> None:
    base = _decoder()
    (exported / "adapter_model.safetensors").write_bytes(b"garbage")
    _refused(base, exported, nnx_peft.CorruptCheckpointError, "cannot be read as a safetensors")
    (exported / "adapter_model.safetensors").unlink()
    _refused(base, exported, nnx_peft.NotACheckpointError, "No safetensors file")


def test_tensor_without_its_pair(exported: Path) -> None:
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    folder = _edit_tensors(exported, lambda t: {k: v for k, v in t.items() if k != key})
    _refused(_decoder(), folder, nnx_peft.CorruptCheckpointError, r"only \['A'\] for module")


def test_tensors_the_map_places_nowhere(exported: Path) -> None:
    _refused(
        _decoder(),
        exported,
        nnx_peft.HfTensorPlacementError,
        r"6 PEFT modules that module_map gives to no module.*model.layers.0.mlp.down_proj",
        module_map=MAP[:1],
    )


def test_tensors_for_modules_that_do_not_exist(exported: Path) -> None:
    def renamed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}

    _refused(
        _decoder(),
        _edit_tensors(exported, renamed),
        nnx_peft.HfTensorPlacementError,
        r"model\.layers\.7\.mlp\.down_proj",
    )


def test_one_name_for_several_modules(exported: Path) -> None:
    ambiguous = [(r"layers/\d+/attn/q_proj", "model.layers.0.self_attn.q_proj"), *MAP]
    _refused(
        _decoder(),
        exported,
        nnx_peft.HfTensorPlacementError,
        "gives the PEFT name 'model.layers.0.self_attn.q_proj' to several modules",
        module_map=ambiguous,
    )


def test_shapes_of_another_model_size(exported: Path) -> None:
    _refused(
        _decoder(embed_dim=32),
        exported,
        nnx_peft.HfShapeError,
        r"down_proj.lora_B.weight has shape \(64, 2\), but module 'layers/0/mlp/down_proj' .* "
        r"needs \(32, 2\)",
    )


def test_rank_disagreeing_with_config(exported: Path) -> None:
    _refused(
        _decoder(),
        _edit_config(exported, r=3),
        nnx_peft.HfShapeError,
        "has rank 2.*gives it rank 3",
    )


EMBED_MAP = [*MAP, ("embed", "model.embed_tokens")]
EMBED_KEY = "base_model.model.model.embed_tokens"


def test_embedding_round_trips_with_peft_names(tmp_path: Path) -> None:
    model = _wrapped(target=r"embed|.*attn/q_proj")
    model.save_hf_peft(tmp_path / "a", module_map=EMBED_MAP)
    config, tensors = _read(tmp_path / "a")
    assert sorted(config["target_modules"]) == ["embed_tokens", "q_proj"]
    hf_a, hf_b = tensors[EMBED_KEY + ".lora_embedding_A"], tensors[EMBED_KEY + ".lora_embedding_B"]
    assert (hf_a.shape, hf_b.shape) == ((2, 11), (D, 2))
    # PEFT's Embedding.get_delta_weight: (B @ A).T * scale, the change merging makes.
    table = np.asarray(_decoder().embed.embedding.get_value())
    merged = np.asarray(model.merge_and_unload().embed.embedding.get_value())
    np.testing.assert_allclose(merged - table, 2.0 * (hf_b @ hf_a).T, rtol=1e-5, atol=1e-6)
    loaded = _load(_decoder(), tmp_path / "a", module_map=EMBED_MAP)
    assert _adapter_arrays(loaded).keys() == _adapter_arrays(model).keys()
    for key, value in _adapter_arrays(model).items():
        np.testing.assert_array_equal(_adapter_arrays(loaded)[key], value, err_msg=key)
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))


def _peft_embedding_folder(folder: Path, base_table: np.ndarray | None) -> Path:
    """A PEFT folder as peft saves LoRA on embed_tokens (written without torch)."""
    rng = np.random.default_rng(0)
    tensors = {
        EMBED_KEY + ".lora_embedding_A": rng.normal(size=(2, 11)).astype(np.float32),
        EMBED_KEY + ".lora_embedding_B": rng.normal(size=(D, 2)).astype(np.float32),
    }
    if base_table is not None:  # save_embedding_layers: the full table rides along
        tensors[EMBED_KEY + ".base_layer.weight"] = base_table
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "target_modules": ["embed_tokens"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return _write(folder, config, tensors)


def test_peft_embedding_folder_gives_peft_semantics(tmp_path: Path) -> None:
    """PEFT's Embedding: ``E[ids] + F.embedding(ids, A.T) @ B.T * scale``, no dropout."""
    base = _decoder()
    table = np.asarray(base.embed.embedding.get_value())
    folder = _peft_embedding_folder(tmp_path / "a", table)
    model = _load(base, folder, module_map=EMBED_MAP)
    _, tensors = _read(folder)
    hf_a, hf_b = tensors[EMBED_KEY + ".lora_embedding_A"], tensors[EMBED_KEY + ".lora_embedding_B"]
    ids = np.asarray(TOKENS)
    looked_up = table[ids] + (hf_a.T[ids] @ hf_b.T) * 2.0
    # The same model with the table replaced so that its lookups give `looked_up`.
    expected_base = _decoder()
    expected_base.embed.embedding.set_value(jnp.asarray(table + 2.0 * (hf_b @ hf_a).T))
    np.testing.assert_allclose(
        np.asarray(expected_base.embed(TOKENS)), looked_up, rtol=1e-5, atol=1e-5
    )
    model.train()  # dropout 0.05 in the config: lookups take none, in training too
    np.testing.assert_allclose(
        np.asarray(model(TOKENS)), np.asarray(expected_base(TOKENS)), rtol=1e-5, atol=1e-5
    )
    model.save_hf_peft(tmp_path / "b", module_map=EMBED_MAP)
    _, again = _read(tmp_path / "b")
    assert sorted(again) == sorted(k for k in tensors if not k.endswith("base_layer.weight"))
    for key, value in again.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_saved_base_table_must_be_the_models(tmp_path: Path) -> None:
    base = _decoder()
    table = np.asarray(base.embed.embedding.get_value())
    _refused(
        base,
        _peft_embedding_folder(tmp_path / "a", table + 1.0),
        nnx_peft.UnsupportedPeftFieldError,
        "base_layer.weight.*differs.*resized or trained",
        module_map=EMBED_MAP,
    )


def test_embedding_factors_on_a_matmul_are_refused(tmp_path: Path) -> None:
    folder = _peft_embedding_folder(tmp_path / "a", None)
    _refused(
        _decoder(),
        folder,
        nnx_peft.HfTensorPlacementError,
        "lora_embedding_A/B.*multiplies by its weight",
        module_map=[("lm_head", "model.embed_tokens")],
    )


HEAD_MAP = [*MAP, ("lm_head", "lm_head")]
HEAD_KEY = "base_model.model.lm_head"


def test_modules_to_save_round_trip_as_torch_parameters(tmp_path: Path) -> None:
    model = _wrapped(target=r".*attn/q_proj", modules_to_save="lm_head")
    model.save_hf_peft(tmp_path / "a", module_map=HEAD_MAP)
    config, tensors = _read(tmp_path / "a")
    assert config["modules_to_save"] == ["lm_head"]
    head = model.model.lm_head
    # PEFT's key: base_model.model.<name>.<param>, nn.Linear's weight (out, in).
    np.testing.assert_array_equal(tensors[HEAD_KEY + ".weight"], np.asarray(head.kernel[...]).T)
    assert sorted(k for k in tensors if k.startswith(HEAD_KEY)) == [HEAD_KEY + ".weight"]
    assert not np.array_equal(np.asarray(head.kernel[...]), _decoder().lm_head.kernel[...])
    loaded = _load(_decoder(), tmp_path / "a", module_map=HEAD_MAP)
    assert loaded.config.modules_to_save == ("lm_head",)
    for key, value in _adapter_arrays(model).items():
        np.testing.assert_array_equal(_adapter_arrays(loaded)[key], value, err_msg=key)
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))
    with loaded.disable_adapter():  # the saved module's values from before are the base's
        np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(_decoder()(TOKENS)))


@pytest.fixture
def with_head(tmp_path: Path) -> Path:
    model = _wrapped(target=r".*attn/q_proj", modules_to_save="lm_head")
    model.save_hf_peft(tmp_path / "head", module_map=HEAD_MAP)
    return tmp_path / "head"


def test_modules_to_save_tensors_must_fit(with_head: Path) -> None:
    def narrow(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return tensors | {HEAD_KEY + ".weight": tensors[HEAD_KEY + ".weight"][:5]}

    _refused(
        _decoder(),
        _edit_tensors(with_head, narrow),
        nnx_peft.HfShapeError,
        r"lm_head.weight has shape \(5, 64\).*needs \(11, 64\)",
        module_map=HEAD_MAP,
    )


def test_modules_to_save_tensors_must_be_the_modules_parameters(
    with_head: Path, tmp_path: Path
) -> None:
    def with_bias(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return tensors | {HEAD_KEY + ".bias": np.zeros((11,), np.float32)}

    _refused(
        _decoder(),
        _edit_tensors(with_head, with_bias),
        nnx_peft.HfTensorPlacementError,
        r"tensors of 'lm_head' are \['bias', 'weight'\].*has exactly \['weight'\]",
        module_map=HEAD_MAP,
    )
    _refused(
        _decoder(),
        with_head,
        nnx_peft.HfTensorPlacementError,
        r"module_map gives to no module.*'lm_head'",
        module_map=MAP,
    )


def test_other_tensors_are_refused(exported: Path) -> None:
    def with_bias(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.bias"
        return tensors | {key: np.zeros((F,), np.float32)}

    _refused(
        _decoder(),
        _edit_tensors(exported, with_bias),
        nnx_peft.UnsupportedPeftFieldError,
        "no LoRA factor",
    )


def test_dora_flag_and_tensors_must_agree(exported: Path) -> None:
    _refused(
        _decoder(),
        _edit_config(exported, use_dora=True),
        nnx_peft.CorruptCheckpointError,
        "use_dora=True, but lora_magnitude_vector tensors are missing",
    )


@pytest.mark.parametrize("module_map", ["layers", [("(", "x")], [("a",)], 3])
def test_invalid_module_map(exported: Path, module_map: Any) -> None:
    _refused(_decoder(), exported, nnx_peft.ConfigError, "module_map", module_map=module_map)


# --- Fused weights ----------------------------------------------------------------------


class FusedKV(nnx.Module):
    """Attention projections in Gemma's style: k and v fused in one (2, K, D, H) weight."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q_einsum = nnx.Einsum("BTD,DNH->BTNH", (8, 2, 4), rngs=rngs)
        self.kv_einsum = nnx.Einsum("BTD,SKDH->SBTKH", (2, 1, 8, 4), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        k, v = self.kv_einsum(x)
        return self.q_einsum(x).sum(-1) + (k * v).sum(-1)


FUSED_MAP = [("q_einsum", "q_proj"), ("kv_einsum", "k_proj")]


def test_fused_weight_is_refused_on_export(tmp_path: Path) -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*einsum")
    x = jnp.ones((1, 3, 8))
    model = nnx_peft.PeftModel(FusedKV(nnx.Rngs(0)), config, x, rngs=nnx.Rngs(1))
    with pytest.raises(nnx_peft.FusedWeightError, match=r"module 'kv_einsum'.*kv_einsum standing"):
        model.save_hf_peft(tmp_path / "a", module_map=FUSED_MAP)
    assert not (tmp_path / "a").exists()


def test_fused_weight_is_refused_on_import(tmp_path: Path) -> None:
    tensors = {
        "base_model.model.q_proj.lora_A.weight": np.zeros((2, 8), np.float32),
        "base_model.model.q_proj.lora_B.weight": np.zeros((8, 2), np.float32),
        "base_model.model.k_proj.lora_A.weight": np.zeros((2, 8), np.float32),
        "base_model.model.k_proj.lora_B.weight": np.zeros((4, 2), np.float32),
    }
    folder = _write(
        tmp_path / "a", {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}, tensors
    )
    base = FusedKV(nnx.Rngs(0))
    before = _bits(base)
    with pytest.raises(nnx_peft.FusedWeightError, match="module 'kv_einsum'"):
        nnx_peft.PeftModel.from_hf_peft(
            base, folder, jnp.ones((1, 3, 8)), rngs=nnx.Rngs(0), module_map=FUSED_MAP
        )
    assert _bits(base) == before


# --- Export refusals and safety -----------------------------------------------------------


def test_export_needs_a_name_for_every_adapter(tmp_path: Path) -> None:
    with pytest.raises(nnx_peft.HfTensorPlacementError, match="no PEFT name to the adapted"):
        _wrapped().save_hf_peft(tmp_path / "a", module_map=MAP[:1])
    with pytest.raises(nnx_peft.HfTensorPlacementError, match="to several modules"):
        _wrapped().save_hf_peft(tmp_path / "a", module_map=[(r".*q_proj", "q"), *MAP])
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"init": "pissa"}, "init='pissa'.*residual"),
    ],
)
def test_export_refuses_what_peft_cannot_hold(
    tmp_path: Path, config: dict[str, Any], match: str
) -> None:
    with pytest.raises(nnx_peft.UnsupportedPeftFieldError, match=match):
        _wrapped(**config).save_hf_peft(tmp_path / "a", module_map=MAP)


def test_modules_to_save_of_unknown_layer_types_are_refused(tmp_path: Path) -> None:
    model = _wrapped(modules_to_save="final_norm")  # the toy's own RMSNorm class
    with pytest.raises(nnx_peft.UnsupportedPeftFieldError, match="'final_norm' is a RMSNorm"):
        model.save_hf_peft(tmp_path / "a", module_map=[*MAP, ("final_norm", "model.norm")])
    assert not (tmp_path / "a").exists()


def test_export_of_merged_adapters_is_refused(tmp_path: Path) -> None:
    model = _wrapped()
    model.merge_adapter()
    with pytest.raises(nnx_peft.AdapterStateError, match="save_hf_peft"):
        model.save_hf_peft(tmp_path / "a", module_map=MAP)


def test_export_never_replaces_without_overwrite(tmp_path: Path, exported: Path) -> None:
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    other = _wrapped(rank=3)
    with pytest.raises(nnx_peft.CheckpointExistsError, match="overwrite=True"):
        other.save_hf_peft(exported, module_map=MAP)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    other.save_hf_peft(exported, module_map=MAP, overwrite=True)
    assert _read(exported)[0]["r"] == 3
    (exported / "notes.txt").write_text("mine")
    with pytest.raises(nnx_peft.CheckpointExistsError, match="other files"):
        other.save_hf_peft(exported, module_map=MAP, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(nnx_peft.CheckpointExistsError, match="is a file"):
        other.save_hf_peft(tmp_path / "file", module_map=MAP, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "file"]  # no temporary left


def test_interrupted_export_keeps_the_old_folder(
    tmp_path: Path, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name: p.read_bytes() for p in exported.iterdir()}

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_numpy, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _wrapped(rank=3).save_hf_peft(exported, module_map=MAP, overwrite=True)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# --- The adapter PEFT itself saved, on tunix's NNX Llama (optional: needs tunix 0.1.7) ------

FIXTURE = Path(
    os.environ.get(
        "NNX_PEFT_HF_FIXTURE",
        Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "hf_peft_llama",
    )
)


@pytest.fixture(scope="module")
def llama() -> tuple[nnx.Module, tuple[Any, ...], dict[str, np.ndarray]]:
    """tunix's Llama3 with the fixture's base weights, its call arguments and PEFT's logits."""
    if not (FIXTURE / "adapter" / "adapter_config.json").is_file():
        pytest.skip(f"the PEFT fixture is not at {FIXTURE} (set NNX_PEFT_HF_FIXTURE)")
    model_lib = pytest.importorskip("tunix.models.llama3.model")
    params_lib = pytest.importorskip("tunix.models.llama3.params")
    hf = json.loads((FIXTURE / "base" / "config.json").read_text())
    config = model_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf["rope_parameters"]["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
    )
    base = params_lib.create_model_from_safe_tensors(str(FIXTURE / "base"), config)
    reference = dict(np.load(FIXTURE / "reference.npz"))
    ids = jnp.asarray(reference["input_ids"])
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
    return base, (ids, positions, None, mask), reference


def _logits(model: nnx.Module, args: tuple[Any, ...]) -> np.ndarray:
    logits, _ = model(*args)
    return np.asarray(logits)


def _from_fixture(llama: Any, **kwargs: Any) -> nnx_peft.PeftModel:
    base, args, _ = llama
    return nnx_peft.PeftModel.from_hf_peft(
        base, FIXTURE / "adapter", *args, rngs=nnx.Rngs(0), module_map=MAP, **kwargs
    )


def test_peft_fixture_gives_peft_logits_on_tunix_llama(llama: Any) -> None:
    base, args, reference = llama
    assert np.abs(_logits(base, args) - reference["base_logits"]).max() < 1e-5
    model = _from_fixture(llama)
    assert len(model.adapters()) == 14
    adapted = np.abs(_logits(model, args) - reference["adapter_logits"]).max()
    merged = np.abs(_logits(model.merge_and_unload(), args) - reference["adapter_merged_logits"])
    assert adapted < 1e-4 and merged.max() < 1e-4, (adapted, merged.max())
    # The adapter does change the outputs, well beyond those tolerances.
    assert np.abs(reference["adapter_logits"] - reference["base_logits"]).max() > 1e-2


def test_peft_fixture_exports_the_same_adapter(llama: Any, tmp_path: Path) -> None:
    _from_fixture(llama).save_hf_peft(tmp_path / "again", module_map=MAP)
    original, original_tensors = _read(FIXTURE / "adapter")
    config, tensors = _read(tmp_path / "again")
    assert tensors.keys() == original_tensors.keys()
    for key, value in original_tensors.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout"):
        assert config[field] == original[field], field
    assert sorted(config["target_modules"]) == sorted(original["target_modules"])
    assert config["rank_pattern"] == original["rank_pattern"] == {}


def test_peft_fixture_trains_and_exports(llama: Any, tmp_path: Path) -> None:
    base, args, _ = llama
    model = _from_fixture(llama, trainable=True)
    optimizer = model.make_optimizer(optax.adam(1e-2))
    ids = args[0]

    def loss(m: nnx_peft.PeftModel) -> jax.Array:
        logits, _ = m(*args)
        return nnx_peft.toy.next_token_loss(logits[:, :-1], ids[:, 1:])

    losses = []
    for _ in range(3):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(
            model
        )
        optimizer.update(model, grads)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    model.save_hf_peft(tmp_path / "trained", module_map=MAP)
    _, tensors = _read(tmp_path / "trained")
    _, original = _read(FIXTURE / "adapter")
    assert tensors.keys() == original.keys()
    assert all(not np.array_equal(tensors[k], original[k]) for k in original)
    again = nnx_peft.PeftModel.from_hf_peft(
        base, tmp_path / "trained", *args, rngs=nnx.Rngs(0), module_map=MAP
    )
    model.eval()
    np.testing.assert_array_equal(_logits(again, args), _logits(model, args))


def test_tunix_embedding_and_head_round_trip(llama: Any, tmp_path: Path) -> None:
    """tunix's Embedder indexes its table (``input_embedding[(ids,)]``); lm_head is an einsum."""
    base, args, _ = llama
    tunix_map = [*MAP, ("embedder", "model.embed_tokens"), ("lm_head", "lm_head")]
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r"embedder|lm_head|.*attn/q_proj")
    model = nnx_peft.PeftModel(base, config, *args, rngs=nnx.Rngs(0))
    model = strategies.randomized_adapters(model)
    adapted = _logits(model, args)
    assert np.abs(adapted - _logits(base, args)).max() > 1e-2
    model.save_hf_peft(tmp_path / "a", module_map=tunix_map)
    hf_config, tensors = _read(tmp_path / "a")
    assert sorted(hf_config["target_modules"]) == ["embed_tokens", "lm_head", "q_proj"]
    hf_a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    hf_b = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert (hf_a.shape, hf_b.shape) == ((2, 128), (64, 2))
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (128, 2)
    again = nnx_peft.PeftModel.from_hf_peft(
        base, tmp_path / "a", *args, rngs=nnx.Rngs(3), module_map=tunix_map
    )
    np.testing.assert_array_equal(_logits(again, args), adapted)
    table = np.asarray(base.embedder.input_embedding[...])
    merged = model.merge_and_unload()
    change = np.asarray(merged.embedder.input_embedding[...]) - table
    np.testing.assert_allclose(change, 2.0 * (hf_b @ hf_a).T, rtol=1e-5, atol=1e-6)
    assert np.abs(_logits(merged, args) - adapted).max() < 1e-4


def test_stacked_factors_are_refused_with_the_shape_error(tmp_path: Path) -> None:
    """Factors with a layer axis in front (as a scanned stack has) fit no PEFT Linear."""
    model = _wrapped(target=r".*attn/q_proj")
    variable = model.model.layers[0].attn.q_proj.kernel_lora_a
    variable.set_value(jnp.stack([variable.get_value()] * 2))
    with pytest.raises(nnx_peft.HfShapeError, match=r"\(2, 64, 2\).*scanned stack"):
        model.save_hf_peft(tmp_path / "a", module_map=MAP)
    assert not (tmp_path / "a").exists()


def test_lm_head_round_trips(tmp_path: Path) -> None:
    model = _wrapped(target=r".*(attn/q_proj|lm_head)")
    head_map = [*MAP, ("lm_head", "lm_head")]
    model.save_hf_peft(tmp_path / "a", module_map=head_map)
    config, tensors = _read(tmp_path / "a")
    assert config["target_modules"] == ["lm_head", "q_proj"]
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (11, 2)
    loaded = _load(_decoder(), tmp_path / "a", module_map=head_map)
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))


def test_from_hf_maps_modules_to_save_with_peft_name_semantics() -> None:
    config = nnx_peft.LoraConfig.from_hf(
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    )
    model = nnx_peft.PeftModel(_decoder(), config, TOKENS, rngs=nnx.Rngs(0))
    saved = {
        "/".join(map(str, p))
        for p, v in nnx.to_flat_state(nnx.state(model.model, nnx_peft.SavedParam))
    }
    assert saved == {"lm_head/kernel"}


def test_peft_fixture_serves_next_to_another_adapter_in_one_batch(llama: Any) -> None:
    """Named adapters on a model written elsewhere: PEFT's adapter and a second one, each
    example of one batch with its own, each row as that adapter alone gives it."""
    _, args, reference = llama
    model = _from_fixture(llama)
    model.add_adapter("other", model.peft_config["default"], rngs=nnx.Rngs(5))
    for i, adapter in enumerate(adapters(model.model, {"other"})):  # B = 0: give it an effect
        b = adapter.b.get_value()
        adapter.b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    ids = jnp.asarray([0, 1])  # example 0: PEFT's adapter; example 1: the other
    logits, _ = model(*args, adapter_ids=ids)
    np.testing.assert_allclose(np.asarray(logits)[0], reference["adapter_logits"][0], atol=1e-4)
    model.set_adapter("other")
    alone = _logits(model, args)
    np.testing.assert_allclose(np.asarray(logits)[1], alone[1], rtol=1e-5, atol=1e-5)
    assert np.abs(alone[1] - reference["adapter_logits"][1]).max() > 1e-2
    # A weighted combination of PEFT's adapter alone, with weight 1, is that adapter.
    errors = model.add_weighted_adapter(["default"], [1.0], "again", combination_type="cat")
    assert max(errors.values()) < 1e-6
    model.set_adapter("again")
    np.testing.assert_allclose(_logits(model, args), reference["adapter_logits"], atol=1e-4)
