"""Tests for transform_core.patching: patch, train, burn in and un-patch plain torch networks.

The invariants follow PyTorch's parametrization tests: after un-patching, module classes,
``state_dict`` keys and values are as before; burning in gives what the patched forward
pass used; an optimiser step on a patched network moves the raw parameters.
"""

from __future__ import annotations

import copy
import functools
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transform_core import (
    ActWrapper,
    ConfigError,
    TWrapper,
    apply_T,
    deterministic_rounding,
    make_act_T_config,
    make_act_T_network,
    make_param_T_config,
    make_param_T_network,
    remove_T_net,
    stochastic_rounding,
    tree_update,
)

# A deterministic, picklable transform with few levels, so that it visibly changes values.
ROUND = functools.partial(deterministic_rounding, num_levels=5)


def _halve(x: Tensor) -> Tensor:
    return x * 0.5


# --------------------------------------------------------------------------------------
# Test networks


class Block(nn.Module):
    """Children held as plain attributes."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.relu(self.proj(x)))


class DeepNet(nn.Module):
    """Every container kind, nested: Sequential, ModuleList, ModuleDict, plain attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
        self.blocks = nn.ModuleList(
            [Block(), nn.Sequential(Block(), nn.ModuleDict({"inner": Block()}))]
        )
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Sequential(nn.Linear(4, 2))})

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.blocks[0](x)
        x = self.blocks[1][0](x)
        x = self.blocks[1][1]["inner"](x)
        return self.heads["a"](x) + self.heads["b"](x)


def deep_net(seed: int = 0) -> DeepNet:
    torch.manual_seed(seed)
    return DeepNet()


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def inputs(n: int = 6, width: int = 3, seed: int = 1) -> Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


WEIGHT_NAMES = [
    "stem.0.weight",
    "blocks.0.proj.weight",
    "blocks.1.0.proj.weight",
    "blocks.1.1.inner.proj.weight",
    "heads.a.weight",
    "heads.b.0.weight",
]


def unwrapped_names(net: nn.Module) -> list[str]:
    """state_dict keys with the wrappers' ``._mod`` removed."""
    return [k.replace("._mod", "").replace("_mod.", "") for k in net.state_dict()]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def module_classes(net: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in net.named_modules()]


def burned_by_hand(net: nn.Module, names: list[str], fn: Callable[[Tensor], Tensor]) -> nn.Module:
    """A copy of ``net`` with ``fn`` applied to the named tensors directly."""
    copied = copy.deepcopy(net)
    with torch.no_grad():
        for name, tensor in copied.state_dict(keep_vars=True).items():
            if name in names:
                tensor.copy_(fn(tensor))
    return copied


# --------------------------------------------------------------------------------------
# Config trees


def test_param_config_mirrors_module_tree() -> None:
    net = deep_net()
    cfg = make_param_T_config(net, ROUND, "weights")
    assert cfg == {
        "stem": {"0": {"weight": ROUND}},
        "blocks": {
            "0": {"proj": {"weight": ROUND}},
            "1": {"0": {"proj": {"weight": ROUND}}, "1": {"inner": {"proj": {"weight": ROUND}}}},
        },
        "heads": {"a": {"weight": ROUND}, "b": {"0": {"weight": ROUND}}},
    }


def test_param_config_holds_only_matching_tensors() -> None:
    cfg = make_param_T_config(deep_net(), ROUND, "norms")
    assert cfg["stem"] == {"1": {"weight": ROUND, "bias": ROUND}}
    assert "heads" not in cfg
    assert make_param_T_config(deep_net(), ROUND, "no_such_family") == {}


def test_param_config_without_family_selects_every_parameter_but_no_buffer() -> None:
    net = small_net()
    cfg = make_param_T_config(nn.Sequential(net, nn.BatchNorm1d(2)), ROUND)
    assert cfg == {
        "0": {
            "0": {"weight": ROUND, "bias": ROUND},
            "2": {"weight": ROUND, "bias": ROUND},
        },
        "1": {"weight": ROUND, "bias": ROUND},
    }


def test_tree_update_merges_families() -> None:
    net = small_net()
    cfg = make_param_T_config(net, ROUND, "weights")
    cfg = tree_update(cfg, make_param_T_config(net, _halve, "biases"))
    assert cfg == {
        "0": {"weight": ROUND, "bias": _halve},
        "2": {"weight": ROUND, "bias": _halve},
    }
    T_net = make_param_T_network(net, cfg)
    assert T_net[0].T_config == {"weight": ROUND, "bias": _halve}


# --------------------------------------------------------------------------------------
# Wrapping at any depth, in any container


def test_every_selected_module_is_wrapped_at_any_depth() -> None:
    net = deep_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    wrapped = {name for name, m in T_net.named_modules() if isinstance(m, TWrapper)}
    assert wrapped == {name.rsplit(".", 1)[0] for name in WEIGHT_NAMES}
    for name in wrapped:
        wrapper = T_net.get_submodule(name)
        assert isinstance(wrapper._mod, nn.Linear)
        assert wrapper.T_config == {"weight": ROUND}
    # Unselected modules are left as they were.
    assert type(T_net.stem[1]) is nn.BatchNorm1d
    assert type(T_net.blocks[0].norm) is nn.LayerNorm


def test_patched_parameters_are_the_raw_ones() -> None:
    net = deep_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    raw = list(T_net.parameters())
    assert len(raw) == len(list(net.parameters()))
    for (name, p), (_, q) in zip(T_net.named_parameters(), net.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert unwrapped_names(T_net) == list(net.state_dict())
    assert T_net.stem[0]._mod.weight is T_net.stem[0].weight


def test_forward_uses_transformed_values_small_net() -> None:
    net = small_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    x = inputs(width=4)
    by_hand = F.linear(
        torch.relu(F.linear(x, ROUND(net[0].weight), net[0].bias)),
        ROUND(net[2].weight),
        net[2].bias,
    )
    out = T_net(x)
    assert torch.allclose(out, by_hand, atol=1e-6)
    assert not torch.allclose(out, net(x), atol=1e-3)


def test_forward_uses_transformed_values_deep_net() -> None:
    net = deep_net().eval()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights")).eval()
    expected = burned_by_hand(net, WEIGHT_NAMES, ROUND)(inputs())
    out = T_net(inputs())
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, net(inputs()), atol=1e-3)


def test_buffers_updated_in_forward_persist() -> None:
    net = deep_net().train()
    cfg = make_param_T_config(net, ROUND, "weights")
    cfg = tree_update(cfg, make_param_T_config(net, ROUND, "norms"))
    T_net = make_param_T_network(net, cfg)
    assert isinstance(T_net.stem[1], TWrapper)
    before = T_net.stem[1].running_mean.clone()
    T_net(inputs())
    after = T_net.stem[1]._mod.running_mean
    assert not torch.equal(before, after)
    assert int(T_net.stem[1]._mod.num_batches_tracked) == 1
    plain = remove_T_net(T_net)
    assert torch.equal(plain.stem[1].running_mean, after)
    assert int(plain.stem[1].num_batches_tracked) == 1
    # The input network was copied, so its statistics did not move.
    assert torch.equal(net.stem[1].running_mean, before)


def test_buffer_is_transformed_when_a_rule_names_it() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1.0, 1.0)
    net.eval()
    cfg = make_param_T_config(net, _halve, "stats", rules={"*.running_mean": "stats"})
    assert cfg == {"1": {"running_mean": _halve}}
    T_net = make_param_T_network(net, cfg).eval()
    x = inputs()
    bn = net[1]
    by_hand = F.batch_norm(
        net[0](x), bn.running_mean * 0.5, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    assert torch.allclose(T_net(x), by_hand, atol=1e-6)
    burned = remove_T_net(apply_T(T_net))
    assert torch.equal(burned[1].running_mean, bn.running_mean * 0.5)
    assert type(burned[1].running_mean) is Tensor


def test_root_module_can_be_patched() -> None:
    lin = nn.Linear(3, 2)
    T_net = make_param_T_network(lin, {"weight": ROUND})
    assert isinstance(T_net, TWrapper)
    x = inputs()
    assert torch.allclose(T_net(x), F.linear(x, ROUND(lin.weight), lin.bias), atol=1e-6)
    assert type(remove_T_net(T_net)) is nn.Linear


# --------------------------------------------------------------------------------------
# Round trips: remove_T_net, apply_T


def test_remove_restores_classes_keys_and_values() -> None:
    net = deep_net()
    cfg = make_param_T_config(net, ROUND, "weights")
    cfg = tree_update(cfg, make_param_T_config(net, ROUND, "biases"))
    T_net = make_param_T_network(net, cfg)
    plain = remove_T_net(T_net)
    assert module_classes(plain) == module_classes(net)
    assert_same_state(plain, net)
    # The patched network itself is left patched.
    assert isinstance(T_net.stem[0], TWrapper)


def test_apply_then_remove_gives_transformed_values_under_original_keys() -> None:
    net = deep_net().eval()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights")).eval()
    patched_out = T_net(inputs())
    plain = remove_T_net(apply_T(T_net))
    assert module_classes(plain) == module_classes(net)
    assert list(plain.state_dict()) == list(net.state_dict())
    raw = net.state_dict()
    for name, value in plain.state_dict().items():
        expected = ROUND(raw[name]) if name in WEIGHT_NAMES else raw[name]
        assert torch.equal(value, expected), name
    # Burn-in equals what the patched forward used.
    assert torch.equal(plain.eval()(inputs()), patched_out)


def test_burned_in_tensors_are_trainable_parameters() -> None:
    net = small_net()
    plain = remove_T_net(apply_T(make_param_T_network(net, make_param_T_config(net, ROUND))))
    for name, p in plain.named_parameters():
        assert isinstance(p, nn.Parameter), name
        assert p.requires_grad, name
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    before = plain[0].weight.detach().clone()
    plain(inputs(width=4)).sum().backward()
    opt.step()
    assert not torch.equal(plain[0].weight, before)


def test_apply_keeps_requires_grad_false() -> None:
    net = small_net()
    net[0].weight.requires_grad_(False)
    plain = remove_T_net(apply_T(make_param_T_network(net, make_param_T_config(net, ROUND))))
    assert not plain[0].weight.requires_grad
    assert plain[2].weight.requires_grad


def test_apply_inplace_keeps_parameter_objects() -> None:
    net = small_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    weight = T_net[0]._mod.weight
    raw = weight.detach().clone()
    assert apply_T(T_net, inplace=True) is T_net
    assert T_net[0]._mod.weight is weight
    assert torch.equal(weight, ROUND(raw))


def test_wrapper_apply_T_inplace() -> None:
    lin = nn.Linear(3, 3)
    raw = lin.weight.detach().clone()
    wrapper = TWrapper(lin, {"weight": ROUND})
    assert wrapper.apply_T() is wrapper
    assert torch.equal(lin.weight, ROUND(raw))
    copied = TWrapper(nn.Linear(3, 3), {"weight": ROUND}).apply_T(inplace=False)
    assert isinstance(copied, TWrapper)


# --------------------------------------------------------------------------------------
# inplace semantics and copies


def test_patch_without_inplace_leaves_input_untouched() -> None:
    net = deep_net()
    snapshot = copy.deepcopy(net)
    classes = module_classes(net)
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    T_net.train()(inputs())
    apply_T(T_net, inplace=True)
    assert module_classes(net) == classes
    assert_same_state(net, snapshot)
    for p, q in zip(net.parameters(), T_net.parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr()


def test_patch_inplace_patches_the_net_itself() -> None:
    net = deep_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"), inplace=True)
    assert T_net is net
    assert isinstance(net.stem[0], TWrapper)
    assert isinstance(net.blocks[1][1]["inner"].proj, TWrapper)
    plain = remove_T_net(net, inplace=True)
    assert plain is net
    assert not any(isinstance(m, TWrapper) for m in net.modules())


def test_apply_without_inplace_leaves_patched_net_untouched() -> None:
    net = small_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    snapshot = copy.deepcopy(T_net.state_dict())
    burned = apply_T(T_net)
    assert burned is not T_net
    for key, value in T_net.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert not torch.equal(burned[0]._mod.weight, T_net[0]._mod.weight)


def test_apply_without_inplace_does_not_copy_replaced_tensors() -> None:
    net = small_net()
    produced: list[Tensor] = []

    def recording_round(x: Tensor) -> Tensor:
        out = ROUND(x)
        produced.append(out)
        return out

    T_net = make_param_T_network(net, make_param_T_config(net, recording_round, "weights"))
    produced.clear()
    burned = apply_T(T_net)
    # The transformed value is stored as it came out of the transform, not copied again.
    produced_ptrs = {t.data_ptr() for t in produced}
    assert burned[0]._mod.weight.data_ptr() in produced_ptrs
    assert burned[2]._mod.weight.data_ptr() in produced_ptrs
    # Every tensor of the result is its own storage, not the input's.
    input_ptrs = {t.data_ptr() for t in T_net.state_dict().values()}
    for name, t in burned.state_dict().items():
        assert t.data_ptr() not in input_ptrs, name


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda x: x, id="returns-input"),
        pytest.param(lambda x: x.view_as(x), id="returns-view"),
    ],
)
def test_apply_without_inplace_never_aliases_input(fn: Callable[[Tensor], Tensor]) -> None:
    net = small_net()
    T_net = make_param_T_network(net, make_param_T_config(net, fn, "weights"))
    burned = apply_T(T_net)
    input_ptrs = {t.data_ptr() for t in T_net.state_dict().values()}
    for name, t in burned.state_dict().items():
        assert t.data_ptr() not in input_ptrs, name
    with torch.no_grad():
        burned[0]._mod.weight.zero_()
    assert T_net[0]._mod.weight.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize(
    ("cfg", "fragments"),
    [
        pytest.param(
            {"stme": {"0": {"weight": ROUND}}},
            ["'stme'", "no sub-module", "did you mean 'stem'"],
            id="missing-module",
        ),
        pytest.param(
            {"blocks": {"0": {"porj": {"weight": ROUND}}}},
            ["'blocks.0.porj'", "did you mean 'proj'"],
            id="missing-nested-module",
        ),
        pytest.param(
            {"heads": {"a": {"wieght": ROUND}}},
            ["'heads.a.wieght'", "no parameter or buffer", "did you mean 'weight'"],
            id="missing-parameter",
        ),
        pytest.param(
            {"heads": {"a": {"weight": 3}}},
            ["'heads.a.weight'", "transform function", "3"],
            id="not-callable",
        ),
        pytest.param(
            {"stem": {"0": ROUND}},
            ["'stem.0'", "names the module Linear, not a tensor"],
            id="module-for-tensor",
        ),
        pytest.param(
            {"heads": {"a": {"weight": {"x": ROUND}}}},
            ["'heads.a.weight'", "no sub-module"],
            id="tree-for-tensor",
        ),
    ],
)
def test_bad_param_config_fails_at_patch_time(cfg: dict[str, Any], fragments: list[str]) -> None:
    net = deep_net()
    snapshot = copy.deepcopy(net)
    with pytest.raises(ConfigError) as info:
        make_param_T_network(net, cfg, inplace=True)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    # Nothing was patched before the error.
    assert module_classes(net) == module_classes(snapshot)


def test_bad_wrapper_config_fails() -> None:
    with pytest.raises(ConfigError, match="did you mean 'bias'"):
        TWrapper(nn.Linear(2, 2), {"bais": ROUND})
    with pytest.raises(ConfigError, match="transform function"):
        TWrapper(nn.Linear(2, 2), {"bias": "round"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="callable"):
        ActWrapper(nn.ReLU(), "round")  # type: ignore[arg-type]


def test_none_in_a_param_config_transforms_nothing() -> None:
    # As in the original: a None leaf is a tensor left as it is, but its name is checked.
    net = small_net()
    T_net = make_param_T_network(
        net, {"0": {"weight": None, "bias": _halve}, "2": {"weight": None}}
    )
    assert isinstance(T_net[0], TWrapper) and T_net[0].T_config == {"bias": _halve}
    assert type(T_net[2]) is nn.Linear
    assert TWrapper(nn.Linear(2, 2), {"weight": None}).T_config == {}
    with pytest.raises(ConfigError, match=r"'0\.wieght' names no parameter"):
        make_param_T_network(net, {"0": {"wieght": None}})


def test_patching_parameters_twice_is_refused_with_the_way_out() -> None:
    net = small_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    for cfg in (
        make_param_T_config(net, _halve, "biases"),
        make_param_T_config(T_net, _halve, "biases"),
    ):
        with pytest.raises(
            ConfigError, match=r"already has parameter transforms \(a TWrapper at '0'\); merge"
        ):
            make_param_T_network(T_net, cfg)
    both = tree_update(
        make_param_T_config(net, ROUND, "weights"), make_param_T_config(net, _halve, "biases")
    )
    assert make_param_T_network(remove_T_net(T_net), both)[0].T_config == {
        "weight": ROUND,
        "bias": _halve,
    }


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no sub-module"):
        make_param_T_network(small_net(), {"7": {"weight": ROUND}})


def test_bad_act_config_fails_at_patch_time() -> None:
    net = deep_net()
    with pytest.raises(ConfigError, match=r"'head' names no sub-module.*did you mean 'heads'"):
        make_act_T_network(net, {"head": {"a": {"": ROUND}}})
    with pytest.raises(ConfigError, match=r"'heads\.c'.*it has \['a', 'b'\]"):
        make_act_T_network(net, {"heads": {"c": {"": ROUND}}})
    with pytest.raises(ConfigError, match="transform function"):
        make_act_T_network(net, {"stem": {"": 1}})


# --------------------------------------------------------------------------------------
# Training through patches


def test_optimiser_step_moves_raw_parameters() -> None:
    # Evaluation mode: batch statistics would cancel the gradient of the bias before them.
    net = deep_net().eval()
    cfg = make_param_T_config(net, ROUND, "weights")
    cfg = tree_update(cfg, make_param_T_config(net, ROUND, "biases"))
    T_net = make_param_T_network(net, cfg)
    transformed = {
        f"{name}.{attr}": getattr(m._mod, attr)
        for name, m in T_net.named_modules()
        if isinstance(m, TWrapper)
        for attr in m.T_config
    }
    assert len(transformed) == 12
    before = {k: v.detach().clone() for k, v in transformed.items()}
    opt = torch.optim.SGD(T_net.parameters(), lr=0.05)
    (T_net(inputs()) ** 2).sum().backward()
    for name, p in transformed.items():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in transformed.items():
        assert not torch.equal(p.detach(), before[name]), name
    # The step reached the raw values: the input network still holds its own.
    assert torch.equal(net.stem[0].weight, before["stem.0.weight"])


def test_straight_through_gradient_equals_gradient_at_transformed_value() -> None:
    net = small_net()
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    x = inputs(width=4)
    T_net(x).sum().backward()
    w0 = ROUND(net[0].weight).detach().requires_grad_(True)
    w2 = ROUND(net[2].weight).detach().requires_grad_(True)
    F.linear(torch.relu(F.linear(x, w0, net[0].bias)), w2, net[2].bias).sum().backward()
    assert torch.allclose(T_net[0]._mod.weight.grad, w0.grad, atol=1e-6)
    assert torch.allclose(T_net[2]._mod.weight.grad, w2.grad, atol=1e-6)


def test_stochastic_transform_trains() -> None:
    net = small_net()
    gen = torch.Generator().manual_seed(3)
    T_fn = functools.partial(stochastic_rounding, num_levels=9, generator=gen)
    T_net = make_param_T_network(net, make_param_T_config(net, T_fn, "weights"))
    T_net(inputs(width=4)).sum().backward()
    assert T_net[0]._mod.weight.grad is not None
    assert T_net[0]._mod.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Activation transforms


def test_act_config_by_class() -> None:
    net = deep_net()
    cfg = make_act_T_config(net, ROUND, nn.LayerNorm)
    assert cfg == {
        "blocks": {
            "0": {"norm": {"": ROUND}},
            "1": {"0": {"norm": {"": ROUND}}, "1": {"inner": {"norm": {"": ROUND}}}},
        }
    }
    # Containers are selected by class too.
    assert make_act_T_config(net, ROUND, Block)["blocks"]["0"] == {"": ROUND}
    by_sequential = make_act_T_config(net, ROUND, nn.Sequential)
    assert by_sequential["stem"] == {"": ROUND}
    assert by_sequential["blocks"]["1"][""] is ROUND
    assert by_sequential["heads"]["b"] == {"": ROUND}
    assert make_act_T_config(net, ROUND, DeepNet) == {"": ROUND}


def test_act_config_default_selects_leaves() -> None:
    net = small_net()
    assert make_act_T_config(net, ROUND) == {"0": {"": ROUND}, "1": {"": ROUND}, "2": {"": ROUND}}
    assert make_act_T_config(net) == {}
    assert make_act_T_config(nn.ReLU(), ROUND) == {"": ROUND}


def test_act_transforms_inside_modules_that_never_call_their_children_are_refused() -> None:
    # MultiheadAttention reads out_proj's weight; the encoder layer's fast path (eval, no
    # grad) reads every child's tensors: a transform of a child's output would not run.
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    net = nn.Sequential(layer, nn.Linear(8, 2))
    assert make_act_T_config(net, ROUND) == {"0": {"": ROUND}, "1": {"": ROUND}}
    assert make_act_T_config(net, ROUND, nn.Linear) == {"1": {"": ROUND}}
    for tree in ({"0": {"linear1": {"": ROUND}}}, {"0": {"self_attn": {"out_proj": {"": ROUND}}}}):
        with pytest.raises(ConfigError, match=r"inside TransformerEncoderLayer, which reads"):
            make_act_T_network(net, tree)
    A_net = make_act_T_network(net, {"0": {"": _halve}})
    x = torch.randn(2, 3, 8)
    net.eval()
    A_net.eval()
    with torch.no_grad():  # the fast path: the layer's own output is still transformed
        assert torch.allclose(A_net(x), net[1](net[0](x) * 0.5), atol=1e-6)


def test_act_network_transforms_outputs() -> None:
    net = small_net()
    A_net = make_act_T_network(net, make_act_T_config(net, _halve, nn.Linear))
    assert isinstance(A_net[0], ActWrapper)
    assert isinstance(A_net[0]._mod, nn.Linear)
    assert type(A_net[1]) is nn.ReLU
    x = inputs(width=4)
    by_hand = net[2](torch.relu(net[0](x) * 0.5)) * 0.5
    assert torch.allclose(A_net(x), by_hand, atol=1e-6)
    # Without inplace, the input is untouched.
    assert type(net[0]) is nn.Linear


def test_act_network_inplace_and_root() -> None:
    net = small_net()
    assert make_act_T_network(net, {"0": {"": _halve}}, inplace=True) is net
    assert isinstance(net[0], ActWrapper)
    root = make_act_T_network(nn.ReLU(), {"": _halve})
    assert isinstance(root, ActWrapper)
    assert torch.equal(root(torch.tensor([-2.0, 4.0])), torch.tensor([0.0, 2.0]))


def test_act_wrapper_transforms_first_element_of_tuple_output() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    net = nn.Sequential(lstm)
    A_net = make_act_T_network(net, make_act_T_config(net, ROUND, nn.LSTM))
    x = torch.randn(2, 5, 3)
    out, (h, c) = A_net[0](x)
    ref_out, (ref_h, ref_c) = lstm(x)
    assert torch.equal(out, ROUND(ref_out))
    assert torch.equal(h, ref_h)
    assert torch.equal(c, ref_c)


def test_act_wrapper_rejects_other_outputs() -> None:
    class ToDict(nn.Module):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"x": x}

    wrapped = ActWrapper(ToDict(), _halve)
    with pytest.raises(TypeError, match="cannot transform an output of type dict"):
        wrapped(torch.ones(1))
    assert ActWrapper(ToDict())(torch.ones(1))["x"].item() == 1.0


@pytest.mark.parametrize("params_first", [True, False], ids=["params-first", "acts-first"])
def test_param_and_act_patches_combine_and_remove(params_first: bool) -> None:
    net = small_net()
    p_cfg = make_param_T_config(net, ROUND, "weights")
    a_cfg = make_act_T_config(net, _halve, nn.Linear)
    if params_first:
        both = make_act_T_network(make_param_T_network(net, p_cfg), a_cfg)
    else:
        both = make_param_T_network(make_act_T_network(net, a_cfg), p_cfg)
    for i in (0, 2):
        kinds = {type(m) for m in both[i].modules()}
        assert {ActWrapper, TWrapper, nn.Linear} <= kinds
    x = inputs(width=4)
    by_hand = (
        F.linear(
            torch.relu(F.linear(x, ROUND(net[0].weight), net[0].bias) * 0.5),
            ROUND(net[2].weight),
            net[2].bias,
        )
        * 0.5
    )
    assert torch.allclose(both(x), by_hand, atol=1e-6)
    plain = remove_T_net(both)
    assert module_classes(plain) == module_classes(net)
    assert_same_state(plain, net)
    burned = remove_T_net(apply_T(both))
    assert torch.equal(burned[0].weight, ROUND(net[0].weight))


# --------------------------------------------------------------------------------------
# Shared modules, copies, pickling, delegation


def test_shared_module_gets_one_wrapper() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.Tanh(), lin)
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    assert isinstance(T_net[0], TWrapper)
    assert T_net[2] is T_net[0]
    x = inputs()
    w = ROUND(lin.weight)
    by_hand = F.linear(torch.tanh(F.linear(x, w, lin.bias)), w, lin.bias)
    assert torch.allclose(T_net(x), by_hand, atol=1e-6)
    plain = remove_T_net(T_net)
    assert plain[0] is plain[2]
    assert type(plain[0]) is nn.Linear


def test_shared_module_gets_one_act_wrapper() -> None:
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.Tanh(), lin)
    A_net = make_act_T_network(net, make_act_T_config(net, _halve, nn.Linear))
    assert isinstance(A_net[0], ActWrapper)
    assert A_net[2] is A_net[0]


def test_tied_tensor_is_transformed_wherever_it_is_used() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, head)
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    tokens = torch.tensor([0, 3, 5])
    w = ROUND(emb.weight)
    by_hand = F.linear(F.embedding(tokens, w), w)
    patched_out = T_net(tokens)
    assert torch.allclose(patched_out, by_hand, atol=1e-6)
    for inplace in (False, True):
        burned = remove_T_net(apply_T(T_net, inplace=inplace))
        assert burned[0].weight is burned[1].weight
        # Transformed once, not twice.
        assert torch.equal(burned[0].weight, w)
        assert torch.allclose(burned(tokens), patched_out, atol=1e-6)


def test_deepcopy_and_pickle_of_patched_net() -> None:
    net = deep_net().eval()
    cfg = make_param_T_config(net, ROUND, "weights")
    T_net = make_act_T_network(
        make_param_T_network(net, cfg), make_act_T_config(net, _halve, nn.LayerNorm)
    ).eval()
    x = inputs()
    expected = T_net(x)
    for copied in (copy.deepcopy(T_net), pickle.loads(pickle.dumps(T_net))):
        assert isinstance(copied.stem[0], TWrapper)
        assert isinstance(copied.blocks[0].norm, ActWrapper)
        assert copied.stem[0].T_config["weight"].func is deterministic_rounding
        assert torch.equal(copied(x), expected)
        assert copied.stem[0]._mod.weight.data_ptr() != T_net.stem[0]._mod.weight.data_ptr()


def test_wrapper_delegates_attributes() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Conv1d(2, 4, 3))
    T_net = make_param_T_network(net, make_param_T_config(net, ROUND, "weights"))
    assert T_net[0].in_features == 3
    assert T_net[0].out_features == 2
    assert T_net[1].kernel_size == (3,)
    assert T_net[0].weight is T_net[0]._mod.weight
    A_net = make_act_T_network(T_net, {"0": {"": _halve}})
    assert A_net[0].in_features == 3
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = T_net[0].no_such_thing


def test_wrapper_reprs_name_the_transforms() -> None:
    T_net = make_param_T_network(small_net(), {"0": {"weight": ROUND}})
    assert "weight: functools.partial" in repr(T_net[0])
    assert "output:" in repr(ActWrapper(nn.ReLU(), _halve))


# --------------------------------------------------------------------------------------
# Modules that read their children's tensors directly


def test_attention_out_projection_is_transformed_in_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True)).eval()
    cfg = make_param_T_config(net, ROUND, "weights")
    assert cfg == {"0": {"in_proj_weight": ROUND, "out_proj": {"weight": ROUND}}}
    T_net = make_param_T_network(net, cfg).eval()
    x = torch.randn(2, 3, 4)
    patched, _ = T_net[0](x, x, x, need_weights=False)
    burned = remove_T_net(apply_T(T_net)).eval()
    expected, _ = burned[0](x, x, x, need_weights=False)
    assert torch.allclose(patched, expected, atol=1e-6)
    # Both projections were burned in; gradients reach both raw weights.
    assert torch.equal(burned[0].out_proj.weight, ROUND(net[0].out_proj.weight))
    T_net[0](x, x, x, need_weights=False)[0].sum().backward()
    assert T_net[0]._mod.in_proj_weight.grad.abs().sum() > 0
    assert T_net[0]._mod.out_proj._mod.weight.grad.abs().sum() > 0


def test_attention_is_wrapped_when_only_a_child_is_configured() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True)).eval()
    T_net = make_param_T_network(net, {"0": {"out_proj": {"bias": _halve}}}).eval()
    assert isinstance(T_net[0], TWrapper)
    assert T_net[0].T_config == {}
    x = torch.randn(1, 3, 4)
    burned = remove_T_net(apply_T(T_net)).eval()
    assert torch.equal(burned[0].out_proj.bias, net[0].out_proj.bias * 0.5)
    assert torch.allclose(T_net[0](x, x, x)[0], burned[0](x, x, x)[0], atol=1e-6)


@pytest.mark.parametrize("grad", [True, False], ids=["train-path", "fast-path"])
def test_transformer_layer_patched_forward_equals_burn_in(grad: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    net.eval()
    cfg = make_param_T_config(net, ROUND, "weights")
    cfg = tree_update(cfg, make_param_T_config(net, _halve, "norms"))
    T_net = make_param_T_network(net, cfg).eval()
    burned = remove_T_net(apply_T(T_net)).eval()
    x = torch.randn(2, 5, 8)
    with torch.set_grad_enabled(grad):
        assert torch.allclose(T_net(x), burned(x), atol=1e-5)
        assert not torch.allclose(T_net(x), net(x), atol=1e-3)


def test_act_wrapper_keeps_named_tuple_outputs() -> None:
    from typing import NamedTuple

    class Out(NamedTuple):
        value: Tensor
        aux: Tensor

    class Pair(nn.Module):
        def forward(self, x: Tensor) -> Out:
            return Out(x, x + 1)

    out = ActWrapper(Pair(), _halve)(torch.tensor([2.0]))
    assert isinstance(out, Out)
    assert out.value.item() == 1.0
    assert out.aux.item() == 3.0


def test_config_that_is_not_a_mapping_fails() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        make_param_T_network(small_net(), [ROUND])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a mapping"):
        make_act_T_network(small_net(), "relu")  # type: ignore[arg-type]
