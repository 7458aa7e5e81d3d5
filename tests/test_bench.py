"""kvzip bench: the protocol's arithmetic, and the command on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXT
from typer.testing import CliRunner

from kvzip import bench
from kvzip.cli.app import app


def test_score_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    ref = torch.randn(50, 30)
    targets = torch.randint(0, 30, (50,))
    same = bench.score(ref, ref.clone(), targets)
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1 == 1.0
    assert same.dppl_pct == pytest.approx(0.0, abs=1e-9)
    noisy = bench.score(ref, ref + 0.5 * torch.randn(50, 30), targets)
    assert noisy.kl > 1e-3 and noisy.top1 < 1.0


def test_kivi_int4_counts_five_bits_and_bounds_its_error():
    torch.manual_seed(0)
    kv = torch.randn(2, 3, 2, 64, 64)
    decoded, bits = bench.kivi_roundtrip(kv, 4)
    assert bits == pytest.approx(5.0)  # 4 bits + fp16 scale and zero per 32 elements
    assert decoded.shape == kv.shape
    # Asymmetric 4-bit: error at most half a step of the group's range / 15.
    k_range = kv[0].amax(2, keepdim=True) - kv[0].amin(2, keepdim=True)
    assert ((decoded[0] - kv[0]).abs() <= k_range / 15 / 2 * 1.01 + 1e-3).all()
    _, bits2 = bench.kivi_roundtrip(kv, 2)
    assert bits2 == pytest.approx(3.0)


def test_bench_command_on_a_tiny_model(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    png = tmp_path / "chart.png"
    result = CliRunner().invoke(app, [
        "bench", str(text), "--model", str(tiny_model_dir), "--levels", "lossless",
        "--codecs", "", "--prefix", "300", "--cont", "100", "--json", "--plot", str(png), "-q",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    means = {row["method"]: row for row in data["means"]}
    assert set(means) == {"fp16", "zstd-fp16", "kivi-int4", "kivi-int2", "lossless"}
    assert means["lossless"]["kl"] == 0.0 and means["lossless"]["top1"] == 1.0
    assert means["kivi-int2"]["kl"] > means["kivi-int4"]["kl"] > 0
    assert means["zstd-fp16"]["bits_per_element"] < 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_texts_that_are_too_short(tiny_model_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    result = CliRunner().invoke(app, ["bench", str(text), "--model", str(tiny_model_dir), "-q",
                                      "--prefix", "300", "--cont", "100"])
    assert result.exit_code != 0
    assert "tokens the protocol needs" in result.stderr
