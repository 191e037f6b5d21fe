"""The adapter concept (``nnx_peft._adapter.Adapter``): one view of every adapter's parts.

Merging, checkpoints, sharding, the summaries and the Hugging Face mapping all read
adapters through it, so what it reports must be exactly what the model holds.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from hypothesis import given

import nnx_peft
from nnx_peft._adapter import adapters
from nnx_peft._adapter_state import AdapterState
from nnx_peft._parts import ADAPTER_SUFFIXES, UNMERGED_SUFFIX
from tests.strategies import Case, cases


def _wrap(case: Case, **changes: object) -> nnx_peft.PeftModel:
    config = dataclasses.replace(case.config, **changes)
    return nnx_peft.PeftModel(case.build(), config, case.sample(), rngs=nnx.Rngs(0))


def _part_attributes(model: nnx.Module) -> list[str]:
    suffixes = (*ADAPTER_SUFFIXES, UNMERGED_SUFFIX)
    return [
        name
        for _, module in nnx.iter_modules(model)
        for name in vars(module)
        if name.endswith(suffixes)
    ]


@given(case=cases())
def test_the_adapters_are_exactly_the_trained_variables(case: Case) -> None:
    peft = _wrap(case)
    found = adapters(peft.model)
    assert [a.info() for a in found] == peft.adapters()
    assert sorted((a.path, a.weight) for a in found) == sorted(
        (path, "w" if kind == "custom" else "kernel") for path, kind in case.targeted
    )
    trained = {id(v) for a in found for v in a.trained().values()}
    state = nnx.state(peft.model, nnx_peft.AdapterParam)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert trained == {id(v) for v in leaves}
    for adapter in found:
        assert adapter.a is adapter.trained()["_lora_a"]
        assert adapter.state is AdapterState.ACTIVE and adapter.unmerged is None
        assert adapter.layout.scale == case.config.alpha / case.config.rank


@given(case=cases())
def test_states_follow_merging_and_return_to_the_same_graph(case: Case) -> None:
    peft = _wrap(case)
    before = nnx.graphdef(peft.model)
    peft.merge_adapter()
    assert {a.state for a in adapters(peft.model)} == {AdapterState.MERGED}
    assert all(a.unmerged is not None for a in adapters(peft.model))
    peft.unmerge_adapter()
    assert {a.state for a in adapters(peft.model)} == {AdapterState.ACTIVE}
    with peft.disable_adapter():
        assert {a.state for a in adapters(peft.model)} == {AdapterState.DISABLED}
    assert nnx.graphdef(peft.model) == before


@given(case=cases())
def test_removing_every_adapter_leaves_no_part_behind(case: Case) -> None:
    peft = _wrap(case, dropout=0.1)
    peft.merge_adapter()
    model = nnx.clone(peft.model)
    assert _part_attributes(model)
    for adapter in adapters(model):
        adapter.remove()
    assert _part_attributes(model) == []
    assert adapters(model) == []
