"""What the command line prints: closed pipes, user text inside tables, one-line errors.

A closed stdout ends a command quietly, as it ends other Unix tools; paths, tensor and
recipe names are shown as given, never read as Rich markup; an error stays one line
whatever its message holds.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import ok, runner, user_error
from safetensors.torch import save_file
from torch import nn

from cli.main import app, handle_errors, one_line

REPO = Path(__file__).resolve().parent.parent

# Brackets (Rich takes w[0] as text, but not the rest): a closing tag that matches nothing
# (an error), a style (the text would vanish) and an emoji code (the text would change).
ODD_NAMES = ("w[0]", "layer[/x].weight", "head[bold].weight", "a:fire:.weight")


def _mlp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), path)
    return path


def _rockq_command() -> list[str]:
    script = Path(sys.executable).parent / "rockq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --- a closed stdout -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def piped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a small network and a file of 1500 tensors (a long report table)."""
    root = tmp_path_factory.mktemp("piped")
    _mlp(root / "mlp.pt")
    tensors = {f"layer{i}.weight": torch.ones(2) for i in range(1500)}
    save_file(tensors, str(root / "many.safetensors"))
    return root


# Each through another way a closed pipe shows: Rich's console (which raises SystemExit),
# typer.echo in a command, typer.echo before any command, and Typer's help (Rich again).
CLOSED_PIPE_COMMANDS = {
    "inspect": ["inspect", "many.safetensors"],
    "dry-run": ["patch", "mlp.pt", "int8", "--dry-run"],
    "quantize": ["quantize", "many.safetensors", "int8", "-o", "out.safetensors"],
    "json": ["inspect", "mlp.pt", "--json"],
    "recipe": ["recipes", "int8"],
    "version": ["--version"],
    "help": ["quantize", "--help"],
}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize("case", CLOSED_PIPE_COMMANDS)
def test_a_closed_stdout_ends_the_command_quietly(piped: Path, tmp_path: Path, case: str) -> None:
    args = CLOSED_PIPE_COMMANDS[case]
    if case == "quantize":
        args = [*args[:-1], str(tmp_path / args[-1])]
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails, as after `| head` has exited
    try:
        done = subprocess.run(
            [*_rockq_command(), *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=piped,
            env=_env(),
            timeout=300,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")
    if case == "quantize":
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "out.report.json",
            "out.report.md",
            "out.safetensors",
        ]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_piping_a_long_report_into_head(piped: Path, tmp_path: Path) -> None:
    out = tmp_path / "many.q.safetensors"
    command = shlex.join(
        [*_rockq_command(), "quantize", "many.safetensors", "int8", "-o", str(out)]
    )
    script = f'{command} | head -1; echo "${{PIPESTATUS[0]}}"'
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=piped, env=_env(), timeout=300
    )
    assert done.stderr == ""
    first, status = done.stdout.splitlines()
    assert "quantisation report" in first and status == "141"
    assert (tmp_path / "many.q.report.json").exists() and out.stat().st_size > 1500 * 8


def test_sys_exit_from_a_closed_pipe_is_not_blamed_on_user_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Rich ends a print to a closed pipe with SystemExit(1), raised while handling the
    # BrokenPipeError; a custom transform's sys.exit(1) is another matter.
    def prints() -> None:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            raise SystemExit(1) from None

    def writes() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    import typer

    for command in (prints, writes):
        with pytest.raises(typer.Exit) as done:
            handle_errors(command)()
        assert done.value.exit_code == 141
    assert capsys.readouterr().err == ""


# --- user text is not markup ---------------------------------------------------------------


def test_paths_with_brackets_are_shown_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # short relative paths: the titles stay on one line
    for model in ("runs/[exp1]/model.pt", "d[/x].pt", "e[bold]/m:fire:.pt"):
        _mlp(Path(model))
        assert model in ok("inspect", model)
        Path(model).with_name("q[").mkdir()
        out = f"{Path(model).parent}/q[/o].safetensors"
        shown = ok("quantize", model, "int8", "-o", out)
        assert f"wrote {out} and o].report.json, o].report.md" in shown
        assert "0.weight" in ok("report", out)
    recipe = Path("d[/r].yaml")
    recipe.write_text("version: 1\nparams:\n  - family: weights\n    transform: int_quant\n")
    assert "recipe d[/r].yaml (seed 0)" in ok("patch", "d[/x].pt", recipe, "--dry-run")
    ok("patch", "d[/x].pt", recipe, "-o", "d[/p].safetensors", "-q")
    shown = ok("burn-in", "d[/p].safetensors")
    assert "wrote d[/p].quantised.safetensors and p].quantised.report.json" in shown
    shown = ok("demo", "--out-dir", "demo[/x]")
    assert "saved to demo[/x]/example.pt" in shown
    assert "rockq report demo[/x]/example.quantised.safetensors" in shown


def test_tensor_family_and_recipe_names_with_brackets_are_shown_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    save_file({name: torch.arange(4.0) for name in ODD_NAMES}, "odd.safetensors")
    recipe = Path("r.yaml")
    recipe.write_text(
        "version: 1\nfamilies:\n  'fam[/y]': ['re:w\\[0\\]']\nparams:\n"
        "  - family: 'fam[/y]'\n    transform: int_quant\n"
        "  - match: 're:head\\[bold\\].*'\n    transform: int_quant\n"
    )
    listing = ok("inspect", "odd.safetensors", "--recipe", recipe)
    report = ok("quantize", "odd.safetensors", recipe, "-o", "q.safetensors")
    for shown in (listing, report, ok("report", "q.safetensors")):
        for name in ODD_NAMES:
            assert name in shown, (name, shown)
    assert "fam[/y]" in listing and "fam[/y]" in report


def test_module_names_with_brackets_in_patch_burn_in_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    net = nn.Sequential()
    net.add_module("l[/x]", nn.Linear(4, 6))
    net.add_module("act[bold]", nn.ReLU())
    net.add_module("o:fire:", nn.Linear(6, 3))
    torch.save(net, "odd.pt")
    names = ("l[/x].weight", "l[/x].bias", "o:fire:.weight", "o:fire:.bias")
    plan = ok("patch", "odd.pt", "int8", "--dry-run")
    assert "l[/x].weight, o:fire:.weight" in plan and "l[/x].bias, o:fire:.bias" in plan
    ok("patch", "odd.pt", "int8", "-o", "p.safetensors", "-q")
    for shown in (ok("burn-in", "p.safetensors"), ok("report", "p.quantised.safetensors")):
        for name in names:
            assert name in shown, (name, shown)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_the_progress_bar_shows_odd_tensor_names(tmp_path: Path, name: str) -> None:
    # 0.weight gives int8 a tensor to match, and comes first: the bar ends on the odd name.
    save_file(
        {"0.weight": torch.ones(2), name: torch.arange(4.0)}, str(tmp_path / "odd.safetensors")
    )
    args = ["quantize", str(tmp_path / "odd.safetensors"), "int8", "-o"]
    # A terminal, as far as Rich can tell: the progress bar shows on stderr.
    terminal = runner()
    terminal.env = {**terminal.env, "TTY_COMPATIBLE": "1"}
    result = terminal.invoke(app, [*args, str(tmp_path / "q.safetensors")])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert name in result.stderr


# --- one-line errors -----------------------------------------------------------------------


def test_a_tensor_name_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    source = tmp_path / "nl.safetensors"
    save_file(
        {"a\nb.weight": torch.tensor([float("nan"), 1.0]), "c\x1b[31md": torch.ones(2)},
        str(source),
    )
    line = user_error("quantize", source, "int8", "-o", tmp_path / "q.safetensors")
    assert line.startswith(f"rockq: error: {source}: a\\nb.weight: holds 1 NaN or Inf value(s)")
    assert not (tmp_path / "q.safetensors").exists()


def test_a_custom_transforms_message_with_newlines_stays_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "rockq_two_line_error"
    (tmp_path / f"{module}.py").write_text(
        "def fn(x, **kwargs):\n    raise ValueError('first line\\nsecond line\\r\\tthird')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'version: 1\nparams:\n  - family: weights\n    transform: "{module}:fn"\n')
    model = _mlp(tmp_path / "mlp.pt")
    line = user_error("quantize", model, recipe, "-o", tmp_path / "q.safetensors")
    assert "first line\\nsecond line\\r\\tthird" in line
    assert not (tmp_path / "q.safetensors").exists()


def test_one_line_escapes_line_breaks_and_control_characters() -> None:
    assert one_line("a\nb\r\tc\x1b[31md\u2028e\x85f") == "a\\nb\\r\\tc\\x1b[31md\\u2028e\\x85f"
    assert one_line("päth/w[0] ok") == "päth/w[0] ok"


def test_sizes_round_up_to_whole_bytes_and_ratios_read_sensibly() -> None:
    from cli.render import _size, _smaller

    assert [_size(b) for b in (0, 1, 590, 8 * 1024, 8 * 1536)] == [
        "0 B",
        "1 B",
        "74 B",
        "1.0 KiB",
        "1.5 KiB",
    ]
    assert _smaller(32, 8) == "4x smaller"
    assert _smaller(0, 0) == "no values"
    assert _smaller(32, 0) == "no bits needed"


def test_names_with_line_breaks_stay_on_one_table_row(tmp_path: Path) -> None:
    path = tmp_path / "nl.safetensors"
    save_file({"a\nb.weight": torch.randn(2, 2)}, str(path))
    listing = ok("inspect", path)
    assert "a\\nb.weight" in listing
    assert not any(line.strip("│ ").startswith("b.weight") for line in listing.splitlines())
