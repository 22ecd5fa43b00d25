"""Tests for transform_core.checkpoint and transform_core.safetensors_io."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file
from torch import nn

from transform_core import safetensors_io
from transform_core.checkpoint import (
    RESERVED_PREFIX,
    LoadedNetwork,
    SourceInfo,
    build_from_arch,
    is_patched,
    load_network,
    load_patched,
    load_pickled_module,
    load_state_dict_file,
    load_state_dict_strict,
    save_patched,
)
from transform_core.errors import CheckpointError
from transform_core.safetensors_io import (
    SafetensorsWriter,
    WriteBehind,
    atomic_output,
    open_tensors,
    read_header,
    save_safetensors,
    sha256_file,
    write_safetensors,
)

PKG = "rockq_ckpt_testpkg"

PKG_SOURCE = """
import torch
from os import system  # a re-export that trusting this package must not unlock
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.fc = nn.Linear(3, hidden)
        self.out = nn.Linear(hidden, 2)
        self.register_buffer("scale", torch.full((hidden,), 0.5))
        self.note = "custom attribute"

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)) * self.scale)


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight


def make_net(hidden=4):
    return TinyNet(hidden)


def not_a_module():
    return 3


def broken(**kwargs):
    raise RuntimeError("boom")
"""


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small importable package with user classes and factories."""
    root = tmp_path_factory.mktemp("pkgroot")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "models.py").write_text(textwrap.dedent(PKG_SOURCE))
    sys.path.insert(0, str(root))
    yield PKG
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def _one_line(err: pytest.ExceptionInfo[CheckpointError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.ModuleList([nn.Linear(2, 3), nn.LSTM(3, 4, num_layers=2)]),
        nn.ModuleDict({"emb": nn.Embedding(5, 3), "gru": nn.GRU(2, 2)}),
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
    ).eval()


def _replace_pickle(path: Path, payload: bytes) -> None:
    """Swap the data.pkl record of a torch.save archive for crafted bytes."""
    with zipfile.ZipFile(path) as src:
        records = {info.filename: src.read(info) for info in src.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records.items():
            dst.writestr(name, payload if name.endswith("/data.pkl") else data)


def _crafted(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle that calls module.name(arg) when unpickled."""
    text = arg.encode()
    return (
        b"\x80\x02c"
        + f"{module}\n{name}\n".encode()
        + b"X"
        + struct.pack("<I", len(text))
        + text
        + b"\x85R."
    )


# --- whole-module pickles -----------------------------------------------------------


def test_nested_torch_modules_load_from_pickle(tmp_path: Path) -> None:
    net = _zoo()
    torch.save(net, tmp_path / "zoo.pt")
    loaded = load_network(tmp_path / "zoo.pt")
    assert isinstance(loaded, LoadedNetwork) and loaded.module is not None
    assert [type(m) for m in loaded.module.modules()] == [type(m) for m in net.modules()]
    assert loaded.module.state_dict().keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    ours = dict(loaded.module.named_modules())
    theirs = dict(net.named_modules())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ours["0"](x), theirs["0"](x))
    seq = torch.randn(5, 2, 3)
    assert torch.equal(ours["3.1"](seq)[0], theirs["3.1"](seq)[0])
    tokens = torch.randn(2, 4, 8)
    assert torch.allclose(ours["5"](tokens), theirs["5"](tokens))
    data = (tmp_path / "zoo.pt").read_bytes()
    assert loaded.network_bytes == data
    assert loaded.source == SourceInfo(
        "pickle", str(tmp_path / "zoo.pt"), sha256_file(tmp_path / "zoo.pt")
    )


def test_user_class_needs_trust(tmp_path: Path, pkg: str) -> None:
    net = build_from_arch(f"{pkg}.models:make_net", {"hidden": 5})
    path = tmp_path / "model.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError) as err:
        load_network(path)
    assert _one_line(err) == (
        f"{path}: the pickle needs global '{pkg}.models.TinyNet', which is not allowed; "
        f"if you trust package '{pkg}', pass --trust {pkg}"
    )
    loaded = load_network(path, trust=[pkg])
    assert loaded.module is not None and loaded.source.trust == (pkg,)
    assert loaded.module.note == "custom attribute"
    x = torch.randn(4, 3)
    assert torch.equal(loaded.module(x), net(x))
    assert isinstance(load_pickled_module(path, trust=[f"{pkg}.models"]), nn.Module)


_EVIL_CASES = [
    ("os.system", (), "the pickle needs global 'posix.system', which is not allowed"),
    ("os.system", ("os",), "the pickle needs global 'posix.system', which is not allowed"),
    # Trusting posix does not help either: torch's own unpickler blocks it.
    ("os.system", ("posix",), "cannot be loaded safely"),
    ("builtins.exec", (), "the pickle needs global 'builtins.exec', which is not allowed"),
    ("builtins.exec", ("torch",), "the pickle needs global 'builtins.exec', which is not allowed"),
    # Pickle protocol 2 writes subprocess.call under its Python 2 name.
    ("subprocess.call", (), "if you trust package 'commands', pass --trust commands"),
    ("subprocess.call", ("subprocess",), "needs global 'commands.call'"),
]


@pytest.mark.parametrize(("target", "trust", "phrase"), _EVIL_CASES)
def test_malicious_pickle_never_runs(
    tmp_path: Path, target: str, trust: tuple[str, ...], phrase: str
) -> None:
    marker = tmp_path / "pwned"
    module, _, name = target.rpartition(".")
    real = getattr(__import__(module), name)
    arg: object = {
        "os.system": f"touch {marker}",
        "builtins.exec": f"open({str(marker)!r}, 'w').close()",
        "subprocess.call": ["touch", str(marker)],
    }[target]

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (real, (arg,))

    path = tmp_path / "evil.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    torch.save({"net": torch.load(path, weights_only=False), "evil": Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        load_network(path, trust=trust)
    assert _one_line(err).startswith(f"{path}: ")
    assert phrase in str(err.value)
    assert not marker.exists()


def test_crafted_os_system_names_global_and_flag(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"x": 1}, path)
    _replace_pickle(path, _crafted("os", "system", f"touch {marker}"))
    with pytest.raises(CheckpointError) as err:
        load_network(path)
    assert _one_line(err) == (
        f"{path}: the pickle needs global 'os.system', which is not allowed; "
        "if you trust package 'os', pass --trust os"
    )
    with pytest.raises(CheckpointError, match="defined in 'posix' outside the trusted packages"):
        load_network(path, trust=["os"])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_network(path, trust=["os", "posix"])  # torch itself blocks os, trusted or not
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.nn.modules.module", "torch.save"),  # dotted name walks out of the allowlist
        ("torch.nn.functional", "torch"),  # a module object, not a function
        ("torch.nn.modules.linear", "__builtins__"),
        ("torch.nn.functional", "has_torch_function"),  # not an nn.functional op
        ("transform_core.safe_pickle", "importlib"),
        ("transform_core.safetensors_io", "save_safetensors"),  # writes files
        ("transform_core.checkpoint", "SourceInfo"),  # not a module or a transform
    ],
)
def test_allowlisted_packages_cannot_smuggle_other_globals(
    tmp_path: Path, module: str, name: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save({"x": 1}, path)
    _replace_pickle(path, _crafted(module, name, str(tmp_path / "out.pt")))
    with pytest.raises(CheckpointError, match="not allowed"):
        load_network(path)
    assert not (tmp_path / "out.pt").exists()


def test_patched_network_with_transform_core_wrappers_loads(tmp_path: Path) -> None:
    import transform_core as tt

    net = nn.Sequential(nn.Linear(3, 3))
    patched = tt.make_param_T_network(
        net, tt.make_param_T_config(net, tt.deterministic_rounding, "weights")
    )
    torch.save(patched, tmp_path / "patched.pt")
    loaded = load_pickled_module(tmp_path / "patched.pt")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in patched.modules()]
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), patched(x))


def test_trust_does_not_extend_to_reexported_globals(tmp_path: Path, pkg: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"x": 1}, path)
    _replace_pickle(path, _crafted(f"{pkg}.models", "system", f"touch {marker}"))
    with pytest.raises(CheckpointError) as err:
        load_network(path, trust=[pkg])
    assert "is defined in 'posix' outside the trusted packages" in _one_line(err)
    assert "pass --trust posix" in str(err.value)
    assert not marker.exists()


@pytest.mark.slow
def test_untrusted_pickle_in_a_subprocess_does_not_run(tmp_path: Path) -> None:
    # End to end in a fresh interpreter: nothing imported beforehand can mask a leak.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": 1}, path)
    _replace_pickle(path, _crafted("subprocess", "getoutput", f"touch {marker}"))
    code = (
        "from transform_core.checkpoint import load_network\n"
        "from transform_core.errors import CheckpointError\n"
        f"try:\n    load_network({str(path)!r})\nexcept CheckpointError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    assert "needs global 'subprocess.getoutput'" in result.stdout
    assert not marker.exists()


def test_pickle_holding_state_dict_asks_for_arch(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"holds a state dict \(2 tensors\).*--arch"):
        load_network(path)


def test_pickle_holding_something_else(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match=r"holds a list, expected a torch\.nn\.Module"):
        load_network(path)


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.save(nn.Linear(2, 2), path)
    with zipfile.ZipFile(path, "a") as archive:  # the record that marks TorchScript
        archive.writestr("scripted/constants.pkl", b"")
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_network(path)


def test_legacy_torch_save_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(nn.Linear(2, 2), path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="old-style"):
        load_network(path)


# --- bad inputs: one line each --------------------------------------------------------


def _make_bad(tmp_path: Path, case: str) -> Path:
    good_pt = tmp_path / "good.pt"
    torch.save(nn.Linear(2, 2), good_pt)
    good_st = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(good_st))
    if case == "missing":
        return tmp_path / "nope.pt"
    if case == "empty":
        (tmp_path / "empty.pt").write_bytes(b"")
        return tmp_path / "empty.pt"
    if case == "folder-without-index":
        (tmp_path / "folder").mkdir()
        return tmp_path / "folder"
    if case == "truncated-pt":
        (tmp_path / "cut.pt").write_bytes(good_pt.read_bytes()[:200])
        return tmp_path / "cut.pt"
    if case == "garbage-pt":
        (tmp_path / "junk.pt").write_bytes(b"hello, this is not a checkpoint at all")
        return tmp_path / "junk.pt"
    if case == "zip-not-torch":
        with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
            archive.writestr("readme.txt", "hi")
        return tmp_path / "other.pt"
    if case == "truncated-safetensors":
        (tmp_path / "cut.safetensors").write_bytes(good_st.read_bytes()[:-10])
        return tmp_path / "cut.safetensors"
    if case == "bad-json-safetensors":
        raw = b"{not json}      "
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        return tmp_path / "bad.safetensors"
    if case in ("deep-json-safetensors", "surrogate-safetensors"):
        raw = b"[" * 100_000 if case.startswith("deep") else rb'{"w\ud800.weight": 1}'
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        return tmp_path / "bad.safetensors"
    if case == "text-as-safetensors":
        (tmp_path / "text.safetensors").write_text("just some text that is long enough")
        return tmp_path / "text.safetensors"
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing", "no such file or folder"),
        ("empty", "is empty (0 bytes)"),
        ("folder-without-index", "exactly one *.safetensors.index.json, found none"),
        ("truncated-pt", "corrupt or truncated"),
        ("garbage-pt", "not a torch.save file"),
        ("zip-not-torch", "not a torch.save checkpoint"),
        ("truncated-safetensors", "is truncated"),
        ("bad-json-safetensors", "header is not valid JSON"),
        ("deep-json-safetensors", "header is JSON nested too deeply to read"),
        ("surrogate-safetensors", r"header holds a lone surrogate ('w\ud800.weight')"),
        ("text-as-safetensors", "is not a safetensors file or is truncated"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path: Path, case: str, phrase: str) -> None:
    path = _make_bad(tmp_path, case)
    with pytest.raises(CheckpointError) as err:
        load_network(path)
    line = _one_line(err)
    assert line.startswith(f"{path}: ")
    assert phrase in line


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "truncated-safetensors", "bad-json-safetensors", "text-as-safetensors"],
)
def test_bad_safetensors_headers(tmp_path: Path, case: str) -> None:
    path = _make_bad(tmp_path, case)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert _one_line(err).startswith(f"{path}: ")


def test_directory_where_file_expected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a folder, expected a file"):
        load_pickled_module(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder, expected a file"):
        sha256_file(tmp_path)


def test_safetensors_with_bad_offsets_is_corrupt(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"w: is corrupt: shape \[2\] of F32 needs 8 bytes"):
        read_header(path)


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom((2 << 20) + 3)
    (tmp_path / "big.bin").write_bytes(data)
    assert sha256_file(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()


# --- state dict + architecture -------------------------------------------------------


def test_state_dict_with_arch(tmp_path: Path, pkg: str) -> None:
    net = build_from_arch(f"{pkg}.models:make_net", {"hidden": 6})
    torch.save(net.state_dict(), tmp_path / "w.pt")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        loaded = load_network(path, arch=f"{pkg}.models:make_net", arch_kwargs={"hidden": 6})
        assert loaded.module is not None
        assert torch.equal(loaded.module.state_dict()["fc.weight"], net.state_dict()["fc.weight"])
        assert loaded.source.kind == "arch" and loaded.source.arch_kwargs == {"hidden": 6}
        assert loaded.source.sha256 == sha256_file(path)


def test_sharded_state_dict_with_arch(tmp_path: Path, pkg: str) -> None:
    net = build_from_arch(f"{pkg}.models:make_net")
    state = net.state_dict()
    _write_shards(tmp_path, state)
    loaded = load_network(tmp_path, arch=f"{pkg}.models:make_net")
    assert loaded.module is not None
    for key, value in state.items():
        assert torch.equal(loaded.module.state_dict()[key], value)


def test_strict_loading_lists_problems_in_one_line() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    state = dict(net.state_dict())
    del state["0.bias"]
    state["extra"] = torch.zeros(1)
    state["1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(net, state, path="w.pt")
    assert _one_line(err) == (
        "w.pt: the state dict does not fit the network: 1 missing key (0.bias); 1 unexpected key "
        "(extra); 1 shape mismatch (1.weight: file [3, 3], network [4, 3]); check that --arch "
        "and --arch-kwargs build the network these weights came from"
    )
    with pytest.raises(
        CheckpointError, match=r"6 missing keys \(0.weight, 0.bias, 1.weight, \.\.\. 3 more\)"
    ):
        load_state_dict_strict(nn.Sequential(*(nn.Linear(2, 2) for _ in range(3))), {})


@pytest.mark.parametrize(
    ("spec", "kwargs", "phrase"),
    [
        ("no_colon_here", None, "expected 'package.module:factory'"),
        ("a.b:c:d", None, "expected 'package.module:factory'"),
        ("rockq_missing_pkg.models:make", None, "cannot import module 'rockq_missing_pkg.models'"),
        (f"{PKG}.models:make_nett", None, "did you mean 'make_net'?"),
        (f"{PKG}.models:not_a_module", None, "returned a int, expected a torch.nn.Module"),
        (f"{PKG}.models:broken", None, "raised RuntimeError: boom"),
        (f"{PKG}.models:make_net", {"nope": 1}, "raised TypeError"),
    ],
)
def test_arch_errors(spec: str, kwargs: dict[str, int] | None, phrase: str, pkg: str) -> None:
    with pytest.raises(CheckpointError) as err:
        build_from_arch(spec, kwargs)
    assert phrase in _one_line(err)
    assert str(err.value).startswith("arch: ")


def test_arch_kwargs_must_be_json(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="arch_kwargs: expected JSON values"):
        load_network(tmp_path / "w.pt", arch="torch.nn:Linear", arch_kwargs={"x": object()})


def test_arch_kwargs_without_arch_are_refused(tmp_path: Path) -> None:
    torch.save(nn.Sequential(nn.Linear(2, 3)), tmp_path / "net.pt")
    with pytest.raises(CheckpointError, match=r"arch_kwargs: are given without arch \(--arch\)"):
        load_network(tmp_path / "net.pt", arch_kwargs={"hidden": 8})


def test_the_index_of_a_sharded_checkpoint_asks_for_its_folder(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {}}')
    fix = f"is the index of a sharded checkpoint; pass its folder \\({tmp_path}\\) instead"
    with pytest.raises(CheckpointError, match=fix):
        load_network(index)
    with pytest.raises(CheckpointError, match=fix):
        load_state_dict_file(index)


def test_trust_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="trust: expected a package name"):
        load_network(tmp_path, trust=["not a package"])


def test_state_dict_file_rejects_checkpoint_containers(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "state_dict": nn.Linear(2, 2).state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="found a dict with keys 'epoch', 'state_dict'"):
        load_state_dict_file(tmp_path / "ckpt.pt")


# --- tensor mode ------------------------------------------------------------------------


def _write_shards(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(folder / shard), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_tensor_mode_single_file(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 2), "a.bias": torch.arange(3, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "t.safetensors"), {"k": "v"})
    loaded = load_network(tmp_path / "t.safetensors")
    assert loaded.module is None and loaded.tensors is not None
    assert loaded.source.kind == "tensors"
    source = loaded.tensors
    assert sorted(source.names) == ["a.bias", "a.weight"] and len(source) == 2
    assert source.info("a.weight").shape == (3, 2)
    assert source.info("a.bias").dtype == torch.int64
    assert source.metadata == {"k": "v"}
    assert all(torch.equal(t, tensors[n]) for n, t in source.iter_tensors())


def test_tensor_mode_sharded_reads_shard_by_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {f"layer{i}.weight": torch.full((2, 2), float(i)) for i in range(6)}
    weight_map = _write_shards(tmp_path, state)
    source = open_tensors(tmp_path)
    assert set(source.names) == set(state)
    assert source.metadata == {"total_size": "123"}
    assert source.index_file == tmp_path / "model.safetensors.index.json"
    events: list[str] = []
    real_open = safetensors_io._open

    def recording_open(path: Path) -> Any:
        events.append(f"open {Path(path).name}")
        return real_open(path)

    monkeypatch.setattr(safetensors_io, "_open", recording_open)
    for name, tensor in source.iter_tensors():
        events.append(name)
        assert torch.equal(tensor, state[name])
    # Every tensor of a shard is read before the next shard is opened.
    expected = []
    for shard in sorted(set(weight_map.values())):
        expected += [f"open {shard}", *(n for n in state if weight_map[n] == shard)]
    assert events == expected
    assert torch.equal(source.get("layer5.weight"), state["layer5.weight"])
    assert load_network(tmp_path).source.kind == "tensors"


def _big_tensors(path: Path) -> dict[str, torch.Tensor]:
    # Megabytes and bytes; two dtypes, odd sizes.
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "big.weight": torch.randn(700, 501, generator=generator),
        "half.weight": torch.randn(600_001, generator=generator).half(),
        "small.bias": torch.arange(7.0),
    }
    save_file(tensors, str(path))
    return tensors


def test_reading_computes_the_files_digest_on_the_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.safetensors"
    tensors = _big_tensors(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert open_tensors(path).sha256() == expected  # read for the purpose
    source = open_tensors(path)
    read = dict(source.iter_tensors(digest=True))
    assert all(torch.equal(read[n], t) for n, t in tensors.items())
    assert load_network(path).source.sha256 == expected
    monkeypatch.setattr(safetensors_io, "sha256_file", lambda _: pytest.fail("read again"))
    assert source.sha256() == expected


def test_a_folders_digest_lists_its_index_and_shards(tmp_path: Path) -> None:
    state = {f"layer{i}.weight": torch.full((2, 2), float(i)) for i in range(6)}
    _write_shards(tmp_path, state)
    source = open_tensors(tmp_path)
    lines = "".join(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()} {f.name}\n"
        for f in (tmp_path / "model.safetensors.index.json", *source.files)
    )
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert source.sha256() == expected
    list(source.iter_tensors(digest=True))
    assert source.sha256() == expected
    assert load_network(tmp_path).source.sha256 == expected


def test_a_file_truncated_after_opening_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    _big_tensors(path)
    source = open_tensors(path)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 1000)
    with pytest.raises(
        CheckpointError, match=r"bytes into tensor data .* truncated, copy it again"
    ):
        dict(source.iter_tensors())


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing-shard", "lists shard 'model-00002-of-00002.safetensors', which does not exist"),
        ("unlisted-tensor", "holds 1 tensor ('layer5.weight') that the index does not list"),
        ("missing-tensor", "puts 1 tensor ('ghost') in it but the shard does not hold them"),
        ("bad-json", "is not valid JSON"),
        ("deep-json", "its text is JSON nested too deeply to read"),
        ("no-weight-map", "non-empty 'weight_map'"),
        ("escape", "points outside the folder"),
        ("two-indexes", "found a.safetensors.index.json, model.safetensors.index.json"),
    ],
)
def test_sharded_folder_errors(tmp_path: Path, case: str, phrase: str) -> None:
    state = {f"layer{i}.weight": torch.zeros(2) for i in range(6)}
    weight_map = _write_shards(tmp_path, state)
    index_path = tmp_path / "model.safetensors.index.json"
    if case == "missing-shard":
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
    elif case == "unlisted-tensor":
        del weight_map["layer5.weight"]
        index_path.write_text(json.dumps({"weight_map": weight_map}))
    elif case == "missing-tensor":
        weight_map["ghost"] = "model-00001-of-00002.safetensors"
        index_path.write_text(json.dumps({"weight_map": weight_map}))
    elif case == "bad-json":
        index_path.write_text("{")
    elif case == "deep-json":
        index_path.write_text("[" * 100_000)
    elif case == "no-weight-map":
        index_path.write_text(json.dumps({"metadata": {}}))
    elif case == "escape":
        weight_map["layer0.weight"] = "../elsewhere.safetensors"
        index_path.write_text(json.dumps({"weight_map": weight_map}))
    elif case == "two-indexes":
        (tmp_path / "a.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        open_tensors(tmp_path)
    assert phrase in _one_line(err)


# --- atomic writes --------------------------------------------------------------------


def test_atomic_output_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    for exc in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_output(target) as temp:
            assert temp.parent == tmp_path and temp.name.startswith(".out.safetensors.tmp-")
            temp.write_bytes(b"partial")
            raise exc
        assert list(tmp_path.iterdir()) == []


def test_streaming_write_interrupted_mid_stream_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    specs = {f"t{i}": (torch.float32, [4]) for i in range(4)}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield "t0", torch.zeros(4)
        yield "t1", torch.zeros(4)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(target, specs, tensors(), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert target.read_bytes() == b"precious"


def test_existing_output_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError) as err:
        save_safetensors({"w": torch.ones(2)}, target)
    assert _one_line(err) == f"{target}: already exists; pass --force to overwrite it"
    assert target.read_bytes() == b"precious"
    save_safetensors({"w": torch.ones(2)}, target, force=True)
    assert torch.equal(load_file(str(target))["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_files_that_belong_together_are_replaced_all_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transform_core.files import atomic_outputs

    targets = [tmp_path / name for name in ("t.safetensors", "t.report.json", "t.report.md")]
    for target in targets:
        target.write_text("old " + target.name)
    real_replace = os.replace

    def refused_for_the_last(src: Any, dst: Any) -> None:
        if Path(dst) == targets[-1] and ".tmp-" in Path(src).name:
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refused_for_the_last)
    with pytest.raises(CheckpointError) as err, atomic_outputs(targets, force=True) as temps:
        for temp in temps:
            temp.write_text("new")
    assert _one_line(err).startswith(f"{targets[-1]}: cannot be written (Permission denied); ")
    assert [t.read_text() for t in targets] == ["old " + t.name for t in targets]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in targets)
    monkeypatch.setattr(os, "replace", real_replace)
    with atomic_outputs(targets, force=True) as temps:
        for temp in temps:
            temp.write_text("new")
    assert [t.read_text() for t in targets] == ["new"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in targets)


def test_ctrl_c_while_old_outputs_are_deleted_waits_until_they_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from transform_core.files import atomic_outputs

    targets = [tmp_path / name for name in ("t.safetensors", "t.report.json", "t.report.md")]
    for target in targets:
        target.write_text("old " + target.name)
    real_unlink = Path.unlink

    def interrupted_after(path: Path, missing_ok: bool = False) -> None:
        real_unlink(path, missing_ok)
        if ".old-" in path.name:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the old files are deleted

    monkeypatch.setattr(Path, "unlink", interrupted_after)
    with pytest.raises(KeyboardInterrupt), atomic_outputs(targets, force=True) as temps:
        for temp in temps:
            temp.write_text("new")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    # The interrupt came once all was done: the new files, and no old one left behind.
    assert [t.read_text() for t in targets] == ["new"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in targets)


def test_an_output_the_system_refuses_is_named_with_the_fix(tmp_path: Path) -> None:
    from transform_core.files import atomic_output

    long_name = tmp_path / ("n" * 250)  # the temporary file's name is longer still
    with pytest.raises(CheckpointError) as err, atomic_output(long_name):
        pass
    assert _one_line(err) == (
        f"{long_name}: cannot be written (File name too long); choose a shorter output name"
    )
    target = tmp_path / "out.bin"
    no_space = r"out.bin: cannot be written \(No space left"
    with pytest.raises(CheckpointError, match=no_space), atomic_output(target):
        raise OSError(28, "No space left on device")
    # other errors of the block are the caller's, and pass unchanged
    with pytest.raises(FileNotFoundError), atomic_output(target):
        raise FileNotFoundError(2, "No such file or directory", "input.pt")
    assert list(tmp_path.iterdir()) == []


def test_output_never_overwrites_an_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(source))
    before = source.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for target in (source, "./model.safetensors", tmp_path / "link.safetensors"):
        with pytest.raises(CheckpointError, match="is also an input"):
            save_safetensors({"w": torch.zeros(2)}, target, force=True, inputs=[source])
    assert source.read_bytes() == before


def test_output_never_overwrites_a_file_in_an_input_folder(tmp_path: Path) -> None:
    state = {f"layer{i}.weight": torch.zeros(2) for i in range(4)}
    weight_map = _write_shards(tmp_path, state)
    shard = tmp_path / sorted(set(weight_map.values()))[0]
    for part in (shard, tmp_path / "model.safetensors.index.json"):
        with pytest.raises(CheckpointError, match="is also an input"):
            save_safetensors({"w": torch.ones(2)}, part, force=True, inputs=[tmp_path])
    # A file in the folder that is not part of the input (an earlier output) may be replaced.
    save_safetensors({"w": torch.ones(2)}, tmp_path / "new.safetensors", inputs=[tmp_path])
    save_safetensors(
        {"w": torch.ones(3)}, tmp_path / "new.safetensors", force=True, inputs=[tmp_path]
    )
    assert open_tensors(tmp_path).get("layer0.weight").tolist() == [0.0, 0.0]


def test_output_never_overwrites_a_shard_behind_a_link_or_in_a_subfolder(tmp_path: Path) -> None:
    # The Hugging Face cache: a snapshot folder of links to blobs; and shards in a subfolder.
    blobs, snapshot, nested = tmp_path / "blobs", tmp_path / "snapshot", tmp_path / "nested"
    for folder in (blobs, snapshot, nested / "sub"):
        folder.mkdir(parents=True)
    weight_map = _write_shards(blobs, {f"layer{i}.weight": torch.zeros(2) for i in range(4)})
    for name in (*set(weight_map.values()), "model.safetensors.index.json"):
        (snapshot / name).symlink_to(blobs / name)
    shard = sorted(set(weight_map.values()))[0]
    for target in (blobs / shard, snapshot / shard):
        with pytest.raises(CheckpointError, match="is also an input"):
            save_safetensors({"w": torch.ones(2)}, target, force=True, inputs=[snapshot])
    save_file({"w": torch.zeros(2)}, str(nested / "sub" / "part.safetensors"))
    index = {"weight_map": {"w": "sub/part.safetensors"}}
    (nested / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is also an input"):
        save_safetensors(
            {"w": torch.ones(2)}, nested / "sub" / "part.safetensors", force=True, inputs=[nested]
        )
    assert open_tensors(nested).get("w").tolist() == [0.0, 0.0]


def test_output_folder_must_exist_and_target_must_not_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"folder '.*missing' does not exist; create it first"
    ):
        save_safetensors({"w": torch.ones(2)}, tmp_path / "missing" / "out.safetensors")
    with pytest.raises(CheckpointError, match="is a folder; expected an output file path"):
        save_safetensors({"w": torch.ones(2)}, tmp_path, force=True)


def test_atomic_output_gives_normal_permissions(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    with atomic_output(tmp_path / "out") as temp:
        temp.write_bytes(b"x")
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


# --- the streaming writer -----------------------------------------------------------


def _mixed_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "f32": torch.randn(3, 4),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7),
        "u8": torch.arange(9, dtype=torch.uint8),
        "f64": torch.randn(2).double(),
        "fp8": torch.randn(4).to(torch.float8_e4m3fn),
        "e8m0": torch.tensor([0.5, 1.0, 64.0]).to(torch.float8_e8m0fnu),
        "e4fnuz": torch.randn(2).to(torch.float8_e4m3fnuz),
        "a_f32": torch.ones(1),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"rockq.format": "patched"}])
def test_streaming_writer_is_byte_identical_to_safetensors(
    tmp_path: Path, metadata: dict[str, str] | None
) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata)
    specs = {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}
    # Written in reverse order: each tensor goes to its own offset.
    write_safetensors(tmp_path / "ours.safetensors", specs, reversed(tensors.items()), metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_streaming_writer_with_several_metadata_keys(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    metadata = {"b": "1", "a": 'é\n\x01"', "rockq.recipe": "params:\n  - x: 1\n"}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata)
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata)
    ours, ref = (read_header(tmp_path / f).tensors for f in ("ours.safetensors", "ref.safetensors"))
    assert [(i.name, i.offsets) for i in ours.values()] == [
        (i.name, i.offsets) for i in ref.values()
    ]
    assert read_header(tmp_path / "ours.safetensors").metadata == metadata
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    for name, tensor in tensors.items():
        as_bytes = loaded[name].reshape(-1).view(torch.uint8)
        assert torch.equal(as_bytes, tensor.reshape(-1).view(torch.uint8)), name


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]


@settings(max_examples=20, deadline=None)
@given(
    st.dictionaries(
        st.text("abc._", min_size=1, max_size=6),
        st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 3), max_size=3)),
        max_size=5,
    )
)
def test_streaming_writer_matches_safetensors_property(
    specs: dict[str, tuple[torch.dtype, list[int]]],
) -> None:
    tensors = {n: torch.ones(shape).to(dtype) for n, (dtype, shape) in specs.items()}
    ours = io.BytesIO()
    writer = SafetensorsWriter(ours, specs)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    assert ours.getvalue() == save(tensors)


def test_tied_and_non_contiguous_tensors_save(tmp_path: Path) -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    state = {"emb.weight": emb.weight, "head.weight": head.weight, "t": torch.randn(3, 4).t()}
    save_safetensors(state, tmp_path / "tied.safetensors")
    loaded = load_file(str(tmp_path / "tied.safetensors"))
    assert torch.equal(loaded["emb.weight"], loaded["head.weight"])
    assert torch.equal(loaded["t"], state["t"])


def test_writer_rejects_mismatches(tmp_path: Path) -> None:
    writer = SafetensorsWriter(io.BytesIO(), {"a": (torch.float32, [2])})
    with pytest.raises(ValueError, match=r"declared torch\.float32 \[2\]"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="was not declared"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match=r"1 tensor \('a'\) declared but never written"):
        writer.close()
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="already written"):
        writer.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match=r"c: has dtype torch\.complex128, which safetensors"):
        save_safetensors({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_writing_behind_gives_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = {**_big_tensors(tmp_path / "ref.safetensors"), "zero": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), {"k": "v"})
    specs = {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}
    synced: list[int] = []
    real_sync = SafetensorsWriter.sync
    monkeypatch.setattr(SafetensorsWriter, "sync", lambda w: synced.append(1) or real_sync(w))
    monkeypatch.setattr(WriteBehind, "SYNC_BYTES", 1 << 20)
    with (tmp_path / "ours.safetensors").open("wb") as handle:
        writer = SafetensorsWriter(handle, specs, {"k": "v"})
        with WriteBehind(writer) as behind:
            for name, tensor in tensors.items():
                behind.write(name, tensor)
        writer.close()
    assert synced  # the disk was asked to start on the data before the end
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_an_error_while_writing_behind_comes_back_to_the_caller() -> None:
    big = torch.zeros(1 << 19)  # 2 MiB: written in the background
    writer = SafetensorsWriter(io.BytesIO(), {"a": (torch.float32, [1 << 19])})
    with pytest.raises(ValueError, match="was not declared"), WriteBehind(writer) as behind:
        behind.write("b", big)
        behind.wait()
    with WriteBehind(writer) as behind:
        behind.write("a", big)
    with pytest.raises(ValueError, match="already written"), WriteBehind(writer) as behind:
        behind.write("a", big)
    writer.close()


def test_nothing_queued_behind_a_failed_write_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = {f"w{i}": (torch.float32, [4]) for i in range(5)}
    writer = SafetensorsWriter(io.BytesIO(), specs)
    queued = threading.Event()
    written: list[str] = []
    real_write = SafetensorsWriter.write

    def write(self: SafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        written.append(name)
        if name == "w1":
            queued.wait(10)  # fail only once every tensor is queued behind this one
            raise OSError(28, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    with pytest.raises(OSError, match="No space left"), WriteBehind(writer) as behind:
        for name in specs:
            behind.write(name, torch.ones(4))
        queued.set()
    assert written == ["w0", "w1"]


def test_metadata_can_be_replaced_by_metadata_of_the_same_length() -> None:
    buffer = io.BytesIO()
    writer = SafetensorsWriter(buffer, {"w": (torch.float32, [2])}, {"digest": "0" * 8})
    writer.write("w", torch.ones(2))
    with pytest.raises(ValueError, match="keep every value's length"):
        writer.replace_metadata({"digest": "0" * 64})
    writer.replace_metadata({"digest": "abcd1234"})
    writer.close()
    writer.sync()  # nothing to do for a buffer in memory
    assert buffer.getvalue() == save({"w": torch.ones(2)}, {"digest": "abcd1234"})


# --- the patched checkpoint ---------------------------------------------------------


def test_patched_round_trip_from_pickle(tmp_path: Path) -> None:
    net = _zoo()
    torch.save(net, tmp_path / "zoo.pt")
    loaded = load_network(tmp_path / "zoo.pt")
    assert loaded.module is not None
    out = tmp_path / "patched.safetensors"
    save_patched(
        out,
        loaded.module.state_dict(),
        source=loaded.source,
        recipe="params:\n  - family: weights\n",
        seed=7,
        network_bytes=loaded.network_bytes,
        state={"step": 3},
        extra_tensors={"optim/step": torch.tensor(3)},
    )
    meta = read_header(out).metadata or {}
    assert meta["rockq.format"] == "patched" and meta["rockq.format_version"] == "1"
    assert set(meta) == {
        "rockq.format",
        "rockq.format_version",
        "rockq.version",
        "rockq.recipe",
        "rockq.seed",
        "rockq.source",
        "rockq.state",
    }
    raw = load_file(str(out))  # plain safetensors, no unpickling
    assert raw[f"{RESERVED_PREFIX}network"].dtype == torch.uint8
    assert is_patched(out) and not is_patched(tmp_path / "zoo.pt")
    ckpt = load_patched(out)
    assert ckpt.recipe == "params:\n  - family: weights\n" and ckpt.seed == 7
    assert ckpt.state == {"step": 3} and ckpt.source == loaded.source
    assert torch.equal(ckpt.extra_tensors["optim/step"], torch.tensor(3))
    assert ckpt.network is not None and type(ckpt.network) is nn.Sequential
    for key, value in net.state_dict().items():
        assert torch.equal(ckpt.network.state_dict()[key], value), key
    assert ckpt.sha256 == sha256_file(out)
    again = load_network(out)
    assert again.source.kind == "patched" and again.source.origin == loaded.source


def test_patched_from_arch_needs_trust(tmp_path: Path, pkg: str) -> None:
    spec = f"{pkg}.models:make_net"
    net = build_from_arch(spec, {"hidden": 3})
    torch.save(net.state_dict(), tmp_path / "w.pt")
    loaded = load_network(tmp_path / "w.pt", arch=spec, arch_kwargs={"hidden": 3})
    out = tmp_path / "p.safetensors"
    save_patched(out, net.state_dict(), source=loaded.source, recipe="r", seed=None)
    with pytest.raises(CheckpointError) as err:
        load_patched(out)
    assert _one_line(err) == (
        f"{out}: rebuilding the network runs factory '{spec}' named in the file; "
        f"if you trust package '{pkg}', pass --trust {pkg}"
    )
    bare = load_patched(out, rebuild=False)  # tensors and metadata need no trust
    assert bare.network is None and bare.recipe == "r" and bare.source == loaded.source
    assert torch.equal(bare.state_dict["out.weight"], net.state_dict()["out.weight"])
    ckpt = load_patched(out, trust=[pkg])
    assert ckpt.seed is None and ckpt.network is not None
    assert torch.equal(ckpt.network.state_dict()["out.weight"], net.state_dict()["out.weight"])


def test_patched_embedded_pickle_goes_through_the_allowlist(tmp_path: Path, pkg: str) -> None:
    net = build_from_arch(f"{pkg}.models:TiedNet")
    torch.save(net, tmp_path / "tied.pt")
    loaded = load_network(tmp_path / "tied.pt", trust=[pkg])
    assert loaded.module is not None
    out = tmp_path / "p.safetensors"
    save_patched(out, loaded.module.state_dict(), source=loaded.source, recipe="r")
    with pytest.raises(CheckpointError, match=r"\(__rockq__/network\): the pickle needs global"):
        load_patched(out)
    network = load_patched(out, trust=[pkg]).network
    assert network is not None
    head, emb = network.get_submodule("head"), network.get_submodule("emb")
    assert head.weight is emb.weight  # tying survives the round trip


def test_patched_from_tensors_has_no_network(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "t.safetensors"))
    loaded = load_network(tmp_path / "t.safetensors")
    save_patched(tmp_path / "p.safetensors", {"w": torch.ones(2)}, source=loaded.source, recipe="")
    ckpt = load_patched(tmp_path / "p.safetensors")
    assert ckpt.network is None and torch.equal(ckpt.state_dict["w"], torch.ones(2))


def test_save_patched_guards(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "net.pt")
    loaded = load_network(tmp_path / "net.pt")
    assert loaded.module is not None
    state = loaded.module.state_dict()
    with pytest.raises(CheckpointError, match="__rockq__/x: uses the reserved prefix"):
        save_patched(
            tmp_path / "p.safetensors",
            {**state, "__rockq__/x": torch.ones(1)},
            source=loaded.source,
            recipe="",
        )
    with pytest.raises(ValueError, match="reserved for the embedded network"):
        save_patched(
            tmp_path / "p.safetensors",
            state,
            source=loaded.source,
            recipe="",
            extra_tensors={"network": torch.ones(1)},
        )
    with pytest.raises(CheckpointError, match="is also an input"):
        save_patched(tmp_path / "net.pt", state, source=loaded.source, recipe="", force=True)
    # Without network_bytes the source file is re-read, and must be unchanged.
    save_patched(tmp_path / "p.safetensors", state, source=loaded.source, recipe="")
    assert load_patched(tmp_path / "p.safetensors").network is not None
    torch.save(nn.Linear(2, 2), tmp_path / "net.pt")
    with pytest.raises(CheckpointError, match="changed since the network was loaded"):
        save_patched(tmp_path / "q.safetensors", state, source=loaded.source, recipe="")


def _patched_with_meta(tmp_path: Path, **changes: str) -> Path:
    source = SourceInfo("tensors", "t.safetensors", "00")
    meta = {
        "rockq.format": "patched",
        "rockq.format_version": "1",
        "rockq.source": source.to_json(),
        **changes,
    }
    path = tmp_path / "p.safetensors"
    save_file({"w": torch.ones(1)}, str(path), {k: v for k, v in meta.items() if v != "DROP"})
    return path


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"rockq.format": "DROP"}, "is not a rockq patched checkpoint (no 'rockq.format'"),
        ({"rockq.format_version": "2"}, "format version '2'; this rockq reads version '1'"),
        ({"rockq.source": "{"}, "rockq.source: has a source record that is not valid JSON"),
        ({"rockq.source": '{"kind": "magic"}'}, "unknown kind 'magic'"),
        ({"rockq.seed": "seven"}, "malformed rockq.seed or rockq.state"),
        ({"rockq.source": "DROP"}, "has no 'rockq.source' metadata"),
    ],
)
def test_load_patched_rejects_bad_metadata(
    tmp_path: Path, changes: dict[str, str], phrase: str
) -> None:
    path = _patched_with_meta(tmp_path, **changes)
    with pytest.raises(CheckpointError) as err:
        load_patched(path)
    assert phrase in _one_line(err)


def test_source_info_round_trips_nested_origin() -> None:
    origin = SourceInfo("arch", "w.pt", "ab", arch="p.m:f", arch_kwargs={"n": 2}, trust=("p",))
    info = SourceInfo("patched", "p.safetensors", "cd", origin=origin)
    assert SourceInfo.from_json(info.to_json()) == info
    with pytest.raises(CheckpointError, match="an 'arch' source needs 'arch'"):
        SourceInfo.from_dict({"kind": "arch", "path": "x", "sha256": "y"})
