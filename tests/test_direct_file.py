"""DirectFile: the same bytes as an ordinary file, whichever way each write goes."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from transform_core.direct_file import DirectFile
from transform_core.safetensors_io import SafetensorsWriter, WriteBehind

_MIB = 1 << 20


def _pattern(length: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 256, (length,), dtype=torch.uint8, generator=generator).numpy().tobytes()
    )


def _count_direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length of each write that goes past the page cache."""
    lengths: list[int] = []
    real = DirectFile._pwrite_direct

    def counted(self: DirectFile, view: memoryview, offset: int) -> bool:
        lengths.append(len(view))
        return real(self, view, offset)

    monkeypatch.setattr(DirectFile, "_pwrite_direct", counted)
    return lengths


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3 * _MIB), st.integers(0, 3 * _MIB)), min_size=1, max_size=5)
)
def test_writes_at_any_offset_match_an_ordinary_file_property(
    writes: list[tuple[int, int]],
) -> None:
    # Offsets and lengths off the page grid, overlapping rewrites included.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        ours, reference = Path(folder, "ours"), io.BytesIO()
        with DirectFile(ours) as file:
            for k, (offset, length) in enumerate(writes):
                data = _pattern(length, k)
                assert file.seek(offset) == offset
                assert file.write(data) == length
                reference.seek(offset)
                reference.write(data)
                assert file.tell() == reference.tell()
            assert file.seek(0, os.SEEK_END) == len(reference.getvalue())
        assert ours.read_bytes() == reference.getvalue()


def test_large_writes_go_direct_and_small_ones_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = _count_direct_writes(monkeypatch)
    data = _pattern(3 * _MIB + 123, 1)
    with DirectFile(tmp_path / "f") as file:
        if not file.direct:
            pytest.skip("this file system refuses O_DIRECT")
        file.write(b"x" * 100)  # small: the cache
        file.write(data)  # pages inside it go direct, in stage-sized pieces
        file.write(b"y" * 5000)
    assert direct and sum(direct) % os.sysconf("SC_PAGE_SIZE") == 0
    assert max(direct) <= DirectFile.STAGE_BYTES
    assert (tmp_path / "f").read_bytes() == b"x" * 100 + data + b"y" * 5000


def test_a_refused_direct_write_carries_on_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if file._direct_fd is not None and fd == file._direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    data = _pattern(2 * _MIB + 7, 2)
    with DirectFile(tmp_path / "f") as file:
        if not file.direct:
            pytest.skip("this file system refuses O_DIRECT")
        monkeypatch.setattr(os, "pwrite", pwrite)
        file.write(b"h")
        file.write(data)
        file.write(data)
        assert not file.direct
    assert len(refused) == 1  # refused once, then never tried again
    assert (tmp_path / "f").read_bytes() == b"h" + data + data


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    # Raised through the file's closing, which must not mask it.
    with pytest.raises(OSError, match="No space left"), DirectFile(tmp_path / "f") as file:
        monkeypatch.setattr(os, "pwrite", full)
        file.write(_pattern(2 * _MIB, 3))


def test_without_direct_everything_goes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = _count_direct_writes(monkeypatch)
    data = _pattern(2 * _MIB, 4)
    with DirectFile(tmp_path / "f", direct=False) as file:
        assert not file.direct
        file.write(data)
    assert direct == []
    assert (tmp_path / "f").read_bytes() == data


def test_seek_rejects_bad_arguments(tmp_path: Path) -> None:
    with DirectFile(tmp_path / "f") as file:
        with pytest.raises(ValueError, match="whence must be 0, 1 or 2"):
            file.seek(0, 3)
        with pytest.raises(ValueError, match="negative position"):
            file.seek(-1)
        file.write(b"abc")
        assert file.seek(-1, os.SEEK_CUR) == 2
        assert file.seek(1, os.SEEK_END) == 4


def test_safetensors_written_direct_behind_match_safetensors(tmp_path: Path) -> None:
    # Tensor sizes that leave every tensor boundary off the page grid.
    tensors = {
        f"t{i}": torch.randn(262_144 + 37 * i, generator=torch.Generator().manual_seed(i))
        for i in range(4)
    }
    tensors["small"] = torch.arange(5, dtype=torch.int8)
    save_file(tensors, str(tmp_path / "ref.safetensors"), {"k": "v"})
    specs = {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}
    with DirectFile(tmp_path / "ours.safetensors") as handle:
        writer = SafetensorsWriter(handle, specs, {"k": "0"})
        with WriteBehind(writer, sync=not handle.direct) as behind:
            for name, tensor in reversed(tensors.items()):
                behind.write(name, tensor)
        writer.replace_metadata({"k": "v"})
        writer.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_writing_behind_without_sync_never_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(SafetensorsWriter, "sync", lambda w: synced.append(1))
    monkeypatch.setattr(WriteBehind, "SYNC_BYTES", 1)
    with (tmp_path / "out").open("wb") as handle:
        writer = SafetensorsWriter(handle, {"a": (torch.float32, [1 << 18])})
        with WriteBehind(writer, sync=False) as behind:
            behind.write("a", torch.ones(1 << 18))
        writer.close()
    assert synced == []


@pytest.mark.parametrize("setting", ["0", "off", "No"])
def test_the_environment_can_turn_direct_writes_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv("ROCKQ_DIRECT_IO", setting)
    with DirectFile(tmp_path / "f") as file:
        assert not file.direct
        file.write(_pattern(2 * _MIB, 5))
    assert (tmp_path / "f").stat().st_size == 2 * _MIB


def test_without_pwrite_the_cache_path_seeks_and_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on Windows, which has no os.pwrite (nor O_DIRECT).
    monkeypatch.delattr(os, "pwrite")
    with DirectFile(tmp_path / "f", direct=False) as file:
        file.write(b"abcdef")
        file.seek(2)
        file.write(b"XY")
        file.seek(10)
        file.write(b"z")
    assert (tmp_path / "f").read_bytes() == b"abXYef\0\0\0\0z"
