"""Tests for Rockpool spiking networks as inputs: transform_core.rockpool_support and the
patching API on Rockpool ``TorchModule`` networks."""

from __future__ import annotations

import copy
import doctest
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import transform_core as tt
from transform_core import rockpool_support
from transform_core.errors import CheckpointError
from transform_core.patching import ActWrapper, TWrapper
from transform_core.rockpool_support import (
    is_rockpool_module,
    load_rockpool_params,
    main_output,
    reset_state,
)

pytest.importorskip("rockpool")

from rockpool import parameters as rp
from rockpool.nn.combinators import Residual, Sequential
from rockpool.nn.modules import (
    ExpSynTorch,
    LIFTorch,
    LinearTorch,
    RateTorch,
    TorchModule,
)

pytestmark = pytest.mark.rockpool

SEED = 4321


def seeded(build: Callable[[], nn.Module], seed: int = SEED) -> Any:
    """Build a network with parameters drawn from ``seed``, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _paths(tree: Any) -> list[tuple[str, ...]]:
    """The key path of every leaf of a tree, in order."""
    return [path for path, _ in tt.tree_items(tree)]


def spikes_in(n_in: int, steps: int = 12, batches: int = 2) -> torch.Tensor:
    """A fixed, strong input that makes the LIF neurons below fire."""
    gen = torch.Generator().manual_seed(7)
    return torch.rand(batches, steps, n_in, generator=gen) * 4.0


def walkthrough_net() -> Any:
    return Sequential(
        LinearTorch((2, 4), has_bias=True),
        LIFTorch(4),
        Residual(LinearTorch((4, 4), has_bias=True), LIFTorch(4)),
    )


# One builder per module kind and leak mode, and nested combinations.
NETWORKS: dict[str, Callable[[], Any]] = {
    "lif_taus": lambda: Sequential(LinearTorch((2, 3)), LIFTorch(3, has_rec=True)),
    "lif_decays": lambda: Sequential(LinearTorch((2, 3)), LIFTorch(3, leak_mode="decays")),
    "lif_bitshifts": lambda: Sequential(
        LinearTorch((2, 3)), LIFTorch(3, leak_mode="bitshifts", dash_mem=2.0, dash_syn=3.0)
    ),
    "expsyn_rate": lambda: Sequential(
        LinearTorch((2, 3), has_bias=True), ExpSynTorch(3), RateTorch(3, has_rec=True)
    ),
    "nested": lambda: Sequential(
        LinearTorch((2, 3)),
        LIFTorch(3),
        Residual(Sequential(LinearTorch((3, 3)), RateTorch(3)), Residual(LinearTorch((3, 3)))),
    ),
}


def state_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers (Rockpool states) of an un-patched network."""
    return {
        k: v.clone() for k, v in net.state_dict().items() if k not in dict(net.named_parameters())
    }


# --------------------------------------------------------------------------------------
# Imports and families


def test_importing_transform_core_does_not_import_rockpool() -> None:
    code = (
        "import sys, torch, transform_core as tt\n"
        "tt.make_param_T_network(torch.nn.Linear(2, 2),"
        " tt.make_param_T_config(torch.nn.Linear(2, 2), tt.identity, 'weights'))\n"
        "print('rockpool' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


def test_is_rockpool_module() -> None:
    net = seeded(walkthrough_net)
    assert is_rockpool_module(net)
    assert is_rockpool_module(net[0])
    assert not is_rockpool_module(nn.Linear(2, 2))
    assert not is_rockpool_module(TWrapper(net[0]))  # a wrapper is not one itself


def test_families_are_rockpool_own() -> None:
    net = seeded(
        lambda: Sequential(
            LinearTorch((2, 3), has_bias=True),
            LIFTorch(3, leak_mode="decays"),
            Residual(LinearTorch((3, 3)), LIFTorch(3, leak_mode="bitshifts")),
            ExpSynTorch(3),
            RateTorch(3),
        )
    )
    families = tt.param_families(net)
    assert families == {
        "0_LinearTorch.weight": "weights",
        "0_LinearTorch.bias": "biases",
        "1_LIFTorch.alpha": "decays",
        "1_LIFTorch.beta": "decays",
        "1_LIFTorch.bias": "bias",
        "1_LIFTorch.threshold": "thresholds",
        "2_TorchResidual.0_LinearTorch.weight": "weights",
        "2_TorchResidual.1_LIFTorch.dash_mem": "bitshifts",
        "2_TorchResidual.1_LIFTorch.dash_syn": "bitshifts",
        "2_TorchResidual.1_LIFTorch.bias": "bias",
        "2_TorchResidual.1_LIFTorch.threshold": "thresholds",
        "3_ExpSynTorch.tau": "taus",
        "4_RateTorch.tau": "taus",
        "4_RateTorch.bias": "biases",
        "4_RateTorch.threshold": "thresholds",
    }
    # States and simulation parameters (vmem, isyn, the unused w_rec, ...) get no family.
    infos = tt.tensor_infos(net)
    assert infos["1_LIFTorch.vmem"].family is None
    assert infos["1_LIFTorch.w_rec"].family is None


def _yaml_family(tmp_path: Path) -> str:
    file = tmp_path / "family.yaml"
    file.write_text("family: weights\n", encoding="utf-8")
    return str(yaml.safe_load(file.read_text(encoding="utf-8"))["family"])


@pytest.mark.parametrize("source", ["yaml", "runtime"])
def test_family_names_compare_by_value(source: str, tmp_path: Path) -> None:
    family = _yaml_family(tmp_path) if source == "yaml" else "".join(["we", "ights"])
    # Not the interned literal: Rockpool's identity comparison would find nothing.
    assert family == "weights" and family is not sys.intern("weights")
    net = seeded(walkthrough_net)
    config = tt.make_param_T_config(net, tt.identity, family)
    assert _paths(config) == [
        ("0_LinearTorch", "weight"),
        ("2_TorchResidual", "0_LinearTorch", "weight"),
    ]


class Leaky(TorchModule):
    """A user-defined Rockpool module, outside the rockpool package."""

    def __init__(self, n: int) -> None:
        super().__init__(shape=(n, n))
        self.gain = rp.Parameter(torch.ones(n), family="weights")
        self.tau = rp.Parameter(torch.full((n,), 0.02), family="taus")
        self.level = rp.State(torch.zeros(n))

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        out = data * self.gain * torch.exp(-1e-3 / self.tau) + self.level
        self.level = out[0, -1].detach()
        return out


def test_user_defined_torchmodule_declares_families() -> None:
    assert Leaky.__module__ != "rockpool"
    assert tt.param_families(Leaky(2)) == {"gain": "weights", "tau": "taus"}


# --------------------------------------------------------------------------------------
# Patching: behaviour equal to the un-patched network, state kept across calls


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_identity_patch_matches_unpatched_and_keeps_state(name: str) -> None:
    net = seeded(NETWORKS[name])
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, tt.identity))
    assert any(isinstance(m, TWrapper) for m in nn.Module.modules(T_net))
    x = spikes_in(2)
    for _ in range(2):  # the second call starts from the state the first one left
        out, state, record = T_net(x)
        ref_out, ref_state, ref_record = net(x)
        assert torch.equal(out, ref_out)
        assert _paths(state) == _paths(ref_state)
        assert _paths(record) == _paths(ref_record)
    states = state_tensors(tt.remove_T_net(T_net))
    ref_states = state_tensors(net)
    assert states.keys() == ref_states.keys() and states
    assert all(torch.equal(states[k], ref_states[k]) for k in states)
    # The forward pass changed the state, so the comparison above says something.
    assert any(v.abs().sum() > 0 for v in ref_states.values())


def test_record_passes_through() -> None:
    net = seeded(walkthrough_net)
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, tt.identity, "weights"))
    x = spikes_in(2)
    _, _, record = T_net(x, record=True)
    _, _, ref_record = net(x, record=True)
    flat, treedef = tt.tree_flatten(record)
    ref_flat, ref_treedef = tt.tree_flatten(ref_record)
    assert treedef == ref_treedef and ("1_LIFTorch", "vmem") in _paths(record)
    assert all(torch.equal(a, b) for a, b in zip(flat, ref_flat, strict=True))


def test_state_updated_by_setattr_persists_in_wrapped_module() -> None:
    lif, ref = seeded(lambda: LIFTorch(3)), seeded(lambda: LIFTorch(3))
    wrapped = TWrapper(lif, {"tau_mem": tt.identity})
    wrapped(spikes_in(3))
    ref(spikes_in(3))
    assert lif.vmem.abs().sum() > 0
    assert torch.equal(lif.vmem, ref.vmem) and torch.equal(lif.isyn, ref.isyn)
    # The raw parameter is back in place after the call.
    assert isinstance(lif.tau_mem, nn.Parameter)


def test_wrapped_modules_keep_rockpool_interface() -> None:
    net = seeded(walkthrough_net)
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, tt.identity, "weights"))
    assert isinstance(net[0], LinearTorch)  # the original is untouched (patched a copy)
    first = T_net[0]
    assert isinstance(first, TWrapper) and isinstance(first._mod, LinearTorch)
    assert torch.equal(T_net[0]._mod.weight, net[0].weight)
    assert first.shape == (2, 4) and T_net.shape == net.shape
    assert first.name == "'0_LinearTorch'"
    assert T_net.modules()["0_LinearTorch"] is first
    assert isinstance(T_net[2][0], TWrapper)
    assert type(first.as_graph()).__name__ == "LinearWeights"
    assert type(T_net.as_graph()).__name__ == "GraphHolder"
    # Rockpool's own parameter dictionary looks like the un-patched network's.
    assert _paths(T_net.parameters()) == _paths(net.parameters())
    # Rockpool re-assigns what reset_state() returns; the wrappers must stay.
    T_net.reset_state()
    assert isinstance(T_net[0], TWrapper) and isinstance(T_net[2][0], TWrapper)


@pytest.mark.parametrize("kind", ["param", "act"])
def test_a_rockpool_module_patched_at_the_root_keeps_its_parameter_tree(kind: str) -> None:
    lif = LIFTorch(4)
    if kind == "param":
        T_net = tt.make_param_T_network(lif, tt.make_param_T_config(lif, torch.round, "taus"))
    else:
        T_net = tt.make_act_T_network(lif, tt.make_act_T_config(lif, torch.round))
    assert isinstance(T_net, TWrapper if kind == "param" else ActWrapper)
    assert sorted(T_net.parameters("taus")) == ["tau_mem", "tau_syn"]  # the family filter
    assert len(list(T_net.parameters().astorch())) == len(list(lif.parameters().astorch()))
    assert len(list(torch.nn.Module.parameters(T_net))) == 4


def test_patching_in_place_updates_rockpool_registry() -> None:
    net = seeded(walkthrough_net)
    config = tt.make_param_T_config(net, tt.identity, "taus")
    assert tt.make_param_T_network(net, config, inplace=True) is net
    assert isinstance(net[1], TWrapper) and isinstance(net[2][1], TWrapper)
    plain = tt.remove_T_net(net, inplace=True)
    assert isinstance(plain[1], LIFTorch) and isinstance(plain[2][1], LIFTorch)


def test_twrapper_apply_T_method() -> None:
    lin = seeded(lambda: LinearTorch((3, 2)))
    wrapped = TWrapper(lin, {"weight": lambda w: tt.deterministic_rounding(w, num_levels=3)})
    assert wrapped.apply_T() is wrapped
    assert lin.weight.unique().numel() <= 3
    assert isinstance(lin.weight, nn.Parameter)


@pytest.mark.parametrize("torch_api", [False, True], ids=["rockpool_call", "torch_call"])
@pytest.mark.parametrize("kind", ["linear", "lif"])
def test_wrappers_follow_the_wrapped_calling_convention(kind: str, torch_api: bool) -> None:
    def build() -> Any:
        mod = LinearTorch((3, 3)) if kind == "linear" else LIFTorch(3)
        return mod.to_torch() if torch_api else mod

    x = spikes_in(3)
    attr = "weight" if kind == "linear" else "tau_mem"
    ref = main_output(seeded(build)(x))
    t_out = TWrapper(seeded(build), {attr: tt.identity})(x)
    a_out = ActWrapper(seeded(build), lambda y: y * 2.0)(x)
    for out in (t_out, a_out):
        if torch_api:
            assert isinstance(out, torch.Tensor)
        else:
            assert isinstance(out, tuple) and len(out) == 3
    assert torch.equal(main_output(t_out), ref)
    assert torch.equal(main_output(a_out), ref * 2.0)


def test_deepcopy_and_state_dict_round_trip() -> None:
    net = seeded(walkthrough_net)
    twin = copy.deepcopy(net)
    assert twin[0].weight is not net[0].weight and torch.equal(twin[0].weight, net[0].weight)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = seeded(walkthrough_net, seed=SEED + 1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = spikes_in(2)
    assert torch.equal(fresh(x)[0], net(x)[0])


def test_copies_after_a_forward_pass_with_gradients() -> None:
    # RateTorch keeps its state trace, part of the autograd graph, after each call.
    net = seeded(lambda: Sequential(LinearTorch((2, 3)), RateTorch(3)))
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, torch.round, "weights"))
    T_net(spikes_in(2))[0].sum().backward()
    burned = tt.apply_T(T_net)
    plain = tt.remove_T_net(burned)
    assert burned is not T_net and isinstance(plain[0], LinearTorch)
    assert torch.equal(plain[0].weight, torch.round(T_net[0]._mod.weight))
    assert plain[1]._state.grad_fn is None  # the copy holds it detached
    assert tt.make_param_T_network(T_net, {}) is not T_net


def test_activation_and_parameter_patches_together() -> None:
    net = seeded(walkthrough_net)
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, tt.identity, "weights"))
    both = tt.make_act_T_network(T_net, tt.make_act_T_config(net, lambda y: y * 0.5, LinearTorch))
    assert isinstance(both[0], ActWrapper) and isinstance(both[0]._mod, TWrapper)
    assert both.modules()["0_LinearTorch"] is both[0]
    x = spikes_in(2)
    _, _, record = both(x, record=True)
    _, _, ref_record = net(x, record=True)
    assert torch.equal(record["0_LinearTorch_output"], ref_record["0_LinearTorch_output"] * 0.5)
    plain = tt.remove_T_net(both)
    assert [type(m) for m in nn.Module.modules(plain)] == [type(m) for m in nn.Module.modules(net)]
    assert isinstance(plain[0], LinearTorch) and plain.modules()["0_LinearTorch"] is plain[0]


# --------------------------------------------------------------------------------------
# The reference walkthrough


def test_walkthrough() -> None:
    net = seeded(walkthrough_net)
    classes = [type(m) for m in nn.Module.modules(net)]
    keys = list(net.state_dict())
    gen = torch.Generator().manual_seed(3)

    T_config = tt.make_param_T_config(
        net, lambda p: tt.stochastic_rounding(p, num_levels=2**4, generator=gen), "weights"
    )
    T_config = tt.tree_update(
        T_config,
        tt.make_param_T_config(net, lambda p: tt.dropout(p, 0.2, generator=gen), "biases"),
    )
    T_net = tt.make_param_T_network(net, T_config)

    out, _, record = T_net(spikes_in(2), record=True)
    loss = (
        out.sum()
        + record["1_LIFTorch"]["vmem"].sum()
        + record["2_TorchResidual"]["1_LIFTorch"]["vmem"].sum()
    )
    loss.backward()
    assert _paths(T_config) == [
        ("0_LinearTorch", "weight"),
        ("0_LinearTorch", "bias"),
        ("2_TorchResidual", "0_LinearTorch", "weight"),
        ("2_TorchResidual", "0_LinearTorch", "bias"),
    ]
    for wrapper in (T_net[0], T_net[2][0]):
        for attr in ("weight", "bias"):
            grad = getattr(wrapper._mod, attr).grad
            assert grad is not None and grad.abs().sum() > 0, attr

    burned = tt.apply_T(T_net)
    for wrapper in (burned[0], burned[2][0]):
        assert wrapper._mod.weight.unique().numel() <= 2**4
    plain = tt.remove_T_net(burned)
    assert [type(m) for m in nn.Module.modules(plain)] == classes
    assert list(plain.state_dict()) == keys
    assert isinstance(plain[0], LinearTorch) and plain[0].weight.unique().numel() <= 2**4

    # Activation transforms on the outputs of every LinearTorch, found by class.
    act_config = tt.make_act_T_config(net, lambda y: y.clamp(min=0.0), LinearTorch)
    assert _paths(act_config) == [
        ("0_LinearTorch", ""),
        ("2_TorchResidual", "0_LinearTorch", ""),
    ]
    A_net = tt.make_act_T_network(net, act_config)
    assert isinstance(A_net[0], ActWrapper) and isinstance(A_net[2][0], ActWrapper)
    x = spikes_in(2) - 2.0
    _, _, record = A_net(x, record=True)
    _, _, ref_record = net(x, record=True)
    assert torch.equal(
        record["0_LinearTorch_output"], ref_record["0_LinearTorch_output"].clamp(min=0)
    )
    assert (ref_record["0_LinearTorch_output"] < 0).any()
    assert [type(m) for m in nn.Module.modules(tt.remove_T_net(A_net))] == classes


def test_t_decay_on_decays() -> None:
    net = seeded(
        lambda: Sequential(
            LinearTorch((2, 3)),
            LIFTorch(3, leak_mode="decays", alpha=torch.tensor([0.93, 0.8, 0.6]), beta=0.85),
        )
    )
    config = tt.make_param_T_config(net, lambda p: tt.t_decay(p, dt=1e-3), "decays")
    assert _paths(config) == [("1_LIFTorch", "alpha"), ("1_LIFTorch", "beta")]
    T_net = tt.make_param_T_network(net, config)
    out, _, _ = T_net(spikes_in(2))
    out.sum().backward()
    raw_alpha = T_net[1]._mod.alpha.detach().clone()
    plain = tt.remove_T_net(tt.apply_T(T_net))
    assert torch.equal(plain[1].alpha, tt.t_decay(raw_alpha, dt=1e-3))
    assert not torch.equal(plain[1].alpha, raw_alpha)


def test_rounding_of_bitshifts() -> None:
    net = seeded(
        lambda: Sequential(
            LinearTorch((2, 3)),
            LIFTorch(
                3, leak_mode="bitshifts", dash_mem=torch.tensor([1.4, 2.6, 3.2]), dash_syn=2.7
            ),
        )
    )
    round_st = tt.make_backward_passthrough(torch.round)
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, round_st, "bitshifts"))
    _, _, record = T_net(spikes_in(2), record=True)
    record["1_LIFTorch"]["vmem"].sum().backward()
    assert T_net[1]._mod.dash_mem.grad is not None and T_net[1]._mod.dash_mem.grad.abs().sum() > 0
    plain = tt.remove_T_net(tt.apply_T(T_net))
    assert torch.equal(plain[1].dash_mem, torch.tensor([1.0, 3.0, 3.0]))
    assert torch.equal(plain[1].dash_syn, torch.round(plain[1].dash_syn))


# --------------------------------------------------------------------------------------
# Support helpers


def test_reset_state_through_wrappers_and_torch_containers() -> None:
    rock = seeded(walkthrough_net)
    net = nn.Sequential(
        tt.make_param_T_network(rock, tt.make_param_T_config(rock, tt.identity, "taus"))
    )
    net[0](spikes_in(2))
    assert net[0][1]._mod.vmem.abs().sum() > 0
    assert reset_state(net) == 1
    assert net[0][1]._mod.vmem.abs().sum() == 0 and net[0][2][1]._mod.vmem.abs().sum() == 0
    assert isinstance(net[0][1], TWrapper)


def test_main_output_rejects_other_results() -> None:
    with pytest.raises(TypeError, match="tuple starting with one"):
        main_output({"out": 1})


def test_doctests_hold() -> None:
    result = doctest.testmod(rockpool_support, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------
# Rockpool parameter files


def test_load_rockpool_params_round_trip(tmp_path: Path) -> None:
    net = seeded(NETWORKS["lif_taus"])
    file = tmp_path / "net.json"
    net.save(str(file))
    fresh = seeded(NETWORKS["lif_taus"], seed=SEED + 1)
    weight = fresh[0].weight
    loaded = load_rockpool_params(fresh, file)
    assert set(dict(fresh.named_parameters())) <= set(loaded)
    assert fresh[0].weight is weight  # same tensor object, new values
    for name, value in net.state_dict().items():
        if name in loaded:
            assert torch.equal(fresh.state_dict()[name], value), name
    x = spikes_in(2)
    assert torch.equal(fresh(x)[0], net(x)[0])


def test_load_rockpool_params_into_patched_network(tmp_path: Path) -> None:
    net = seeded(walkthrough_net)
    T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, tt.identity, "weights"))
    file = tmp_path / "patched.json"
    T_net.save(str(file))  # Rockpool sees through the wrappers: the plain file format
    assert json.loads(file.read_text()).keys() == {"0_LinearTorch", "1_LIFTorch", "2_TorchResidual"}
    target = tt.make_param_T_network(
        seeded(walkthrough_net, seed=SEED + 1), tt.make_param_T_config(net, tt.identity, "weights")
    )
    loaded = load_rockpool_params(target, file)
    assert "2_TorchResidual.0_LinearTorch.weight" in loaded
    assert torch.equal(target[2][0]._mod.weight, net[2][0].weight)


def _saved(
    tmp_path: Path, build: Callable[[], Any] = walkthrough_net
) -> tuple[Path, dict[str, Any]]:
    file = tmp_path / "net.json"
    seeded(build).save(str(file))
    return file, json.loads(file.read_text())


def _write(tmp_path: Path, data: Any) -> Path:
    file = tmp_path / "edited.json"
    file.write_text(json.dumps(data))
    return file


def test_load_rockpool_params_errors(tmp_path: Path) -> None:
    net = seeded(walkthrough_net)
    with pytest.raises(CheckpointError, match="no such file"):
        load_rockpool_params(net, tmp_path / "missing.json")

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "0_LinearTorch": {,\n}')
    with pytest.raises(CheckpointError) as info:
        load_rockpool_params(net, bad)
    assert info.value.line == 2 and "not valid JSON" in str(info.value)

    _, data = _saved(tmp_path)
    data["0_LinearTorh"] = data.pop("0_LinearTorch")
    with pytest.raises(CheckpointError, match="did you mean '0_LinearTorch'") as info:
        load_rockpool_params(net, _write(tmp_path, data))
    assert info.value.key == "0_LinearTorh"

    _, data = _saved(tmp_path)
    data["1_LIFTorch"]["tau_mme"] = "[0.1]"
    with pytest.raises(CheckpointError, match="did you mean 'tau_mem'"):
        load_rockpool_params(net, _write(tmp_path, data))


def test_load_rockpool_params_checks_shapes_and_settings(tmp_path: Path) -> None:
    net = seeded(walkthrough_net)
    _, data = _saved(tmp_path)
    data["0_LinearTorch"]["weight"] = json.dumps([[0.0] * 5] * 2)
    with pytest.raises(CheckpointError, match=r"expected shape \(2, 4\), found \(2, 5\)") as info:
        load_rockpool_params(net, _write(tmp_path, data))
    assert info.value.key == "0_LinearTorch.weight"

    _, data = _saved(tmp_path)
    data["1_LIFTorch"]["dt"] = "0.0001"
    with pytest.raises(
        CheckpointError, match=re.escape("the network has 0.001, the file has 0.0001")
    ):
        load_rockpool_params(net, _write(tmp_path, data))
    assert "1_LIFTorch.tau_mem" in load_rockpool_params(net, _write(tmp_path, data), strict=False)

    _, data = _saved(tmp_path)
    del data["2_TorchResidual"]["0_LinearTorch"]["weight"]
    with pytest.raises(
        CheckpointError, match=r"1 parameter\(s\) .*2_TorchResidual.0_LinearTorch.weight"
    ):
        load_rockpool_params(net, _write(tmp_path, data))
    loaded = load_rockpool_params(net, _write(tmp_path, data), strict=False)
    assert "2_TorchResidual.0_LinearTorch.weight" not in loaded
