"""Memory and size limits: a reader prices what a header declares before allocating it,
an attached file must have the model's geometry, and encode refuses a text too large
for the context before reading or tokenizing it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TEXT
from test_cli import assert_one_line_error, run

from kvzip import api
from kvzip.errors import ContextTooLongError, InputError, MemoryLimitError, ModelMismatchError
from kvzip.formats import encode_header, limits, parse_header
from kvzip.formats.limits import memory_limit, parse_size, set_memory_limit
from kvzip.levels import open_cache

ATTACK = Path(__file__).parent / "fixtures" / "attacks" / "lossless_inflates_1gib.kvz"


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_MEMORY, raising=False)
    set_memory_limit(None)
    yield
    set_memory_limit(None)


@pytest.fixture(scope="module")
def tiny_kvz(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("limits") / "doc.kvz"
    api.encode(TEXT, out, model=tiny_llama, levels=["lossless"], chunk_tokens=64)
    return out


@pytest.mark.parametrize("text, size", [
    ("8G", 8 << 30), ("512M", 512 << 20), ("512MiB", 512 << 20), ("1.5g", 3 << 29),
    ("4096", 4096), ("64kb", 64 << 10),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "8X", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(InputError, match="--max-memory"):
        parse_size(text)


def test_the_default_limit_is_half_of_ram_and_the_environment_and_option_override_it(monkeypatch):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory_limit() == ram // 2
    monkeypatch.setenv(limits.ENV_MAX_MEMORY, "3G")
    assert memory_limit() == 3 << 30
    set_memory_limit(1 << 20)
    assert memory_limit() == 1 << 20


def test_an_honest_file_over_the_limit_is_refused_before_decoding():
    """The probe's file: 34 KB that inflates to 1 GiB; verify must neither decode it
    (no 2 GiB of RSS) nor call it damaged."""
    set_memory_limit(512 << 20)
    with open_cache(ATTACK) as reader:
        with pytest.raises(MemoryLimitError, match=r"3\.0 GiB.*--max-memory or KVZIP_MAX_MEMORY"):
            reader.verify(decode=True)
        with pytest.raises(MemoryLimitError, match="level 'lossless'"):
            reader.decode_level("lossless")


def test_verify_cli_names_the_option(tmp_path):
    result = run("verify", ATTACK, "--max-memory", "256M")
    assert result.exit_code == MemoryLimitError.exit_code
    assert_one_line_error(result, "--max-memory", "256.0 MiB")
    result = run("decode", ATTACK, "-o", tmp_path / "x.safetensors", "--max-memory", "256M", "-q")
    assert_one_line_error(result, "--max-memory")
    assert list(tmp_path.iterdir()) == []


def test_a_limit_counts_the_level_and_the_chunks_in_flight(tiny_kvz):
    with open_cache(tiny_kvz) as reader:
        level = reader.level_bytes()
        assert level == 2 * 3 * 2 * reader.header.token_count * 16 * 4  # tiny llama, float32
        set_memory_limit(level)  # the array fits, the decoder's working chunk does not
        with pytest.raises(MemoryLimitError):
            reader.decode_level("lossless", decoders=1)
        set_memory_limit(level * 8)
        assert reader.decode_level("lossless", decoders=1).shape[3] == reader.header.token_count


def test_a_forged_geometry_is_refused_before_decoding(tiny_llama, tiny_kvz):
    """A copied fingerprint on other dimensions, or more tokens than the context."""
    with open_cache(tiny_kvz) as reader:
        raw = reader.header.raw
    tiny_llama.check_stored_cache(parse_header(encode_header(raw)))
    for forged in ({"kv_heads": 64}, {"num_layers": 3000}, {"token_count": 100_000}):
        header = parse_header(encode_header({**raw, **forged}))
        with pytest.raises(ModelMismatchError, match="declares"):
            tiny_llama.check_stored_cache(header)


def test_encode_refuses_a_huge_file_without_reading_it(tiny_model_dir, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        handle.truncate(1 << 30)  # sparse: reading it would take a GiB
    out = tmp_path / "big.kvz"
    result = run("encode", big, "-o", out, "--model", tiny_model_dir, "-q")
    assert result.exit_code == ContextTooLongError.exit_code
    assert_one_line_error(result, "1073741824 bytes", "context can hold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_encode_refuses_a_huge_stdin(tiny_model_dir, tiny_llama, tmp_path):
    text = "a" * (tiny_llama.max_text_bytes + 1)
    result = run("encode", "-", "-o", tmp_path / "x.kvz", "--model", tiny_model_dir, "-q", input=text)
    assert_one_line_error(result, "stdin holds more than")


def test_the_library_refuses_a_huge_text_before_tokenizing(tiny_llama, tmp_path, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized a text that cannot fit")

    monkeypatch.setattr(tiny_llama, "document_ids", no_tokenizing)
    with pytest.raises(ContextTooLongError, match="characters"):
        api.encode("x" * (tiny_llama.max_text_bytes + 1), tmp_path / "x.kvz", model=tiny_llama,
                   levels=["lossless"])


def test_a_text_that_fits_is_not_refused(tiny_llama):
    """The bound over-estimates: a context's worth of the longest tokens still passes."""
    assert tiny_llama.max_text_bytes >= tiny_llama.max_context * 13  # "<|endoftext|>"
    tiny_llama.check_text_size(tiny_llama.max_context * 13)
