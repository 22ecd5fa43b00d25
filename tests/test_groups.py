"""Tests for transform_core.groups: scale groups on plain torch networks."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from transform_core.errors import RecipeError
from transform_core.groups import GroupedTransform
from transform_core.patching import TWrapper
from transform_core.pipeline import burn_in, patch_network, plan_network, plan_tensors
from transform_core.recipe import parse_recipe

RULES = """\
version: 1
params:
  - family: weights
    transform: deterministic_rounding
    args: {output_range: [-127, 127], num_levels: 255}
  - family: biases
    transform: deterministic_rounding
    args: {output_range: [-32767, 32767], num_levels: 65535}
"""


def mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def recipe(groups: str) -> object:
    return parse_recipe(RULES + groups, source="g.yaml")


def burned_state(groups: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    net = mlp()
    raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
    plan = plan_network(net, recipe(groups))
    burned, _ = burn_in(patch_network(net, plan), plan)
    return raw, burned.state_dict()


def test_per_layer_biases_follow_the_weights_scale() -> None:
    raw, state = burned_state(
        "scale_groups:\n  - name: layer\n"
        "    members: [{family: weights}, {family: biases, sets_range: false}]\n"
    )
    for layer in ("0", "2"):
        scale = 127 / raw[f"{layer}.weight"].abs().max()
        assert state[f"{layer}.weight"].abs().max() == 127
        expected = (raw[f"{layer}.bias"] * scale).round()
        assert (state[f"{layer}.bias"] - expected).abs().max() <= 1


def test_per_neuron_along_dim_0_for_torch_linear() -> None:
    raw, state = burned_state(
        "scale_groups:\n  - name: neurons\n    per: neuron\n"
        "    members: [{family: weights, dim: 0}, {family: biases, sets_range: false, dim: 0}]\n"
    )
    scale = 127 / raw["0.weight"].abs().amax(1)  # one output neuron per row
    assert torch.equal(state["0.weight"].abs().amax(1), torch.full((4,), 127.0))
    assert (state["0.bias"] - (raw["0.bias"] * scale).round()).abs().max() <= 1


def test_regex_pairing_groups_by_the_captured_name() -> None:
    plan = plan_network(
        mlp(),
        recipe(
            "scale_groups:\n  - name: g\n    pair: 're:(\\d+)\\..*'\n"
            "    members: [{family: biases, sets_range: false}, {family: weights}]\n"
        ),
    )
    assert [[m.name for m in g.members] for g in plan.groups] == [
        ["0.weight", "0.bias"],
        ["2.weight", "2.bias"],
    ]


def test_the_patched_forward_is_the_burned_in_forward() -> None:
    net = mlp()
    plan = plan_network(
        net,
        recipe(
            "scale_groups:\n  - name: layer\n"
            "    members: [{family: weights}, {family: biases, sets_range: false}]\n"
        ),
    )
    T_net = patch_network(net, plan)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = T_net(x)
    copied = copy.deepcopy(T_net)  # a copy reads its own tensors
    with torch.no_grad():
        copied[0]._mod.weight.mul_(4.0)
        assert torch.equal(T_net(x), expected)
    burned, _ = burn_in(T_net, plan)
    with torch.no_grad():
        assert torch.equal(burned(x), expected)


def test_gradients_reach_every_member() -> None:
    net = mlp()
    plan = plan_network(
        net,
        recipe(
            "scale_groups:\n  - name: layer\n"
            "    members: [{family: weights}, {family: biases, sets_range: false}]\n"
        ),
    )
    T_net = patch_network(net, plan)
    grouped = [
        fn
        for m in T_net.modules()
        if isinstance(m, TWrapper)
        for fn in m.T_config.values()
        if isinstance(fn, GroupedTransform)
    ]
    assert len(grouped) == 4
    T_net(torch.ones(2, 3)).sum().backward()
    for param in T_net.parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0)


def test_optional_group_matching_nothing_is_fine() -> None:
    plan = plan_network(
        mlp(), recipe("scale_groups:\n  - {name: g, optional: true, members: [{family: taus}]}\n")
    )
    assert plan.groups == ()


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            "scale_groups:\n  - name: g\n    members: [{family: weights}, {family: biases}]\n",
            "have different num_levels ([255, 65535]); give their rules the same num_levels",
        ),
        (
            "scale_groups:\n  - name: g\n    members: [{family: weights}, {match: '*.weight'}]\n",
            "tensor '0.weight' is selected by members[0] and members[1]",
        ),
        (
            "scale_groups:\n  - {name: a, members: [{family: weights}]}\n"
            "  - {name: b, members: [{match: '0.*'}]}\n",
            "tensor '0.weight' is already in scale group 'a'",
        ),
        (
            "scale_groups:\n  - name: g\n    per: neuron\n"
            "    members: [{family: weights}, {family: biases, sets_range: false}]\n",
            "per: neuron needs one neuron count in an instance, found 0.weight: 3, 0.bias: 4",
        ),
        (
            "scale_groups:\n  - name: g\n    pair: 're:(0)\\..*'\n    members: [{family: weights}]\n",
            "tensor '2.weight' does not match pair",
        ),
    ],
)
def test_groups_that_do_not_fit(groups: str, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        plan_network(mlp(), recipe(groups))
    # The line of the group at fault: the first (line 10) or the second (line 11).
    assert re.match(r"g\.yaml:1[01]: scale_groups\[[01]\]: ", str(info.value))
    assert message in str(info.value)


def test_a_rule_giving_its_own_input_range_is_refused() -> None:
    text = RULES.replace(
        "{output_range: [-127, 127]", "{input_range: [-1, 1], output_range: [-127, 127]"
    )
    bad = parse_recipe(
        text + "scale_groups:\n  - {name: g, members: [{family: weights}]}\n", "g.yaml"
    )
    with pytest.raises(RecipeError, match=r"params\[0\] sets input_range for '0.weight'"):
        plan_network(mlp(), bad)


def test_tensor_mode_refuses_scale_groups() -> None:
    with pytest.raises(RecipeError, match="scale groups need a network"):
        plan_tensors(
            [("fc.weight", (2, 2), "float32")],
            recipe("scale_groups:\n  - {name: g, members: [{family: weights}]}\n"),
        )
