"""The benchmark suite's smoke run: structure of its table and JSON, never its timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import memory, run

IMPL_KEYS = {"median_ms", "min_ms", "rounds", "ratio"}


def _check_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert set(row) >= {"group", "case", "shape", "baseline", "baseline_ms", "impls"}
        assert row["baseline_ms"] > 0
        assert "rockq" in row["impls"]
        for impl, figures in row["impls"].items():
            assert impl in run.IMPLS
            assert figures["ratio"] > 0
        if row["target"] is None:
            assert row["meets"] is None
        else:
            assert row["meets"] == (row["impls"]["rockq"]["ratio"] <= row["target"])


def test_quick_run_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    assert run.main(["--quick", "--groups", "transforms,channel,training", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["options"]["quick"] is True
    assert doc["machine"]["torch_threads"] >= 1
    cases = [(r["group"], r["case"]) for r in doc["rows"]]
    for name in run_targets():
        assert ("transforms", name) in cases
    assert ("channel", "stochastic_channel_rounding") in cases
    assert ("channel", "conv_weight_channel_rounding") in cases
    assert ("training", "mlp") in cases
    _check_rows(doc["rows"])
    for row in doc["rows"]:
        assert set(row["impls"]["rockq"]) == IMPL_KEYS
        assert (
            row["impls"]["chain"]["rounds"] == doc["options"]["repeats"]
            or row["group"] == "training"
        )
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header[:5] == ["group", "case", "shape", "baseline", "base"]
    assert all(name in printed for _, name in cases)
    assert f"wrote {out}" in printed


def run_targets() -> list[str]:
    from bench.transforms import CPU_TARGETS

    return list(CPU_TARGETS)


def test_reference_column_when_rockpool_is_installed() -> None:
    pytest.importorskip("rockpool")
    doc = run.run(run._parser().parse_args(["--quick", "--groups", "channel"]))
    assert "rockpool" in doc["rows"][0]["impls"]
    assert doc["machine"]["rockpool"]


def test_gpu_group_is_skipped_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    doc = run.run(run._parser().parse_args(["--quick", "--groups", "gpu"]))
    assert doc["rows"] == [] and "gpu" in doc["skipped"]


def test_gpu_passes_need_the_gpu_kernels() -> None:
    import torch

    from bench import transforms

    # On the CPU the range kernel does not run, so there are no passes to time.
    assert transforms.gpu_passes(size=4096, device=torch.device("cpu"), repeats=1, warmup=0) == []


@pytest.mark.gpu
def test_gpu_passes_time_each_pass_over_a_copy() -> None:
    import torch

    from bench import transforms
    from transform_core import cuda_kernels

    if not torch.cuda.is_available() or not cuda_kernels._load_triton():
        pytest.skip("needs a CUDA device and Triton")
    rows = transforms.gpu_passes(size=2**16, device=torch.device("cuda"), repeats=2, warmup=1)
    assert [row["group"] for row in rows] == ["gpu-passes"] * 4
    assert all(row["baseline_ms"] > 0 and row["impls"]["rockq"]["ratio"] > 0 for row in rows)


def test_unknown_group_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown group"):
        run.main(["--groups", "speed"])


def test_table_marks_misses() -> None:
    row = {
        "group": "g",
        "case": "c",
        "shape": [4],
        "baseline": "clone()",
        "baseline_ms": 1.0,
        "impls": {"rockq": {"ratio": 2.5}},
        "target": 2.0,
        "meets": False,
    }
    doc = {"rows": [row], "skipped": {}, "machine": run.machine()}
    text = run.table(doc)
    assert "2.50x" in text and "MISS" in text
    # A smoke run's small sizes are not judged against the targets.
    quick = run.table({**doc, "options": {"quick": True}})
    assert "2.50x" in quick and "MISS" not in quick


@pytest.mark.slow
def test_memory_group_measures_peak_rss_of_the_cli() -> None:
    peak, timing, durable = memory.quantize_tensors(2, repeats=2)
    network = memory.quantize_network(2)
    _check_rows([peak, timing, durable, network])
    for row in (peak, network):
        assert row["baseline_peak_mib"] > 0 and row["impls"]["rockq"]["peak_mib"] > 0
    assert peak["limit_mib"] == pytest.approx((3 * 256 * 256 * 4 + 500e6) / 2**20)
    assert timing["impls"]["rockq"]["ratio"] == pytest.approx(
        timing["impls"]["rockq"]["median_ms"] / timing["baseline_ms"]
    )
    assert timing["target"] == memory.TENSOR_TIME_TARGET
    pairs = timing["impls"]["rockq"]["pair_ratios"]
    assert len(pairs) == 2 and all(ratio > 0 for ratio in pairs)
    # The same rockq runs, over the copy that also waits for the disk; no target there.
    assert durable["impls"]["rockq"]["median_ms"] == timing["impls"]["rockq"]["median_ms"]
    assert durable["baseline"].endswith("+ fsync (wall time)")
    assert durable["target"] is None and durable["meets"] is None
