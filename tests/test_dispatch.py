"""``backend="auto"`` between two kernels: the measured table, how it is built, and how it is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from divkernels import backend, dispatch
from divkernels.benchmarks import dispatch as dispatch_cli
from divkernels.benchmarks import runner

GPU_NAME = "Fake GPU 80GB"
FAKE_CUDA = torch.device("cuda", 0)


def test_shape_classes() -> None:
    assert [dispatch.group_class(g) for g in (2, 3, 4, 5, 16, 17, 128)] == [2, 4, 4, 8, 16, 32, 128]
    assert [dispatch.dim_class(d) for d in (None, 1, 384, 512, 513, 4096, 8192, 8193)] == \
        ["none", "512", "512", "512", "2048", "8192", "8192", "large"]
    assert dispatch.shape_class(16, 4096, torch.bfloat16) == "G16-D8192-bfloat16"
    assert dispatch.shape_class(12, 384, "float32") == "G16-D512-float32"
    assert dispatch.shape_class(2, None, None) == "G2-Dnone-none"


def _rows() -> list[dict]:
    """Benchmark rows as the runner writes them: cuda faster at G=16, triton faster at G=64."""
    rows = []
    timings = {  # (op, G, pass): (triton ms, cuda ms)
        ("ddpo+logdet", 16, "fwd"): (1.0, 0.5), ("ddpo+logdet", 16, "fwd+bwd"): (2.0, 1.5),
        ("ddpo+logdet", 64, "fwd"): (1.0, 3.0), ("ddpo+logdet", 64, "fwd+bwd"): (2.0, 1.9),
        ("dpo", 16, "fwd"): (0.1, 0.2),
    }
    for (op, group, passes), (triton_ms, cuda_ms) in timings.items():
        for provider, ms in (("triton", triton_ms), ("cuda", cuda_ms), ("eager", 50.0)):
            rows.append({"family": "group_loss", "op": op, "B": 256, "G": group, "D": 4096, "dtype": "bfloat16",
                         "pass": passes, "provider": provider, "median_ms": ms})
    # measured by one kernel only (the other failed): not a comparison
    rows.append({"family": "group_loss", "op": "ddpo+logdet", "B": 256, "G": 8, "D": 384, "dtype": "float32",
                 "pass": "fwd", "provider": "triton", "median_ms": 1.0})
    rows.append({"family": "group_loss", "op": "ddpo+logdet", "B": 256, "G": 8, "D": 384, "dtype": "float32",
                 "pass": "fwd", "provider": "cuda", "median_ms": None})
    rows.append({"family": "similarity", "op": "similarity", "B": 256, "G": 16, "D": 4096, "dtype": "bfloat16",
                 "pass": "fwd", "provider": "triton", "median_ms": 1.0})
    return rows


def test_build_entries_takes_the_geometric_mean_per_class() -> None:
    entries = dispatch_cli.build_entries(dispatch_cli.dispatch_rows(_rows()), GPU_NAME)
    by_class = {entry["class"]: entry for entry in entries}
    assert set(by_class) == {"G16-D8192-bfloat16", "G64-D8192-bfloat16", "G16-Dnone-none"}
    assert by_class["G16-D8192-bfloat16"]["backend"] == "cuda"
    assert by_class["G16-D8192-bfloat16"]["cuda_over_triton"] == pytest.approx((0.5 * 0.75) ** 0.5, abs=1e-4)
    # a 5% cuda win does not outweigh a 3x loss: geometric mean (3 * 0.95) ** 0.5 > 1
    assert by_class["G64-D8192-bfloat16"]["backend"] == "triton"
    assert by_class["G16-Dnone-none"]["backend"] == "triton"  # plain DPO reads no embeddings
    assert all(entry["device"] == GPU_NAME and entry["op"] == "group_preference_loss" for entry in entries)


def test_merge_replaces_only_remeasured_classes() -> None:
    old = [{"device": GPU_NAME, "op": "group_preference_loss", "class": "G2-Dnone-none", "backend": "cuda"},
           {"device": GPU_NAME, "op": "group_preference_loss", "class": "G16-D8192-bfloat16", "backend": "cuda"}]
    new = [{"device": GPU_NAME, "op": "group_preference_loss", "class": "G16-D8192-bfloat16", "backend": "triton"}]
    merged = dispatch_cli.merge_entries(old, new)
    assert [(entry["class"], entry["backend"]) for entry in merged] == [
        ("G16-D8192-bfloat16", "triton"), ("G2-Dnone-none", "cuda")]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A CUDA device named GPU_NAME on which both kernels are available; records the probes."""
    probed: list[str] = []

    def available(name: str, device: torch.device) -> None:
        probed.append(name)

    monkeypatch.delenv("DIVKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "device_name", lambda device: GPU_NAME)
    monkeypatch.setattr(backend, "backend_unavailable_reason", available)
    return probed


def _auto(group: int, dim: int | None, dtype: torch.dtype | None) -> str:
    return backend.resolve_backend("auto", op="group_preference_loss", device=FAKE_CUDA, group_size=group,
                                   kernels=("triton", "cuda"), dim=dim, emb_dtype=dtype)


def test_cli_writes_a_table_that_auto_follows(tmp_path: Path, fake_gpu: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "fake-gpu-full-2026-11-22.json"
    results.write_text(json.dumps({"device": GPU_NAME, "commit": "abc", "rows": _rows()}))
    table = tmp_path / "table.json"
    assert dispatch_cli.main([str(results), "--table", str(table)]) == 0
    written = json.loads(table.read_text())
    assert written["version"] == dispatch.TABLE_VERSION and len(written["entries"]) == 3
    assert "fake-gpu-full-2026-11-22.json (commit abc)" in written["sources"]

    monkeypatch.setenv(dispatch.ENV_TABLE, str(table))
    assert _auto(16, 4096, torch.bfloat16) == "cuda"
    assert _auto(9, 3000, torch.bfloat16) == "cuda"  # same class: G16, D8192, bf16
    assert _auto(64, 4096, torch.bfloat16) == "triton"
    assert _auto(16, 4096, torch.float16) == "triton"  # unmeasured class: the default order
    assert _auto(16, None, None) == "triton"
    monkeypatch.setattr(dispatch, "device_name", lambda device: "Another GPU")
    assert _auto(16, 4096, torch.bfloat16) == "triton"  # unmeasured device
    # the explicit choice and the environment override still win
    monkeypatch.setenv("DIVKERNELS_BACKEND", "triton")
    monkeypatch.setattr(dispatch, "device_name", lambda device: GPU_NAME)
    assert _auto(16, 4096, torch.bfloat16) == "triton"


def test_unmeasured_auto_never_probes_cuda(tmp_path: Path, fake_gpu: list[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Probing the CUDA backend may JIT-build it: auto asks only when the table points there."""
    table = tmp_path / "empty.json"
    dispatch_cli.write_table(table, [], [])
    monkeypatch.setenv(dispatch.ENV_TABLE, str(table))
    assert _auto(16, 4096, torch.bfloat16) == "triton"
    assert fake_gpu == ["triton"]


def test_cli_without_two_kernels_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"device": GPU_NAME, "rows": [r for r in _rows() if r["provider"] != "cuda"]}))
    table = tmp_path / "table.json"
    assert dispatch_cli.main([str(results), "--table", str(table)]) == 1
    assert "no case was timed with both" in capsys.readouterr().out and not table.exists()


def test_bad_tables_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "device_name", lambda device: GPU_NAME)
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="DIVKERNELS_DISPATCH_TABLE=.*missing.json does not exist"):
        dispatch.measured_backend("group_preference_loss", FAKE_CUDA, 16, 4096, torch.bfloat16)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"version": 0, "entries": []}))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(old))
    with pytest.raises(ValueError, match="has version 0, expected 1"):
        dispatch.measured_backend("group_preference_loss", FAKE_CUDA, 16, 4096, torch.bfloat16)


def test_shipped_table_is_valid_and_measured() -> None:
    """Every shipped entry names a real device and a kernel, and says how many cases back it."""
    data = json.loads(dispatch.DEFAULT_TABLE.read_text())
    assert data["version"] == dispatch.TABLE_VERSION
    for entry in data["entries"]:
        assert entry["backend"] in ("triton", "cuda") and entry["device"] and entry["cases"] >= 1
        assert entry["class"].startswith("G") and entry["op"] == "group_preference_loss"
    assert bool(data["entries"]) == bool(data["sources"])


@pytest.mark.triton
@pytest.mark.cuda_ext
def test_runner_output_feeds_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real rows: the smoke suite with both kernels on CPU (interpreter / host build) gives a table."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIVKERNELS_CUDA_HOST_EMULATION", "1")
    assert runner.main(["--suite", "smoke", "--device", "cpu", "--providers", "triton,cuda", "--repeats", "2",
                        "--warmup", "1", "--only", "group_loss/ddpo", "--out", str(tmp_path)]) == 0
    results = sorted(tmp_path.glob("*-smoke-*.json"))
    table = tmp_path / "table.json"
    assert dispatch_cli.main([str(path) for path in results] + ["--table", str(table)]) == 0
    entries = json.loads(table.read_text())["entries"]
    assert [entry["class"] for entry in entries] == ["G8-D512-float32"]
    assert entries[0]["cases"] == 2 and entries[0]["backend"] in ("triton", "cuda")
