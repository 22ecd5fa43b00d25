"""Tests for the ``rockq`` command line: every command, its happy path and its error paths.

Most tests run the Typer app in-process with :class:`typer.testing.CliRunner`; a few run the
installed entry point in a subprocess. Inputs are built once per module from fixed values
(no random numbers), so golden files stay valid across torch versions.

Golden files: ``tests/golden/cli_quantize_*.json``. After an intended change to the output
format, regenerate them with ``ROCKQ_UPDATE_GOLDEN=1 pytest tests/test_cli.py`` and review
the diff.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runs import ok, runner, user_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import transform_core
from cli import quantise_commands
from cli.main import app
from transform_core.direct_file import DirectFile
from transform_core.errors import CheckpointError, RecipeError
from transform_core.safetensors_io import SafetensorsWriter

PKG = "rockq_cli_testpkg"
GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("ROCKQ_UPDATE_GOLDEN") == "1"
REPO = Path(__file__).resolve().parent.parent

PKG_SOURCE = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.fc = nn.Linear(3, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.fc(x))))


def make_net(hidden=4):
    return TinyNet(hidden).eval()
"""

DETERMINISTIC = """\
version: 1
description: 4-bit weights, 8-bit biases, deterministic
params:
  - family: weights
    transform: deterministic_rounding
    args: {num_levels: 15, maintain_zero: true}
  - family: biases
    transform: deterministic_rounding
    args: {num_levels: 255}
    optional: true
"""

OVERLAPPING = """\
version: 1
params:
  - family: weights
    transform: deterministic_rounding
    args: {num_levels: 3}
  - match: "fc.*"
    transform: deterministic_rounding
    args: {num_levels: 255}
  - family: norms
    transform: identity
    optional: true
"""

UNMATCHED = """\
version: 1
params:
  - family: weights
    transform: identity
  - family: decays
    transform: identity
"""

ACTIVATIONS = """\
version: 1
params:
  - family: weights
    transform: identity
activations:
  - module: Linear
    transform: identity
"""

BAD_ARGS = """\
version: 1
params:
  - family: weights
    transform: deterministic_rounding
    args: {num_levels: 1}
"""


def _fill(net: nn.Module) -> nn.Module:
    """Give every floating tensor fixed values that are exact in float32 (no RNG, no libm)."""
    with torch.no_grad():
        for i, (name, tensor) in enumerate(net.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            k = torch.arange(tensor.numel(), dtype=torch.float32)
            # cubes of -8..8 over 512: exact, and mostly off any uniform grid
            values = ((k * 7 + 3 * i) % 17 - 8) ** 3 / 512
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values.reshape(tensor.shape))
    return net


def _mlp() -> nn.Module:
    return _fill(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))


@dataclass(frozen=True)
class Inputs:
    root: Path
    mlp: Path  # whole-module pickle of torch layers only
    net: Path  # whole-module pickle of the test package's TinyNet: needs --trust
    state_pt: Path  # TinyNet's state dict, torch.save
    state_st: Path  # the same as safetensors (byte-stable)
    sharded: Path  # the same in two shards with an index
    arch: str


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("pkgroot")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "models.py").write_text(textwrap.dedent(PKG_SOURCE))
    sys.path.insert(0, str(root))
    yield PKG
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def _tiny(pkg: str) -> nn.Module:
    import importlib

    module = importlib.import_module(f"{pkg}.models")
    return _fill(module.make_net())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, pkg: str) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    torch.save(_mlp(), root / "mlp.pt")
    net = _tiny(pkg)
    torch.save(net, root / "net.pt")
    state = net.state_dict()
    torch.save(state, root / "state.pt")
    save_file(state, str(root / "state.safetensors"))
    sharded = root / "sharded"
    sharded.mkdir()
    # The second shard holds the first layer: tensors come in another order than the file's.
    shards = {
        "model-00001-of-00002.safetensors": [k for k in state if not k.startswith("fc.")],
        "model-00002-of-00002.safetensors": [k for k in state if k.startswith("fc.")],
    }
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / file))
    weight_map = {name: file for file, names in shards.items() for name in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return Inputs(
        root=root,
        mlp=root / "mlp.pt",
        net=root / "net.pt",
        state_pt=root / "state.pt",
        state_st=root / "state.safetensors",
        sharded=sharded,
        arch=f"{pkg}.models:make_net",
    )


@pytest.fixture
def recipe_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(DETERMINISTIC)
    return path


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- listings ------------------------------------------------------------------------------


def test_version() -> None:
    assert ok("--version") == f"rockq {transform_core.__version__}\n"


def test_help_lists_every_command() -> None:
    out = ok("--help")
    for command in ("inspect", "patch", "burn-in", "quantize", "report", "recipes", "demo"):
        assert command in out


def test_recipes_lists_prints_and_suggests() -> None:
    listing = ok("recipes")
    assert "int8" in listing and "ternary" in listing and "qat4" in listing
    assert ok("recipes", "ternary").startswith("version: 1\n")
    assert "(did you mean 'int8'?)" in user_error("recipes", "int9")


def test_transforms_as_json_and_table() -> None:
    specs = {s["name"]: s for s in json.loads(ok("transforms", "--json"))}
    args = {a["name"]: a for a in specs["stochastic_rounding"]["args"]}
    assert args["num_levels"] == {
        "name": "num_levels",
        "type": args["num_levels"]["type"],
        "required": False,
        "default": 256,
    }
    assert "deterministic_rounding" in ok("transforms")


# --- inspect -------------------------------------------------------------------------------


def test_inspect_network_json(inputs: Inputs) -> None:
    data = json.loads(ok("inspect", inputs.mlp, "--json"))
    assert data["source"]["kind"] == "pickle"
    assert [(r["name"], r["family"], r["module_class"]) for r in data["tensors"]] == [
        ("0.weight", "weights", "Linear"),
        ("0.bias", "biases", "Linear"),
        ("2.weight", "weights", "Linear"),
        ("2.bias", "biases", "Linear"),
    ]
    assert data["tensors"][0]["numel"] == 24
    assert data["tied"] == {}


def test_tied_tensors_are_named_in_inspect_and_by_a_rule_that_selects_the_other_name(
    tmp_path: Path,
) -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    torch.save(nn.Sequential(emb, nn.ReLU(), head), tmp_path / "tied.pt")
    data = json.loads(ok("inspect", tmp_path / "tied.pt", "--json"))
    assert [r["name"] for r in data["tensors"]] == ["0.weight"]
    assert data["tied"] == {"2.weight": "0.weight"}
    assert "tied (one tensor, listed once): 2.weight is 0.weight" in ok(
        "inspect", tmp_path / "tied.pt"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nparams:\n  - {match: '2.weight', transform: identity}\n")
    message = user_error("quantize", tmp_path / "tied.pt", recipe, "-o", tmp_path / "q.safetensors")
    assert message.endswith(
        "params[0]: selects '2.weight', which is the same tensor as '0.weight' (tied), and "
        "rules see it under that name only; select '0.weight' instead"
    )


def test_inspect_table_and_recipe_families(inputs: Inputs, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nfamilies:\n  heads: ['out.*']\nparams:\n"
        "  - family: heads\n    transform: identity\n"
    )
    out = ok("inspect", inputs.state_st, "--arch", inputs.arch, "--recipe", recipe)
    assert "norm.running_mean" in out and "per family" in out and "heads" in out


def test_inspect_bare_tensors(inputs: Inputs) -> None:
    data = json.loads(ok("inspect", inputs.sharded, "--json"))
    assert data["source"]["kind"] == "tensors"
    rows = {r["name"]: r for r in data["tensors"]}
    assert rows["fc.weight"]["family"] == "weights" and rows["fc.weight"]["module_class"] is None
    assert rows["norm.num_batches_tracked"]["dtype"] == "int64"


# --- loading networks ----------------------------------------------------------------------


def test_untrusted_class_needs_trust(inputs: Inputs, pkg: str) -> None:
    line = user_error("inspect", inputs.net)
    assert line == (
        f"rockq: error: {inputs.net}: the pickle needs global '{pkg}.models.TinyNet', which is "
        f"not allowed; if you trust package '{pkg}', pass --trust {pkg}"
    )
    rows = json.loads(ok("inspect", inputs.net, "--trust", pkg, "--json"))["tensors"]
    assert rows[0]["module_class"] == "Linear" and len(rows) == 9


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("trust", [[], ["--trust", PKG], ["--trust", "os"]])
@pytest.mark.parametrize("how", ["inside-module", "torch-save", "raw-pickle"])
def test_malicious_pickle_never_runs(
    tmp_path: Path, inputs: Inputs, how: str, trust: list[str]
) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload(f"touch {marker}")
    path = tmp_path / "evil.pt"
    if how == "inside-module":
        net = _mlp()
        net.extra = payload  # type: ignore[assignment]
        torch.save(net, path)
    elif how == "torch-save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    for command in (["inspect", path], ["quantize", path, "int8", "-o", tmp_path / "o.st"]):
        line = user_error(*command, *trust)
        assert line.startswith(f"rockq: error: {path}: ")
        if how != "raw-pickle":
            assert "'posix.system'" in line and "--trust posix" in line
        else:
            assert "old-style (non-zip) torch.save file" in line
    assert not marker.exists()
    assert _files(tmp_path) == ["evil.pt"]


def test_state_dict_with_arch(inputs: Inputs, pkg: str) -> None:
    for state in (inputs.state_pt, inputs.state_st, inputs.sharded):
        data = json.loads(ok("inspect", state, "--arch", inputs.arch, "--json"))
        assert data["source"]["kind"] == "arch"
        assert data["tensors"][2]["module_class"] == "BatchNorm1d"
    ok("inspect", inputs.state_pt, "--arch", inputs.arch, "--arch-kwargs", '{"hidden": 4}')


def test_state_dict_that_does_not_fit(inputs: Inputs, tmp_path: Path) -> None:
    line = user_error(
        "inspect", inputs.state_pt, "--arch", inputs.arch, "--arch-kwargs", '{"hidden": 5}'
    )
    assert "shape mismatch" in line and "fc.weight: file [4, 3], network [5, 3]" in line
    state = torch.load(inputs.state_pt, weights_only=True)
    del state["out.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    line = user_error("inspect", path, "--arch", inputs.arch)
    assert "1 missing key (out.bias)" in line and "1 unexpected key (extra.weight)" in line


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--arch-kwargs", "{hidden: 4}"], "--arch-kwargs: is not valid JSON"),
        (["--arch-kwargs", "[4]"], "--arch-kwargs: must be a JSON object, got list"),
        (["--arch-kwargs", '{"hidden": NaN}'], "--arch-kwargs: holds NaN, which JSON does not"),
        (["--arch-kwargs", "[" * 5000 + "]" * 5000], "--arch-kwargs: is nested too deeply"),
        (["--arch-kwargs", '{"width": 4}'], "raised TypeError"),
    ],
)
def test_bad_arch_kwargs(inputs: Inputs, extra: list[str], phrase: str) -> None:
    assert phrase in user_error("inspect", inputs.state_pt, "--arch", inputs.arch, *extra)


@pytest.mark.parametrize(
    ("arch", "phrase"),
    [
        ("no_colon", "expected 'package.module:factory'"),
        ("rockq_no_such_pkg.models:make", "cannot import module 'rockq_no_such_pkg.models'"),
        (f"{PKG}.models:make_nett", "(did you mean 'make_net'?)"),
    ],
)
def test_bad_arch_spec(inputs: Inputs, arch: str, phrase: str) -> None:
    assert phrase in user_error("inspect", inputs.state_pt, "--arch", arch)


# --- user errors ---------------------------------------------------------------------------


def _bad_input(tmp_path: Path, inputs: Inputs, case: str) -> Path:
    if case == "missing":
        return tmp_path / "nothere.pt"
    if case == "folder":
        return tmp_path
    path = tmp_path / f"{case}.pt"
    data = inputs.mlp.read_bytes()
    if case == "truncated-safetensors":
        path = tmp_path / "t.safetensors"
        data = inputs.state_st.read_bytes()
    path.write_bytes(
        {
            "empty": b"",
            "corrupt": b"\x00garbage" * 10,
            "truncated-pt": data[: len(data) // 2],
            "truncated-safetensors": data[: len(data) - 7],
        }[case]
    )
    return path


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing", "no such file"),
        ("folder", "expected a folder with exactly one *.safetensors.index.json"),
        ("empty", "is empty (0 bytes)"),
        ("corrupt", "is not a torch.save file"),
        ("truncated-pt", "corrupt or truncated"),
        ("truncated-safetensors", "is truncated"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "quantize", "patch", "report"])
def test_bad_input_files(
    tmp_path: Path, inputs: Inputs, case: str, phrase: str, command: str
) -> None:
    path = _bad_input(tmp_path, inputs, case)
    if command == "report" and case == "folder":
        phrase = "*.safetensors.index.json"
    args: list[str | Path] = {
        "inspect": ["inspect", path],
        "quantize": ["quantize", path, "int8", "-o", tmp_path / "out.safetensors"],
        "patch": ["patch", path, "int8", "-o", tmp_path / "out.safetensors"],
        "report": ["report", path],
    }[command]
    before = _files(tmp_path)
    line = user_error(*args)
    assert phrase in line and str(path) in line
    assert _files(tmp_path) == before


def test_burn_in_of_something_else(tmp_path: Path, inputs: Inputs) -> None:
    assert "is not a patched checkpoint" in user_error("burn-in", inputs.state_st)
    assert "is a folder" in user_error("burn-in", inputs.sharded)
    assert "no such file" in user_error("burn-in", tmp_path / "nothere.safetensors")


@pytest.mark.parametrize(
    ("recipe", "phrase"),
    [
        ("int9", "'int9' is not a recipe file and not a built-in recipe (did you mean 'int8'?)"),
        ("recipes/int8.yml", "'recipes/int8.yml' is not a recipe file"),
    ],
)
def test_unknown_recipe(inputs: Inputs, recipe: str, phrase: str) -> None:
    line = user_error("patch", inputs.mlp, recipe, "--dry-run")
    assert phrase in line and "one of the built-ins: int8, " in line


def test_recipe_folder_and_bad_content(tmp_path: Path, inputs: Inputs) -> None:
    assert "is a directory" in user_error("quantize", inputs.mlp, tmp_path, "-o", tmp_path / "o")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_ARGS)
    line = user_error("quantize", inputs.mlp, recipe, "-o", tmp_path / "o.safetensors")
    assert line == (
        f"rockq: error: {recipe}:5: params[0].args.num_levels: must be an integer >= 2, got 1"
    )
    recipe.write_text("version: 1\nparams:\n  - family: weights\n   transform: x\n")
    assert f"{recipe}:4: invalid YAML" in user_error("patch", inputs.mlp, recipe, "--dry-run")
    assert _files(tmp_path) == ["bad.yaml"]


@pytest.mark.parametrize("kind", ["network", "tensors"])
def test_a_transform_that_refuses_a_tensor_is_named_before_any_write(
    tmp_path: Path, kind: str
) -> None:
    model = tmp_path / ("half.pt" if kind == "network" else "half.safetensors")
    if kind == "network":
        torch.save(_mlp().half(), model)
    else:
        save_file({k: v.half() for k, v in _mlp().state_dict().items()}, str(model))
    recipe = tmp_path / "r.yaml"
    rule = "version: 1\nparams:\n  - family: weights\n    transform: int_quant\n"
    recipe.write_text(rule + "    args: {n_bits: 17}\n")
    out = tmp_path / "q.safetensors"
    line = user_error("quantize", model, recipe, "-o", out)
    assert line == (
        f"rockq: error: {recipe}:3: params[0]: int_quant cannot transform tensor '0.weight': "
        "n_bits must be at most 12 for float16 values (float16 holds every integer only up to "
        "2**11), got 17; convert the tensor to float32; change the rule's args, or leave this "
        "tensor out of it"
    )
    recipe.write_text(
        rule.replace("int_quant", "deterministic_channel_rounding").replace(
            "family: weights", "match: '*'"
        )
        + "    args: {output_range: [-1, 1]}\n"
    )
    line = user_error("quantize", model, recipe, "-o", out)
    assert "tensor '0.bias': needs a tensor of 2 or more dimensions, got shape (6,)" in line
    if kind == "network":
        assert "'0.bias'" in user_error("patch", model, recipe, "-o", out)
    assert _files(tmp_path) == [model.name, "r.yaml"]


def test_a_recipe_with_an_absurd_bit_depth_is_refused_at_once(
    tmp_path: Path, inputs: Inputs
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nparams:\n  - family: weights\n    transform: int_quant\n"
        "    args: {n_bits: 99999999999999999999}\n"
    )
    line = user_error("quantize", inputs.mlp, recipe, "-o", tmp_path / "q.safetensors")
    assert line.startswith(f"rockq: error: {recipe}:5: params[0].args.n_bits: must be at most 25")


@pytest.mark.parametrize("variable", ["ROCKQ_COMPILED_KERNELS", "ROCKQ_DIRECT_IO"])
def test_a_switch_in_the_environment_that_is_not_understood_stops_any_command(
    tmp_path: Path, inputs: Inputs, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "maybe")
    out = tmp_path / "q.safetensors"
    line = user_error("quantize", inputs.mlp, "int8", "-o", out)  # too small to read it
    assert line == (
        f"rockq: error: environment variable {variable}='maybe' is not understood; set it to "
        "0 (or false, no, off) to turn the feature off, or unset it"
    )
    assert _files(tmp_path) == []
    monkeypatch.setenv(variable, "Off")
    ok("quantize", inputs.mlp, "int8", "-o", out, "-q")


@pytest.mark.parametrize("where", ["import", "call"])
def test_imported_code_that_calls_sys_exit_is_a_one_line_error(
    tmp_path: Path, inputs: Inputs, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    module = f"exits_on_{where}"
    body = "def clip(x):\n    raise SystemExit(3)\n"
    if where == "import":
        body = "import sys\nsys.exit()\n"
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nparams:\n  - family: weights\n    transform: {module}:clip\n")
    line = user_error("quantize", inputs.mlp, recipe, "-o", tmp_path / "q.safetensors")
    call = "sys.exit()" if where == "import" else "sys.exit(3)"
    assert line.startswith(f"rockq: error: code it imported called {call} (a custom transform")
    assert sorted(p.name for p in tmp_path.glob("*.*")) == [f"{module}.py", "r.yaml"]


def test_debug_raises_instead_of_one_line(inputs: Inputs, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_ARGS)
    result = runner().invoke(app, ["patch", str(inputs.mlp), str(recipe), "--debug"])
    assert result.exit_code == 1
    assert isinstance(result.exception, RecipeError)
    assert "rockq: error" not in result.output
    result = runner().invoke(app, ["inspect", str(tmp_path / "none.pt"), "--debug"])
    assert isinstance(result.exception, CheckpointError)


def test_internal_errors_exit_1(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    import transform_core.pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(transform_core.pipeline, "plan_network", broken)
    result = runner().invoke(app, ["patch", str(inputs.mlp), "int8", "--dry-run"])
    assert result.exit_code == 1
    assert result.stderr.startswith("rockq: error: internal error: RuntimeError: boom (run again")
    assert result.stderr.count("\n") == 1
    result = runner().invoke(app, ["patch", str(inputs.mlp), "int8", "--dry-run", "--debug"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def _nan_net(tmp_path: Path) -> tuple[Path, Path]:
    net = _mlp()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
        net[2].bias[1] = float("inf")
    whole = tmp_path / "nan.pt"
    torch.save(net, whole)
    tensors = tmp_path / "nan.safetensors"
    save_file(net.state_dict(), str(tensors))
    return whole, tensors


def test_nonfinite_parameters_need_a_flag(tmp_path: Path) -> None:
    whole, tensors = _nan_net(tmp_path)
    out = tmp_path / "out.safetensors"
    for source in (whole, tensors):
        line = user_error("quantize", source, "int8", "-o", out)
        assert f"{source}: 0.weight: " in line and "--allow-nonfinite" in line
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    assert "--allow-nonfinite" in user_error("patch", whole, "int8", "-o", out)
    ok("quantize", whole, "int8", "-o", out, "--allow-nonfinite", "-q")
    written = load_file(str(out))
    assert bool(written["0.weight"][0, 0].isnan()) and bool(written["2.bias"][1].isinf())
    ok("quantize", tensors, "int8", "-o", tmp_path / "t.safetensors", "--allow-nonfinite", "-q")


def test_burn_in_of_nonfinite_parameters_needs_the_flag(tmp_path: Path) -> None:
    whole, _ = _nan_net(tmp_path)
    patched = tmp_path / "nan.patched.safetensors"
    ok("patch", whole, "int8", "-o", patched, "--allow-nonfinite", "-q")
    out = tmp_path / "nan.quantised.safetensors"
    line = user_error("burn-in", patched)
    assert line.startswith(f"rockq: error: {patched}: 0.weight: holds 1 NaN or Inf value(s)")
    assert "--allow-nonfinite" in line and not out.exists()
    ok("burn-in", patched, "--allow-nonfinite", "-q")
    assert bool(load_file(str(out))["0.weight"][0, 0].isnan())


def test_a_transform_that_makes_nan_from_finite_values_writes_nothing(tmp_path: Path) -> None:
    # A float32 range wider than float32 holds: every level of that weight overflows.
    net = _mlp()
    with torch.no_grad():
        net[0].weight[0, :2] = torch.tensor([3e38, -3e38])
    whole, tensors = tmp_path / "wide.pt", tmp_path / "wide.safetensors"
    torch.save(net, whole)
    save_file(net.state_dict(), str(tensors))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nparams:\n  - family: weights\n    transform: deterministic_rounding\n"
    )
    out = tmp_path / "out.safetensors"
    patched = tmp_path / "wide.patched.safetensors"
    ok("patch", whole, recipe, "-o", patched, "-q")
    for command in (
        ["quantize", whole, recipe, "-o", out],
        ["quantize", tensors, recipe, "-o", out],
        ["burn-in", patched, "-o", out],
    ):
        line = user_error(*command)
        assert line.startswith(
            "rockq: error: deterministic_rounding() made 24 NaN or Inf value(s) in tensor "
            "'0.weight' (float32); nothing was written"
        ), line
        assert "--allow-nonfinite" in line and not out.exists()
    ok("quantize", tensors, recipe, "-o", out, "--allow-nonfinite", "-q")
    assert bool(load_file(str(out))["0.weight"].isnan().all())


# --- patch, dry run, burn-in ---------------------------------------------------------------


def test_dry_run_shows_matches_overlaps_and_sizes(tmp_path: Path, inputs: Inputs) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(OVERLAPPING)
    out = ok("patch", inputs.net, recipe, "--trust", PKG, "--dry-run")
    assert "params[0]" in out and "fc.weight, out.weight" in out
    assert "nothing (optional)" not in out and "norm.weight, norm.bias" in out
    assert "not transformed (4): norm.running_mean, norm.running_var, " in out
    assert "overlap fc.weight: matched by params[0], params[1]; params[1] wins" in out
    assert "size: " in out and "before" in out
    data = json.loads(ok("patch", inputs.net, recipe, "--trust", PKG, "--dry-run", "--json"))
    assert [r["matches"] for r in data["rules"]] == [
        ["fc.weight", "out.weight"],
        ["fc.weight", "fc.bias"],
        ["norm.weight", "norm.bias"],
    ]
    assert data["unmatched_tensors"] == [
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "out.bias",
    ]
    assert data["overlaps"] == [
        {"tensor": "fc.weight", "rules": ["params[0]", "params[1]"], "winner": "params[1]"}
    ]
    before, after = data["size_bits"]["before"], data["size_bits"]["after"]
    # fc at 8 bits, out.weight at 2, the rest as stored (the step counter is an int64)
    assert before == 32 * 42 + 64
    assert after == (12 + 4) * 8 + 8 * 2 + 32 * (4 + 4 + 4 + 4 + 2) + 64
    assert _files(tmp_path) == ["r.yaml"]
    assert _files(inputs.root) == sorted(
        ["mlp.pt", "net.pt", "state.pt", "state.safetensors", "sharded"]
    )


def test_rule_matching_nothing_is_an_error_unless_optional(tmp_path: Path, inputs: Inputs) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(UNMATCHED)
    line = user_error("patch", inputs.mlp, recipe, "--dry-run")
    assert line.startswith(f"rockq: error: {recipe}:5: params[1]: matches no tensor")
    assert "add 'optional: true'" in line
    assert "params[1]: matches no tensor" in user_error(
        "quantize", inputs.mlp, recipe, "-o", tmp_path / "o.safetensors"
    )
    recipe.write_text(UNMATCHED + "    optional: true\n")
    assert "nothing (optional)" in ok("patch", inputs.mlp, recipe, "--dry-run")
    assert _files(tmp_path) == ["r.yaml"]


def test_patch_then_burn_in_needs_nothing_else(tmp_path: Path, inputs: Inputs) -> None:
    model = tmp_path / "mlp.pt"
    shutil.copy(inputs.mlp, model)
    out = ok("patch", model, "ternary")
    patched = tmp_path / "mlp.patched.safetensors"
    assert out == f"wrote {patched}: 2 of 4 tensors patched\n"
    assert "burn-in and report" not in ok("burn-in", patched, "-q")
    quantised = tmp_path / "mlp.quantised.safetensors"
    assert _files(tmp_path) == sorted(
        [
            "mlp.pt",
            "mlp.patched.safetensors",
            "mlp.quantised.safetensors",
            "mlp.quantised.report.json",
            "mlp.quantised.report.md",
        ]
    )
    state = load_file(str(quantised))
    net = _mlp()
    net.load_state_dict(state, strict=True)
    assert list(state) != [] and set(state) == set(net.state_dict())
    assert net[0].weight.unique().numel() <= 3
    assert torch.equal(net[0].bias, _mlp()[0].bias)
    report = json.loads((tmp_path / "mlp.quantised.report.json").read_text())
    assert report["meta"]["checkpoint"] == str(patched)
    assert report["meta"]["input"] == str(model)
    assert "| 0.weight |" in (tmp_path / "mlp.quantised.report.md").read_text()


def test_burn_in_of_an_arch_checkpoint_needs_trust(tmp_path: Path, inputs: Inputs) -> None:
    patched = tmp_path / "p.safetensors"
    ok("patch", inputs.state_st, "int8", "--arch", inputs.arch, "-o", patched, "-q")
    line = user_error("burn-in", patched, "-o", tmp_path / "q.safetensors")
    assert f"runs factory '{inputs.arch}'" in line and f"pass --trust {PKG}" in line
    ok("burn-in", patched, "-o", tmp_path / "q.safetensors", "--trust", PKG, "-q")
    net = _tiny(PKG)
    net.load_state_dict(load_file(str(tmp_path / "q.safetensors")), strict=True)
    assert net.fc.weight.unique().numel() <= 255
    assert torch.equal(net.norm.weight, _tiny(PKG).norm.weight)


def test_patch_refuses_tensor_files(tmp_path: Path, inputs: Inputs) -> None:
    for source in (inputs.state_st, inputs.sharded):
        line = user_error("patch", source, "int8", "-o", tmp_path / "p.safetensors")
        assert "is a bare tensor file" in line and "--arch" in line
    assert _files(tmp_path) == []


def test_patch_and_quantize_agree(tmp_path: Path, inputs: Inputs) -> None:
    ok("patch", inputs.mlp, "qat4", "-o", tmp_path / "p.safetensors", "--seed", "3")
    ok("burn-in", tmp_path / "p.safetensors", "-o", tmp_path / "a.safetensors", "-q")
    ok("quantize", inputs.mlp, "qat4", "-o", tmp_path / "b.safetensors", "--seed", "3", "-q")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- quantize ------------------------------------------------------------------------------


def test_quantize_network_and_tensor_mode(tmp_path: Path, inputs: Inputs) -> None:
    out = ok("quantize", inputs.state_st, "qat4", "-o", tmp_path / "net.safetensors", "--arch",
             inputs.arch)  # fmt: skip
    assert f"wrote {tmp_path / 'net.safetensors'} and net.report.json, net.report.md" in out
    ok("quantize", inputs.state_st, "qat4", "-o", tmp_path / "flat.safetensors", "-q")
    ok("quantize", inputs.sharded, "qat4", "-o", tmp_path / "shards.safetensors", "-q")
    network = load_file(str(tmp_path / "net.safetensors"))
    flat = load_file(str(tmp_path / "flat.safetensors"))
    shards = load_file(str(tmp_path / "shards.safetensors"))
    original = load_file(str(inputs.state_st))
    assert network.keys() == flat.keys() == shards.keys() == original.keys()
    # the same tensor gets the same random stream whatever the order it is processed in
    assert all(torch.equal(flat[k], shards[k]) for k in flat)
    for name in ("fc.weight", "fc.bias", "out.weight", "out.bias"):
        assert torch.equal(network[name], flat[name])
        assert not torch.equal(network[name], original[name])
    # tensor mode takes families from names, so the norm's weight counts as a weight there
    assert torch.equal(network["norm.weight"], original["norm.weight"])
    assert not torch.equal(flat["norm.weight"], original["norm.weight"])
    assert torch.equal(flat["norm.num_batches_tracked"], original["norm.num_batches_tracked"])
    report = json.loads((tmp_path / "shards.report.json").read_text())
    assert report["meta"]["input"] == str(inputs.sharded)
    # shard by shard: the first layer's tensors sit in the second shard
    assert [t["name"].startswith("fc.") for t in report["tensors"]] == [False] * 7 + [True] * 2


def test_quantize_maps_large_blocks_in_tensor_mode_only(
    tmp_path: Path, inputs: Inputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(quantise_commands, "map_large_blocks", lambda: calls.append("mapped"))
    ok("quantize", inputs.state_st, "qat4", "-o", tmp_path / "net.safetensors", "--arch",
       inputs.arch, "-q")  # fmt: skip
    assert calls == []
    ok("quantize", inputs.state_st, "qat4", "-o", tmp_path / "flat.safetensors", "-q")
    assert calls == ["mapped"]


def test_quantize_tensor_mode_refuses_network_recipes(tmp_path: Path, inputs: Inputs) -> None:
    recipe = tmp_path / "act.yaml"
    recipe.write_text(ACTIVATIONS)
    line = user_error("quantize", inputs.state_st, recipe, "-o", tmp_path / "o.safetensors")
    assert line.startswith(f"rockq: error: {recipe}:6: activations[0]: activation rules need")
    assert "a network" in line
    recipe.write_text("version: 1\nparams:\n  - family: weights\n    module: Linear\n"
                      "    transform: identity\n")  # fmt: skip
    line = user_error("quantize", inputs.sharded, recipe, "-o", tmp_path / "o.safetensors")
    assert "'module:' needs a network" in line
    ok("quantize", inputs.state_st, recipe, "-o", tmp_path / "o.safetensors", "--arch",
       inputs.arch, "-q")  # fmt: skip


def test_same_inputs_and_seed_give_identical_bytes(tmp_path: Path, inputs: Inputs) -> None:
    def quantize(source: Path, name: str, *extra: str) -> bytes:
        ok("quantize", source, "qat4", "-o", tmp_path / name, "-q", *extra)
        return (tmp_path / name).read_bytes()

    for source in (inputs.mlp, inputs.state_st):
        first = quantize(source, "a.safetensors")
        assert quantize(source, "b.safetensors") == first
        assert (tmp_path / "a.report.json").read_bytes() == (
            tmp_path / "b.report.json"
        ).read_bytes()
        assert quantize(source, "c.safetensors", "--seed", "1") != first
        assert quantize(source, "d.safetensors", "--seed", "0") == first  # qat4 says seed: 0
        if source == inputs.mlp:
            ok("patch", source, "qat4", "-o", tmp_path / "p1.safetensors", "-q")
            ok("patch", source, "qat4", "-o", tmp_path / "p2.safetensors", "-q")
            p1, p2 = (tmp_path / "p1.safetensors").read_bytes(), (tmp_path / "p2.safetensors")
            assert p1 == p2.read_bytes()
        for stale in tmp_path.iterdir():
            stale.unlink()


def test_tensor_mode_writes_the_same_bytes_past_the_page_cache_or_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Weights of 1 MiB and more, with biases between them, leave tensor boundaries off the
    # page grid: the whole pages go direct, the edges through the cache.
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(512 + i, 520, generator=generator) for i in range(3)}
    tensors.update({f"layer{i}.bias": torch.randn(512 + i, generator=generator) for i in range(3)})
    save_file(tensors, str(tmp_path / "in.safetensors"))
    written: list[bool] = []
    real_init = DirectFile.__init__

    def recorded(self: DirectFile, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        written.append(self.direct)

    monkeypatch.setattr(DirectFile, "__init__", recorded)
    ok("quantize", tmp_path / "in.safetensors", "int8", "-o", tmp_path / "a.safetensors", "-q")
    monkeypatch.setenv("ROCKQ_DIRECT_IO", "0")
    ok("quantize", tmp_path / "in.safetensors", "int8", "-o", tmp_path / "b.safetensors", "-q")
    assert written[1] is False
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "a.safetensors"))
    assert torch.equal(loaded["layer0.bias"], tensors["layer0.bias"])  # int8 rounds weights only
    assert loaded["layer2.weight"].unique().numel() <= 255


def test_a_wrong_direct_io_setting_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file({"layer0.weight": torch.ones(4, 4)}, str(tmp_path / "in.safetensors"))
    monkeypatch.setenv("ROCKQ_DIRECT_IO", "offf")
    line = user_error(
        "quantize", tmp_path / "in.safetensors", "int8", "-o", tmp_path / "o.safetensors"
    )
    assert "ROCKQ_DIRECT_IO='offf' is not understood" in line and "unset it" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


# --- metadata and golden files -------------------------------------------------------------


def _normalised(data: object, *folders: tuple[Path, str]) -> object:
    """``data`` with temporary folder paths replaced by placeholders."""
    text = json.dumps(data)
    for folder, placeholder in folders:
        text = text.replace(str(folder), placeholder)
    return json.loads(text)


def _check_golden(name: str, data: object) -> None:
    path = GOLDEN / name
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.exists(), f"missing {path}; create it with ROCKQ_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs; if intended, ROCKQ_UPDATE_GOLDEN=1"


def test_tensor_mode_records_the_inputs_digest(tmp_path: Path, inputs: Inputs) -> None:
    import hashlib

    out = tmp_path / "q.safetensors"
    ok("quantize", inputs.state_st, "int8", "-o", out, "-q")
    digest = hashlib.sha256(inputs.state_st.read_bytes()).hexdigest()
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["rockq.input_sha256"] == digest
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["meta"]["input_sha256"] == digest
    assert list(report["meta"]) == ["rockq_version", "recipe", "seed", "input", "input_sha256"]


def test_output_metadata_and_report_golden(
    tmp_path: Path, inputs: Inputs, recipe_file: Path
) -> None:
    out = tmp_path / "q.safetensors"
    ok("quantize", inputs.state_st, recipe_file, "-o", out, "--arch", inputs.arch, "-q")
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["rockq.version"] == transform_core.__version__
    assert metadata["rockq.recipe"] == DETERMINISTIC
    assert metadata["rockq.seed"] == "0"
    import hashlib

    digest = hashlib.sha256(inputs.state_st.read_bytes()).hexdigest()
    assert metadata["rockq.input_sha256"] == digest
    tensors = json.loads(metadata["rockq.tensors"])
    assert tensors["fc.weight"]["transform"] == "deterministic_rounding"
    assert tensors["fc.weight"]["args"] == {"num_levels": 15, "maintain_zero": True}
    metadata["rockq.version"] = "<version>"
    folders = ((tmp_path, "<tmp>"), (inputs.root, "<inputs>"))
    _check_golden("cli_quantize_metadata.json", _normalised(metadata, *folders))

    written = json.loads((tmp_path / "q.report.json").read_text())
    assert written["meta"]["rockq_version"] == transform_core.__version__
    written["meta"]["rockq_version"] = "<version>"
    _check_golden("cli_quantize_report.json", _normalised(written, *folders))

    # `rockq report` on the output, against the input, says what the burn-in report said
    # (there, tensors left alone are compared too: error 0 instead of no error)
    read = json.loads(ok("report", out, "--reference", inputs.state_st, "--json"))
    errors = ("max_abs_error", "rmse", "sqnr_db")
    for mine, theirs in zip(read["tensors"], written["tensors"], strict=True):
        if theirs["transform"] is None:
            assert (mine["max_abs_error"], mine["sqnr_db"]) == (0, "inf")
            mine = {k: v for k, v in mine.items() if k not in errors}
            theirs = {k: v for k, v in theirs.items() if k not in errors}
        assert mine == theirs
    assert read["totals"] == written["totals"]


def test_report_command(tmp_path: Path, inputs: Inputs) -> None:
    out = tmp_path / "q.safetensors"
    ok("quantize", inputs.mlp, "ternary", "-o", out, "-q")
    table = ok("report", out, "--reference", inputs.mlp)
    assert "quantisation report" in table and "sqnr dB" in table and "0.weight" in table
    markdown = tmp_path / "r.md"
    data = json.loads(ok("report", out, "--json", "--markdown", markdown))
    assert data["tensors"][0]["distinct"] <= 3 and data["tensors"][0]["max_abs_error"] is None
    assert markdown.read_text().startswith("#")
    assert "already exists; pass --force" in user_error("report", out, "--markdown", markdown)
    ok("report", out, "--markdown", markdown, "--force")
    assert "is also an input" in user_error("report", out, "--markdown", out, "--force")
    # a patched checkpoint and a plain state dict report too
    ok("patch", inputs.mlp, "ternary", "-o", tmp_path / "p.safetensors", "-q")
    patched = json.loads(ok("report", tmp_path / "p.safetensors", "--json"))
    assert patched["tensors"][0]["max_abs_error"] is not None
    assert len(json.loads(ok("report", inputs.state_pt, "--json"))["tensors"]) == 9
    line = user_error("report", out, "--reference", inputs.state_st)
    assert f"{inputs.state_st}: holds none of the checkpoint's 4 tensor names" in line
    other = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).state_dict(), other)
    line = user_error("report", out, "--reference", other)
    assert f"{other}: 0.bias: has shape (5,) in the reference but (6,) in" in line
    first = tmp_path / "first.pt"
    whole = torch.load(inputs.mlp, weights_only=False).state_dict()
    torch.save({k: v for k, v in whole.items() if k.startswith("0.")}, first)
    table = ok("report", out, "--reference", first)
    assert (
        "not in the reference, so without error figures: 2 tensors ('2.weight', '2.bias')" in table
    )


# --- writes --------------------------------------------------------------------------------


def test_existing_outputs_need_force(tmp_path: Path, inputs: Inputs) -> None:
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    line = user_error("quantize", inputs.mlp, "int8", "-o", out)
    assert line == f"rockq: error: {out}: already exists; pass --force to overwrite it"
    assert out.read_bytes() == b"keep me" and _files(tmp_path) == ["q.safetensors"]
    # a report that is in the way stops the run before the tensors are written
    out.unlink()
    (tmp_path / "q.report.md").write_text("old")
    assert "q.report.md: already exists" in user_error(
        "quantize", inputs.state_st, "int8", "-o", out
    )
    assert _files(tmp_path) == ["q.report.md"]
    ok("quantize", inputs.mlp, "int8", "-o", out, "--force", "-q")
    assert (tmp_path / "q.report.md").read_text() != "old"
    assert load_file(str(out)).keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    patched = tmp_path / "p.safetensors"
    patched.write_bytes(b"keep me")
    assert "already exists" in user_error("patch", inputs.mlp, "int8", "-o", patched)
    assert patched.read_bytes() == b"keep me"


@pytest.mark.parametrize("command", ["quantize", "patch"])
def test_outputs_that_cannot_be_written(tmp_path: Path, inputs: Inputs, command: str) -> None:
    long_name = tmp_path / ("n" * 240 + ".safetensors")  # its temporary file's is too long
    line = user_error(command, inputs.mlp, "int8", "-o", long_name)
    assert line == f"rockq: error: {long_name}: cannot be written (File name too long); " + (
        "choose a shorter output name"
    )
    line = user_error(command, inputs.mlp, "int8", "-o", "")
    assert line == "rockq: error: .: is a folder; expected an output file path"
    assert _files(tmp_path) == []


def test_inputs_are_never_overwritten(tmp_path: Path, inputs: Inputs) -> None:
    for source in ("mlp.pt", "state.safetensors"):
        model = tmp_path / source
        shutil.copy(inputs.root / source, model)
        before = model.read_bytes()
        for command in (["quantize", model, "int8", "-o"], ["patch", model, "int8", "-o"]):
            if command[0] == "patch" and source.endswith(".safetensors"):
                continue
            line = user_error(*command, model, "--force")
            assert line.startswith(f"rockq: error: {model}: is also an input")
        assert model.read_bytes() == before
    ok("patch", tmp_path / "mlp.pt", "int8", "-q")
    patched = tmp_path / "mlp.patched.safetensors"
    before = patched.read_bytes()
    assert "is also an input" in user_error("burn-in", patched, "-o", patched, "--force")
    assert patched.read_bytes() == before


def test_recipes_and_report_inputs_are_never_overwritten(tmp_path: Path, inputs: Inputs) -> None:
    recipe = tmp_path / "q.report.md"  # under the name of a report, too
    shutil.copy(REPO / "recipes" / "int8.yaml", recipe)
    text = recipe.read_text()
    for command in ("quantize", "patch"):
        line = user_error(command, inputs.mlp, recipe, "-o", recipe, "--force")
        assert line.startswith(f"rockq: error: {recipe}: is also an input")
    line = user_error("quantize", inputs.mlp, recipe, "-o", tmp_path / "q.safetensors", "--force")
    assert line.startswith(f"rockq: error: {recipe}: is also an input")
    assert recipe.read_text() == text
    out = tmp_path / "out.safetensors"
    ok("quantize", inputs.mlp, recipe, "-o", out, "-q")
    reference = tmp_path / "mlp.pt"
    shutil.copy(inputs.mlp, reference)
    before = reference.read_bytes()
    for args in (["--reference", reference], ["--limits", recipe]):
        line = user_error("report", out, *args, "--markdown", args[1], "--force")
        assert line.startswith(f"rockq: error: {args[1]}: is also an input")
    assert reference.read_bytes() == before and recipe.read_text() == text


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "mlp.pt", "qat4", "-o", "out.safetensors"],
        ["quantize", "state.safetensors", "qat4", "-o", "out.safetensors"],
        ["patch", "mlp.pt", "qat4", "-o", "out.safetensors"],
    ],
)
def test_interrupted_write_leaves_nothing(
    tmp_path: Path, inputs: Inputs, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    for name in ("mlp.pt", "state.safetensors"):
        shutil.copy(inputs.root / name, tmp_path / name)
    real_write = SafetensorsWriter.write
    calls: list[str] = []

    def interrupted(self: SafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", interrupted)
    result = runner().invoke(app, [str(tmp_path / c) if "." in c else c for c in command])
    assert result.exit_code == 130
    assert result.stderr == "rockq: error: interrupted; no file was left half-written\n"
    assert len(calls) == 2
    assert _files(tmp_path) == ["mlp.pt", "state.safetensors"]


@pytest.mark.parametrize("source", ["mlp.pt", "state.safetensors"])
def test_interrupted_report_write_leaves_no_tensors(
    tmp_path: Path, inputs: Inputs, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    from transform_core.report import Report

    def interrupted(self: Report) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(Report, "to_markdown", interrupted)
    result = runner().invoke(
        app, ["quantize", str(inputs.root / source), "int8", "-o", str(tmp_path / "q.safetensors")]
    )
    assert result.exit_code == 130
    assert _files(tmp_path) == []


# --- demo and the installed command --------------------------------------------------------


def test_demo_refuses_a_file_as_folder_and_old_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert "exists and is not a folder" in user_error("demo", "--out-dir", tmp_path / "f")
    (tmp_path / "example.pt").write_text("mine")
    line = user_error("demo", "--out-dir", tmp_path)
    assert (
        line == f"rockq: error: {tmp_path / 'example.pt'}: already exists; pick an empty --out-dir"
    )
    assert (tmp_path / "example.pt").read_text() == "mine"


def test_a_failed_demo_leaves_nothing_and_can_run_again(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    line = user_error("demo", "--out-dir", folder, "--recipe", "int9", "-q")
    assert line.startswith("rockq: error: 'int9' is not a recipe file")
    recipe = tmp_path / "r.yaml"  # loads, but has nothing for this network
    recipe.write_text("version: 1\nparams:\n  - match: 'nothing.*'\n    transform: dropout\n")
    line = user_error("demo", "--out-dir", folder, "--recipe", recipe, "-q")
    assert "matches no tensor" in line
    assert _files(tmp_path) == ["r.yaml"]
    ok("demo", "--out-dir", folder, "-q")
    assert _files(folder) == [
        "example.patched.safetensors",
        "example.pt",
        "example.quantised.report.json",
        "example.quantised.report.md",
        "example.quantised.safetensors",
    ]


def _rockq(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "rockq"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_installed_command_end_to_end(tmp_path: Path) -> None:
    demo = _rockq("demo", "--out-dir", str(tmp_path / "d"), "-q", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert demo.stderr == ""
    quantised = tmp_path / "d" / "example.quantised.safetensors"
    report = _rockq("report", str(quantised), "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["totals"]["tensors"] == 11
    assert {t["name"] for t in data["tensors"]} >= {"0.weight", "4.weight", "6.weight"}
    # --debug lets the traceback through (without it: one line, tested in-process)
    debug = _rockq("report", str(tmp_path / "none.safetensors"), "--debug", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "CheckpointError: " in debug.stderr


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter from the repository; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from cli.main import app\n"
        "for args in (['--help'], ['quantize', '--help'], ['recipes', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = _python(code)
    assert result.stderr.split() == ["False", "False", "False"]
    assert "Usage" in result.stdout


def test_usage_errors_of_the_console_command_are_one_line() -> None:
    import subprocess

    rockq = Path(sys.executable).with_name("rockq")
    done = subprocess.run(
        [str(rockq), "quantize", "model.pt", "int8"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "rockq: error: Missing option '--output' / '-o'. (see 'rockq quantize --help')"
    ]


def test_the_console_command_freezes_its_imports_and_the_in_process_app_does_not() -> None:
    code = (
        "import gc, sys\n"
        "from typer.testing import CliRunner\n"
        "from cli.main import app, run\n"
        "assert CliRunner().invoke(app, ['recipes']).exit_code == 0\n"
        "print(gc.get_freeze_count(), file=sys.stderr)\n"
        "sys.argv = ['rockq', 'recipes']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as done:\n"
        "    print(done.code, gc.get_freeze_count(), file=sys.stderr)\n"
    )
    result = _python(code)
    in_process, exit_code, frozen = result.stderr.split()
    assert in_process == "0"
    assert exit_code == "0" and int(frozen) > 100_000  # torch's objects among them
