"""kvzip bench: the protocol's arithmetic, and the command on a tiny model."""

from __future__ import annotations

import json
import math

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


# ------------------------------------------------------ profiles, sweep, speed
CAL_TEXT = (TEXT + "Numbers 0123456789 and (brackets) [lists] {sets}; punctuation!? ") * 8


@pytest.fixture(scope="module")
def bench_env(tiny_model_dir, tmp_path_factory):
    """A profile for the tiny model, calibrated on two named texts, in a fresh profile dir."""
    from kvzip.levels import write_profile
    from kvzip.levels.calibrate import CalibrationOptions, calibrate
    from kvzip.model import KVModel

    root = tmp_path_factory.mktemp("bench-profiles")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVZIP_PROFILE_DIR", str(root / "profiles"))
        km = KVModel.load(str(tiny_model_dir))
        data, _ = calibrate(km, [("cal-a.txt", CAL_TEXT), ("cal-b.txt", CAL_TEXT[::-1])],
                            CalibrationOptions(tokens_per_text=320, continuation=64))
        prof = write_profile(data, path=root / "tiny.kvzprofile")
        text = root / "eval.txt"
        text.write_text(TEXT * 3)
        yield {"km": km, "profile": prof, "text": text, "root": root}


@pytest.fixture(scope="module")
def full_run(bench_env, tiny_model_dir):
    """kvzip bench with the profile, --uncalibrated, --sweep, --lengths and --plot, as JSON."""
    png = bench_env["root"] / "frontier.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVZIP_PROFILE_DIR", str(bench_env["root"] / "profiles"))
        result = CliRunner().invoke(app, [
            "bench", str(bench_env["text"]), "--model", str(tiny_model_dir), "--levels", "balanced,small",
            "--codecs", "", "--no-baselines", "--prefix", "300", "--cont", "64",
            "--profile", str(bench_env["profile"].path), "--uncalibrated", "--sweep",
            "--lengths", "128,256", "--plot", str(png), "--json", "-q",
        ])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), png


def test_default_texts_are_never_calibration_texts():
    from kvzip.levels.calibrate import BENCH_TEXT_NAMES, default_calibration_texts

    bench_names = {p.name for p in bench.default_texts()}
    assert bench_names <= set(BENCH_TEXT_NAMES)
    assert not bench_names & {p.name for p in default_calibration_texts()}


def test_bench_refuses_texts_the_profile_was_calibrated_on(bench_env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(bench_env["root"] / "profiles"))
    overlap = bench_env["root"] / "sub" / "cal-b.txt"
    overlap.parent.mkdir(exist_ok=True)
    overlap.write_text(TEXT * 3)
    result = CliRunner().invoke(app, [
        "bench", str(bench_env["text"]), str(overlap), "--model", str(tiny_model_dir),
        "--levels", "balanced", "--codecs", "", "--prefix", "300", "--cont", "64",
        "--profile", bench_env["profile"].digest, "-q",
    ])
    assert result.exit_code == 2, result.output
    assert "cal-b.txt is a calibration text of profile" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # The library refuses too, before any work.
    with pytest.raises(bench.InputError, match="calibration text"):
        bench.check_no_overlap([overlap], bench_env["profile"])
    bench.check_no_overlap([bench_env["text"]], bench_env["profile"])


def test_levels_are_calibrated_and_the_profile_cost_is_reported(full_run, bench_env):
    data, _ = full_run
    means = {row["method"]: row for row in data["means"]}
    assert set(means) == {"balanced", "small", "balanced-uncal", "small-uncal"}
    prof = data["profile"]
    assert prof["digest"] == bench_env["profile"].digest
    assert prof["bytes"] == bench_env["profile"].path.stat().st_size > 0
    assert prof["calibration_texts"] == ["cal-a.txt", "cal-b.txt"]
    assert set(prof["break_even"]) == {"balanced", "small"}
    for level, be in prof["break_even"].items():
        saved = (means[f"{level}-uncal"]["file_bytes"] - means[level]["file_bytes"]) / 300
        assert be["saved_bytes_per_token"] == pytest.approx(saved)
        if saved > 0:
            assert be["break_even_tokens"] == math.ceil(prof["bytes"] / saved)
        else:
            assert be["break_even_tokens"] == "none"
    # calibrated and uncalibrated codecs really differ
    assert means["balanced"]["file_bytes"] != means["balanced-uncal"]["file_bytes"]


def test_break_even_arithmetic():
    assert bench.break_even(1000, [(100, 300), (100, 500)], 10) == {
        "saved_bytes_per_token": 30.0, "break_even_tokens": 34}
    assert bench.break_even(1000, [(300, 100)], 10)["break_even_tokens"] == "none"
    assert bench.break_even(1000, [(300, 300)], 10)["break_even_tokens"] == "none"


def test_sweep_traces_monotone_curves(full_run):
    data, png = full_run
    means = data["sweep"]["means"]
    curves: dict[str, list] = {}
    for p in means:
        curves.setdefault(p["curve"], []).append(p)
    assert set(curves) == {"kvzip", "kvzip-uncal", "cachegen", "kivi"}
    assert len(data["sweep"]["points"]) == len(means)  # one text
    for curve in ("kvzip", "kvzip-uncal"):
        pts = sorted(curves[curve], key=lambda p: p["setting"])
        assert [p["setting"] for p in pts] == list(bench.STEP_FACTORS)
        bits = [p["bits_per_element"] for p in pts]
        assert all(a > b for a, b in zip(bits, bits[1:])), (curve, bits)  # coarser step, fewer bits
        assert pts[0]["kl"] < pts[-1]["kl"]
    pts = sorted(curves["cachegen"], key=lambda p: p["setting"])
    bits = [p["bits_per_element"] for p in pts]
    assert all(a < b for a, b in zip(bits, bits[1:])), bits  # more bins, more bits
    kivi = {p["setting"]: p for p in curves["kivi"]}
    assert sorted(kivi) == [2.0, 3.0, 4.0, 8.0]
    overhead = [kivi[b]["bits_per_element"] - b for b in (2.0, 3.0, 4.0, 8.0)]
    assert overhead == pytest.approx([overhead[0]] * 4) and overhead[0] >= 1  # scales and zeros
    assert kivi[8.0]["kl"] < kivi[2.0]["kl"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_section_reports_positive_fields(full_run):
    data, _ = full_run
    speed = data["speed"]
    assert [r["tokens"] for r in speed] == [128, 256]
    for r in speed:
        assert r["level"] == "balanced" and r["codec"] == "kvzip-profile"
        for key in ("bits_per_element", "file_bytes", "encode_meps", "decode_meps", "decode_warm_meps",
                    "decoders", "peak_decode_bytes", "cache_fp32_bytes", "peak_ratio", "ttft_kvz_s",
                    "ttft_prefill_s", "ttft_speedup"):
            assert r[key] > 0, (key, r)
        assert r["cache_fp32_bytes"] == 2 * 3 * 2 * r["tokens"] * 16 * 4  # tiny llama geometry
        assert r["peak_ratio"] == pytest.approx(r["peak_decode_bytes"] / r["cache_fp32_bytes"])
        assert r["ttft_speedup"] == pytest.approx(r["ttft_prefill_s"] / r["ttft_kvz_s"])


def test_speed_counts_decode_threads_and_caps_at_the_context(bench_env, monkeypatch, tmp_path):
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(bench_env["root"] / "profiles"))
    km = bench_env["km"]
    config = bench.BenchConfig(texts=[bench_env["text"]], levels=[], codecs=[], quality=False,
                               lengths=[600], speed_level="small", decoders=2, chunk_tokens=64)
    (row,), used = bench.run_speed(km, config, bench_env["profile"], tmp_path)
    assert used == ["eval.txt"]
    assert row.tokens == km.max_context - 1  # 600 is beyond the tiny model's 512
    assert row.decoders == 2
    # the decoded cache itself is part of the peak
    assert row.peak_decode_bytes >= row.cache_fp32_bytes


def test_decode_memory_sees_an_allocation():
    import numpy as np

    with bench.DecodeMemory() as mem:
        x = np.ones(64 * 2**20 // 8)
        del x
    assert mem.peak_bytes >= 48 * 2**20, mem.peak_bytes


def test_speed_only_needs_lengths_and_a_long_enough_text(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "profiles"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    base = ["bench", str(text), "--model", str(tiny_model_dir), "-q", "--if-no-profile", "uncalibrated"]
    result = CliRunner().invoke(app, [*base, "--speed-only"])
    assert result.exit_code == 2 and "needs --lengths" in result.stderr
    result = CliRunner().invoke(app, [*base, "--speed-only", "--lengths", "400"])
    assert result.exit_code == 2 and "tokens; the speed section needs 401" in result.stderr
    result = CliRunner().invoke(app, [*base, "--speed-only", "--lengths", "64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"] == [] and data["profile"] is None
    assert data["config"]["speed_texts"] == ["t.txt"]
    assert data["speed"][0]["codec"] == "kvzip-lossy"  # no profile: the uncalibrated level


def test_no_profile_error_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "empty"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    result = CliRunner().invoke(app, [
        "bench", str(text), "--model", str(tiny_model_dir), "-q", "--levels", "balanced",
        "--prefix", "300", "--cont", "64", "--if-no-profile", "error",
    ])
    assert result.exit_code != 0
    assert "no calibration profile" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_importance_section_rows_per_scorer_mode_and_fraction(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    result = CliRunner().invoke(app, [
        "bench", str(text), "--model", str(tiny_model_dir), "--levels", "lossless", "--codecs", "",
        "--no-baselines", "--prefix", "300", "--cont", "64", "--importance", "prefill,keynorm",
        "--keep", "0.9,0.5", "--keep-rule", "shared,head", "--json", "-q",
    ])
    assert result.exit_code == 0, result.output
    section = json.loads(result.stdout)["importance"]
    rows = section["means"]
    assert len(rows) == 2 * (1 + 2 * 2) and len(section["rows"]) == len(rows)
    by = {(r["scorer"], r["mode"], r["keep"], r["rule"]): r for r in rows}
    for scorer in ("prefill", "keynorm"):
        only = by[(scorer, "importance", None, None)]
        assert only["kl"] == 0.0 and only["kept_fraction"] == 1.0  # lossless: weights change nothing
        for rule in ("shared", "head"):
            half, most = by[(scorer, "keep", 0.5, rule)], by[(scorer, "keep", 0.9, rule)]
            assert half["kept_fraction"] == pytest.approx(0.5, abs=0.01)
            assert half["bits_per_context_element"] < most["bits_per_context_element"]
            assert half["bits_per_context_element"] == pytest.approx(0.5 * half["bits_per_element"], rel=0.05)
            assert half["kl"] > 0
    bad = CliRunner().invoke(app, ["bench", str(text), "--model", str(tiny_model_dir), "--keep", "0.5", "-q"])
    assert bad.exit_code != 0 and "--importance" in bad.stderr


def test_keep_weigh_rows_drop_the_same_entries_and_weigh_them(tiny_model_dir, tmp_path, monkeypatch):
    """--keep-weigh: each keep row once more with the kept entries coded by class, as
    ``encode --keep F --importance SCORER`` writes them: the same entries, other bits."""
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "empty"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    args = ["bench", str(text), "--model", str(tiny_model_dir), "--levels", "balanced", "--codecs", "",
            "--no-baselines", "--prefix", "300", "--cont", "64", "--if-no-profile", "uncalibrated",
            "--importance", "prefill", "--keep", "0.5", "-q"]
    result = CliRunner().invoke(app, [*args, "--keep-weigh", "--json"])
    assert result.exit_code == 0, result.output
    by = {(r["mode"], r["keep"]): r for r in json.loads(result.stdout)["importance"]["means"]}
    assert sorted(by, key=str) == sorted([("importance", None), ("keep", 0.5), ("keep+importance", 0.5)], key=str)
    plain, weighed = by[("keep", 0.5)], by[("keep+importance", 0.5)]
    assert weighed["kept_fraction"] == plain["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    assert weighed["file_bytes"] != plain["file_bytes"] and weighed["kl"] != plain["kl"]
    bad = CliRunner().invoke(app, [*args[:-3], "--keep-weigh", "-q"])
    assert bad.exit_code != 0 and "--keep FRACTIONS" in bad.stderr


def test_calibrated_rows_spend_bits_as_the_profile_says(bench_env, monkeypatch, tmp_path):
    """A profile that turns prefill importance on: the calibrated rows are coded by class
    (as encode codes them), and --uniform codes them uniformly again."""
    from kvzip.codecs.profile import profile_to_bytes
    from kvzip.levels import write_profile

    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(bench_env["root"] / "profiles"))
    base = bench_env["profile"]
    weighing = write_profile(profile_to_bytes(base.tensors, {**base.meta, "importance": "prefill"}),
                             path=tmp_path / "weighing.kvzprofile")
    km = bench_env["km"]
    got = {}
    for name, prof, uniform in (("plain", base, False), ("profile", weighing, False), ("uniform", weighing, True)):
        config = bench.BenchConfig(texts=[bench_env["text"]], levels=["balanced"], codecs=[], baselines=False,
                                   prefix=300, cont=64, profile=str(prof.path), uniform=uniform)
        result = bench.run_bench(km, config)
        (row,) = result.rows
        got[name] = (row.file_bytes, result.profile.importance)
    assert got["plain"] == got["uniform"]  # the same codec on the same cache: the same bytes
    assert got["plain"][1] is None and got["profile"][1] == "prefill"
    assert got["profile"][0] != got["plain"][0]  # the classes travel in the chunk
    # the speed section codes its files the same way
    config = bench.BenchConfig(texts=[bench_env["text"]], levels=[], codecs=[], quality=False,
                               lengths=[200], chunk_tokens=64)
    sizes = [bench.run_speed(km, config, p, tmp_path)[0][0].file_bytes for p in (base, weighing)]
    assert sizes[0] != sizes[1]


def test_uncalibrated_rows_spend_bits_as_encode_does_without_a_profile(bench_env, monkeypatch, tmp_path):
    """The -uncal rows are coded as an encode without a profile codes them (by
    UNCALIBRATED_IMPORTANCE); --uniform codes them uniformly; the calibrated row of a
    uniform profile stays uniform."""
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(bench_env["root"] / "profiles"))
    km = bench_env["km"]
    got = {}
    for uniform in (False, True):
        config = bench.BenchConfig(texts=[bench_env["text"]], levels=["balanced"], codecs=[], baselines=False,
                                   prefix=300, cont=64, profile=str(bench_env["profile"].path),
                                   uncalibrated=True, uniform=uniform)
        rows = {r.method: r.file_bytes for r in bench.run_bench(km, config).rows}
        got[uniform] = rows
    assert got[False]["balanced"] == got[True]["balanced"]  # the profile weighs nothing
    assert got[False]["balanced-uncal"] != got[True]["balanced-uncal"]  # the classes travel in the chunk
