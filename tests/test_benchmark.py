"""scripts/benchmark.py at toy size on CPU: every measurement runs and lands in the JSON and the table."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_benchmark_writes_json_and_table(benchmark, tmp_path):
    result = benchmark.main(["--config", "toy", "--device", "cpu", "--out", str(tmp_path), "--warmup", "0",
                             "--runs", "2", "--teacher-steps", "4", "--batch-sizes", "1,2",
                             "--gradient-checkpointing", "off,on", "--train-warmup", "1", "--train-runs", "1"])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["meta"]["configs"] == ["toy"] and saved["meta"]["device"].startswith("cpu")
    # teacher and 1-step student × end-to-end and transformer-only, fp32, compile off (the CPU default)
    cells = {(r["model"], r["mode"], r["dtype"], r["compile"]) for r in saved["latency"]}
    assert cells == {(m, mode, "fp32", "off") for m in ("teacher", "student_1step")
                     for mode in ("end_to_end", "transformer")}
    assert all(r["runs"] == 2 and r["median"] > 0 and r["attention"] == "sdpa" for r in saved["latency"])
    e2e = {r["model"]: r["median"] for r in saved["latency"] if r["mode"] == "end_to_end"}
    assert e2e["teacher"] > e2e["student_1step"]  # 4 guided steps cost more than one plain step
    # DMD training: every batch size with and without gradient checkpointing ran a finite step
    assert {(r["batch_size"], r["gradient_checkpointing"]) for r in saved["training"]} == {
        (1, False), (2, False), (1, True), (2, True)}
    assert all(r["status"] == "ok" and math.isfinite(r["step_ms"]["median"]) for r in saved["training"])
    assert all(r["peak_allocated_gib"] is None for r in saved["training"])  # CPU: not measured, not invented
    # The targets are printed, and not judged on a toy on a CPU
    assert saved["targets"] and all(t["met"] is None for t in saved["targets"])
    table = (tmp_path / "benchmark.md").read_text()
    assert "| toy | teacher | fp32 | off | sdpa | end_to_end |" in table and "## Targets" in table
    assert result["latency"] == saved["latency"]


def test_real_size_configurations_match_pixart_sigma(benchmark):
    """The real-size parts are built from the published numbers (on the meta device: no memory, no time)."""
    import torch

    with torch.device("meta"):
        t512, t1024, vae = benchmark.sigma_transformer(512), benchmark.sigma_transformer(1024), benchmark.sdxl_vae()
        t5 = benchmark.t5_xxl_encoder()
    config = t512.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim, config.caption_channels,
            config.out_channels, config.sample_size) == (28, 16, 72, 4096, 8, 64)
    assert t1024.config.sample_size == 128 and t1024.config.interpolation_scale == 2
    assert 0.60e9 < sum(p.numel() for p in t512.parameters()) < 0.62e9  # PixArt-Σ XL/2: 0.61B
    assert 4.7e9 < sum(p.numel() for p in t5.parameters()) < 4.8e9  # the T5 v1.1 XXL encoder: 4.76B
    assert vae.config.scaling_factor == 0.13025 and tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
