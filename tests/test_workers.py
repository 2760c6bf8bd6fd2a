"""pytest-xdist: ``-n 2`` runs the audits grouped by file on two workers, each loading the model once, and the
controller writes ONE JSON file and ONE HTML report, identical to a serial run's apart from timings, worker ids,
thread counts and the command line."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_plugin import FAKE_CONFTEST, write_audit
from tests.test_plugin import isolated_result_cache as isolated_result_cache  # noqa: F401  (autouse)
from tests.test_plugin import tiny_dir as tiny_dir  # noqa: F401  (the module-scoped tiny model fixture)

pytest.importorskip("xdist")

WORKER_CONFTEST = FAKE_CONFTEST + '''

import os


class PidParams(CheckParams):
    value: float = 1.0


def fake_pid(context, params) -> FakeResult:
    """Deterministic values; notes which process ran it on which loaded model."""
    with open("loads.txt", "a") as handle:
        handle.write(f"{os.getpid()} {id(context.model)}\\n")
    return FakeResult(params.value, "pid", context.model.adapter.n_layers, [{"token": "t", "score": params.value}])


if "fake_pid" not in CHECKS:
    register_check("fake_pid", params=PidParams, area="arithmetic")(fake_pid)
'''


def _audits(pytester: pytest.Pytester) -> None:
    write_audit(pytester, "audits:\n" + "".join(
        f"  - {{name: a{i}, check: fake_pid, params: {{value: {i}}}, expect: {{value: {{max: 2}}}}}}\n"
        for i in range(4)), name="a.yaml")
    write_audit(pytester, "audits:\n" + "".join(
        f"  - {{name: b{i}, check: fake_pid, params: {{value: {10 + i}}}}}\n" for i in range(3)), name="b.yaml")
    (pytester.path / "audits" / "test_python.py").write_text(
        "def test_depth(audit_model, audit_expect):\n"
        "    audit_expect('n_layers', audit_model.adapter.n_layers, equals=2)\n")


def _run(pytester: pytest.Pytester, tiny: Path, name: str, *extra: str) -> tuple[int, str, dict, str]:
    """The serial run in-process (faster), the pytest-xdist one in a real subprocess (workers are processes)."""
    args = ["audits/", "--model", str(tiny), "--audit-json", f"{name}.json", "--audit-report", f"{name}.html",
            "--audit-no-cache", "-p", "no:cacheprovider", *extra]
    if not extra:
        result = pytester.runpytest_inprocess(*args)
        code, output = int(result.ret), "\n".join(result.outlines)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        process = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=pytester.path, env=env,
                                 capture_output=True, text=True, timeout=600)
        code, output = process.returncode, process.stdout + process.stderr
    data = json.loads((pytester.path / f"{name}.json").read_text())
    return code, output, data, (pytester.path / f"{name}.html").read_text()


def _without_timings_and_workers(document: dict) -> dict:
    document = copy.deepcopy(document)
    run = document["run"]
    for key in ("duration_s", "started", "invocation", "workers"):
        run.pop(key)
    run["model"].pop("load_seconds")
    run["precision"].pop("threads")  # each CPU worker takes its share of the cores
    for audit in document["audits"]:
        audit.pop("duration_s")
        audit.pop("worker")
    return document


def test_two_workers_write_one_report_identical_to_a_serial_run(pytester: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    pytester.makeconftest(WORKER_CONFTEST)
    (pytester.path / "audits").mkdir()
    _audits(pytester)
    serial_code, _, serial, serial_html = _run(pytester, tiny_dir, "serial")
    (pytester.path / "loads.txt").unlink()
    code, output, parallel, html = _run(pytester, tiny_dir, "parallel", "-n", "2")

    assert code == serial_code == pytest.ExitCode.TESTS_FAILED, output  # a2 and a3 miss their threshold
    assert parallel["verdict"] == serial["verdict"] == "FAIL"
    assert _without_timings_and_workers(parallel) == _without_timings_and_workers(serial)
    assert parallel["run"]["workers"] == ["gw0", "gw1"] and serial["run"]["workers"] == []
    assert {a["worker"] for a in parallel["audits"]} == {"gw0", "gw1"}
    assert [a["key"] for a in parallel["audits"]][:2] == ["a.yaml::a0", "a.yaml::a1"]
    # Grouped by file: every audit of one file ran in one worker; each worker loaded the model once.
    by_file: dict[str, set[str]] = {}
    for audit in parallel["audits"]:
        by_file.setdefault(audit["source"], set()).add(audit["worker"])
    assert all(len(workers) == 1 for workers in by_file.values()), by_file
    loads: dict[str, set[str]] = {}
    for line in (pytester.path / "loads.txt").read_text().splitlines():
        pid, model = line.split()
        loads.setdefault(pid, set()).add(model)
    assert len(loads) == 2 and all(len(models) == 1 for models in loads.values()), loads
    # One HTML report with every row, in the serial order.
    rows = re.findall(r'<tr class="row-\w+">\s*<td><a href="#([^"]+)"', html)
    assert rows == re.findall(r'<tr class="row-\w+">\s*<td><a href="#([^"]+)"', serial_html) and len(rows) == 8
    assert not list(pytester.path.glob("parallel*.json.*")) and "lmaudit: FAIL — 8 claims checked" in output


@pytest.mark.parametrize(("worker", "gpus", "expected"), [
    (None, 0, "cpu"), ("gw0", 0, "cpu"), (None, 2, "cuda:0"), ("gw0", 2, "cuda:0"), ("gw1", 2, "cuda:1"),
    ("gw2", 2, "cuda:0"), ("gw3", 4, "cuda:3"),
])
def test_device_auto_gives_each_worker_its_own_gpu(
    monkeypatch: pytest.MonkeyPatch, worker: str | None, gpus: int, expected: str
) -> None:
    import torch

    from lmaudit.checks.plugin.options import AuditOptions
    from lmaudit.checks.plugin.session import AuditSession

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    session = AuditSession(AuditOptions(device="auto"), worker=worker)
    assert session.device() == expected and session.placement() == {"device": expected}
    assert AuditSession(AuditOptions(device="cpu"), worker=worker).device() == "cpu"


@pytest.mark.parametrize(("cpus", "workers", "threads"), [(2, 2, 1), (8, 2, 4), (2, 4, 1), (16, 3, 5), (1, 1, 1)])
def test_each_cpu_worker_takes_its_share_of_the_cores(cpus: int, workers: int, threads: int) -> None:
    from lmaudit.checks.plugin.options import AuditOptions
    from lmaudit.checks.plugin.session import AuditSession, worker_threads

    assert worker_threads(cpus, workers) == threads
    assert AuditSession(AuditOptions(device="cpu")).threads() is None  # serial: torch's default
    assert AuditSession(AuditOptions(device="cpu", threads=3), worker="gw1", n_workers=2).threads() == 3
    assert AuditSession(AuditOptions(device="cpu"), worker="gw1", n_workers=2).threads() is not None
