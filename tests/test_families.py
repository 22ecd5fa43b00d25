"""Tests for transform_core.families: which tensor belongs to which family."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from transform_core.errors import ConfigError
from transform_core.families import (
    BUILTIN_FAMILIES,
    family_for_name,
    name_matches,
    param_families,
    tensor_infos,
    tied_names,
)

# --------------------------------------------------------------------------------------
# Small modules used below


class Decaying(nn.Module):
    """A module that declares families for its own parameters and buffers."""

    transform_families: ClassVar[dict[str, str]] = {
        "alpha": "decays",
        "tau": "time_constants",
        "weight": "kernels",
    }

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((3,), 0.9))
        self.weight = nn.Parameter(torch.ones(3))
        self.gain = nn.Parameter(torch.ones(3))
        self.register_buffer("tau", torch.full((3,), 0.02))
        self.register_buffer("state", torch.zeros(3))


class KernelLinear(nn.Linear):
    """A Linear subclass whose declaration overrides the built-in family of its weight."""

    transform_families: ClassVar[dict[str, str]] = {"weight": "kernels"}


class MaskedLinear(nn.Linear):
    """A Linear with a buffer whose name looks like a weight's."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.register_buffer("weight_mask", torch.ones(2, 2))


# --------------------------------------------------------------------------------------
# Built-in families


def _rnn_expected(module: nn.Module) -> dict[str, str]:
    return {
        name: ("weights" if name.startswith("weight_") else "biases")
        for name, _ in module.named_parameters()
    }


BUILTIN_CASES: list[tuple[str, nn.Module, dict[str, str | None]]] = [
    ("Linear", nn.Linear(2, 3), {"weight": "weights", "bias": "biases"}),
    ("Linear-nobias", nn.Linear(2, 3, bias=False), {"weight": "weights"}),
    ("Bilinear", nn.Bilinear(2, 2, 3), {"weight": "weights", "bias": "biases"}),
    ("Conv1d", nn.Conv1d(2, 3, 3), {"weight": "weights", "bias": "biases"}),
    ("Conv2d", nn.Conv2d(2, 3, 3), {"weight": "weights", "bias": "biases"}),
    ("Conv3d", nn.Conv3d(2, 3, 1), {"weight": "weights", "bias": "biases"}),
    ("ConvTranspose1d", nn.ConvTranspose1d(2, 3, 3), {"weight": "weights", "bias": "biases"}),
    ("ConvTranspose2d", nn.ConvTranspose2d(2, 3, 3), {"weight": "weights", "bias": "biases"}),
    ("ConvTranspose3d", nn.ConvTranspose3d(2, 3, 1), {"weight": "weights", "bias": "biases"}),
    ("Embedding", nn.Embedding(5, 3), {"weight": "weights"}),
    ("EmbeddingBag", nn.EmbeddingBag(5, 3), {"weight": "weights"}),
    ("BatchNorm1d", nn.BatchNorm1d(3), {"weight": "norms", "bias": "norms"}),
    ("BatchNorm2d", nn.BatchNorm2d(3), {"weight": "norms", "bias": "norms"}),
    ("BatchNorm3d", nn.BatchNorm3d(3), {"weight": "norms", "bias": "norms"}),
    ("InstanceNorm1d", nn.InstanceNorm1d(3, affine=True), {"weight": "norms", "bias": "norms"}),
    ("LayerNorm", nn.LayerNorm(3), {"weight": "norms", "bias": "norms"}),
    ("GroupNorm", nn.GroupNorm(1, 3), {"weight": "norms", "bias": "norms"}),
    ("RMSNorm", nn.RMSNorm(3), {"weight": "norms"}),
    ("PReLU", nn.PReLU(), {"weight": None}),
    (
        "MultiheadAttention",
        nn.MultiheadAttention(4, 2),
        {
            "in_proj_weight": "weights",
            "in_proj_bias": "biases",
            "out_proj.weight": "weights",
            "out_proj.bias": "biases",
        },
    ),
    (
        "MultiheadAttention-kdim",
        nn.MultiheadAttention(4, 2, kdim=3, vdim=5, add_bias_kv=True),
        {
            "q_proj_weight": "weights",
            "k_proj_weight": "weights",
            "v_proj_weight": "weights",
            "in_proj_bias": "biases",
            "bias_k": "biases",
            "bias_v": "biases",
            "out_proj.weight": "weights",
            "out_proj.bias": "biases",
        },
    ),
]


@pytest.mark.parametrize(
    ("module", "expected"),
    [pytest.param(m, e, id=i) for i, m, e in BUILTIN_CASES],
)
def test_builtin_families(module: nn.Module, expected: dict[str, str | None]) -> None:
    assert param_families(module) == expected


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(nn.RNN(3, 4, num_layers=2), id="RNN"),
        pytest.param(nn.GRU(3, 4, bidirectional=True), id="GRU"),
        pytest.param(nn.LSTM(3, 4, proj_size=2, num_layers=2, bidirectional=True), id="LSTM-proj"),
        pytest.param(nn.RNNCell(3, 4), id="RNNCell"),
        pytest.param(nn.LSTMCell(3, 4), id="LSTMCell"),
        pytest.param(nn.GRUCell(3, 4), id="GRUCell"),
    ],
)
def test_recurrent_weights_and_biases(module: nn.Module) -> None:
    families = param_families(module)
    assert families == _rnn_expected(module)
    assert set(families.values()) == {"weights", "biases"}


def test_lstm_projection_weight_is_a_weight() -> None:
    families = param_families(nn.LSTM(3, 4, proj_size=2))
    assert families["weight_hr_l0"] == "weights"


def test_builtin_family_names() -> None:
    assert BUILTIN_FAMILIES == ("weights", "biases", "norms")


def test_unknown_parameters_have_no_family() -> None:
    module = Decaying()
    families = param_families(module)
    # gain is declared nowhere and held by no built-in layer.
    assert families["gain"] is None
    assert "state" not in families


def test_builtin_families_never_cover_buffers() -> None:
    families = param_families(nn.BatchNorm1d(3))
    assert set(families) == {"weight", "bias"}
    infos = tensor_infos(nn.BatchNorm1d(3))
    assert infos["running_mean"].is_buffer
    assert infos["running_mean"].family is None
    assert infos["num_batches_tracked"].family is None


def test_buffer_named_like_a_weight_gets_no_builtin_family() -> None:
    families = param_families(MaskedLinear())
    assert families == {"weight": "weights", "bias": "biases"}


def test_nested_names_use_qualified_paths() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.LayerNorm(3)))
    assert param_families(net) == {
        "0.weight": "weights",
        "0.bias": "biases",
        "2.0.weight": "norms",
        "2.0.bias": "norms",
    }


# --------------------------------------------------------------------------------------
# Declarations and rules


def test_declaration_gives_families_to_parameters_and_buffers() -> None:
    families = param_families(Decaying())
    assert families["alpha"] == "decays"
    assert families["tau"] == "time_constants"
    assert families["weight"] == "kernels"


def test_declaration_overrides_builtin() -> None:
    assert param_families(KernelLinear(2, 2)) == {"weight": "kernels", "bias": "biases"}


def test_rule_overrides_declaration_and_builtin() -> None:
    net = nn.Sequential(Decaying(), nn.Linear(2, 2))
    families = param_families(net, {"*.alpha": "leaks", "1.weight": "heads"})
    assert families["0.alpha"] == "leaks"
    assert families["1.weight"] == "heads"
    # Tensors no rule matches keep their declared or built-in families.
    assert families["0.tau"] == "time_constants"
    assert families["1.bias"] == "biases"


def test_later_rules_win() -> None:
    lin = nn.Linear(2, 2)
    assert param_families(lin, {"*": "all", "weight": "w"})["weight"] == "w"
    assert param_families(lin, {"weight": "w", "*": "all"})["weight"] == "all"


def test_star_dot_pattern_matches_top_level_name() -> None:
    families = param_families(Decaying(), {"*.gain": "gains"})
    assert families["gain"] == "gains"
    nested = param_families(nn.Sequential(nn.Sequential(Decaying())), {"*.gain": "gains"})
    assert nested["0.0.gain"] == "gains"


def test_regex_rule_matches_whole_name() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    families = param_families(net, {r"re:1\.(weight|bias)": "head"})
    assert families == {
        "0.weight": "weights",
        "0.bias": "biases",
        "1.weight": "head",
        "1.bias": "head",
    }
    # A regex must match the whole name, not a part of it.
    assert param_families(net, {"re:weight": "x"})["0.weight"] == "weights"


def test_rule_gives_a_buffer_a_family() -> None:
    net = nn.Sequential(nn.BatchNorm1d(3))
    families = param_families(net, {"*.running_mean": "stats"})
    assert families["0.running_mean"] == "stats"
    assert "0.running_var" not in families


def test_name_matches() -> None:
    assert name_matches("a.b.alpha", "*.alpha")
    assert name_matches("alpha", "*.alpha")
    assert not name_matches("xalpha", "*.alpha")
    assert name_matches("enc.0.weight", "enc.*")
    assert name_matches("layers.3.weight", r"re:layers\.\d+\.weight")
    assert not name_matches("layers.3.weight.extra", r"re:layers\.\d+\.weight")


# --------------------------------------------------------------------------------------
# Tensor mode and shared tensors


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weight", "weights"),
        ("fc.weight", "weights"),
        ("encoder.layers.0.bias", "biases"),
        ("bias", "biases"),
        ("lif.alpha", None),
        ("fc.weightx", None),
        ("fc.my_weight", None),
    ],
)
def test_family_for_name(name: str, expected: str | None) -> None:
    assert family_for_name(name) == expected


def test_family_for_name_rules_come_first() -> None:
    rules = {"*.alpha": "decays", "head.*": "heads"}
    assert family_for_name("lif.alpha", rules) == "decays"
    assert family_for_name("alpha", rules) == "decays"
    assert family_for_name("head.weight", rules) == "heads"
    assert family_for_name("body.weight", rules) == "weights"


def test_shared_module_listed_once() -> None:
    lin = nn.Linear(2, 2)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    assert list(param_families(net)) == ["0.weight", "0.bias"]


def test_tied_tensor_listed_once() -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5)
    head.weight = emb.weight
    net = nn.Sequential(emb, head)
    families = param_families(net)
    assert families == {"0.weight": "weights", "1.bias": "biases"}


def test_tensor_info_fields() -> None:
    net = nn.Sequential(nn.Conv1d(2, 4, 3, bias=False).double())
    info = tensor_infos(net)["0.weight"]
    assert info.module_path == "0"
    assert info.attr == "weight"
    assert info.module_class == "Conv1d"
    assert info.family == "weights"
    assert not info.is_buffer
    assert info.shape == (4, 2, 3)
    assert info.dtype == "float64"
    assert info.numel == 24


@pytest.mark.filterwarnings("ignore:Lazy modules:UserWarning")
def test_lazy_module_before_its_first_forward_is_a_clear_error() -> None:
    net = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ConfigError, match=r"'0.weight' of LazyLinear is not initialised"):
        tensor_infos(net)


def test_tied_names_lists_the_other_names_of_shared_tensors() -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10)
    head.weight = emb.weight
    shared = nn.Linear(2, 2)
    net = nn.Sequential(emb, head, shared, shared)
    assert tied_names(net) == {
        "1.weight": ("0.weight", "Linear"),
        "3.weight": ("2.weight", "Linear"),
        "3.bias": ("2.bias", "Linear"),
    }
    assert set(tensor_infos(net)) == {"0.weight", "1.bias", "2.weight", "2.bias"}
    assert tied_names(nn.Linear(2, 2)) == {}
