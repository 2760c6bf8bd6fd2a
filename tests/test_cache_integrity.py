"""Cache entries (dequantized GGUF, LoRA fine-tune) are built once under a lock, checked on every load, and rebuilt
once when damaged. Every test converts a real tiny GGUF file and damages the real entry on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lmaudit.checks.core.cache_entry as cache_entry
import lmaudit.checks.core.loading as loading
from lmaudit.checks.core.cache_entry import MANIFEST, STAMP, CacheEntryWarning
from lmaudit.checks.core.errors import CacheEntryError, ModelLoadError
from lmaudit.checks.core.finetune import lora_finetune
from lmaudit.checks.core.loading import LoadedModel, load_model
from tests.checkpoints import byte_tokenizer, save_tiny_gguf
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMAUDIT_CACHE", str(tmp_path / "cache"))
    # Four 1 KiB sampled blocks instead of sixteen 64 KiB ones, so the tiny safetensors file (~140 KB) has bytes
    # that the cheap check does not read, as a real multi-GB file does.
    monkeypatch.setattr(cache_entry, "N_SAMPLES", 4)
    monkeypatch.setattr(cache_entry, "SAMPLE_BYTES", 1024)
    return tmp_path / "cache"


def _weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _overwrite_keeping_mtime(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place and put the mtime back: a change that size and mtime cannot see."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def _unsampled_offset(path: Path) -> int:
    """A byte offset in the middle of the tensor data that no sampled block covers."""
    spans = cache_entry._spans(path.stat().st_size)
    offset = (spans[1][0] + spans[1][1] + spans[2][0]) // 2
    assert all(not start <= offset < start + length for start, length in spans)
    return offset


def test_first_load_builds_and_fully_checks_then_loads_cheaply(gguf_file: Path, cache: Path) -> None:
    first = load_model(str(gguf_file))
    entry = Path(first.cache_entry or "")
    assert (first.cache_hit, first.cache_check) == (False, "full")
    assert entry.parent == cache / "gguf" and entry.name == first.source_sha256
    manifest = json.loads((entry / MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= manifest["files"].keys()
    assert (entry / STAMP).is_file()
    second = load_model(str(gguf_file))
    assert (second.cache_hit, second.cache_check) == (True, "cheap")
    asked = load_model(str(gguf_file), verify=True)
    assert (asked.cache_hit, asked.cache_check) == (True, "full")
    assert first.content_hash == second.content_hash == asked.content_hash


def test_entry_files_get_ordinary_permissions(gguf_file: Path, cache: Path) -> None:
    umask = os.umask(0o022)
    try:
        entry = Path(load_model(str(gguf_file)).cache_entry or "")
    finally:
        os.umask(umask)
    assert oct(entry.stat().st_mode & 0o777) == oct(0o755)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in entry.iterdir()}
    assert set(modes.values()) == {oct(0o644)}, modes  # safetensors itself writes 0600


def test_zeroed_sampled_block_is_caught_by_the_cheap_check_and_rebuilt(gguf_file: Path, cache: Path) -> None:
    good = load_model(str(gguf_file))
    weights = _weights(good)
    safetensors = Path(good.cache_entry or "") / "model.safetensors"
    _overwrite_keeping_mtime(safetensors, cache_entry._spans(safetensors.stat().st_size)[1][0], bytes(512))
    with pytest.warns(CacheEntryWarning, match=r"model.safetensors: the block at byte \d+ differs.*rebuilt"):
        again = load_model(str(gguf_file))
    assert (again.cache_hit, again.cache_check) == (False, "full")
    assert again.content_hash == good.content_hash and _same_weights(weights, _weights(again))


def test_zeroed_bytes_between_blocks_pass_the_cheap_check_and_fail_the_full_one(gguf_file: Path, cache: Path) -> None:
    good = load_model(str(gguf_file))
    safetensors = Path(good.cache_entry or "") / "model.safetensors"
    _overwrite_keeping_mtime(safetensors, _unsampled_offset(safetensors), bytes(256))
    unseen = load_model(str(gguf_file))
    assert (unseen.cache_hit, unseen.cache_check) == (True, "cheap")
    assert unseen.content_hash != good.content_hash  # the hash of what is loaded shows it anyway
    with pytest.warns(CacheEntryWarning, match="model.safetensors: sha256 differs"):
        verified = load_model(str(gguf_file), verify=True)
    assert (verified.cache_hit, verified.cache_check) == (False, "full")
    assert verified.content_hash == good.content_hash


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda entry: (entry / MANIFEST).unlink(), "incomplete: no lmaudit-manifest.json"),
    (lambda entry: (entry / "config.json").unlink(), "config.json is missing"),
    (lambda entry: os.truncate(entry / "model.safetensors", 1000), "model.safetensors has 1000 bytes"),
])
def test_incomplete_entry_is_rebuilt_once_with_a_warning(gguf_file: Path, cache: Path, damage: object,
                                                         reason: str) -> None:
    good = load_model(str(gguf_file))
    damage(Path(good.cache_entry or ""))  # type: ignore[operator]
    with pytest.warns(CacheEntryWarning) as caught:
        again = load_model(str(gguf_file))
    assert len(caught) == 1 and reason in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert again.cache_hit is False and again.content_hash == good.content_hash
    assert load_model(str(gguf_file)).cache_hit is True  # repaired for good: no second rebuild


def test_touched_file_is_fully_checked_and_kept(gguf_file: Path, cache: Path, recwarn: pytest.WarningsRecorder) -> None:
    good = load_model(str(gguf_file))
    safetensors = Path(good.cache_entry or "") / "model.safetensors"
    os.utime(safetensors, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime (cp without -p)
    touched = load_model(str(gguf_file))
    assert (touched.cache_hit, touched.cache_check) == (True, "full")
    assert (touched.cache_hit, load_model(str(gguf_file)).cache_check) == (True, "cheap")  # the new mtime recorded
    assert not [w for w in recwarn if issubclass(w.category, CacheEntryWarning)]


def test_entry_that_cannot_be_rebuilt_is_refused_naming_the_path(gguf_file: Path, cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Path(load_model(str(gguf_file)).cache_entry or "")
    (entry / MANIFEST).unlink()

    def broken(gguf_path: Path, out_dir: Path) -> None:
        raise ModelLoadError(f"could not dequantize GGUF file {gguf_path}: disk full")

    monkeypatch.setattr(loading, "_dequantize_into", broken)
    with pytest.raises(CacheEntryError, match=rf"disk full\. Delete {entry} and run again"):
        load_model(str(gguf_file))


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "LMAUDIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


SLOW_CONVERSION = """
    import json, os, sys, time
    from pathlib import Path
    from lmaudit.checks.core import loading

    gguf, marks, n_ready = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    convert = loading._dequantize_into

    def slow(gguf_path, out_dir):
        (marks / f"build-{os.getpid()}").write_text("")
        time.sleep(float(sys.argv[4]))
        convert(gguf_path, out_dir)

    loading._dequantize_into = slow
    (marks / f"ready-{os.getpid()}").write_text("")
    while len(list(marks.glob("ready-*"))) < n_ready:  # start loading together
        time.sleep(0.01)
    loaded = loading.load_model(str(gguf))
    print(json.dumps({"hit": loaded.cache_hit, "hash": loaded.content_hash}))
"""


def test_two_processes_converting_at_once_build_once(gguf_file: Path, cache: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = [_python(SLOW_CONVERSION, str(gguf_file), str(marks), "2", "1.0", env=_env(cache)) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(list(marks.glob("build-*"))) == 1
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["hash"] == results[1]["hash"]
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".")]


def test_staging_left_by_a_killed_conversion_is_cleaned(gguf_file: Path, cache: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _python(SLOW_CONVERSION, str(gguf_file), str(marks), "1", "600", env=_env(cache))
    try:
        deadline = time.monotonic() + 120
        while not list(marks.glob("build-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        staging = [p for p in (cache / "gguf").iterdir() if ".staging-" in p.name]
        assert len(staging) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert staging[0].is_dir()  # the killed build left it behind
    loaded = load_model(str(gguf_file))
    assert loaded.cache_hit is False and not staging[0].exists()
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".")]


def test_finetune_entry_is_verified_and_retrained_once_when_damaged(cache: Path) -> None:
    model = tiny_model("llama")
    base = LoadedModel.from_model(model, byte_tokenizer(), spec="tiny")
    tuned = lora_finetune(base, steps=2, batch_size=4)
    assert (tuned.cache_hit, tuned.cache_check) == (False, "full")
    entry = Path(tuned.cache_entry or "")
    assert entry.parent == cache / "finetune" and (entry / MANIFEST).is_file()
    assert lora_finetune(base, steps=2, batch_size=4).cache_check == "cheap"
    safetensors = entry / "model.safetensors"
    _overwrite_keeping_mtime(safetensors, 0, bytes(64))  # the safetensors header: the first sampled block
    with pytest.warns(CacheEntryWarning, match="LoRA fine-tune of tiny"):
        again = lora_finetune(base, steps=2, batch_size=4)
    assert again.cache_hit is False and again.extras["cache_hit"] == "False"
    assert again.content_hash == tuned.content_hash  # the recipe is seeded: retraining gives the same weights


def test_audit_verify_makes_the_session_check_the_entry_in_full(gguf_file: Path, cache: Path) -> None:
    """``--audit-verify``: the plugin session loads with the full check (cache_check "full"), without it the cheap
    one; the model card records which ran."""
    from lmaudit.checks.plugin.options import AuditOptions
    from lmaudit.checks.plugin.session import AuditSession

    load_model(str(gguf_file))  # builds the entry and its first full check
    cheap = AuditSession(AuditOptions(model=str(gguf_file))).load(str(gguf_file))
    full = AuditSession(AuditOptions(model=str(gguf_file), verify=True)).load(str(gguf_file))
    assert (cheap.cache_check, full.cache_check) == ("cheap", "full")
