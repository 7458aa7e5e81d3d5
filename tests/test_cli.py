"""The command line, driven in-process on a tiny model saved as a local directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEXT
from safetensors.numpy import load_file
from tiny import save_tiny_model
from typer.testing import CliRunner

from kvzip.cli.app import app
from kvzip.formats import open_kvz
from kvzip.formats.spec import PREAMBLE_SIZE

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvzip: error:"), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def kvz(tiny_model_dir, doc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kvz") / "doc.kvz"
    result = run("encode", doc, "-o", out, "--model", tiny_model_dir, "--chunk-tokens", "64",
                 "--level", "lossless", "-q")
    assert result.exit_code == 0, result.output
    return out


def test_encode_prints_a_summary(tiny_model_dir, doc, tmp_path):
    out = tmp_path / "x.kvz"
    result = run("encode", doc, "-o", out, "--model", tiny_model_dir, "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tokens"] == len(TEXT.encode())  # byte-level tokenizer
    assert summary["file_bytes"] == out.stat().st_size
    assert summary["levels"] == ["balanced"]  # the default level
    assert summary["ratio"] > 5.0


def test_encode_stores_several_levels(tiny_model_dir, doc, tmp_path):
    out = tmp_path / "multi.kvz"
    # --levels, as issue 6 spells it, is the same option as --level
    result = run("encode", doc, "-o", out, "--model", tiny_model_dir, "--levels",
                 "small,balanced,high", "-q")
    assert result.exit_code == 0, result.output
    levels = {lvl["name"]: lvl for lvl in json.loads(run("info", out, "--json").stdout)["levels"]}
    assert list(levels) == ["small", "balanced", "high"]
    assert levels["small"]["payload_bytes"] < levels["balanced"]["payload_bytes"] < levels["high"]["payload_bytes"]


def test_encode_reads_stdin(tiny_model_dir, tmp_path):
    out = tmp_path / "stdin.kvz"
    result = run("encode", "-", "-o", out, "--model", tiny_model_dir, "-q", input=TEXT)
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_info_shows_header_and_levels(kvz):
    result = run("info", kvz, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == len(TEXT.encode())
    assert data["chunks"] == -(-data["tokens"] // 64)
    assert [lvl["name"] for lvl in data["levels"]] == ["lossless"]
    assert data["model"]["architecture"] == "llama"
    human = run("info", kvz)
    assert human.exit_code == 0 and "lossless" in human.stdout and "ratio" in human.stdout


def test_verify_ok(kvz):
    result = run("verify", kvz)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK")


def test_decode_writes_the_safetensors_contract(kvz, tmp_path, tiny_model_dir):
    out = tmp_path / "doc.safetensors"
    result = run("decode", kvz, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    tensors = load_file(out)
    n = len(TEXT.encode())
    assert tensors["token_ids"].dtype.name == "int64" and tensors["token_ids"].shape == (n,)
    assert sorted(k for k in tensors if k != "token_ids") == sorted(
        f"layers.{i}.{kind}" for i in range(3) for kind in ("key", "value", "positions")
    )
    assert tensors["layers.0.key"].shape == (2, n, 16)
    assert tensors["layers.2.positions"].dtype.name == "int64"
    assert tensors["layers.2.positions"].tolist() == [list(range(n))] * 2


def test_generate_matches_generation_from_text(kvz, tiny_model_dir):
    result = run("generate", kvz, "--prompt", " and then", "-n", "6", "--model",
                 tiny_model_dir, "--compare", "--json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["baseline_identical"] is True
    assert len(data["new_token_ids"]) == 6


# ----------------------------------------------------------------- bad input
def test_missing_input(tiny_model_dir, tmp_path):
    out = tmp_path / "o.kvz"
    assert_one_line_error(run("encode", tmp_path / "nope.txt", "-o", out, "--model", tiny_model_dir), "not found")
    assert not out.exists()


def test_unreadable_input(tiny_model_dir, tmp_path):
    out = tmp_path / "o.kvz"
    assert_one_line_error(run("encode", tmp_path, "-o", out, "--model", tiny_model_dir), "directory")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    assert_one_line_error(run("encode", binary, "-o", out, "--model", tiny_model_dir), "UTF-8")
    assert not out.exists()


def test_empty_text(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "o.kvz"
    assert_one_line_error(run("encode", empty, "-o", out, "--model", tiny_model_dir), "empty")
    assert not out.exists()


def test_text_longer_than_context(tiny_model_dir, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("a" * 600)  # the tiny model's context is 512 tokens
    out = tmp_path / "o.kvz"
    assert_one_line_error(run("encode", long, "-o", out, "--model", tiny_model_dir), "600 tokens", "512")
    assert not out.exists()


def test_unknown_level(tiny_model_dir, doc, tmp_path):
    out = tmp_path / "o.kvz"
    assert_one_line_error(run("encode", doc, "-o", out, "--model", tiny_model_dir, "--level", "ultra"), "ultra")
    assert not out.exists()


def test_not_a_kvz(doc, tmp_path):
    assert_one_line_error(run("info", doc), "not a .kvz")
    out = tmp_path / "o.safetensors"
    assert_one_line_error(run("decode", doc, "-o", out))
    assert not out.exists()


def test_missing_kvz(tmp_path):
    assert_one_line_error(run("info", tmp_path / "missing.kvz"), "No such file")


def test_truncated_file(kvz, tmp_path):
    data = kvz.read_bytes()
    for cut in (10, PREAMBLE_SIZE + 5, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.kvz"
        bad.write_bytes(data[:cut])
        assert_one_line_error(run("info", bad))
        assert_one_line_error(run("verify", bad))


def test_unknown_major_version(kvz, tmp_path):
    data = bytearray(kvz.read_bytes())
    data[8:10] = (99).to_bytes(2, "little")
    bad = tmp_path / "v99.kvz"
    bad.write_bytes(bytes(data))
    assert_one_line_error(run("info", bad), "version")


def test_flipped_bit_in_payload(kvz, tmp_path):
    with open_kvz(kvz) as reader:
        last = reader.kv_entries("lossless")[-1]
    data = bytearray(kvz.read_bytes())
    data[last.offset + last.length // 2] ^= 0x10  # inside the last KV payload
    bad = tmp_path / "flip.kvz"
    bad.write_bytes(bytes(data))
    result = run("verify", bad)
    assert result.exit_code != 0
    assert "checksum" in result.output.lower()
    out = tmp_path / "flip.safetensors"
    assert_one_line_error(run("decode", bad, "-o", out, "-q"), "checksum")
    assert not out.exists()


def test_kvz_attached_to_another_model(kvz, tmp_path):
    other = save_tiny_model(tmp_path / "other", "llama", seed=7)
    assert_one_line_error(
        run("generate", kvz, "--prompt", "x", "--model", other, "-q"), "does not match"
    )


def test_existing_output_survives_a_failed_encode(tiny_model_dir, tmp_path):
    out = tmp_path / "keep.kvz"
    out.write_bytes(b"precious")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run("encode", empty, "-o", out, "--model", tiny_model_dir))
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_version_and_help():
    assert run("--version").stdout.startswith("kvzip ")
    result = run("--help")
    assert result.exit_code == 0
    for command in ("encode", "info", "decode", "verify", "generate"):
        assert command in result.stdout


def test_output_to_a_closed_pipe_is_a_quiet_exit_not_an_internal_error(kvz):
    """`kvzip info F | head -1`: when the reader has gone, kvzip stops without a message
    (rich ends the write with SystemExit), never 'internal error'."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "kvzip", "info", str(kvz), "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
