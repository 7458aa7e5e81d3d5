"""Calibration profiles: kvzip calibrate, the kvzip-profile codec, and finding profiles."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT
from test_cli import assert_one_line_error, run

from kvzip import api
from kvzip.codecs import ChunkContext, codec_from_config
from kvzip.codecs.profile import profile_from_bytes, profile_to_bytes
from kvzip.errors import CodecError, InputError, ProfileError, ProfileMismatchError, ProfileNotFoundError
from kvzip.formats import open_kvz
from kvzip.levels import (
    UNCALIBRATED_IMPORTANCE,
    codec_for_level,
    find_profile,
    level_config,
    list_profiles,
    model_profile,
    read_profile_file,
    write_kvz,
    write_profile,
)
from kvzip.levels import profiles as profile_mod
from kvzip.levels.calibrate import CalibrationOptions, calibrate
from kvzip.model import KVModel

CAL_TEXT = (TEXT + "Numbers 0123456789 and (brackets) [lists] {sets}; punctuation!? ") * 8


@pytest.fixture
def profile_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "profiles"
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(d))
    monkeypatch.setattr(profile_mod, "_LOADED", {})  # profiles found in memory by earlier tests
    return d


@pytest.fixture(scope="module")
def km(tiny_model_dir) -> KVModel:
    return KVModel.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def profile_bytes(km) -> tuple[bytes, dict]:
    opts = CalibrationOptions(tokens_per_text=320, continuation=64)
    return calibrate(km, [("a", CAL_TEXT), ("b", CAL_TEXT[::-1])], opts)


def test_profile_is_bound_to_the_model_and_named_by_its_hash(km, profile_bytes, profile_dir):
    data, report = profile_bytes
    prof = write_profile(data)
    assert prof.path == profile_dir / f"{prof.digest}.kvzprofile"
    assert prof.model_fingerprint == km.identity()["fingerprint"]
    assert prof.geometry == (km.num_layers, km.kv_heads, km.head_dim)
    assert find_profile(prof.digest) is not None
    assert [p.digest for p in list_profiles(km.identity()["fingerprint"])] == [prof.digest]
    assert list_profiles("0" * 64) == []
    assert report["sensitivity"] is not None and len(report["sensitivity"]) == 2


@pytest.mark.parametrize("basis", ["pca-layer", "pca"])
def test_basis_inverts_and_decorrelates(km, basis):
    opts = CalibrationOptions(basis=basis, allocation="flat", tokens_per_text=320, continuation=64)
    t = profile_from_bytes(calibrate(km, [("a", CAL_TEXT)], opts)[0]).tensors
    groups, width = t["key_fwd"].shape[1], t["key_fwd"].shape[2]
    assert (groups, width) == ((1, km.kv_heads * km.head_dim) if basis == "pca-layer" else (km.kv_heads, km.head_dim))
    for fwd, inv in (("key_fwd", "key_inv"), ("value_fwd", "value_inv")):
        prod = np.einsum("lhij,lhjk->lhik", t[inv].astype(np.float64), t[fwd].astype(np.float64))
        assert np.allclose(prod, np.eye(width), atol=1e-4)
    # the calibration data is decorrelated in the new basis
    kv = km.prefill(km.encode_text(CAL_TEXT, special_tokens=True)[:320]).dense.numpy()
    v = kv[1, 0, :, 4:].transpose(1, 0, 2).reshape(-1, groups, width)[:, 0]
    y = (v - t["value_mean"][0].reshape(groups, width)[0]) @ t["value_fwd"][0, 0].T
    c = np.cov(y.T)
    off = c - np.diag(np.diag(c))
    assert np.abs(off).max() < 0.1 * np.abs(np.diag(c)).max()
    # and the layer basis mixes heads, the per-head one never does
    mixed = np.abs(t["key_fwd"][0, 0][: km.head_dim, km.head_dim :]).max() if groups == 1 else 0.0
    assert (mixed > 1e-3) == (basis == "pca-layer")


def test_plain_options_give_the_identity_basis(km):
    opts = CalibrationOptions(key_weighting="mse", value_weighting="mse", basis="none", allocation="flat",
                              tokens_per_text=256, continuation=64)
    data, report = calibrate(km, [("a", CAL_TEXT)], opts)
    t = profile_from_bytes(data).tensors
    assert np.allclose(t["key_fwd"], np.eye(km.head_dim)) and np.allclose(t["value_inv"], np.eye(km.head_dim))
    assert report["sensitivity"] is None


def test_profile_codec_roundtrip_is_close_and_deterministic(km, profile_bytes, profile_dir):
    prof = write_profile(profile_bytes[0])
    kv = km.prefill(km.encode_text(TEXT, special_tokens=True)).dense.numpy()
    n = kv.shape[3]
    ctx = ChunkContext(0, n, km.num_layers, km.kv_heads, km.head_dim, "float32", km.rope_inv_freq())
    errs = {}
    for level in ("high", "balanced", "small"):
        codec = codec_for_level(level, prof)
        assert codec.config()["id"] == "kvzip-profile"
        payload = codec.encode(kv, ctx)
        assert codec.encode(kv, ctx) == payload
        again = codec_from_config(json.loads(json.dumps(codec.config())), prof)
        out = again.decode(payload, ctx)
        assert np.array_equal(out, codec.decode(payload, ctx))
        errs[level] = float(np.sqrt(np.mean((out - kv) ** 2)) / np.sqrt(np.mean(kv**2)))
    assert errs["high"] < errs["balanced"] < errs["small"] < 1.0
    with pytest.raises(ProfileMismatchError):
        codec.decode(payload, ChunkContext(0, n, km.num_layers + 1, km.kv_heads, km.head_dim, "float32",
                                           km.rope_inv_freq()))


def test_encode_calibrates_once_then_reuses(km, tmp_path, profile_dir):
    out1, out2 = tmp_path / "a.kvz", tmp_path / "b.kvz"
    s1 = api.encode(TEXT, out1, model=km, levels=["balanced", "lossless"])
    assert s1.profile is not None
    assert len(list(profile_dir.glob("*.kvzprofile"))) == 1
    s2 = api.encode(TEXT, out2, model=km, levels=["small"])
    assert s2.profile == s1.profile
    with open_kvz(out1) as r:
        assert r.header.raw["profile"]["digest"] == s1.profile
        assert r.header.levels[0].codec["profile"] == s1.profile
        assert r.header.levels[1].codec["id"] == "bytegroup-zstd"
    info = api.info(out1)
    assert info["profile"]["digest"] == s1.profile and info["profile"]["available"]


def test_if_no_profile_choices(km, tmp_path, profile_dir):
    s = api.encode(TEXT, tmp_path / "u.kvz", model=km, levels=["balanced"], if_no_profile="uncalibrated")
    assert s.profile is None
    with open_kvz(tmp_path / "u.kvz") as r:
        assert r.header.levels[0].codec["id"] == "kvzip-lossy"
    with pytest.raises(ProfileNotFoundError):
        api.encode(TEXT, tmp_path / "e.kvz", model=km, levels=["balanced"], if_no_profile="error")
    assert not (tmp_path / "e.kvz").exists()
    # lossless needs no profile at all
    s = api.encode(TEXT, tmp_path / "l.kvz", model=km, levels=["lossless"], if_no_profile="error")
    assert s.profile is None


def test_decoding_without_the_profile_is_a_clear_error(km, tmp_path, profile_dir, monkeypatch):
    out = tmp_path / "p.kvz"
    api.encode(TEXT, out, model=km, levels=["balanced"])
    ref = api.load_kv(out).kv.dense
    # a fresh process with the profile directory: decodes the same numbers
    code = ("import sys, numpy as np; from kvzip.api import load_kv; "
            "np.save(sys.argv[1], load_kv(sys.argv[2]).kv.dense.numpy())")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "k.npy"), str(out)], check=True)
    assert np.array_equal(np.load(tmp_path / "k.npy"), ref.numpy())
    # a fresh process without it: one line, exit code 6
    from kvzip.levels import profiles as profile_mod

    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(profile_mod, "_LOADED", {})
    with pytest.raises(ProfileNotFoundError):
        api.load_kv(out)
    result = run("decode", out, "-o", tmp_path / "x.safetensors")
    assert_one_line_error(result, "profile")
    assert result.exit_code == 6
    assert not (tmp_path / "x.safetensors").exists()
    info = api.info(out)
    assert info["profile"]["available"] is False


def test_profile_for_another_model_is_refused(km, profile_bytes, tmp_path, profile_dir):
    t = profile_from_bytes(profile_bytes[0]).tensors
    foreign = write_profile(profile_to_bytes(t, {"model_fingerprint": "f" * 64}))
    with pytest.raises(ProfileMismatchError, match="calibrated for model"):
        model_profile(km, foreign.path)
    kv = km.prefill(km.encode_text(TEXT, special_tokens=True)).dense
    with pytest.raises(ProfileMismatchError):
        write_kvz(kv, list(range(kv.shape[3])), tmp_path / "f.kvz", km, levels=["balanced"],
                  chunk_tokens=64, dtype="float32", profile=foreign)
    assert not (tmp_path / "f.kvz").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan", "tamper"])
def test_damaged_profiles_are_refused(profile_bytes, tmp_path, profile_dir, damage):
    data = profile_bytes[0]
    good = profile_from_bytes(data)
    path = profile_dir / f"{good.digest}.kvzprofile"
    profile_dir.mkdir(parents=True, exist_ok=True)
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    elif damage == "nan":
        t = dict(good.tensors)
        t["step_scale"] = t["step_scale"].copy()
        t["step_scale"][0, 0] = np.nan
        from safetensors.numpy import save

        path.write_bytes(save(t, metadata={"kvzip": json.dumps(good.meta)}))
    else:  # valid profile, but not the one the name promises
        t = dict(good.tensors)
        t["step_scale"] = t["step_scale"] * 2
        path.write_bytes(profile_to_bytes(t, {k: v for k, v in good.meta.items() if k != "format"}))
    with pytest.raises(ProfileError):
        find_profile(good.digest)
    with pytest.raises(ProfileError):
        read_profile_file(path) if damage != "tamper" else find_profile(good.digest)


def test_bad_digest_and_codec_config(profile_dir):
    with pytest.raises(ProfileError, match="SHA-256"):
        find_profile("../../etc/passwd")
    with pytest.raises(ProfileNotFoundError, match="kvzprofile"):
        find_profile("a" * 64)
    with pytest.raises(CodecError, match="needs its calibration profile aaaaaaaaaaaa"):
        codec_from_config(level_config("balanced", "a" * 64))


def test_a_profile_codec_is_built_from_its_config_and_the_profile_alone(km, profile_dir, monkeypatch):
    """No disk or environment read in a codec's constructor: the levels layer finds the
    profile and hands it over; the wrong one is refused."""
    prof = model_profile(km, if_missing="calibrate")
    config = level_config("balanced", prof.digest)
    def no_looking(*args, **kwargs):
        raise AssertionError("a codec looked for its profile")

    monkeypatch.setenv("KVZIP_PROFILE_DIR", "/nonexistent")
    for name in ("find_profile", "read_profile_file", "list_profiles"):
        monkeypatch.setattr(profile_mod, name, no_looking)
    codec = codec_from_config(config, prof)
    assert codec.profile is prof and codec.config() == config
    other = dataclasses.replace(prof, digest="b" * 64)
    with pytest.raises(ProfileMismatchError, match="not the bbbbbbbbbbbb"):
        codec_from_config(config, other)


def test_cli_calibrate_encode_info_profiles(tiny_model_dir, tmp_path, profile_dir):
    text = tmp_path / "cal.txt"
    text.write_text(CAL_TEXT)
    prof_path = tmp_path / "mine.kvzprofile"
    r = run("calibrate", text, "--model", tiny_model_dir, "-o", prof_path, "--tokens-per-text", "256",
            "--json", "-q")
    assert r.exit_code == 0, r.output
    digest = json.loads(r.stdout)["digest"]
    assert read_profile_file(prof_path).digest == digest
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    out = tmp_path / "d.kvz"
    r = run("encode", doc, "-o", out, "--model", tiny_model_dir, "--profile", prof_path, "-q", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["profile"] == digest
    r = run("info", out, "--json")
    assert json.loads(r.stdout)["profile"]["digest"] == digest
    r = run("info", out)
    assert r.exit_code == 0 and "profile" in r.stdout and digest[:16] in r.stdout
    assert not list(profile_dir.glob("*.kvzprofile"))  # -o wrote where asked, not into the dir
    r = run("calibrate", tmp_path / "missing.txt", "--model", tiny_model_dir)
    assert_one_line_error(r, "missing.txt")
    r = run("encode", doc, "-o", tmp_path / "e.kvz", "--model", tiny_model_dir, "--if-no-profile", "error")
    assert_one_line_error(r, "kvzip calibrate")
    r = run("encode", doc, "-o", tmp_path / "e.kvz", "--model", tiny_model_dir, "--profile", doc)
    assert_one_line_error(r)
    assert not (tmp_path / "e.kvz").exists()
    r = run("profiles")
    assert r.exit_code == 0


def test_calibrated_levels_beat_uncalibrated_ones_on_kl(km, profile_bytes, profile_dir):
    """On a continuation the tiny model reads after the cache, the calibrated
    balanced level must disturb the output less than the uncalibrated one at no
    more bits (a random model has little structure, so this is a weak bound)."""
    prof = write_profile(profile_bytes[0])
    ids = km.encode_text(TEXT * 2, special_tokens=True)
    prefix, cont = ids[:-32], ids[-32:]
    kv = km.prefill(prefix).dense
    ref = torch.log_softmax(km.teacher_force(kv, cont).double(), -1)
    n = kv.shape[3]
    ctx = ChunkContext(0, n, km.num_layers, km.kv_heads, km.head_dim, "float32", km.rope_inv_freq())
    res = {}
    for name, cfg in (("cal", level_config("balanced", prof.digest)), ("uncal", level_config("balanced"))):
        codec = codec_from_config(cfg, prof if "profile" in cfg else None)
        payload = codec.encode(kv.numpy(), ctx)
        test = torch.log_softmax(km.teacher_force(torch.from_numpy(codec.decode(payload, ctx)), cont).double(), -1)
        res[name] = (len(payload), float((ref.exp() * (ref - test)).sum(-1).mean()))
    assert res["cal"][1] > 0 and res["uncal"][1] > 0
    assert res["cal"][0] * res["cal"][1] < res["uncal"][0] * res["uncal"][1] * 4


def test_calibration_checks_the_default_level_and_turns_importance_on_only_when_it_pays(km):
    """Step 6: the calibrated balanced level's KL on the calibration texts decides whether
    the profile's levels spend bits by the prefill's attention."""
    texts = [("a", CAL_TEXT), ("b", CAL_TEXT[::-1])]
    opts = CalibrationOptions(tokens_per_text=320, continuation=64)
    _, report = calibrate(km, texts, opts)
    q = report["quality"]
    assert q["level"] == "balanced" and q["texts"] == ["a", "b"]
    assert len(q["uniform"]["kl"]) == 2 and 1 < q["uniform"]["mean_bits"] < 8
    # the tiny random model's levels are far within the default bound: uniform, unmeasured
    assert q["uniform"]["mean_kl"] < opts.importance_above
    assert report["importance"] is None and "prefill" not in q
    # bound 0: the weighted level is measured, and chosen only if its KL is lower
    data, report = calibrate(km, texts, dataclasses.replace(opts, importance_above=0.0))
    q = report["quality"]
    assert len(q["prefill"]["kl"]) == 2
    better = q["prefill"]["mean_kl"] < q["uniform"]["mean_kl"]
    assert report["importance"] == ("prefill" if better else None)
    assert profile_from_bytes(data).importance == report["importance"]
    with pytest.raises(InputError):
        CalibrationOptions(importance_above=-1).check()


def _with_importance(data: bytes, scorer: str | None) -> bytes:
    prof = profile_from_bytes(data)
    return profile_to_bytes(prof.tensors, {**prof.meta, "importance": scorer})


def test_encode_spends_bits_by_the_importance_the_profile_names(km, profile_bytes, tmp_path, profile_dir):
    weighing = write_profile(_with_importance(profile_bytes[0], "prefill"))
    plain = write_profile(_with_importance(profile_bytes[0], None))
    runs = {
        "profile": dict(profile=weighing.digest),
        "none": dict(profile=weighing.digest, importance="none"),
        "other": dict(profile=weighing.digest, importance="keynorm"),
        "plain": dict(profile=plain.digest),
        "lossless": dict(profile=weighing.digest, levels=["lossless"]),
    }
    got = {}
    for name, kwargs in runs.items():
        out = tmp_path / f"{name}.kvz"
        summary = api.encode(TEXT, out, model=km, **{"levels": ["balanced"], **kwargs})
        with open_kvz(out) as r:
            record = r.header.raw.get("importance")
        got[name] = (summary.importance, None if record is None else record["scorer"])
        assert api.load_kv(out).kv.token_count == len(km.document_ids(TEXT, None))
    assert got == {"profile": ("prefill", "prefill"), "none": (None, None), "other": ("keynorm", "keynorm"),
                   "plain": (None, None), "lossless": (None, None)}
    listed = run("profiles").stdout.replace("\n", "")
    assert "levels by prefill importance" in listed and listed.count("importance") == 1
    with pytest.raises(InputError):
        api.encode(TEXT, tmp_path / "bad.kvz", model=km, importance="psychic")
    assert not (tmp_path / "bad.kvz").exists()


def test_without_a_profile_the_lossy_levels_spend_bits_by_the_prefills_attention(km, tmp_path, profile_dir):
    """No profile, no measurement to choose by: the uncalibrated levels weigh by
    UNCALIBRATED_IMPORTANCE unless told --importance none."""
    assert UNCALIBRATED_IMPORTANCE == "prefill"
    runs = {"default": {}, "none": dict(importance="none"), "lossless": dict(levels=["lossless"])}
    got = {}
    for name, kwargs in runs.items():
        out = tmp_path / f"{name}.kvz"
        summary = api.encode(TEXT, out, model=km, **{"levels": ["balanced"], "if_no_profile": "uncalibrated", **kwargs})
        with open_kvz(out) as r:
            record = r.header.raw.get("importance")
            assert r.header.raw.get("profile") is None
        got[name] = (summary.importance, None if record is None else record["scorer"])
    assert got == {"default": ("prefill", "prefill"), "none": (None, None), "lossless": (None, None)}
    assert api.info(tmp_path / "default.kvz")["levels"][0]["importance_classes"] is not None
    assert api.verify(tmp_path / "default.kvz").ok


def test_the_default_importance_gives_way_where_the_scored_cache_would_not_fit(km, tmp_path, profile_dir, monkeypatch):
    """Scoring holds the model's cache and the copy it scores: where the two would pass half
    the memory limit (the cache alone does not, so the prefill keeps it in memory) the file
    is coded uniformly; scoring that is asked for still runs."""
    cache = api._cache_bytes(km, len(km.document_ids(TEXT, None)))
    options = dict(model=km, levels=["balanced"], if_no_profile="uncalibrated")
    monkeypatch.setattr(api, "memory_limit", lambda: 3 * cache)  # cache <= limit / 2 < 2 x cache
    summary = api.encode(TEXT, tmp_path / "u.kvz", **options)
    assert summary.importance is None
    with open_kvz(tmp_path / "u.kvz") as r:
        assert r.header.raw.get("importance") is None
    assert api.encode(TEXT, tmp_path / "a.kvz", importance="prefill", **options).importance == "prefill"
    monkeypatch.setattr(api, "memory_limit", lambda: 4 * cache)  # 2 x cache = limit / 2: fits
    assert api.encode(TEXT, tmp_path / "w.kvz", **options).importance == "prefill"


def test_cli_encode_importance_none_and_calibrate_bound(tiny_model_dir, tmp_path, profile_dir):
    text = tmp_path / "cal.txt"
    text.write_text(CAL_TEXT)
    r = run("calibrate", text, "--model", tiny_model_dir, "--tokens-per-text", "256", "--importance-above", "-2")
    assert_one_line_error(r, "--importance-above")
    r = run("calibrate", text, "--model", tiny_model_dir, "--tokens-per-text", "256", "-q")
    assert r.exit_code == 0 and "uniform precision" in r.output, r.output
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    r = run("encode", doc, "-o", tmp_path / "n.kvz", "--model", tiny_model_dir, "--importance", "none", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["importance"] is None
    r = run("encode", doc, "-o", tmp_path / "p.kvz", "--model", tiny_model_dir, "--importance", "prefill", "--json")
    assert json.loads(r.stdout)["importance"] == "prefill"
    r = run("encode", doc, "-o", tmp_path / "x.kvz", "--model", tiny_model_dir, "--importance", "nonsense")
    assert_one_line_error(r, "nonsense")
    assert not (tmp_path / "x.kvz").exists()


def test_a_cache_kept_on_disk_is_coded_uniformly_and_explicit_scoring_there_is_refused(
        km, profile_bytes, tmp_path, profile_dir):
    """Scoring holds the whole cache in memory: where the prefill keeps it on disk the
    profile's importance gives way, and asking for scoring there is an error."""
    weighing = write_profile(_with_importance(profile_bytes[0], "prefill"))
    out = tmp_path / "disk.kvz"
    summary = api.encode(TEXT, out, model=km, profile=weighing.digest, prefill_cache="disk")
    assert summary.importance is None
    with open_kvz(out) as r:
        assert r.header.raw.get("importance") is None
    for kwargs in (dict(importance="prefill"), dict(keep=0.5)):
        with pytest.raises(InputError, match="prefill-cache disk"):
            api.encode(TEXT, tmp_path / "no.kvz", model=km, profile=weighing.digest, prefill_cache="disk", **kwargs)
    assert not (tmp_path / "no.kvz").exists()


@pytest.mark.parametrize("basis", ["pca-layer", "pca"])
def test_importance_classes_are_a_positions_where_the_basis_maps_a_layers_heads_jointly(km, basis, tmp_path, profile_dir):
    """A per-layer basis mixes a layer's heads: its "head" blocks hold components of all of
    them, so classes drawn per head would scale the wrong components.  There a position has
    one class in every head, by its scores summed over the heads; a per-head basis keeps
    each head's own classes."""
    from kvzip import importance

    assert km.kv_heads > 1
    opts = CalibrationOptions(basis=basis, allocation="flat", tokens_per_text=320, continuation=64)
    prof = write_profile(calibrate(km, [("a", CAL_TEXT)], opts)[0])
    codec = codec_for_level("balanced", prof)
    assert codec.codes_heads_apart() == (basis == "pca")
    scored = importance.score(km, km.document_ids(TEXT, None), "prefill")
    used = importance.apply(scored, [("balanced", codec)], prof, weigh=True)
    own = importance.classes(scored.scores)  # each head's classes from its own scores
    assert any((c != c[:1]).any() for c in own)  # the heads do disagree on this text
    if basis == "pca-layer":
        summed = importance.classes([s.sum(axis=0, keepdims=True) for s in scored.scores])
        for got, want in zip(used.classes, summed):
            assert (got == want).all()  # broadcast: the same class in every head
        assert used.header["importance"]["heads"] == "layer"
    else:
        assert all((got == want).all() for got, want in zip(used.classes, own))
        assert "heads" not in used.header["importance"]
    out = tmp_path / "w.kvz"
    api.encode(TEXT, out, model=km, levels=["balanced"], profile=str(prof.path), importance="prefill")
    with open_kvz(out) as r:
        assert r.header.raw["importance"] == used.header["importance"]
    assert api.verify(out).ok
