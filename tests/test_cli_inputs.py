"""The CLI's input checks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from cli_runs import ok, runner, user_error
from safetensors.torch import load_file, save_file
from torch import nn

from cli.inputs import check_finite
from cli.main import app
from cli.options import output_file
from transform_core.errors import CheckpointError


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_tensor_and_the_count(dtype: torch.dtype, bad: float) -> None:
    tensor = torch.ones(1000, dtype=dtype)
    tensor[[3, 500]] = bad
    with pytest.raises(CheckpointError, match=r"model\.pt.*fc\.weight.*2 NaN or Inf"):
        check_finite([("ok", torch.ones(3)), ("fc.weight", tensor)], Path("model.pt"))


def test_check_finite_passes_finite_values_whose_sum_overflows() -> None:
    huge = torch.full((4,), 1e308, dtype=torch.float64)
    check_finite([("w", huge), ("steps", torch.arange(3)), ("empty", torch.zeros(0))], Path("m"))


def test_check_finite_catches_infinities_that_cancel_in_a_sum() -> None:
    with pytest.raises(CheckpointError, match="2 NaN or Inf"):
        check_finite([("w", torch.tensor([math.inf, -math.inf, 1.0]))], Path("m"))


def test_check_finite_reads_float8_tensors() -> None:
    check_finite([("w", torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn))], Path("m"))
    bad = torch.tensor([1.0, math.nan, 2.0]).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"m: w: holds 1 NaN or Inf"):
        check_finite([("w", bad)], Path("m"))


# --- the commands on unusual inputs ----------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


_EVERY_TENSOR = """\
version: 1
params:
  - match: '*'
    transform: deterministic_rounding
    args: {num_levels: 255, maintain_zero: true}
"""


def _odd_file(folder: Path) -> Path:
    """A file with a float8 and a complex tensor beside a float32 one."""
    generator = torch.Generator().manual_seed(0)
    path = folder / "odd.safetensors"
    tensors = {
        "a": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fn),
        "b": torch.randn(3, dtype=torch.complex64, generator=generator),
        "c": torch.randn(3, generator=generator),
    }
    save_file(tensors, str(path))
    return path


def test_report_describes_float8_and_complex_tensors(tmp_path: Path) -> None:
    odd = _odd_file(tmp_path)
    text = ok("report", odd)
    assert "Complex tensors ('b') are described by their real and imaginary parts" in text
    data = json.loads(ok("report", odd, "--json"))
    dtypes = {t["name"]: (t["dtype"], t["numel"]) for t in data["tensors"]}
    assert dtypes == {"a": ("float8_e4m3fn", 16), "b": ("complex64", 3), "c": ("float32", 3)}
    # 16 float8 + 3 complex64 + 3 float32 values at float32 (a complex one as two).
    assert data["totals"]["float32_bits"] == 16 * 32 + 3 * 64 + 3 * 32


def test_quantize_keeps_float8_and_complex_tensors_and_reports_them(tmp_path: Path) -> None:
    odd = _odd_file(tmp_path)
    recipe = tmp_path / "every.yaml"
    recipe.write_text(_EVERY_TENSOR)
    out = tmp_path / "out.safetensors"
    ok("quantize", odd, recipe, "-o", out, "--quiet")
    before, after = load_file(str(odd)), load_file(str(out))
    # Only float16/32/64 and bfloat16 tensors are transformed; the others pass unchanged.
    for name in ("a", "b"):
        assert after[name].dtype == before[name].dtype
        assert torch.equal(after[name].view(torch.uint8), before[name].view(torch.uint8))
    assert not torch.equal(after["c"], before["c"])
    report = json.loads((tmp_path / "out.report.json").read_text())
    transforms = {t["name"]: t["transform"] for t in report["tensors"]}
    assert transforms["a"] is None and transforms["b"] is None and transforms["c"]
    compared = json.loads(ok("report", out, "--reference", odd, "--json"))
    errors = {t["name"]: t["max_abs_error"] for t in compared["tensors"]}
    assert errors["a"] == 0.0 and errors["b"] == 0.0 and errors["c"] > 0


def _write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    """A safetensors file written by hand: 8-byte length, JSON header, data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


_BAD_ENTRIES = {
    "bool-size": (
        {"dtype": "F32", "shape": [True, 16], "data_offsets": [0, 64]},
        "shape [true, 16]",
    ),
    "negative-size": ({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}, "shape [-1, 4]"),
    "fraction-size": ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, "shape [1.5]"),
    "text-shape": ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, 'shape "4"'),
    "huge-size": (
        {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]},
        "is too large for torch",
    ),
    "bool-offsets": (
        {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]},
        "data_offsets [false, true]",
    ),
    "list-dtype": ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, 'dtype ["F32"]'),
}


@pytest.mark.parametrize("case", sorted(_BAD_ENTRIES))
@pytest.mark.parametrize("command", ["report", "quantize", "inspect"])
def test_malformed_header_entries_name_the_file_and_tensor(
    tmp_path: Path, case: str, command: str
) -> None:
    entry, phrase = _BAD_ENTRIES[case]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    bad = _write_safetensors(tmp_path / "bad.safetensors", {"layer.weight": entry}, bytes(size))
    args: list[str | Path] = {
        "report": ["report", bad],
        "quantize": ["quantize", bad, "int8", "-o", tmp_path / "out.safetensors"],
        "inspect": ["inspect", bad],
    }[command]
    before = _files(tmp_path)
    line = user_error(*args)
    assert line.startswith(f"rockq: error: {bad}: layer.weight: ")
    assert phrase in line
    assert line.endswith(("; re-create the file", "; convert the tensor"))
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command", ["burn-in", "report"])
def test_patched_checkpoint_with_a_malformed_shape_names_the_tensor(
    tmp_path: Path, command: str
) -> None:
    net = tmp_path / "net.pt"
    torch.save(nn.Sequential(nn.Linear(4, 3)), net)
    patched = tmp_path / "net.patched.safetensors"
    ok("patch", net, "int8", "-o", patched, "--quiet")
    raw = patched.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["0.weight"]["shape"] = [True, 12]  # 3 x 4 values, as 1 x 12 with a JSON true
    broken = _write_safetensors(tmp_path / "broken.safetensors", header, raw[8 + length :])
    before = _files(tmp_path)
    args: list[str | Path] = [command, broken]
    if command == "burn-in":
        args += ["-o", tmp_path / "out.safetensors"]
    line = user_error(*args)
    assert f"{broken}: 0.weight: is corrupt: shape [true, 12]" in line
    assert _files(tmp_path) == before


@contextlib.contextmanager
def _unblocked(fifo: Path) -> Iterator[None]:
    """Open ``fifo`` for writing after a while, so that a reader stuck on it ends (at EOF)
    and the test fails rather than hangs."""

    def release() -> None:
        with contextlib.suppress(OSError):  # no reader: nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(10.0, release)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


_NOT_REGULAR = {
    "/dev/zero": "a character device",
    "/dev/null": "a character device",
    "fifo": "a named pipe (FIFO)",
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and /dev")
@pytest.mark.parametrize("kind", sorted(_NOT_REGULAR))
@pytest.mark.parametrize("command", ["report", "quantize", "burn-in", "inspect", "reference"])
def test_inputs_that_are_not_regular_files_are_refused_without_reading(
    tmp_path: Path, kind: str, command: str
) -> None:
    model = Path(kind)
    if kind == "fifo":
        model = tmp_path / "model.safetensors"
        os.mkfifo(model)
    out = tmp_path / "out.safetensors"
    args: list[str | Path] = {
        "report": ["report", model],
        "quantize": ["quantize", model, "int8", "-o", out],
        "burn-in": ["burn-in", model, "-o", out],
        "inspect": ["inspect", model],
        "reference": ["report", _odd_file(tmp_path), "--reference", model],
    }[command]
    before = _files(tmp_path)
    with _unblocked(model):
        line = user_error(*args)
    assert line.startswith(f"rockq: error: {model}: is not a regular file but {_NOT_REGULAR[kind]}")
    assert "is empty" not in line
    assert _files(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_shard_index_that_is_a_fifo_is_refused_without_reading(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    os.mkfifo(index)
    with _unblocked(index):
        line = user_error("report", folder)
    assert line.startswith(f"rockq: error: {index}: is not a regular file but a named pipe")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_output_that_is_a_fifo_is_not_replaced(tmp_path: Path) -> None:
    odd = _odd_file(tmp_path)
    fifo = tmp_path / "report.md"
    os.mkfifo(fifo)
    line = user_error("report", odd, "--markdown", fifo, "--force")
    assert f"{fifo}: is not a regular file but a named pipe (FIFO)" in line
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def _cannot_open(monkeypatch: pytest.MonkeyPatch, path: Path, error: OSError) -> None:
    """Make every open of ``path`` fail with ``error``, as an unreadable file would."""
    real_open = Path.open

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:
            raise error
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)


def test_input_that_cannot_be_opened_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = _odd_file(tmp_path)
    _cannot_open(monkeypatch, odd, PermissionError(13, "Permission denied", str(odd)))
    line = user_error("report", odd)
    assert (
        line
        == f"rockq: error: {odd}: cannot be read (Permission denied); check the file and its permissions"
    )


@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_a_pickle_that_cannot_be_read_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    model = tmp_path / "m.pt"
    torch.save(nn.Linear(2, 2), model)
    _cannot_open(monkeypatch, model, OSError(5, "Input/output error", str(model)))
    extra = ["int8", "-o", str(tmp_path / "q.safetensors")] if command == "quantize" else []
    line = user_error(command, model, *extra)
    assert line == (
        f"rockq: error: {model}: cannot be read (Input/output error); check the file and its "
        "permissions"
    )
    assert _files(tmp_path) == ["m.pt"]


CUSTOM_CODE = """
from pathlib import Path

Path(__file__).with_name("imported.marker").touch()


def halve(x):
    return x / 2


def loss(out, y):
    return ((out - y) ** 2).mean()
"""


@pytest.fixture
def custom_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package 'rq_named_code' on sys.path that leaves a marker file when imported."""
    package = tmp_path / "pkgs" / "rq_named_code"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(CUSTOM_CODE)
    monkeypatch.syspath_prepend(str(package.parent))
    yield package / "imported.marker"
    import sys

    sys.modules.pop("rq_named_code", None)


def _patched_naming_code(tmp_path: Path, transform: str) -> tuple[Path, Path]:
    """A patched checkpoint whose recipe names ``transform`` and the loss rq_named_code:loss,
    and data to fine-tune it on."""
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "net.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nparams:\n  - {{family: weights, transform: '{transform}'}}\n"
        "finetune: {loss: 'rq_named_code:loss'}\n"
    )
    patched = tmp_path / "net.patched.safetensors"
    ok("patch", tmp_path / "net.pt", recipe, "-o", patched, "-q")  # the user's own recipe
    data = tmp_path / "d.safetensors"
    save_file({"inputs": torch.ones(4, 2), "targets": torch.zeros(4, 2)}, str(data))
    return patched, data


def test_code_a_patched_checkpoint_names_needs_trust(tmp_path: Path, custom_code: Path) -> None:
    patched, data = _patched_naming_code(tmp_path, "rq_named_code:halve")
    import sys

    sys.modules.pop("rq_named_code", None)  # imported by patch: forget it
    custom_code.unlink()
    out = tmp_path / "net.q.safetensors"
    message = user_error("burn-in", patched, "-o", out)
    assert "its recipe runs transform 'rq_named_code:halve'" in message
    assert message.endswith("if you trust package 'rq_named_code', pass --trust rq_named_code")
    assert "rq_named_code" in user_error("report", patched)
    assert "rq_named_code" in user_error("finetune", patched, "--data", data)
    assert not custom_code.exists() and not out.exists()
    ok("burn-in", patched, "-o", out, "--trust", "rq_named_code", "-q")
    assert custom_code.exists()


def test_a_loss_named_in_a_checkpoint_needs_trust(tmp_path: Path, custom_code: Path) -> None:
    patched, data = _patched_naming_code(tmp_path, "deterministic_rounding")
    message = user_error("finetune", patched, "--data", data)
    assert "its recipe runs loss 'rq_named_code:loss'" in message
    assert not custom_code.exists()
    ok("burn-in", patched, "-o", tmp_path / "q.safetensors", "-q")  # no code of its own


def test_report_reads_the_limits_without_importing_the_recipes_code(
    tmp_path: Path, custom_code: Path
) -> None:
    recipe = (
        "version: 1\nparams:\n  - {family: weights, transform: 'rq_named_code:halve'}\n"
        "limits: {weights: {signed: true, bits: 8}}\n"
    )
    path = tmp_path / "q.safetensors"
    metadata = {"rockq.format": "burned", "rockq.recipe": recipe}
    save_file({"fc.weight": torch.tensor([[300.0, 1.0]])}, str(path), metadata=metadata)
    report = json.loads(ok("report", path, "--json"))
    assert report["violations"], report
    assert not custom_code.exists()


def test_arch_kwargs_without_arch_and_a_shard_index_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(nn.Linear(2, 2).state_dict(), str(weights))
    out = tmp_path / "q.safetensors"
    message = user_error("quantize", weights, "int8", "-o", out, "--arch-kwargs", '{"a": 1}')
    assert "arch_kwargs: are given without arch (--arch)" in message
    index = tmp_path / "m.safetensors.index.json"
    index.write_text('{"weight_map": {"weight": "w.safetensors", "bias": "w.safetensors"}}')
    for command in (["quantize", index, "int8", "-o", out], ["report", index], ["inspect", index]):
        assert f"pass its folder ({tmp_path}) instead" in user_error(*command)
    assert "pass its folder" in user_error("report", weights, "--reference", index)
    assert not out.exists()


def test_outputs_keep_the_inputs_metadata_and_say_format_pt(tmp_path: Path) -> None:
    # Hugging Face loaders refuse a safetensors file without 'format: pt'.
    from safetensors import safe_open

    tensors = tmp_path / "t.safetensors"
    save_file({"w.weight": torch.randn(4, 4)}, str(tensors), {"format": "pt", "origin": "hub"})
    stale = {"rockq.format": "burned", "rockq.seed": "99"}
    save_file({"w.weight": torch.randn(4, 4)}, str(tmp_path / "q0.safetensors"), stale)
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "net.pt")
    for source, expected in (
        (tensors, {"format": "pt", "origin": "hub"}),
        (tmp_path / "q0.safetensors", {"format": "pt"}),
        (tmp_path / "net.pt", {"format": "pt"}),
    ):
        out = tmp_path / f"{source.stem}.q.safetensors"
        ok("quantize", source, "int8", "-o", out, "-q")
        with safe_open(str(out), "pt") as handle:
            metadata = handle.metadata()
        assert {k: v for k, v in metadata.items() if not k.startswith("rockq.")} == expected
        assert metadata["rockq.seed"] == "0"  # rockq's own entries are this run's


def test_an_output_path_ending_in_a_separator_is_a_folder_not_a_file(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    save_file({"w.weight": torch.randn(2, 2)}, str(weights))
    folder = f"{tmp_path / 'newdir'}/"
    # A usage error: click reports it here, and the installed command as one line.
    result = runner().invoke(app, ["quantize", str(weights), "int8", "-o", folder])
    assert result.exit_code == 2
    assert "names a folder; give a file path" in result.output
    with pytest.raises(typer.BadParameter, match=r"^'out/' names a folder; give a file path"):
        output_file("out/")
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "newdir.report.json").exists()


def test_report_check_without_limits_and_limits_that_check_nothing_say_so(tmp_path: Path) -> None:
    plain = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.tensor([[300.0, 1.0]])}, str(plain))
    message = user_error("report", plain, "--check")
    assert message.endswith(
        "--check: has no limits to check: it records no recipe with a "
        "'limits' section; pass --limits RECIPE"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nparams: [{family: weights, transform: identity}]\n"
        "limits: {weight: {signed: true, bits: 4}}\n"
    )
    shown = " ".join(ok("report", plain, "--limits", recipe, "--check").split())
    assert "limits for 'weight' (did you mean 'weights'?) checked no tensor" in shown


def test_report_limits_from_a_recipe_file_import_nothing(tmp_path: Path, custom_code: Path) -> None:
    plain = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.tensor([[300.0, 1.0]])}, str(plain))
    limits_only = tmp_path / "limits.yaml"
    limits_only.write_text("version: 1\nlimits: {weights: {signed: true, bits: 8}}\n")
    naming_code = tmp_path / "full.yaml"
    naming_code.write_text(
        "version: 1\nparams:\n  - {family: weights, transform: 'rq_named_code:halve'}\n"
        "limits: {weights: {signed: true, bits: 8}}\n"
    )
    for recipe in (limits_only, naming_code):
        result = runner().invoke(app, ["report", str(plain), "--limits", str(recipe), "--check"])
        assert result.exit_code == 3, result.output
    assert not custom_code.exists()
