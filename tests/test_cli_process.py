"""Settings rockq makes to a process of its own."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cli import process

REPO = Path(__file__).resolve().parents[1]


def test_openmp_threads_are_asked_to_sleep_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    process.let_openmp_threads_sleep()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    process.let_openmp_threads_sleep()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_callers_process_is_left_as_it_is() -> None:
    # The tests run the app in their own process, which never claims it.
    assert process.map_large_blocks() is False


# Whether map_large_blocks() made its setting, and how many blocks glibc has mapped on
# their own for an array of LARGE_BLOCK_BYTES made after one four times as large was
# freed. By default that free raises glibc's size for mapping blocks above the first.
_MAPPED_AFTER_A_LARGE_FREE = """
import ctypes, sys
import numpy as np
from cli import process

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "own":
    process.claim()
print(process.map_large_blocks())
np.ones(4 * process.LARGE_BLOCK_BYTES, np.uint8)  # freed at once
before = libc.mallinfo2().hblks
block = np.ones(process.LARGE_BLOCK_BYTES, np.uint8)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator",
)
def test_large_blocks_get_their_own_mappings_in_rockqs_own_process() -> None:
    def run(mode: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", _MAPPED_AFTER_A_LARGE_FREE, mode],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        if "mallinfo2" in done.stderr:
            pytest.skip("glibc before 2.33 has no mallinfo2")
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    # A caller's process: the block comes from glibc's heap, where it would stay resident
    # once freed. rockq's own: a mapping of its own, unmapped when freed.
    assert run("caller") == ["False", "0"]
    assert run("own") == ["True", "1"]


# Runs rockq as its console command, sending this process a signal as the second tensor is
# written: as if `kill` had come in the middle of the run.
_SIGNALLED_WHILE_WRITING = """
import os, signal, sys
from transform_core.safetensors_writer import SafetensorsWriter
from cli.main import run

signum = getattr(signal, sys.argv[1])
real_write = SafetensorsWriter.write
calls = []

def write(self, name, tensor):
    calls.append(name)
    if len(calls) == 2:
        os.kill(os.getpid(), signum)
    real_write(self, name, tensor)

SafetensorsWriter.write = write
sys.argv = ["rockq", *sys.argv[2:]]
run()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("signame", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_leaves_no_partial_output(tmp_path: Path, signame: str, code: int) -> None:
    import torch
    from torch import nn

    torch.save(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), tmp_path / "mlp.pt")
    out = tmp_path / "q.safetensors"
    command = ["quantize", str(tmp_path / "mlp.pt"), "int8", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALLED_WHILE_WRITING, signame, *command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == code, done.stderr
    assert done.stderr == f"rockq: error: stopped by {signame}; no file was left half-written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton, which torch's optimisers load"
)
def test_a_training_run_ends_without_leak_reports_on_stderr(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    torch.save(nn.Sequential(nn.Linear(4, 3)), tmp_path / "m.pt")
    save_file(
        {"inputs": torch.randn(16, 4), "targets": torch.randint(0, 3, (16,))},
        str(tmp_path / "d.safetensors"),
    )
    (tmp_path / "r.yaml").write_text(
        "version: 1\nparams:\n  - family: weights\n    transform: stochastic_rounding\n"
        "finetune: {steps: 2, batch_size: 8}\n"
    )
    command = ["patch", "m.pt", "r.yaml", "--finetune", "--data", "d.safetensors", "-q"]
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *command, "-o", "out.safetensors"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # Triton's nanobind module lists frozen objects as leaks
