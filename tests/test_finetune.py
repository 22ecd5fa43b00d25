"""Fine-tuning: the recipe section, the loop, exact resume, gradients, DDP and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from transform_core.checkpoint import load_network, load_patched
from transform_core.data import LoaderData, TensorData
from transform_core.errors import ConfigError, RecipeError
from transform_core.finetune import (
    CheckpointTarget,
    FinetuneConfig,
    evaluate,
    finetune,
    finetune_patched,
    log_path_for,
    lr_factor,
)
from transform_core.finetune_checkpoints import RunLog
from transform_core.pipeline import patch_network, plan_network
from transform_core.recipe import Recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
version: 1
seed: 3
params:
  - family: weights
    transform: stochastic_rounding
    args: {num_levels: 3}
  - family: biases
    transform: deterministic_rounding
    args: {num_levels: 255}
finetune:
  epochs: 3
  batch_size: 16
  optimizer: {name: adamw, lr: 0.01, weight_decay: 0.01}
  schedule: {name: cosine, warmup_steps: 2}
  checkpoint_every: 2
  eval_every: 3
"""


def _net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Dropout draws from torch's global generator: resuming must restore it too.
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _data(n: int = 50) -> TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + 20, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorData(x[:n], y[:n], x[n:], y[n:])


class _Stop(Exception):
    pass


def _setup(tmp_path: Path, text: str = RECIPE) -> tuple[Recipe, Any]:
    torch.save(_net(), tmp_path / "net.pt")
    return parse_recipe(text), load_network(tmp_path / "net.pt")


def _run(recipe: Recipe, loaded: Any, out: Path, data: Any, stop_at: int | None = None) -> Any:
    net = loaded.module
    plan = plan_network(net, recipe)
    target = CheckpointTarget(out, loaded.source, recipe.text, loaded.network_bytes)

    def on_event(event: dict[str, Any]) -> None:
        if stop_at is not None and event["kind"] == "train" and event["step"] == stop_at:
            raise _Stop

    assert recipe.finetune is not None
    T_net = patch_network(net, plan)
    return finetune(
        T_net, plan, recipe.finetune, data, float_net=net, target=target, on_event=on_event
    )


def _resume(recipe: Recipe, out: Path, data: Any) -> Any:
    ckpt = load_patched(out)
    plan = plan_network(ckpt.network, recipe)
    T_net = patch_network(ckpt.network, plan, inplace=True)
    target = CheckpointTarget(out, ckpt.source, recipe.text, ckpt.network_bytes)
    assert recipe.finetune is not None
    return finetune(T_net, plan, recipe.finetune, data, target=target, resume=ckpt)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_patched(path).state_dict


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# --- the recipe section ------------------------------------------------------------------


def test_section_parses_into_a_config() -> None:
    config = parse_recipe(RECIPE).finetune
    assert config == FinetuneConfig(
        epochs=3,
        batch_size=16,
        optimizer="adamw",
        optimizer_args={"weight_decay": 0.01},
        lr=0.01,
        schedule="cosine",
        warmup_steps=2,
        checkpoint_every=2,
        eval_every=3,
    )
    assert parse_recipe(RECIPE.split("finetune:")[0]).finetune is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{epochs: 0}", "finetune.epochs: must be a whole number >= 1, got 0"),
        ("{epochs: 2, steps: 5}", "finetune.steps: give 'epochs' or 'steps', not both"),
        ("{epoch: 2}", "finetune.epoch: unknown key 'epoch' (did you mean 'epochs'?)"),
        ("{optimizer: adma}", "finetune.optimizer: must be one of adam, adamw, sgd, got 'adma'"),
        ("{optimizer: {name: sgd, lr: -1}}", "finetune.optimizer.lr: sgd: Invalid learning rate"),
        ("{optimizer: {name: sgd, betas: [0.9, 0.9]}}", "'sgd' has no argument 'betas'"),
        (
            "{optimizer: {name: adam, betas: [0.9, 0.9, 0.9]}}",
            "finetune.optimizer.betas: must be a list of 2 finite numbers, got [0.9, 0.9, 0.9]",
        ),
        (
            "{optimizer: {name: adam, fused: true, foreach: true}}",
            "finetune.optimizer: adam: `fused` and `foreach` cannot be `True` together",
        ),
        ("{optimizer: {name: sgd, nesterov: true}}", "optimizer.nesterov: sgd: Nesterov momentum"),
        ("{optimizer: {name: adam, capturable: true}}", "optimizer.capturable: is not supported"),
        ("{optimizer: {name: adam, fused: 1}}", "fused: must be true, false or null, got 1"),
        ("{optimizer: {name: sgd, lr: .inf}}", "optimizer.lr: must be a finite number, got inf"),
        ("{optimizer: {name: sgd, momentum: .nan}}", "optimizer.momentum: must be a finite"),
        ("{optimizer: {name: adam, betas: [.nan, 0.9]}}", "betas: must be a list of 2 finite"),
        ("{grad_clip: .nan}", "finetune.grad_clip: must be a finite number > 0 or null, got nan"),
        ("{schedule: {name: cosine, min_lr: .inf}}", "schedule.min_lr: must be a finite number"),
        (
            "{optimizer: {name: sgd, lr: 0.01}, schedule: {name: cosine, min_lr: 0.1}}",
            "schedule.min_lr: must be at most the optimizer's lr (0.01), got 0.1",
        ),
        ("{schedule: {name: linear, min_lr: 0.01}}", "min_lr: must be at most the optimizer's lr"),
        ("{schedule: {name: step, gamma: .nan}}", "schedule.gamma: must be a finite number from"),
        # A step schedule's gamma is a decay factor: more than 1 would grow the rate past
        # float's range.
        (
            "{schedule: {name: step, gamma: 10}}",
            "finetune.schedule.gamma: must be a finite number from 0 to 1 (the factor each "
            "step_size steps multiplies the rate by), got 10",
        ),
        ("{schedule: {name: step, gamma: 1.0e+300}}", "schedule.gamma: must be a finite number"),
        # A number given as a string is refused, as in transform args, with how to write it.
        (
            "{grad_clip: '1e30'}",
            "grad_clip: must be a finite number > 0 or null, got '1e30' (a string; write the "
            "number without quotes)",
        ),
        ("{optimizer: {name: sgd, lr: '1e-3'}}", "lr: must be a finite number, got '1e-3' (a"),
        ("{steps: '1e4'}", "steps: must be a whole number >= 1, got '1e4' (a string; write the"),
        ("{schedule: {name: step, step_size: 0}}", "finetune.schedule.step_size: must be a whole"),
        ("{loss: crossentropy}", "(did you mean 'cross_entropy'?)"),
        ("{reduce_time: max}", "finetune.reduce_time: must be one of sum, mean, last"),
        ("{eval_every: weekly}", "finetune.eval_every: must be 'epoch' or a number of steps"),
        ("[1, 2]", "finetune: 'finetune' must be a mapping"),
        # Counts beyond 64 bits, and seeds beyond torch.manual_seed, are refused by the parser.
        (
            "{batch_size: 99999999999999999999999}",
            "finetune.batch_size: must be a whole number <= 9223372036854775807 (2**63 - 1), "
            "got 99999999999999999999999",
        ),
        ("{epochs: 9223372036854775808}", "finetune.epochs: must be a whole number <= 92233"),
        ("{steps: 99999999999999999999999}", "finetune.steps: must be a whole number <= 92233"),
        ("{eval_every: 99999999999999999999999}", "eval_every: must be 'epoch' or a number of"),
        ("{checkpoint_every: 99999999999999999999999}", "checkpoint_every: must be 'epoch' or a"),
        (
            "{seed: 18446744073709551616}",
            "finetune.seed: must be an integer from -9223372036854775808 to "
            "18446744073709551615 (what torch.manual_seed takes), got 18446744073709551616",
        ),
        ("{seed: -9223372036854775809}", "finetune.seed: must be an integer from -922337203685"),
        (
            "{schedule: {name: cosine, warmup_steps: 99999999999999999999999}}",
            "finetune.schedule.warmup_steps: must be a whole number <= 9223372036854775807",
        ),
        (
            "{schedule: {name: step, step_size: 99999999999999999999999}}",
            "finetune.schedule.step_size: must be a whole number <= 9223372036854775807",
        ),
        # Whole numbers past float's range are no finite numbers.
        (f"{{grad_clip: {10**400}}}", "finetune.grad_clip: must be a finite number > 0 or null"),
        (f"{{optimizer: {{name: sgd, lr: {10**400}}}}}", "optimizer.lr: must be a finite number"),
        (f"{{schedule: {{name: step, gamma: {10**400}}}}}", "schedule.gamma: must be a finite"),
    ],
)
def test_section_errors_name_line_and_key(section: str, expected: str) -> None:
    text = RECIPE.split("finetune:")[0] + f"finetune: {section}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    assert str(info.value).startswith("r.yaml:10: finetune")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("optimizer", "args"),
    [
        # Torch takes a fused optimiser on the CPU too; it refuses fused only with foreach.
        ("{name: adam, fused: true}", {"fused": True}),
        ("{name: sgd, nesterov: true, momentum: 0.9}", {"nesterov": True, "momentum": 0.9}),
        (
            "{name: adamw, betas: [0.8, 0.99], foreach: null}",
            {"betas": (0.8, 0.99), "foreach": None},
        ),
        ("{name: sgd, lr: 1.0e-3}", {}),
        # Whole numbers become floats (torch overflows on a huge int).
        ("{name: adam, eps: 99999999999999999999999}", {"eps": 1e23}),
        ("{name: sgd, momentum: 1, weight_decay: 0}", {"momentum": 1.0, "weight_decay": 0.0}),
    ],
)
def test_optimizer_arguments_torch_accepts(optimizer: str, args: dict[str, Any]) -> None:
    text = RECIPE.split("finetune:")[0] + f"finetune: {{optimizer: {optimizer}}}\n"
    config = parse_recipe(text).finetune
    assert config is not None and config.optimizer_args == args
    assert all(type(v) is type(args[k]) for k, v in config.optimizer_args.items())


def test_seed_range_is_what_torch_takes() -> None:
    for seed, beyond in [(2**64 - 1, 2**64), (-(2**63), -(2**63) - 1)]:
        torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match="Overflow"):
            torch.Generator().manual_seed(beyond)
        text = RECIPE.split("finetune:")[0] + f"finetune: {{seed: {seed}}}\n"
        config = parse_recipe(text).finetune
        assert config is not None and config.seed == seed
        with pytest.raises(RecipeError, match=f"finetune.seed: .*got {beyond}$"):
            parse_recipe(text.replace(str(seed), str(beyond)))


def test_schedules() -> None:
    cosine = FinetuneConfig(schedule="cosine", lr=1.0, min_lr=0.1)
    assert lr_factor(cosine, 0, 10) == 1.0 and lr_factor(cosine, 10, 10) == pytest.approx(0.1)
    step = FinetuneConfig(schedule="step", step_size=3, gamma=0.5)
    assert [lr_factor(step, s, 9) for s in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]


# --- the loop ----------------------------------------------------------------------------


def test_gradients_reach_every_transformed_parameter() -> None:
    net = _net()
    plan = plan_network(net, parse_recipe(RECIPE))
    T_net = patch_network(net, plan)
    data = _data()
    loss = nn.functional.cross_entropy(T_net(data.inputs), data.targets)
    loss.backward()
    transformed = {t.info.name for t in plan.tensors if t.rule is not None}
    assert transformed == {"0.weight", "0.bias", "3.weight", "3.bias"}
    grads = {
        ".".join(p for p in name.split(".") if p != "_mod"): param.grad
        for name, param in T_net.named_parameters()
    }
    for name in transformed:
        grad = grads[name]
        assert grad is not None and bool(grad.abs().sum() > 0), name


def test_training_improves_the_quantised_metric_and_logs(tmp_path: Path) -> None:
    recipe, loaded = _setup(tmp_path)
    result = _run(recipe, loaded, tmp_path / "a.safetensors", _data(200))
    assert result.steps == 3 * 13 and result.epochs == 3
    assert set(result.metrics) == {"float", "post_training", "finetuned"}
    assert result.metrics["finetuned"] > result.metrics["post_training"]
    log = log_path_for(tmp_path / "a.safetensors").read_text().splitlines()
    lines = [json.loads(line) for line in log]
    kinds = {line["kind"] for line in lines}
    assert kinds == {"train", "eval", "checkpoint"}
    assert [line["step"] for line in lines if line["kind"] == "train"] == list(range(1, 40))
    state = load_patched(tmp_path / "a.safetensors").state["finetune"]
    assert state["step"] == 39 and state["metrics"] == result.metrics


def test_same_seed_same_bits(tmp_path: Path) -> None:
    recipe, loaded = _setup(tmp_path)
    _run(recipe, loaded, tmp_path / "a.safetensors", _data())
    _run(recipe, load_network(tmp_path / "net.pt"), tmp_path / "b.safetensors", _data())
    _assert_identical(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


@pytest.mark.parametrize("stop_at", [3, 4, 9])
def test_resumed_run_matches_uninterrupted_bit_for_bit(tmp_path: Path, stop_at: int) -> None:
    recipe, loaded = _setup(tmp_path)
    _run(recipe, loaded, tmp_path / "full.safetensors", _data())
    with pytest.raises(_Stop):
        _run(
            recipe,
            load_network(tmp_path / "net.pt"),
            tmp_path / "cut.safetensors",
            _data(),
            stop_at=stop_at,
        )
    saved = load_patched(tmp_path / "cut.safetensors").state["finetune"]["step"]
    assert saved == (stop_at - 1) // 2 * 2
    result = _resume(recipe, tmp_path / "cut.safetensors", _data())
    assert result.steps == 12
    _assert_identical(tmp_path / "full.safetensors", tmp_path / "cut.safetensors")
    full = load_patched(tmp_path / "full.safetensors")
    cut = load_patched(tmp_path / "cut.safetensors")
    for key, tensor in full.extra_tensors.items():
        assert torch.equal(tensor, cut.extra_tensors[key]), key


def test_resume_with_a_shuffling_dataloader(tmp_path: Path) -> None:
    data = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.inputs, data.targets), batch_size=16, shuffle=True
    )
    loaders = LoaderData(loader, None, "tests:loader")
    text = RECIPE.replace("checkpoint_every: 2", "checkpoint_every: 3")
    recipe, loaded = _setup(tmp_path, text)
    torch.manual_seed(5)
    _run(recipe, loaded, tmp_path / "full.safetensors", loaders)
    torch.manual_seed(5)
    with pytest.raises(_Stop):
        _run(
            recipe,
            load_network(tmp_path / "net.pt"),
            tmp_path / "cut.safetensors",
            loaders,
            stop_at=5,
        )
    torch.manual_seed(99)  # a resumed process starts from an unrelated global state
    _resume(recipe, tmp_path / "cut.safetensors", loaders)
    _assert_identical(tmp_path / "full.safetensors", tmp_path / "cut.safetensors")


def test_time_series_output_needs_reduce_time(tmp_path: Path) -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).unsqueeze(1).expand(-1, 5, -1)

    net = Seq()
    recipe = parse_recipe(RECIPE.replace("checkpoint_every: 2", "reduce_time: last"))
    plan = plan_network(net, recipe)
    assert recipe.finetune is not None
    result = finetune(patch_network(net, plan), plan, recipe.finetune, _data())
    assert result.steps == 12
    bare = FinetuneConfig(epochs=1)
    with pytest.raises(ConfigError, match="reduce_time"):
        finetune(patch_network(net, plan), plan, bare, _data())


def test_huge_seed_and_batch_size_train() -> None:
    # The recipe's seed may be any integer; torch's generators take 64 bits of it.
    net = _net()
    plan = plan_network(net, parse_recipe(RECIPE.replace("seed: 3", f"seed: {10**30}")))
    config = FinetuneConfig(steps=2, batch_size=2**63 - 1, seed=None)
    result = finetune(patch_network(net, plan), plan, config, _data())
    assert result.steps == 2 and result.epochs == 2


def test_mse_with_class_targets_fails_alone_without_torchs_warning() -> None:
    net = _net()
    plan = plan_network(net, parse_recipe(RECIPE))
    data = replace(_data(), source="d.safetensors")
    config = FinetuneConfig(epochs=1, batch_size=16, loss="mse", metric="loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError) as info:
            finetune(patch_network(net, plan), plan, config, data)
    assert [str(w.message) for w in caught] == []
    assert str(info.value) == (
        "d.safetensors: targets: loss 'mse' cannot compare outputs (16, 3) with targets (16,) "
        "(int64): mse needs targets shaped like the outputs (class indices need 'loss: "
        "cross_entropy'); check the data's targets, 'loss' and 'reduce_time'"
    )


class _Fails(nn.Module):
    """A network whose forward pass fails on its own, whatever the data."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


def test_a_fault_inside_the_network_keeps_its_message() -> None:
    recipe = parse_recipe(RECIPE)
    net = _Fails(RuntimeError("boom in layer 7"))
    plan = plan_network(net, recipe)
    with pytest.raises(ConfigError) as info:
        finetune(patch_network(net, plan), plan, FinetuneConfig(), _data())
    message = str(info.value)
    assert "RuntimeError: boom in layer 7" in message
    assert message.endswith("(if it does, the fault is in the network)")
    assert isinstance(info.value.__cause__, RuntimeError)
    # Not a shape or value error of torch's: left as it is, an internal error.
    net = _Fails(AttributeError("no attribute 'weight'"))
    plan = plan_network(net, recipe)
    with pytest.raises(AttributeError):
        finetune(patch_network(net, plan), plan, FinetuneConfig(), _data())


def loss_one_argument(out: torch.Tensor) -> torch.Tensor:
    return out.sum()


def loss_with_keyword(out: torch.Tensor, y: torch.Tensor, *, weight: float) -> torch.Tensor:
    return out.sum() * weight


def loss_per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def loss_float(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(out, y).detach())


def loss_errors_count(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(dim=1) != y).sum()


def loss_detached(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y).detach()


def loss_with_a_bug(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.sum() + "1"  # type: ignore[operator, no-any-return]


def loss_that_exits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sys.exit()


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (
            "loss_one_argument",
            "'tests.test_finetune:loss_one_argument' cannot be called as f(outputs, targets) "
            "(too many positional arguments); a loss must be a function f(outputs, targets) -> "
            "scalar tensor",
        ),
        ("loss_with_keyword", "(missing a required argument: 'weight'); a loss must be"),
        (
            "loss_per_sample",
            "returned a tensor of shape (16,); it must return a scalar tensor (reduce it, for "
            "example with .mean())",
        ),
        ("loss_float", "returned a float; it must return a scalar tensor"),
        ("loss_errors_count", "returned a int64 tensor; it must return a floating-point scalar"),
        ("loss_detached", "returned a tensor that autograd cannot differentiate (no grad_fn)"),
        (
            "loss_with_a_bug",
            "raised TypeError: unsupported operand type(s) for +: 'Tensor' and 'str'; fix the "
            "function (a loss must be",
        ),
        ("loss_that_exits", "called sys.exit(); it must return a scalar tensor instead of"),
    ],
)
def test_custom_losses_that_do_not_fit_fail_before_writing(
    tmp_path: Path, function: str, expected: str
) -> None:
    recipe, loaded = _setup(tmp_path)
    plan = plan_network(loaded.module, recipe)
    out = tmp_path / "a.safetensors"
    target = CheckpointTarget(out, loaded.source, recipe.text, loaded.network_bytes)
    config = FinetuneConfig(batch_size=16, loss=f"tests.test_finetune:{function}", metric="loss")
    with pytest.raises(ConfigError) as info:
        finetune(patch_network(loaded.module, plan), plan, config, _data(), target=target)
    assert str(info.value).startswith("finetune.loss: ")
    assert expected in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]


def test_targets_the_loss_cannot_use_fail_before_writing(tmp_path: Path) -> None:
    recipe, loaded = _setup(tmp_path)
    data = _data()
    bad = TensorData(data.inputs, data.targets + 5, data.val_inputs, data.val_targets + 5)
    with pytest.raises(ConfigError, match="targets: sample 0 holds class index 5, but the"):
        _run(recipe, loaded, tmp_path / "a.safetensors", bad)
    assert not (tmp_path / "a.safetensors").exists()
    assert not log_path_for(tmp_path / "a.safetensors").exists()


# --- the command line ------------------------------------------------------------------------


def _cli_files(tmp_path: Path) -> None:
    torch.save(_net(), tmp_path / "net.pt")
    data = _data()
    save_file(
        {
            "inputs": data.inputs,
            "targets": data.targets,
            "val_inputs": data.val_inputs,
            "val_targets": data.val_targets,
        },
        str(tmp_path / "data.safetensors"),
    )
    (tmp_path / "r.yaml").write_text(RECIPE)


def test_cli_patch_finetune_then_finetune_again(tmp_path: Path) -> None:
    _cli_files(tmp_path)
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    args = [
        "patch",
        str(tmp_path / "net.pt"),
        str(tmp_path / "r.yaml"),
        "--finetune",
        "--data",
        str(tmp_path / "data.safetensors"),
        "-o",
        str(out),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "accuracy on validation data: float" in result.output
    assert load_patched(out).state["finetune"]["step"] == 12
    again = runner.invoke(
        app, ["finetune", str(out), "--data", str(tmp_path / "data.safetensors"), "-q"]
    )
    assert again.exit_code == 0 and again.output == ""
    assert (tmp_path / "out.finetuned.safetensors").is_file()
    resumed = runner.invoke(app, [*args, "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize(
    ("extra", "files", "expected"),
    [
        ([], {}, "--data: is required to fine-tune"),
        (["--data", "nowhere.safetensors"], {}, "nowhere.safetensors: no such file"),
        (
            ["--data", "d.safetensors"],
            {"inputs": torch.zeros(3, 4)},
            "d.safetensors: targets: missing tensor 'targets'",
        ),
        (
            ["--data", "d.safetensors"],
            {"inputs": torch.zeros(3, 4), "targets": torch.zeros(2, dtype=torch.long)},
            "targets: has shape (2,) but 'inputs' has 3 sample(s)",
        ),
        (
            ["--data", "data.safetensors", "--resume"],
            {},
            "--resume: found no checkpoint to resume from",
        ),
        (
            ["--data", "data.safetensors", "--device", "tpu"],
            {},
            "--device: must be one of auto, cpu, cuda",
        ),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(
    tmp_path: Path, extra: list[str], files: dict[str, torch.Tensor], expected: str
) -> None:
    _cli_files(tmp_path)
    if files:
        save_file(files, str(tmp_path / "d.safetensors"))
    os.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["patch", "net.pt", "r.yaml", "--finetune", "-o", "out.safetensors", *extra]
    )
    assert result.exit_code == 2
    assert expected in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_recipe_without_section(tmp_path: Path) -> None:
    _cli_files(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "patch",
            str(tmp_path / "net.pt"),
            "ternary",
            "--finetune",
            "--data",
            str(tmp_path / "data.safetensors"),
        ],
    )
    assert result.exit_code == 2 and "has no 'finetune:' section" in result.output


@pytest.fixture
def cli_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with net.pt, r.yaml and data.safetensors, made the working folder."""
    _cli_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--device", "cpu", "-q"])


_PATCH = ("patch", "net.pt", "r.yaml", "--finetune")
_FINETUNE = ("finetune", "good.safetensors")


@pytest.mark.parametrize(
    ("command", "data", "output", "read"),
    [
        (_PATCH, "data.safetensors", "data.safetensors", "data.safetensors"),
        (_PATCH, "out.finetune.jsonl", "out.safetensors", "out.finetune.jsonl"),
        (_PATCH, "data.safetensors", "r.yaml", "r.yaml"),
        (_FINETUNE, "data.safetensors", "data.safetensors", "data.safetensors"),
        (_FINETUNE, "data.safetensors", "good.safetensors", "good.safetensors"),
        (_FINETUNE, "x.finetune.jsonl", "x.safetensors", "x.finetune.jsonl"),
    ],
)
def test_cli_never_overwrites_a_file_it_reads(
    cli_dir: Path, command: tuple[str, ...], data: str, output: str, read: str
) -> None:
    good = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "good.safetensors")
    assert good.exit_code == 0, good.output
    if data != "data.safetensors":
        # A data file named like the run's log (a safetensors file is read by its content).
        (cli_dir / data).write_bytes((cli_dir / "data.safetensors").read_bytes())
    before = {p.name: p.read_bytes() for p in cli_dir.iterdir() if p.is_file()}
    result = _invoke(*command, "--data", data, "-o", output, "--force")
    assert result.exit_code == 2, result.output
    assert f"rockq: error: {read}: is also an input" in result.output
    after = {p.name: p.read_bytes() for p in cli_dir.iterdir() if p.is_file()}
    assert after == before


def test_cli_resume_never_overwrites_the_data(cli_dir: Path) -> None:
    first = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert first.exit_code == 0, first.output
    # The data, saved under the name of the log that --resume trims and rewrites.
    (cli_dir / "out.finetune.jsonl").write_bytes((cli_dir / "data.safetensors").read_bytes())
    before = {p.name: p.read_bytes() for p in cli_dir.iterdir()}
    result = _invoke(*_PATCH, "--data", "out.finetune.jsonl", "-o", "out.safetensors", "--resume")
    assert result.exit_code == 2, result.output
    assert "rockq: error: out.finetune.jsonl: is also an input" in result.output
    assert {p.name: p.read_bytes() for p in cli_dir.iterdir()} == before


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "optimizer: {name: adam, betas: [0.9, 0.9, 0.9]}",
            "finetune.optimizer.betas: must be a list of 2 finite numbers",
        ),
        (
            "optimizer: {name: adam, lr: '1e-3'}",
            "got '1e-3' (a string; write the number without quotes)",
        ),
        ("grad_clip: .nan", "finetune.grad_clip: must be a finite number > 0 or null, got nan"),
        ("schedule: {name: cosine, min_lr: .inf}", "finetune.schedule.min_lr: must be a finite"),
    ],
)
def test_cli_bad_finetune_settings_exit_2(cli_dir: Path, section: str, expected: str) -> None:
    (cli_dir / "r.yaml").write_text(RECIPE.split("finetune:")[0] + f"finetune:\n  {section}\n")
    result = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("rockq: error: r.yaml:") and expected in result.output
    assert not (cli_dir / "out.safetensors").exists()


def test_cli_huge_batch_size_exits_2(cli_dir: Path) -> None:
    (cli_dir / "r.yaml").write_text(RECIPE.replace("batch_size: 16", f"batch_size: {10**23}"))
    result = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert result.output == (
        "rockq: error: r.yaml:12: finetune.batch_size: must be a whole number <= "
        f"9223372036854775807 (2**63 - 1), got {10**23}\n"
    )
    assert not (cli_dir / "out.safetensors").exists()


def test_cli_data_the_network_cannot_take_exits_2(cli_dir: Path) -> None:
    data = _data()
    wide = {"inputs": torch.cat([data.inputs, data.inputs[:, :1]], dim=1), "targets": data.targets}
    save_file(wide, str(cli_dir / "d5.safetensors"))
    expected = (
        "rockq: error: d5.safetensors: inputs: the network cannot take samples of shape (5,) "
        "(float32): RuntimeError: mat1 and mat2 shapes cannot be multiplied (16x5 and 4x16); "
        "check --data matches the network's input (if it does, the fault is in the network)\n"
    )
    result = _invoke(*_PATCH, "--data", "d5.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2 and result.output == expected
    assert not (cli_dir / "out.safetensors").exists()
    # A resumed run measures nothing before it trains: it is refused as well, files kept.
    good = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert good.exit_code == 0, good.output
    before = {p.name: p.read_bytes() for p in cli_dir.iterdir()}
    result = _invoke(*_PATCH, "--data", "d5.safetensors", "-o", "out.safetensors", "--resume")
    assert result.exit_code == 2 and result.output == expected
    assert {p.name: p.read_bytes() for p in cli_dir.iterdir()} == before


def data_that_exits() -> Any:
    sys.exit()


def test_cli_data_function_that_exits_exits_2(cli_dir: Path) -> None:
    result = _invoke(
        *_PATCH, "--data", "tests.test_finetune:data_that_exits", "-o", "o.safetensors"
    )
    assert result.exit_code == 2
    assert result.output == (
        "rockq: error: --data: 'tests.test_finetune:data_that_exits' called sys.exit(); a --data "
        "function must return (train_loader, val_loader) instead of exiting\n"
    )
    assert not (cli_dir / "o.safetensors").exists()


def test_cli_refuses_nonfinite_data(cli_dir: Path) -> None:
    data = _data()
    data.inputs[7, 2] = float("nan")
    save_file({"inputs": data.inputs, "targets": data.targets}, str(cli_dir / "nan.safetensors"))
    result = _invoke(*_PATCH, "--data", "nan.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert (
        "rockq: error: nan.safetensors: inputs: holds NaN or Inf values in 1 sample(s), first at "
        "index 7" in result.output
    )
    assert sorted(p.name for p in cli_dir.iterdir()) == [
        "data.safetensors",
        "nan.safetensors",
        "net.pt",
        "r.yaml",
    ]


def _diverging_recipe(folder: Path, checkpoint_every: str) -> None:
    # Step 1 (half the rate, in warm-up) throws the weights to about 1e29; step 2's loss is NaN.
    text = RECIPE.replace("{name: adamw, lr: 0.01, weight_decay: 0.01}", "{name: sgd, lr: 1.0e+30}")
    (folder / "r.yaml").write_text(
        text.replace("checkpoint_every: 2", f"checkpoint_every: {checkpoint_every}")
    )


def test_cli_diverging_run_stops_and_keeps_its_last_checkpoint(cli_dir: Path) -> None:
    _diverging_recipe(cli_dir, "1")
    result = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert (
        "rockq: error: finetune: the training loss became nan at step 2 of 12 (epoch 1, learning "
        "rate 1e+30); lower 'finetune.optimizer.lr'" in result.output
    )
    assert "the checkpoint of step 1 is kept" in result.output
    kept = load_patched(cli_dir / "out.safetensors")
    assert kept.state["finetune"]["step"] == 1
    assert all(bool(t.isfinite().all()) for t in kept.state_dict.values())
    log = [json.loads(line) for line in (cli_dir / "out.finetune.jsonl").read_text().splitlines()]
    assert [(line["kind"], line["step"]) for line in log] == [("train", 1), ("checkpoint", 1)]


def test_cli_run_that_fails_before_its_first_checkpoint_leaves_files_as_they_were(
    cli_dir: Path,
) -> None:
    args = (*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    # Nothing there before: nothing there after.
    _diverging_recipe(cli_dir, "epoch")
    result = _invoke(*args)
    assert result.exit_code == 2 and "nothing was written" in result.output
    assert not (cli_dir / "out.safetensors").exists()
    assert not (cli_dir / "out.finetune.jsonl").exists()
    # A good run's checkpoint and log, replaced with --force: both kept as they were.
    (cli_dir / "r.yaml").write_text(RECIPE)
    assert _invoke(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in cli_dir.iterdir()}
    _diverging_recipe(cli_dir, "epoch")
    before["r.yaml"] = (cli_dir / "r.yaml").read_bytes()
    result = _invoke(*args, "--force")
    assert result.exit_code == 2 and "nothing was written" in result.output
    assert {p.name: p.read_bytes() for p in cli_dir.iterdir()} == before


def test_a_quantised_network_whose_loss_is_not_finite_is_refused_before_training(
    tmp_path: Path,
) -> None:
    overflowing = RECIPE.replace(
        "transform: stochastic_rounding\n    args: {num_levels: 3}",
        "transform: deterministic_rounding\n    args: {output_range: [-1.0e38, 1.0e38], "
        "num_levels: 2}",
    )
    recipe, loaded = _setup(tmp_path, overflowing)
    out = tmp_path / "a.safetensors"
    with pytest.raises(ConfigError) as err:
        _run(recipe, loaded, out, _data())
    assert str(err.value).startswith(
        "the quantised network's loss on the validation data is nan before any training "
        "(the float network's is "
    )
    assert "narrow the rules' ranges or give them more levels" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]


def test_the_log_and_the_state_hold_standard_json(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "a.finetune.jsonl", None)
    log.write({"kind": "eval", "loss": float("inf"), "accuracy": 0.5})
    log.commit()
    line = (tmp_path / "a.finetune.jsonl").read_text()
    assert json.loads(line, parse_constant=pytest.fail) == {
        "kind": "eval",
        "loss": None,
        "accuracy": 0.5,
    }


def huge_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A finite loss whose gradient throws the weights past float32's range in one step."""
    return out.sum() * 1e30


def test_weights_that_become_infinite_are_never_checkpointed(tmp_path: Path) -> None:
    recipe, loaded = _setup(tmp_path)
    out = tmp_path / "a.safetensors"
    _run(recipe, loaded, out, _data())
    good = out.read_bytes(), log_path_for(out).read_bytes()
    config = FinetuneConfig(
        steps=3,
        optimizer="sgd",
        lr=1e10,
        loss="tests.test_finetune:huge_loss",
        metric="loss",
        checkpoint_every=1,
    )
    net = load_network(tmp_path / "net.pt")
    plan = plan_network(net.module, recipe)
    target = CheckpointTarget(out, net.source, recipe.text, net.network_bytes, force=True)
    with pytest.raises(
        ConfigError, match=r"weights became NaN or Inf at step 1 of 3 .*nothing was written"
    ):
        finetune(patch_network(net.module, plan), plan, config, _data(), target=target)
    assert (out.read_bytes(), log_path_for(out).read_bytes()) == good


# --- resuming, evaluating and refusing what cannot train -----------------------------------


def test_cli_resume_with_another_network_exits_2(cli_dir: Path) -> None:
    first = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert first.exit_code == 0, first.output
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other_arch = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {p.name: p.read_bytes() for p in cli_dir.iterdir()}
    for other in (other_arch, _net(seed=1)):
        torch.save(other, cli_dir / "other.pt")
        args = ("patch", "other.pt", "r.yaml", "--finetune", "--data", "data.safetensors")
        result = _invoke(*args, "-o", "out.safetensors", "--resume")
        assert result.exit_code == 2, result.output
        assert result.output.startswith(
            "rockq: error: out.safetensors: --resume: was written by a run with another network"
        ), result.output
        assert len(result.output.splitlines()) == 1
        after = {p.name: p.read_bytes() for p in cli_dir.iterdir() if p.name != "other.pt"}
        assert after == before


def _patched_run(folder: Path, out: Path, seed: int | None, *, resume: bool = False) -> Any:
    loaded = load_network(folder / "net.pt")
    recipe = parse_recipe((folder / "r.yaml").read_text())
    plan = plan_network(loaded.module, recipe, seed=seed)
    target = CheckpointTarget(out, loaded.source, recipe.text, loaded.network_bytes)

    def stop(event: dict[str, Any]) -> None:
        if not resume and seed == 5 and out.name == "cut.safetensors" and event["step"] == 5:
            raise _Stop

    return finetune_patched(
        loaded.module,
        plan,
        data=str(folder / "data.safetensors"),
        target=target,
        device="cpu",
        resume=resume,
        seed=seed,
        on_event=stop,
    )


def test_resume_keeps_the_seed_the_run_started_with(tmp_path: Path) -> None:
    _cli_files(tmp_path)
    _patched_run(tmp_path, tmp_path / "full.safetensors", 5)
    with pytest.raises(_Stop):
        _patched_run(tmp_path, tmp_path / "cut.safetensors", 5)
    cut = tmp_path / "cut.safetensors"
    kept = cut.read_bytes()
    # Another seed, given explicitly, is refused naming both.
    with pytest.raises(ConfigError) as info:
        _patched_run(tmp_path, cut, 7, resume=True)
    assert str(info.value) == (
        f"{cut}: --seed: the run was started with seed 5, not 7; drop --seed (a resumed run "
        "keeps its seed), or drop --resume and pick another -o"
    )
    assert cut.read_bytes() == kept
    # No --seed (the recipe's seed 3): the run goes on with its own seed 5.
    _patched_run(tmp_path, cut, None, resume=True)
    _assert_identical(tmp_path / "full.safetensors", cut)
    resumed = load_patched(cut)
    assert resumed.seed == 5 and resumed.state["finetune"]["seed"] == 5
    # An explicit --seed equal to the recipe's own seed is another seed too.
    with pytest.raises(ConfigError, match="started with seed 5, not 3"):
        _patched_run(tmp_path, cut, 3, resume=True)


def test_cli_resume_with_other_data_exits_2(cli_dir: Path) -> None:
    first = _invoke(*_PATCH, "--data", "data.safetensors", "-o", "out.safetensors")
    assert first.exit_code == 0, first.output
    _save_first(30, "fewer.safetensors")
    before = {p.name: p.read_bytes() for p in cli_dir.iterdir()}
    result = _invoke(*_PATCH, "--data", "fewer.safetensors", "-o", "out.safetensors", "--resume")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        "rockq: error: --data: fewer.safetensors is not the data the run in out.safetensors "
        "was trained on (50 training and 20 validation samples, sha256 "
    ), result.output
    assert "; this one: 30 training samples, sha256 " in result.output
    assert result.output.rstrip().endswith(
        "resume with the same --data, or drop --resume and pick another -o"
    )
    assert {p.name: p.read_bytes() for p in cli_dir.iterdir()} == before
    # The same data under another name is the same data.
    (cli_dir / "copy.safetensors").write_bytes((cli_dir / "data.safetensors").read_bytes())
    again = _invoke(*_PATCH, "--data", "copy.safetensors", "-o", "out.safetensors", "--resume")
    assert again.exit_code == 0, again.output


def _val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = _data()
    assert data.val_inputs is not None and data.val_targets is not None
    return [(data.val_inputs, data.val_targets)]


def _never_ending(events: list[dict[str, Any]]) -> Any:
    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if len(events) > 50:
            raise AssertionError("the run loops without training")

    return on_event


@pytest.mark.parametrize("length", ["steps", "epochs"])
def test_an_empty_training_loader_is_refused(length: str) -> None:
    net = _net()
    plan = plan_network(net, parse_recipe(RECIPE))
    config = FinetuneConfig(epochs=None, steps=5) if length == "steps" else FinetuneConfig()
    events: list[dict[str, Any]] = []
    with pytest.raises(ConfigError) as info:
        finetune(
            patch_network(net, plan),
            plan,
            config,
            LoaderData([], _val_batches(), "pkg.data:empty"),
            on_event=_never_ending(events),
        )
    assert str(info.value) == (
        "--data: the training loader of 'pkg.data:empty' yielded no batches; it must yield "
        "(inputs, targets) batches each time it is iterated"
    )
    assert events == []


class _RunsDry:
    """A loader that yields its batches the first two times it is iterated (the check
    before the run, and the first epoch), then nothing."""

    def __init__(self) -> None:
        data = _data()
        self.batches = [
            (data.inputs[:16], data.targets[:16]),
            (data.inputs[16:], data.targets[16:]),
        ]
        self.left = 2

    def __iter__(self) -> Any:
        self.left -= 1
        return iter(self.batches if self.left >= 0 else [])


def test_a_loader_that_stops_yielding_is_refused() -> None:
    net = _net()
    plan = plan_network(net, parse_recipe(RECIPE))
    events: list[dict[str, Any]] = []
    with pytest.raises(ConfigError) as info:
        finetune(
            patch_network(net, plan),
            plan,
            FinetuneConfig(epochs=None, steps=5),
            LoaderData(_RunsDry(), _val_batches(), "pkg.data:once"),
            on_event=_never_ending(events),
        )
    assert str(info.value).startswith(
        "--data: the training loader of 'pkg.data:once' yielded no batches in epoch 2"
    )


def _save_first(samples: int, name: str) -> None:
    """The first ``samples`` of the test data, as a data file in the current folder."""
    data = _data()
    save_file({"inputs": data.inputs[:samples], "targets": data.targets[:samples]}, name)


def _bn_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(("samples", "batch_size"), [(17, 16), (20, 1)])
def test_cli_batchnorm_with_a_batch_of_one_sample_exits_2(
    cli_dir: Path, samples: int, batch_size: int
) -> None:
    torch.save(_bn_net(), cli_dir / "net.pt")
    _save_first(samples, "d.safetensors")
    (cli_dir / "r.yaml").write_text(RECIPE.replace("batch_size: 16", f"batch_size: {batch_size}"))
    result = _invoke(*_PATCH, "--data", "d.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        "rockq: error: d.safetensors: inputs: the network fails in training mode on a batch of "
        "1 sample"
    ), result.output
    assert "ValueError: Expected more than 1 value per channel when training" in result.output
    assert "finetune.batch_size" in result.output and len(result.output.splitlines()) == 1
    assert not (cli_dir / "out.safetensors").exists()


def test_a_network_failing_mid_run_names_the_step_and_the_data() -> None:
    net = _bn_net()
    plan = plan_network(net, parse_recipe(RECIPE))
    data = _data(17)
    loader = [(data.inputs[:16], data.targets[:16]), (data.inputs[16:], data.targets[16:])]
    with pytest.raises(ConfigError) as info:
        finetune(
            patch_network(net, plan),
            plan,
            FinetuneConfig(epochs=None, steps=4),
            LoaderData(loader, None, "pkg.data:loaders"),
        )
    message = str(info.value)
    assert message.startswith(
        "pkg.data:loaders: inputs: the network failed in training at step 2 of 4 (epoch 1) on "
        "a batch of 1 sample of shape (4,) (float32): ValueError: Expected more than 1 value"
    ), message
    assert "drop_last=True" in message


def test_accuracy_needs_classes() -> None:
    net = nn.Sequential(nn.Linear(4, 1))
    plan = plan_network(net, parse_recipe(RECIPE))
    data = _data()
    regression = TensorData(data.inputs, data.inputs[:, :1] * 2.0)
    config = FinetuneConfig(loss="mse", metric="accuracy", batch_size=16)
    with pytest.raises(ConfigError) as info:
        finetune(patch_network(net, plan), plan, config, regression)
    assert str(info.value) == (
        "finetune.metric: 'accuracy' needs (batch, classes) outputs with 2 or more classes and "
        "class-index or one-hot targets, got outputs (16, 1) and targets (16, 1) (float32); set "
        "'metric: loss'"
    )
    batches = [(regression.inputs, regression.targets)]
    assert evaluate(net, batches, config, torch.device("cpu"))["accuracy"] is None
    # Probabilities over the classes (one-hot here) keep their accuracy.
    net = _net()
    plan = plan_network(net, parse_recipe(RECIPE))
    one_hot = TensorData(data.inputs, nn.functional.one_hot(data.targets, 3).float())
    result = finetune(patch_network(net, plan), plan, config, one_hot)
    assert result.metrics["finetuned"] is not None


def test_evaluating_does_not_change_what_is_trained(tmp_path: Path) -> None:
    for every in (1, 1000):
        recipe, loaded = _setup(tmp_path, RECIPE.replace("eval_every: 3", f"eval_every: {every}"))
        _run(recipe, loaded, tmp_path / f"e{every}.safetensors", _data())
    _assert_identical(tmp_path / "e1.safetensors", tmp_path / "e1000.safetensors")
    first = load_patched(tmp_path / "e1.safetensors").extra_tensors
    for key, tensor in load_patched(tmp_path / "e1000.safetensors").extra_tensors.items():
        assert torch.equal(tensor, first[key]), key


def test_the_finetuned_metric_is_that_of_the_burned_in_file(tmp_path: Path) -> None:
    recipe, loaded = _setup(tmp_path)
    out = tmp_path / "a.safetensors"
    result = _run(recipe, loaded, out, _data())
    burned = CliRunner().invoke(app, ["burn-in", str(out), "-o", str(tmp_path / "q.safetensors")])
    assert burned.exit_code == 0, burned.output
    from safetensors.torch import load_file

    net = _net()
    net.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    data = _data()
    assert recipe.finetune is not None
    val = [(data.val_inputs, data.val_targets)]
    figures = evaluate(net, val, recipe.finetune, torch.device("cpu"))
    assert result.metrics["finetuned"] == figures["accuracy"]
    log = [json.loads(line) for line in log_path_for(out).read_text().splitlines()]
    last = [line for line in log if line["kind"] == "eval"][-1]
    assert last["step"] == result.steps
    assert (last["loss"], last["accuracy"]) == (figures["loss"], figures["accuracy"])


class _BadSamples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == 40:
            raise KeyError("label")
        data = _data()
        return data.inputs[index], data.targets[index]


def data_with_a_bad_sample() -> Any:
    return torch.utils.data.DataLoader(_BadSamples(), batch_size=16), _val_batches()


def test_cli_a_loader_failing_mid_run_exits_2(cli_dir: Path) -> None:
    reference = "tests.test_finetune:data_with_a_bad_sample"
    result = _invoke(*_PATCH, "--data", reference, "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"rockq: error: --data: the training loader of '{reference}' raised KeyError: 'label' "
        "at step 3 of 12 (epoch 1); fix the loader\n"
    )


def test_cli_a_bad_class_index_anywhere_is_refused_before_training(cli_dir: Path) -> None:
    data = _data()
    targets = data.targets.clone()
    targets[40] = 7
    tensors = {"inputs": data.inputs, "targets": targets}
    assert data.val_inputs is not None and data.val_targets is not None
    tensors |= {"val_inputs": data.val_inputs, "val_targets": data.val_targets}
    save_file(tensors, "bad.safetensors")
    result = _invoke(*_PATCH, "--data", "bad.safetensors", "-o", "out.safetensors")
    assert result.exit_code == 2, result.output
    assert result.output == (
        "rockq: error: bad.safetensors: targets: sample 40 holds class index 7, but the network "
        "gives 3 classes (indices 0 to 2); fix the targets, or give the network as many outputs "
        "as there are classes\n"
    )
    assert not (cli_dir / "out.safetensors").exists()


# --- more than one process ---------------------------------------------------------------------

_DDP_SCRIPT = """
import sys, torch
import torch.distributed as dist
from transform_core.checkpoint import load_network
from transform_core.finetune import CheckpointTarget, finetune
from transform_core.pipeline import patch_network, plan_network
from transform_core.recipe import parse_recipe
from tests.test_finetune import RECIPE, _data

folder = sys.argv[1]
recipe = parse_recipe(RECIPE)
loaded = load_network(folder + "/net.pt")
plan = plan_network(loaded.module, recipe)
T_net = patch_network(loaded.module, plan)
target = CheckpointTarget(__import__("pathlib").Path(folder + "/ddp.safetensors"),
                          loaded.source, recipe.text, loaded.network_bytes)
dist.init_process_group("gloo")
finetune(T_net, plan, recipe.finetune, _data(51), target=target)
torch.save(T_net.state_dict(), f"{folder}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(net, tmp_path / "net.pt")
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, str(script), str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # One process, same global batch (51 samples: the last batch of 3 splits 2 + 1).
    recipe = parse_recipe(RECIPE)
    loaded = load_network(tmp_path / "net.pt")
    plan = plan_network(loaded.module, recipe)
    T_net = patch_network(loaded.module, plan)
    assert recipe.finetune is not None
    finetune(T_net, plan, recipe.finetune, _data(51))
    for key, value in T_net.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        ["ddp.finetune.jsonl", "ddp.py", "ddp.safetensors", "net.pt", "rank0.pt", "rank1.pt"]
    )
    assert load_patched(tmp_path / "ddp.safetensors").state["finetune"]["step"] == 12


# --- the worked example -----------------------------------------------------------------------


def test_digits_example_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.digits import main

    results = main(["--quick", "--out", str(tmp_path), "--json"])
    assert set(results) == {"4-bit", "ternary"}
    for accuracy in results.values():
        assert set(accuracy) == {"float", "post_training", "finetuned"}
        assert all(0.0 <= value <= 100.0 for value in accuracy.values())
    assert (tmp_path / "mlp.ternary.patched.safetensors").is_file()


_REFUSED_TARGET_SCRIPT = """
import sys
import torch.distributed as dist
from pathlib import Path
from transform_core.checkpoint import load_network
from transform_core.errors import CheckpointError
from transform_core.finetune import CheckpointTarget, finetune
from transform_core.pipeline import patch_network, plan_network
from transform_core.recipe import parse_recipe
from tests.test_finetune import RECIPE, _data

folder = Path(sys.argv[1])
recipe = parse_recipe(RECIPE)
loaded = load_network(folder / "net.pt")
plan = plan_network(loaded.module, recipe)
target = CheckpointTarget(folder / "taken.safetensors", loaded.source, recipe.text, None)
dist.init_process_group("gloo")
try:
    finetune(patch_network(loaded.module, plan), plan, recipe.finetune, _data(), target=target)
except CheckpointError as err:
    print(err)
"""


@pytest.mark.slow
def test_every_process_stops_when_the_output_may_not_be_written(tmp_path: Path) -> None:
    # Processes started on their own, as srun starts them: no torchrun agent to end the
    # others when rank 0 fails.
    import socket

    torch.save(nn.Sequential(nn.Linear(4, 3)), tmp_path / "net.pt")
    (tmp_path / "taken.safetensors").write_bytes(b"not to be replaced")
    script = tmp_path / "refused.py"
    script.write_text(_REFUSED_TARGET_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [rank.communicate(timeout=90) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for stdout, stderr in outputs:
        assert f"{tmp_path / 'taken.safetensors'}: already exists; pass --force" in stdout, stderr[
            -2000:
        ]
    assert (tmp_path / "taken.safetensors").read_bytes() == b"not to be replaced"
