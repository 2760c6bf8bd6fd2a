"""Ctrl-C on a running ``lmaudit`` command: exit status 130 and one line on stderr, no traceback.

The command is the installed ``lmaudit`` script in a subprocess, forced to be slow (perplexity over thousands of
windows of a large corpus on a tiny model); SIGINT is sent once its forward-pass counter shows the check is
running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.checkpoints import save_tiny_llama
from tests.test_verdict import default_sigint


def lmaudit_command() -> list[str]:
    script = Path(sys.executable).parent / "lmaudit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lmaudit.checks.cli.main"]


def test_ctrl_c_exits_130_with_one_line(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "tiny", layers=2)
    corpus = tmp_path / "big.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40_000)  # 1.8 M byte tokens: a minute
    argv = [*lmaudit_command(), "run", "perplexity", "--model", str(model), "--corpus", str(corpus),
            "--param", "seq_len=128", "--param", "n_windows=14000", "--param", "batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               preexec_fn=default_sigint)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read1(4096), b"")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"passes" not in b"".join(chunks):  # the check is running (its counter shows after 1 s)
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the command ended or never started its check: {b''.join(chunks).decode()[-2000:]}")
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    stderr = b"".join(chunks).decode()
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert status == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert lines[-1] == "lmaudit: interrupted"
    assert process.stdout.read() == b""  # no partial result
