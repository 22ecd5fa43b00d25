"""The ``rockq`` command line with Rockpool networks: state dicts and Rockpool JSON parameter
files loaded with --arch, the xylo recipe, ``report --check`` and recipe errors for the
limits and scale_groups sections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app

pytest.importorskip("rockpool")

pytestmark = pytest.mark.rockpool

PKG = "rockq_xylo_testpkg"
ARCH = f"{PKG}.nets:xylo_net"
PKG_SOURCE = """
import torch


def xylo_net(n_in=3, n_hidden=4, n_out=2):
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    return Sequential(
        LinearTorch((n_in, n_hidden)),
        LIFTorch(n_hidden, has_rec=True, leak_mode="bitshifts"),
        LinearTorch((n_hidden, n_out)),
        LIFTorch(n_out, leak_mode="bitshifts"),
    )
"""

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The factory's package on sys.path, and one network saved both ways."""
    root = tmp_path_factory.mktemp("xylo")
    pkg = root / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(PKG_SOURCE))
    sys.path.insert(0, str(root))
    from importlib import import_module

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = import_module(f"{PKG}.nets").xylo_net()
    state = root / "net.pt"
    torch.save(net.state_dict(), state)
    params = root / "net.json"
    net.save(str(params))
    yield {"root": root, "state": state, "json": params}
    sys.path.remove(str(root))


def rockq(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def fresh_net() -> torch.nn.Module:
    from importlib import import_module

    net: torch.nn.Module = import_module(f"{PKG}.nets").xylo_net()
    return net


@pytest.mark.parametrize("kind", ["state", "json"])
def test_quantize_a_saved_rockpool_network_with_xylo(
    files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "xylo.safetensors"
    result = rockq("quantize", files[kind], "xylo", "-o", out, "--arch", ARCH, "-q")
    assert result.exit_code == 0, result.output
    state = load_file(str(out))
    net = fresh_net()
    net.load_state_dict(state)  # the unpatched network's state dict, states included
    assert {"1_LIFTorch.vmem", "1_LIFTorch.threshold"} <= set(state)
    assert state["0_LinearTorch.weight"].abs().max() == 127
    report = json.loads((tmp_path / "xylo.report.json").read_text())
    assert report["ok"] is True and report["violations"] == []
    assert report["limits"]["thresholds"] == {"signed": True, "bits": 16}
    checked = rockq("report", out, "--check", "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["ok"] is True


def test_state_dict_and_json_give_the_same_output(files: dict[str, Path], tmp_path: Path) -> None:
    outs = []
    for kind in ("state", "json"):
        out = tmp_path / f"{kind}.safetensors"
        assert (
            rockq("quantize", files[kind], "xylo", "-o", out, "--arch", ARCH, "-q").exit_code == 0
        )
        outs.append(load_file(str(out)))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_patch_then_burn_in_matches_quantize(files: dict[str, Path], tmp_path: Path) -> None:
    patched = tmp_path / "net.patched.safetensors"
    burned = tmp_path / "net.quantised.safetensors"
    direct = tmp_path / "direct.safetensors"
    assert rockq("patch", files["json"], "xylo", "-o", patched, "--arch", ARCH, "-q").exit_code == 0
    result = rockq("burn-in", patched, "-o", burned, "--trust", PKG, "-q")
    assert result.exit_code == 0, result.output
    assert (
        rockq("quantize", files["json"], "xylo", "-o", direct, "--arch", ARCH, "-q").exit_code == 0
    )
    a, b = load_file(str(burned)), load_file(str(direct))
    assert all(torch.equal(a[k], b[k]) for k in a)


FINETUNE_RECIPE = """
version: 1
params:
  - {family: weights, transform: stochastic_rounding, args: {num_levels: 16}}
finetune:
  epochs: 2
  batch_size: 4
  optimizer: {name: adam, lr: 0.05}
  reduce_time: sum
"""


@pytest.fixture
def qat(tmp_path: Path) -> tuple[Path, Path]:
    """A recipe with a finetune section, and spike trains to train on."""
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(FINETUNE_RECIPE)
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.rand(8, 10, 3, generator=generator) < 0.5).float()
    data = tmp_path / "data.safetensors"
    save_file({"inputs": inputs, "targets": torch.arange(8) % 2}, str(data))
    return recipe, data


def test_finetune_a_rockpool_network_then_burn_in(
    files: dict[str, Path], qat: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, data = qat
    patched = tmp_path / "net.patched.safetensors"
    result = rockq(
        "patch", files["state"], recipe, "-o", patched, "--arch", ARCH,
        "--finetune", "--data", data, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    raw = load_file(str(patched))
    before = torch.load(files["state"])
    assert not torch.equal(raw["0_LinearTorch.weight"], before["0_LinearTorch.weight"])
    burned = tmp_path / "net.q.safetensors"
    assert rockq("burn-in", patched, "-o", burned, "--trust", PKG, "-q").exit_code == 0
    weights = load_file(str(burned))["0_LinearTorch.weight"]
    assert len(weights.unique()) <= 16


@pytest.mark.slow
def test_finetune_in_a_fresh_process_whose_factory_imports_rockpool(
    files: dict[str, Path], qat: tuple[Path, Path], tmp_path: Path
) -> None:
    # The factory imports Rockpool when called, so the first import happens while rockq
    # builds the network: Rockpool's default tensors (made at import) must be ordinary
    # tensors, or the fine-tuning forward pass meets a tensor on the meta device.
    recipe, data = qat
    out = tmp_path / "net.patched.safetensors"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(files["root"]), str(repo)])}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "patch", str(files["state"]), str(recipe),
         "--arch", ARCH, "--finetune", "--data", str(data), "-o", str(out), "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.exists()


def test_dry_run_lists_the_scale_group_pairs(files: dict[str, Path]) -> None:
    result = rockq("patch", files["state"], "xylo", "--arch", ARCH, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["scale_groups"]
    assert [[m["name"] for m in g["members"]] for g in groups] == [
        ["0_LinearTorch.weight", "1_LIFTorch.w_rec", "1_LIFTorch.threshold"],
        ["2_LinearTorch.weight", "3_LIFTorch.threshold"],
    ]
    table = rockq("patch", files["state"], "xylo", "--arch", ARCH, "--dry-run")
    lines = [line for line in table.stdout.splitlines() if line.startswith("scale group")]
    assert lines == [
        "scale group neuron_inputs (per neuron): 0_LinearTorch.weight, 1_LIFTorch.w_rec, "
        "1_LIFTorch.threshold (scaled along)",
        "scale group neuron_inputs (per neuron): 2_LinearTorch.weight, 3_LIFTorch.threshold "
        "(scaled along)",
    ]


def test_report_check_exits_3_on_a_tensor_out_of_range(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.tensor([[300.0, -2.0]]), "fc.bias": torch.ones(1)}, str(bad))
    result = rockq("report", bad, "--limits", "xylo", "--check")
    assert result.exit_code == 3
    assert "fc.weight: expected integers for signed 8-bit [-128, 127], found range" in result.output
    # Without --check the violation is shown, and the exit code stays 0.
    shown = rockq("report", bad, "--limits", "xylo", "--json")
    assert shown.exit_code == 0
    assert [v["name"] for v in json.loads(shown.stdout)["violations"]] == ["fc.weight"]
    # A file without a recorded recipe and no --limits has nothing to check: --check says so.
    assert rockq("report", bad, "--check").exit_code == 2


def test_a_json_parameter_file_without_arch_asks_for_it(files: dict[str, Path]) -> None:
    result = rockq("quantize", files["json"], "xylo", "-o", files["root"] / "x.safetensors")
    assert result.exit_code == 2
    assert result.output.strip().endswith(
        "is a JSON file: a Rockpool parameter file (net.save(path)) holds values, not the "
        "network; pass --arch package.module:factory that builds the network"
    )


def test_a_json_file_that_does_not_fit_the_factory(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    result = rockq(
        "quantize",
        files["json"],
        "xylo",
        "-o",
        out,
        "--arch",
        ARCH,
        "--arch-kwargs",
        '{"n_hidden": 6}',
    )
    assert result.exit_code == 2
    assert str(files["json"]) in result.output and "shape" in result.output
    assert not out.exists()


BAD_RECIPES = [
    (
        "limits:\n  weights: {signed: true, bits: 0}\n",
        "bad.yaml:8: limits.weights.bits: must be a whole number of bits from 1 to 64, got 0",
    ),
    (
        "limits:\n  weights: {signed: 1, bits: 8}\n",
        "bad.yaml:8: limits.weights.signed: must be true or false, got 1",
    ),
    (
        "limits:\n  weights: {bits: 8}\n",
        "bad.yaml:8: limits.weights: missing 'signed'; write the limit as {signed: true, bits: 8}",
    ),
    (
        "limits:\n  weights: {signed: true, bitz: 8}\n",
        "bad.yaml:8: limits.weights.bitz: unknown key 'bitz' (did you mean 'bits'?)",
    ),
    (
        "scale_groups:\n  - name: g\n    per: channel\n    members: [{family: weights}]\n",
        "bad.yaml:9: scale_groups[0].per: must be layer or neuron, got 'channel'",
    ),
    (
        "scale_groups:\n  - name: g\n",
        "bad.yaml:8: scale_groups[0]: a scale group needs 'members'",
    ),
    (
        "scale_groups:\n  - name: g\n    members: [{sets_range: true}]\n",
        "bad.yaml:9: scale_groups[0].members[0]: a member needs a selector",
    ),
    (
        "scale_groups:\n  - name: g\n    members: [{family: weights, sets_range: false}]\n",
        "bad.yaml:9: scale_groups[0].members: no member sets the range",
    ),
    (
        "scale_groups:\n  - name: g\n    pair: 're:\\d+'\n    members: [{family: weights}]\n",
        "bad.yaml:9: scale_groups[0].pair: 're:\\d+' has no capture group",
    ),
    (
        "scale_groups:\n  - {name: g, members: [{family: weights}]}\n"
        "  - {name: g, members: [{family: thresholds}]}\n",
        "bad.yaml:9: scale_groups[1].name: group name 'g' is already used by scale_groups[0]",
    ),
]

BASE = """\
version: 1
params:
  - family: weights
    transform: deterministic_rounding
    args: {output_range: [-127, 127], num_levels: 255}
"""


@pytest.mark.parametrize(("section", "expected"), BAD_RECIPES)
def test_bad_limits_and_scale_groups_name_file_and_line(
    files: dict[str, Path], tmp_path: Path, section: str, expected: str
) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BASE + "\n" + section)
    result = rockq(
        "quantize", files["state"], recipe, "-o", tmp_path / "o.safetensors", "--arch", ARCH
    )
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"rockq: error: {tmp_path / expected.split(':', 1)[0]}:")
    assert expected.split(":", 1)[1] in line


PLAN_ERRORS = [
    (
        "  - family: thresholds\n    transform: int_quant\n"
        "scale_groups:\n  - name: g\n    members: [{family: weights}, {family: thresholds}]\n",
        "scale_groups[0]: tensor '1_LIFTorch.threshold' is transformed by params[1] with "
        "int_quant, which takes no input_range to share",
    ),
    (
        "scale_groups:\n  - name: g\n    members: [{family: weights}, {family: thresholds}]\n",
        "scale_groups[0]: tensor '1_LIFTorch.threshold' is in scale group 'g' but no params rule",
    ),
    (
        "scale_groups:\n  - name: g\n    members: [{family: taus}]\n",
        "scale_groups[0]: scale group 'g' matches no tensor of the network",
    ),
    (
        "scale_groups:\n  - name: g\n    members: [{family: weights, module: LinearTorch}, "
        "{family: weights, module: LIFTorch}]\n",
        "tensor(s) 2_LinearTorch.weight come after the last module holding members[1]",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), PLAN_ERRORS)
def test_scale_groups_that_do_not_fit_the_network(
    files: dict[str, Path], tmp_path: Path, extra: str, expected: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + extra)
    result = rockq("patch", files["state"], recipe, "--arch", ARCH, "--dry-run")
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"rockq: error: {recipe}:")
    assert expected in line
