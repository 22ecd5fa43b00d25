"""Tests for transform_core.pipeline: plans, patching, burn-in, tensor mode and reports."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import transform_core as tt
from transform_core import kernels, pipeline
from transform_core.checkpoint import SourceInfo, save_patched
from transform_core.errors import CheckpointError, ConfigError, RecipeError
from transform_core.patching import ActWrapper, TWrapper
from transform_core.pipeline import (
    Plan,
    burn_in,
    burn_in_tensors,
    checkpoint_report,
    output_metadata,
    patch_network,
    plan_network,
    plan_tensors,
)
from transform_core.recipe import Recipe, load_recipe, parse_recipe
from transform_core.registry import derive_seed
from transform_core.report import TensorReport
from transform_core.safetensors_io import save_safetensors

STOCHASTIC = """\
version: 1
seed: 5
params:
  - family: weights
    transform: stochastic_rounding
    args: {num_levels: 7}
  - family: biases
    transform: stochastic_rounding
    args: {num_levels: 5}
"""


def _recipe(text: str) -> Recipe:
    return parse_recipe(text, source="r.yaml")


def _rules(plan: Plan) -> dict[str, str | None]:
    return {t.info.name: t.rule.label if t.rule else None for t in plan.tensors}


def _names(plan: Plan) -> list[str]:
    return [t.info.name for t in plan.tensors]


def _shapes(net: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in net.state_dict().items()
    ]


# --- planning -----------------------------------------------------------------------------


def test_later_rule_wins_and_overlaps_are_listed(seeded_mlp: nn.Module) -> None:
    recipe = parse_recipe(
        """\
version: 1
params:
  - family: weights
    transform: deterministic_rounding
    args: {num_levels: 3}
  - match: "0.*"
    transform: deterministic_rounding
    args: {num_levels: 255}
"""
    )
    plan = plan_network(seeded_mlp, recipe)
    assert _rules(plan) == {
        "0.weight": "params[1]",
        "0.bias": "params[1]",
        "2.weight": "params[0]",
        "2.bias": None,
    }
    entry = plan.tensors[0]
    assert [r.label for r in entry.matched_by] == ["params[0]", "params[1]"]
    data = plan.to_dict()
    assert data["overlaps"] == [
        {"tensor": "0.weight", "rules": ["params[0]", "params[1]"], "winner": "params[1]"}
    ]
    assert data["unmatched_tensors"] == ["2.bias"]
    assert [r["matches"] for r in data["rules"]] == [
        ["0.weight", "2.weight"],
        ["0.weight", "0.bias"],
    ]
    # the winner's arguments are the ones bound
    assert plan.transform_for(entry).args["num_levels"] == 255  # type: ignore[union-attr]


def test_module_narrows_a_family(seeded_convnet: nn.Module) -> None:
    recipe = _recipe(
        """\
version: 1
params:
  - family: weights
    module: "Conv[123]d"
    transform: deterministic_rounding
    args: {num_levels: 15}
"""
    )
    plan = plan_network(seeded_convnet, recipe)
    assert [n for n, r in _rules(plan).items() if r] == ["0.weight"]
    # the linear layer's weight is a weight too, but not a Conv's
    assert plan.tensors[_names(plan).index("4.weight")].info.family == "weights"


def test_buffers_are_selected_only_through_a_family(seeded_convnet: nn.Module) -> None:
    everything = _recipe("version: 1\nparams:\n  - match: '*'\n    transform: identity\n")
    plan = plan_network(seeded_convnet, everything)
    buffers = {t.info.name for t in plan.tensors if t.info.is_buffer}
    assert buffers == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert all(_rules(plan)[b] is None for b in buffers)
    assert all(_rules(plan)[n] == "params[0]" for n in _names(plan) if n not in buffers)

    with_family = _recipe(
        """\
version: 1
families:
  stats: ["*.running_mean", "*.running_var"]
params:
  - family: stats
    transform: deterministic_rounding
    args: {num_levels: 255}
"""
    )
    plan = plan_network(seeded_convnet, with_family)
    assert [n for n, r in _rules(plan).items() if r] == ["1.running_mean", "1.running_var"]


def test_integer_buffers_are_never_transformed(seeded_convnet: nn.Module) -> None:
    recipe = _recipe(
        """\
version: 1
families:
  counters: ["*.num_batches_tracked"]
params:
  - family: counters
    transform: identity
"""
    )
    plan = plan_network(seeded_convnet, recipe)
    counter = plan.tensors[_names(plan).index("1.num_batches_tracked")]
    assert counter.info.family == "counters"
    assert counter.rule is None and counter.matched_by == ()
    with pytest.raises(RecipeError) as err:
        plan.check()
    assert str(err.value) == (
        "r.yaml:5: params[0]: matches no tensor it may transform (family=counters): "
        "'1.num_batches_tracked' is int64, and only float64, float32, float16 and bfloat16 "
        "tensors are transformed; fix the selector, or add 'optional: true' to the rule"
    )


def test_check_accepts_optional_rules_that_match_nothing(seeded_mlp: nn.Module) -> None:
    text = "version: 1\nparams:\n  - family: norms\n    transform: identity\n"
    plan = plan_network(seeded_mlp, _recipe(text + "    optional: true\n"))
    assert [r.label for r in plan.unmatched_rules()] == ["params[0]"]
    plan.check()
    with pytest.raises(RecipeError, match=r"^r\.yaml:3: params\[0\]: matches no tensor"):
        plan_network(seeded_mlp, _recipe(text)).check()


def test_a_rule_that_matches_only_tensors_never_transformed_says_why() -> None:
    rule = "version: 1\nparams:\n  - match: '{}'\n    transform: identity\n"
    plan = plan_tensors(
        [("a", (4,), "float8_e4m3fn"), ("b", (4,), "float32")], _recipe(rule.format("a"))
    )
    with pytest.raises(RecipeError) as err:
        plan.check()
    assert str(err.value) == (
        "r.yaml:3: params[0]: matches no tensor it may transform (match=a): 'a' is "
        "float8_e4m3fn, and only float64, float32, float16 and bfloat16 tensors are "
        "transformed; fix the selector, or add 'optional: true' to the rule"
    )

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("mask", torch.ones(2))

    with pytest.raises(RecipeError, match="'mask' is a buffer without a family; name it under"):
        plan_network(Masked(), _recipe(rule.format("mask"))).check()
    with pytest.raises(RecipeError, match=r"matches no tensor of the network \(match=nothing\)"):
        plan_network(Masked(), _recipe(rule.format("nothing"))).check()


def test_check_tries_each_transform_on_the_tensors_dtype_and_shape(seeded_mlp: nn.Module) -> None:
    channel = "version: 1\nparams:\n  - match: '*'\n    transform: stochastic_channel_rounding\n"
    plan = plan_network(seeded_mlp, _recipe(channel + "    args: {output_range: [-1, 1]}\n"))
    with pytest.raises(ConfigError) as err:
        plan.check()
    assert str(err.value).startswith(
        "r.yaml:3: params[0]: stochastic_channel_rounding cannot transform tensor '0.bias': "
        "needs a tensor of 2 or more dimensions, got shape (8,); "
    )
    int17 = "version: 1\nparams:\n  - family: weights\n    transform: int_quant\n"
    int17 += "    args: {n_bits: 17}\n"
    plan_network(seeded_mlp, _recipe(int17)).check()
    with pytest.raises(ConfigError, match=r"'0\.weight': n_bits must be at most 12 for float16"):
        plan_network(seeded_mlp.half(), _recipe(int17)).check()


def test_check_leaves_a_users_transform_to_the_real_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "positive_only.py").write_text(
        "import torch\n"
        "def log2_round(x):\n"
        "    if (x <= 0).any():\n"
        "        raise ValueError('needs positive values')\n"
        "    return torch.exp2(torch.log2(x).round())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rule = "version: 1\nparams:\n  - family: weights\n    transform: positive_only:log2_round\n"
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.uniform_(0.5, 3.0)
    plan_network(net, _recipe(rule)).check()  # made-up values would hold negatives
    plan = plan_network(net, _recipe(rule))
    burned, _ = burn_in(patch_network(net, plan), plan)
    assert set(burned.weight.detach().flatten().tolist()) <= {0.5, 1.0, 2.0, 4.0}
    with torch.no_grad():
        net.weight.fill_(-1.0)
    with pytest.raises(ConfigError, match=r"'weight'.*needs positive values"):
        burn_in(patch_network(net, plan), plan)


def test_check_leaves_the_random_streams_unused(seeded_mlp: nn.Module) -> None:
    plan = plan_network(seeded_mlp, _recipe(STOCHASTIC))
    unchecked = [burn_in(patch_network(seeded_mlp, plan), plan)[0].state_dict()]
    plan.check()
    checked = burn_in(patch_network(seeded_mlp, plan), plan)[0].state_dict()
    assert all(torch.equal(checked[k], unchecked[0][k]) for k in checked)


def test_unmatched_activation_rule_names_a_module(seeded_mlp: nn.Module) -> None:
    recipe = _recipe("version: 1\nactivations:\n  - module: Conv2d\n    transform: identity\n")
    with pytest.raises(RecipeError, match=r"params|activations\[0\]: matches no module"):
        plan_network(seeded_mlp, recipe).check()


def test_activation_rule_inside_attention_names_the_rule_and_the_fix() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    recipe = _recipe(
        "version: 1\nactivations:\n  - match: 're:.*\\.?out_proj'\n    transform: identity\n"
    )
    with pytest.raises(RecipeError) as err:
        plan_network(net, recipe)
    assert str(err.value).startswith("r.yaml:3: activations[0]: selects '1.out_proj', inside ")
    assert "MultiheadAttention '1'" in str(err.value)
    assert str(err.value).endswith(
        "narrow the rule (match:), or transform the output of '1' instead"
    )
    narrowed = _recipe("version: 1\nactivations:\n  - {match: '0', transform: identity}\n")
    assert [m.path for m in plan_network(net, narrowed).modules] == ["0"]


def test_seed_comes_from_the_argument_then_the_recipe_then_zero(seeded_mlp: nn.Module) -> None:
    assert plan_network(seeded_mlp, _recipe(STOCHASTIC)).seed == 5
    assert plan_network(seeded_mlp, _recipe(STOCHASTIC), seed=9).seed == 9
    assert plan_network(seeded_mlp, load_recipe("int8")).seed == 0
    bound = plan_network(seeded_mlp, _recipe(STOCHASTIC), seed=9).transform_for(
        plan_network(seeded_mlp, _recipe(STOCHASTIC)).tensors[0]
    )
    assert bound is not None and bound.seed == derive_seed(9, "0.weight")


def test_size_bits_count_the_recipe_widths(seeded_mlp: nn.Module) -> None:
    plan = plan_network(seeded_mlp, load_recipe("ternary"))
    before, after = plan.size_bits()
    weights, biases = 4 * 8 + 8 * 3, 8 + 3
    assert before == 32 * (weights + biases)
    assert after == 2 * weights + 32 * biases
    assert plan.to_dict()["size_bits"] == {"before": before, "after": after}


def test_activation_plan_and_patch(seeded_mlp: nn.Module) -> None:
    recipe = _recipe(
        """\
version: 1
activations:
  - module: Linear
    transform: deterministic_rounding
    args: {num_levels: 5}
  - match: "2"
    transform: deterministic_rounding
    args: {num_levels: 3}
"""
    )
    plan = plan_network(seeded_mlp, recipe)
    assert [(m.path, m.rule.label, len(m.matched_by)) for m in plan.modules] == [
        ("0", "activations[0]", 1),
        ("2", "activations[1]", 2),
    ]
    assert plan.to_dict()["overlaps"] == [
        {"module": "2", "rules": ["activations[0]", "activations[1]"], "winner": "activations[1]"}
    ]
    patched = patch_network(seeded_mlp, plan)
    assert isinstance(patched[0], ActWrapper) and isinstance(patched[2], ActWrapper)
    out = patched(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))
    assert out.detach().unique().numel() <= 3
    assert not isinstance(seeded_mlp[0], ActWrapper)  # the original is untouched


# --- tensor mode --------------------------------------------------------------------------


def test_plan_tensors_takes_families_from_names() -> None:
    recipe = _recipe(
        """\
version: 1
families:
  decays: ["*.alpha"]
params:
  - family: weights
    transform: deterministic_rounding
    args: {num_levels: 3}
  - family: decays
    transform: identity
"""
    )
    plan = plan_tensors(
        [
            ("fc.weight", (2, 2), "float32"),
            ("fc.bias", (2,), "float32"),
            ("lif.alpha", (2,), "float32"),
            ("steps", (), "int64"),
        ],
        recipe,
        seed=3,
    )
    assert [t.info.family for t in plan.tensors] == ["weights", "biases", "decays", None]
    assert _rules(plan) == {
        "fc.weight": "params[0]",
        "fc.bias": None,
        "lif.alpha": "params[1]",
        "steps": None,
    }
    assert plan.seed == 3 and plan.modules == ()
    plan.check()


@pytest.mark.parametrize(
    ("rule", "phrase"),
    [
        ("activations:\n  - module: Linear\n", "activation rules need a network"),
        ("params:\n  - family: weights\n    module: Linear\n", "'module:' needs a network"),
    ],
)
def test_plan_tensors_refuses_what_needs_a_network(rule: str, phrase: str) -> None:
    recipe = _recipe(f"version: 1\n{rule}    transform: identity\n")
    with pytest.raises(RecipeError) as err:
        plan_tensors([("fc.weight", (2, 2), "float32")], recipe)
    assert str(err.value).startswith("r.yaml:3: ")
    assert phrase in str(err.value)


def test_burn_in_tensors_is_order_independent_and_matches_network_mode(
    seeded_mlp: nn.Module,
) -> None:
    recipe = _recipe(STOCHASTIC)
    state = {k: v.clone() for k, v in seeded_mlp.state_dict().items()}
    plan = plan_tensors(_shapes(seeded_mlp), recipe)

    def run(order: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        burn_in_tensors(((n, state[n]) for n in order), plan, lambda n, t: out.update({n: t}))
        return out

    forward = run(list(state))
    backward = run(list(reversed(state)))
    assert all(torch.equal(forward[n], backward[n]) for n in state)
    assert not torch.equal(forward["0.weight"], state["0.weight"])
    assert forward["0.weight"].unique().numel() <= 7

    net_plan = plan_network(seeded_mlp, recipe)
    burned, _ = burn_in(patch_network(seeded_mlp, net_plan), net_plan)
    assert all(torch.equal(burned.state_dict()[n], forward[n]) for n in state)


def test_burn_in_tensors_reports_and_keeps_dtypes() -> None:
    recipe = _recipe(
        "version: 1\nparams:\n  - family: weights\n    transform: deterministic_rounding\n"
        "    args: {num_levels: 3}\n"
    )
    tensors = {
        "a.weight": torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=torch.float64),
        "a.bias": torch.tensor([0.3, 0.1]),
        "steps": torch.tensor(4),
    }
    plan = plan_tensors(
        [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()],
        recipe,
    )
    written: dict[str, torch.Tensor] = {}
    seen: list[str] = []
    report = burn_in_tensors(
        tensors.items(), plan, written.__setitem__, progress=seen.append, meta={"run": 1}
    )
    assert seen == list(tensors)
    assert written["a.weight"].dtype == torch.float64
    assert written["a.weight"].tolist() == [-1.0, 0.0, 0.0, 1.0]
    assert written["a.bias"] is tensors["a.bias"]
    by_name = {t.name: t for t in report.tensors}
    assert by_name["a.weight"].max_abs_error == pytest.approx(0.4)
    assert by_name["a.weight"].transform == "deterministic_rounding(num_levels=3)"
    assert by_name["a.bias"].max_abs_error is None and by_name["a.bias"].transform is None
    assert report.meta == {"run": 1}


def _reported_run(tensors: dict[str, torch.Tensor], plan: Plan) -> tuple[list[Any], list[str]]:
    seen: list[str] = []
    report = burn_in_tensors(tensors.items(), plan, lambda n, t: None, progress=seen.append)
    return [dataclasses.astuple(t) for t in report.tensors], seen


def test_burn_in_tensors_reports_the_same_in_the_background_or_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = {f"l{i}.weight": torch.randn(64, 64, generator=generator) for i in range(5)}
    tensors["big.weight"] = torch.randn(128, 128, generator=generator)
    tensors["l9.weight"] = torch.randn(64, 64, generator=generator)
    plan = plan_tensors(
        [(n, tuple(t.shape), "float32") for n, t in tensors.items()], _recipe(STOCHASTIC)
    )
    threads: list[str] = []
    real_report = pipeline.tensor_report

    def spy(*args: Any, **kwargs: Any) -> TensorReport:
        threads.append(threading.current_thread().name)
        return real_report(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tensor_report", spy)
    # 64x64 float32 pairs (32 KiB) go behind, the 128x128 pair (128 KiB) is reported inline.
    monkeypatch.setattr(pipeline, "REPORT_BEHIND_BYTES", 64 << 10)
    behind, seen = _reported_run(tensors, plan)
    assert seen == list(tensors)
    assert [t.startswith("rockq-report") for t in threads] == [n != "big.weight" for n in tensors]
    monkeypatch.setattr(pipeline, "REPORT_BEHIND_BYTES", 0)
    threads.clear()
    inline, seen = _reported_run(tensors, plan)
    assert not any(t.startswith("rockq-report") for t in threads)
    assert inline == behind and seen == list(tensors)


def test_burn_in_tensors_raises_a_background_report_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tensors = {f"l{i}.weight": torch.ones(4, 4) * i for i in range(3)}
    plan = plan_tensors(
        [(n, tuple(t.shape), "float32") for n, t in tensors.items()], _recipe(STOCHASTIC)
    )
    real_report = pipeline.tensor_report

    def failing(name: str, *args: Any, **kwargs: Any) -> TensorReport:
        if name == "l1.weight":
            raise ValueError("l1.weight: planted")
        return real_report(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "tensor_report", failing)
    seen: list[str] = []
    with pytest.raises(ValueError, match="planted"):
        burn_in_tensors(tensors.items(), plan, lambda n, t: None, progress=seen.append)
    assert seen == ["l0.weight"]


def test_burn_in_tensors_waits_for_each_write_and_loads_kernels_for_big_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _recipe(STOCHASTIC)
    tensors = {f"l{i}.weight": torch.randn(40, 40) for i in range(3)}
    plan = plan_tensors([(n, (40, 40), "float32") for n in tensors], recipe)
    events: list[str] = []
    loads: list[int] = []
    monkeypatch.setattr(kernels, "start_loading_compiled_kernels", lambda: loads.append(1))
    burn_in_tensors(
        tensors.items(), plan, lambda n, t: events.append(f"write {n}"),
        wait=lambda: events.append("wait"),
    )  # fmt: skip
    assert events == [e for n in tensors for e in ("wait", f"write {n}")]
    assert loads == []  # 4800 elements: the chains do
    monkeypatch.setattr(pipeline, "_PRELOAD_ELEMENTS", 4800)
    burn_in_tensors(tensors.items(), plan, lambda n, t: None)
    assert loads == [1]


# --- patching and burn-in -----------------------------------------------------------------


def test_patch_network_copies_unless_in_place(seeded_mlp: nn.Module) -> None:
    plan = plan_network(seeded_mlp, load_recipe("ternary"))
    copy = patch_network(seeded_mlp, plan)
    assert isinstance(copy[0], TWrapper) and isinstance(seeded_mlp[0], nn.Linear)
    same = patch_network(seeded_mlp, plan, inplace=True)
    assert isinstance(seeded_mlp[0], TWrapper) and same is seeded_mlp


def test_burn_in_works_in_place_and_equals_the_patched_forward(seeded_mlp: nn.Module) -> None:
    plan = plan_network(seeded_mlp, load_recipe("ternary"))
    params = {name: p for name, p in seeded_mlp.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in params.items()}
    raw = {name: p.detach().clone() for name, p in params.items()}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    patched = patch_network(seeded_mlp, plan, inplace=True)
    expected = patched(x).detach()
    names: list[str] = []
    burned, report = burn_in(patched, plan, progress=names.append, meta={"k": "v"})
    assert names == ["0.weight", "2.weight"]
    assert isinstance(burned[0], nn.Linear)
    assert list(burned.state_dict()) == list(raw)
    for name, p in burned.named_parameters():
        assert p is params[name] and p.data_ptr() == pointers[name]
    assert torch.equal(burned(x), expected)
    assert burned[0].weight.unique().numel() <= 3
    assert torch.equal(burned[0].bias, raw["0.bias"])
    # report: every tensor in network order, errors measured against the raw values
    assert [t.name for t in report.tensors] == list(raw)
    weight = report.tensors[0]
    assert weight.max_abs_error == pytest.approx(
        float((raw["0.weight"] - burned[0].weight.detach()).abs().max())
    )
    assert weight.transform == "deterministic_rounding(num_levels=3, maintain_zero=True)"
    assert report.tensors[1].max_abs_error is None and report.tensors[1].transform is None
    assert report.meta == {"k": "v"}


def test_burn_in_reports_buffers_with_their_family(seeded_convnet: nn.Module) -> None:
    plan = plan_network(seeded_convnet, load_recipe("int8"))
    burned, report = burn_in(patch_network(seeded_convnet, plan), plan)
    assert [t.name for t in report.tensors] == list(burned.state_dict())
    families = {t.name: t.family for t in report.tensors}
    assert families["1.weight"] == "norms" and families["1.num_batches_tracked"] is None


# --- metadata and reports -----------------------------------------------------------------


def test_output_metadata(seeded_mlp: nn.Module) -> None:
    recipe = load_recipe("qat4")
    plan = plan_network(seeded_mlp, recipe, seed=7)
    meta = output_metadata(plan, version="9.9", input_sha256="ab" * 32)
    assert meta["rockq.format"] == "burned"
    assert meta["rockq.version"] == "9.9"
    assert meta["rockq.recipe"] == recipe.text
    assert meta["rockq.recipe_source"] == "builtin:qat4"
    assert meta["rockq.seed"] == "7"
    assert meta["rockq.input_sha256"] == "ab" * 32
    assert json.loads(meta["rockq.tensors"]) == {
        "0.weight": {
            "family": "weights",
            "transform": "stochastic_rounding",
            "args": {"num_levels": 15, "maintain_zero": True},
            "rule": "params[0]",
        },
        "0.bias": {
            "family": "biases",
            "transform": "stochastic_rounding",
            "args": {"num_levels": 255, "maintain_zero": True},
            "rule": "params[1]",
        },
        "2.weight": {
            "family": "weights",
            "transform": "stochastic_rounding",
            "args": {"num_levels": 15, "maintain_zero": True},
            "rule": "params[0]",
        },
        "2.bias": {
            "family": "biases",
            "transform": "stochastic_rounding",
            "args": {"num_levels": 255, "maintain_zero": True},
            "rule": "params[1]",
        },
    }
    assert output_metadata(plan, version="9.9", input_sha256=None)["rockq.input_sha256"] == ""


def _burned_file(tmp_path: Path, net: nn.Module) -> tuple[Path, dict[str, torch.Tensor]]:
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    plan = plan_network(net, load_recipe("ternary"))
    burned, _ = burn_in(patch_network(net, plan), plan)
    path = tmp_path / "burned.safetensors"
    save_safetensors(
        burned.state_dict(), path, output_metadata(plan, version="0", input_sha256=None)
    )
    return path, raw


def test_checkpoint_report_on_a_burned_file(tmp_path: Path, seeded_mlp: nn.Module) -> None:
    path, raw = _burned_file(tmp_path, seeded_mlp)
    reference = tmp_path / "raw.safetensors"
    save_file(raw, str(reference))
    report = checkpoint_report(path, reference=reference, limits={"weights": (True, 2)})
    by_name = {t.name: t for t in report.tensors}
    assert by_name["0.weight"].transform == (
        "deterministic_rounding(num_levels=3, maintain_zero=True)"
    )
    assert by_name["0.weight"].distinct <= 3
    assert by_name["0.weight"].max_abs_error is not None and by_name["0.weight"].max_abs_error > 0
    assert by_name["0.bias"].transform is None and by_name["0.bias"].max_abs_error == 0
    assert report.meta == {"checkpoint": str(path)}
    # ternary values +-m are not integers, so a signed 2-bit limit is violated
    assert {v.name for v in report.violations} == {"0.weight", "2.weight"}


def test_checkpoint_report_keeps_the_networks_families(
    tmp_path: Path, seeded_convnet: nn.Module
) -> None:
    plan = plan_network(seeded_convnet, load_recipe("int8"))
    burned, written = burn_in(patch_network(seeded_convnet, plan), plan)
    path = tmp_path / "burned.safetensors"
    save_safetensors(
        burned.state_dict(), path, output_metadata(plan, version="0", input_sha256=None)
    )
    read = checkpoint_report(path)
    # from names alone, the norm layer's weight would look like a weight
    assert [(t.name, t.family, t.transform) for t in read.tensors] == [
        (t.name, t.family, t.transform) for t in written.tensors
    ]
    assert {t.name: t.family for t in read.tensors}["1.weight"] == "norms"


def test_checkpoint_report_on_a_state_dict_and_a_pickle_reference(
    tmp_path: Path, seeded_mlp: nn.Module
) -> None:
    state = tmp_path / "state.pt"
    torch.save(seeded_mlp.state_dict(), state)
    whole = tmp_path / "whole.pt"
    torch.save(seeded_mlp, whole)
    report = checkpoint_report(state, reference=whole)
    assert [t.family for t in report.tensors] == ["weights", "biases", "weights", "biases"]
    assert all(t.max_abs_error == 0 for t in report.tensors)
    assert "not_in_reference" not in report.meta
    # A reference with some of the tensors: the others are named, not silently left blank.
    first = tmp_path / "first.pt"
    torch.save({f"0.{k}": v for k, v in seeded_mlp[0].state_dict().items()}, first)
    report = checkpoint_report(state, reference=first)
    assert report.meta["not_in_reference"] == ["2.weight", "2.bias"]
    assert json.loads(report.to_json())["meta"]["not_in_reference"] == ["2.weight", "2.bias"]


def test_checkpoint_report_on_a_patched_checkpoint(tmp_path: Path, seeded_mlp: nn.Module) -> None:
    whole = tmp_path / "net.pt"
    torch.save(seeded_mlp, whole)
    patched = tmp_path / "net.patched.safetensors"
    source = SourceInfo("pickle", str(whole), "0" * 64)
    save_patched(
        patched,
        seeded_mlp.state_dict(),
        source=source,
        recipe=load_recipe("ternary").text,
        seed=0,
        network_bytes=whole.read_bytes(),
    )
    report = checkpoint_report(patched)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["0.weight"].distinct <= 3
    assert by_name["0.weight"].max_abs_error is not None
    assert by_name["0.bias"].transform is None
    # With a reference, errors are measured against it, not against the raw values.
    ones = tmp_path / "ones.pt"
    torch.save({k: torch.ones_like(v) for k, v in seeded_mlp.state_dict().items()}, ones)
    against = {t.name: t for t in checkpoint_report(patched, reference=ones).tensors}
    assert against.keys() == by_name.keys()
    assert against["0.weight"].transform == by_name["0.weight"].transform
    assert against["0.weight"].distinct == by_name["0.weight"].distinct
    assert against["0.bias"].max_abs_error == pytest.approx(
        float((seeded_mlp[0].bias.detach() - 1).abs().max())
    )
    assert against["0.weight"].max_abs_error != by_name["0.weight"].max_abs_error


def test_checkpoint_report_errors(tmp_path: Path, seeded_mlp: nn.Module) -> None:
    path, _ = _burned_file(tmp_path, seeded_mlp)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors: 0\.weight: has shape \(2, 2\)"):
        checkpoint_report(path, reference=wrong)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint_report(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"rockq.tensors": "{not json"})
    with pytest.raises(CheckpointError, match=r"rockq\.tensors: has malformed"):
        checkpoint_report(bad)
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"rockq.families": '{"w": 3}'})
    with pytest.raises(CheckpointError, match=r"rockq\.families: has malformed"):
        checkpoint_report(bad)


def test_burn_in_never_loads_the_compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # One transform per tensor: loading the kernels would cost more than it saves.
    from transform_core import kernels

    monkeypatch.setattr(kernels, "LOAD_AFTER_SECONDS", 0.0)
    # As in a fresh process, whatever earlier tests loaded.
    monkeypatch.setattr(kernels._Compiled, "thread", None)
    monkeypatch.setattr(kernels._Compiled, "module", None)
    started: list[int] = []
    monkeypatch.setattr(kernels, "_start_loading", lambda: started.append(1))
    net = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 300))
    recipe = parse_recipe(
        "version: 1\nparams:\n  - family: weights\n    transform: deterministic_rounding\n",
        "recipe.yaml",
    )
    plan = plan_network(net, recipe)
    burn_in(patch_network(net, plan), plan)
    assert started == []
    tt.deterministic_rounding(torch.randn(300, 300))  # outside burn-in, the work counts
    assert started
