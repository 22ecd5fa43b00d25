"""Fine-tuning data: safetensors files and the user's loaders, and every refusal."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from transform_core.data import LoaderData, TensorData, load_data, split_batch
from transform_core.errors import ConfigError


def _write(path: Path, **tensors: torch.Tensor) -> str:
    save_file(tensors, str(path))
    return str(path)


def test_file_with_validation(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.safetensors",
        inputs=torch.randn(10, 3),
        targets=torch.arange(10),
        val_inputs=torch.randn(4, 3),
        val_targets=torch.arange(4),
    )
    data = load_data(path)
    assert isinstance(data, TensorData)
    assert data.num_samples == 10 and data.validation() is not None


def test_batch_order_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    data = TensorData(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    first = data.batch_indices(4, epoch=0, seed=1)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    again = data.batch_indices(4, epoch=0, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = torch.cat(data.batch_indices(4, epoch=1, seed=1))
    assert not torch.equal(torch.cat(first), other)
    assert torch.cat(data.batch_indices(4, 0, 1, shuffle=False)).tolist() == list(range(10))


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"inputs": torch.zeros(3, 2)}, "targets: missing tensor 'targets'"),
        (
            {"inputs": torch.zeros(3, 2), "targets": torch.zeros(3), "input": torch.zeros(1)},
            "input: unexpected tensor 'input' (did you mean 'inputs'?)",
        ),
        (
            {"inputs": torch.zeros(3, 2, dtype=torch.int32), "targets": torch.zeros(3)},
            "inputs: has dtype int32; expected a floating-point dtype",
        ),
        (
            {"inputs": torch.zeros(3, 2), "targets": torch.zeros(4)},
            "targets: has shape (4,) but 'inputs' has 3 sample(s)",
        ),
        (
            {"inputs": torch.zeros(3, 2), "targets": torch.zeros(3, dtype=torch.bool)},
            "targets: has dtype bool; expected integer class indices",
        ),
        (
            {
                "inputs": torch.zeros(3, 2),
                "targets": torch.zeros(3),
                "val_inputs": torch.zeros(1, 2),
            },
            "val_targets: has 'val_inputs' but no 'val_targets'",
        ),
        (
            {
                "inputs": torch.zeros(3, 2),
                "targets": torch.zeros(3),
                "val_inputs": torch.zeros(2, 5),
                "val_targets": torch.zeros(2),
            },
            "val_inputs: has sample shape (5,) but 'inputs' has (2,)",
        ),
        (
            {
                "inputs": torch.zeros(3, 2),
                "targets": torch.zeros(3, dtype=torch.long),
                "val_inputs": torch.zeros(2, 2),
                "val_targets": torch.zeros(2),
            },
            "val_targets: has sample shape () and dtype float32 but 'targets' has () and int64",
        ),
        ({"inputs": torch.zeros(0, 2), "targets": torch.zeros(0)}, "inputs: has shape (0, 2)"),
        (
            {
                "inputs": torch.tensor([[0.0, 1.0], [0.0, float("nan")], [float("inf"), 0.0]]),
                "targets": torch.zeros(3),
            },
            "inputs: holds NaN or Inf values in 2 sample(s), first at index 1; remove or fix",
        ),
        (
            {
                "inputs": torch.zeros(3, 2),
                "targets": torch.zeros(3),
                "val_inputs": torch.zeros(2, 2),
                "val_targets": torch.tensor([0.0, float("-inf")]),
            },
            "val_targets: holds NaN or Inf values in 1 sample(s), first at index 1",
        ),
    ],
)
def test_bad_files_name_the_tensor(
    tmp_path: Path, tensors: dict[str, torch.Tensor], expected: str
) -> None:
    path = _write(tmp_path / "d.safetensors", **tensors)
    with pytest.raises(ConfigError) as info:
        load_data(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_not_a_file_or_reference(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_data(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="no such file"):
        load_data(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="is a folder"):
        load_data(tmp_path)


def test_loader_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myloaders.py").write_text(
        "import torch\n"
        "def both():\n"
        "    return [(torch.zeros(2, 3), torch.zeros(2))], None\n"
        "def one():\n"
        "    return [(torch.zeros(2, 3), torch.zeros(2))]\n"
        "def once():\n"
        "    return iter([(torch.zeros(2, 3), torch.zeros(2))])\n"
        "def number():\n"
        "    return 3\n"
        "def broken():\n"
        "    raise RuntimeError('no disk')\n"
        "def broken_lines():\n"
        "    raise ValueError('bad config\\n line two')\n"
        "def val_once():\n"
        "    batches = [(torch.zeros(2, 3), torch.zeros(2))]\n"
        "    return batches, iter(batches)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "myloaders", raising=False)
    both = load_data("myloaders:both")
    assert isinstance(both, LoaderData) and both.val is None
    assert isinstance(load_data("myloaders:one"), LoaderData)
    for name, expected in [
        ("once", "one-shot iterator"),
        # Evaluation iterates the validation loader once per evaluation too.
        ("val_once", "returned a one-shot iterator as its validation loader"),
        ("number", "returned a int as its training loader"),
        ("broken", "raised RuntimeError: no disk"),
        ("bothh", "has no function 'bothh' (did you mean 'both'?)"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_data(f"myloaders:{name}")
    # The error stays one line: the exception's first.
    with pytest.raises(ConfigError) as info:
        load_data("myloaders:broken_lines")
    assert str(info.value) == "--data: 'myloaders:broken_lines' raised ValueError: bad config"
    with pytest.raises(ConfigError, match=re.escape("cannot import module 'nosuchpackage.mod'")):
        load_data("nosuchpackage.mod:fn")


def test_loader_function_that_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "exiting.py").write_text(
        "import sys\n"
        "def quits():\n"
        "    sys.exit()\n"
        "def fails():\n"
        "    sys.exit(3)\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "exiting", raising=False)
    for name, call in [("quits", "sys.exit()"), ("fails", "sys.exit(3)")]:
        with pytest.raises(ConfigError) as info:
            load_data(f"exiting:{name}")
        assert str(info.value) == (
            f"--data: 'exiting:{name}' called {call}; a --data function must return "
            "(train_loader, val_loader) instead of exiting"
        )
    # Ctrl-C is the user's, not the function's: it goes through untouched.
    with pytest.raises(KeyboardInterrupt):
        load_data("exiting:interrupted")


def test_batch_order_takes_any_integer_seed() -> None:
    data = TensorData(torch.zeros(10, 2), torch.zeros(10))
    # Seeds torch took before keep their order.
    for seed in (0, 3, -3, -(2**40)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 1)
        order = torch.cat(data.batch_indices(4, epoch=1, seed=seed))
        assert torch.equal(order, torch.randperm(10, generator=generator))
    for seed in (2**64 - 1, -(2**63), 10**30, -(10**30)):
        order = torch.cat(data.batch_indices(4, epoch=1, seed=seed))
        assert sorted(order.tolist()) == list(range(10))
    # Seeds that agree modulo 2**64 agree, as they do in torch.
    a = data.batch_indices(4, epoch=2, seed=-1)
    b = data.batch_indices(4, epoch=2, seed=2**64 - 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_split_batch() -> None:
    x, y = split_batch({"inputs": torch.zeros(2, 1), "targets": torch.ones(2)}, "<l>")
    assert x.shape == (2, 1) and y.tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="yielded a Tensor batch"):
        split_batch(torch.zeros(2), "<l>")
