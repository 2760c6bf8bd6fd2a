"""The plugin's command-line options, and their validation before anything runs.

Every option that names a file is checked in ``pytest_configure``: a typo is a usage error (exit 4) before a model
loads, never an option that is silently ignored or a failure half an hour into the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmaudit.checks.core.corpora import CORPUS_NAMES
from lmaudit.checks.core.loading import DEFAULT_MODEL, DEVICE_MAP_STRATEGIES
from lmaudit.checks.core.loading import DTYPES as LOADER_DTYPES
from lmaudit.checks.harness.audit_file import PROFILES

DTYPES: tuple[str, ...] = tuple(LOADER_DTYPES)  # what the loader supports
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("lmaudit", "lmaudit: audits of language-model internals")
    group.addoption("--model", dest="audit_model", default=None,
                    help=f"model under audit: alias, HF directory, .gguf file or hf:org/name (default {DEFAULT_MODEL})")
    group.addoption("--compare-model", dest="compare_model", default=None,
                    help="a second model (e.g. a fine-tune) for invariance and comparison audits")
    group.addoption("--audit-report", dest="audit_report", default=None,
                    help="where to write the HTML report (default audit-report.html)")
    group.addoption("--audit-json", dest="audit_json", default=None,
                    help="also write the results as JSON here (rewritten, marked incomplete, as each audit finishes)")
    group.addoption("--audit-baseline", dest="audit_baseline", default=None,
                    help="an earlier --audit-json file: show deltas, and check audits' 'baseline:' conditions")
    group.addoption("--audit-profile", dest="audit_profile", default="full", choices=PROFILES,
                    help="quick: the cheap subset for pre-merge CI; full: everything (default)")
    group.addoption("--corpus", dest="audit_corpus", default=None,
                    help=f"perplexity corpus: {', '.join(CORPUS_NAMES)} or a text file path (default pydoc)")
    group.addoption("--corpus-path", dest="corpus_path", default=None,
                    help="where the corpus lives: a text file, or the wikitext-2 directory or file")
    group.addoption("--audit-dtype", dest="audit_dtype", default="float32", choices=DTYPES,
                    help="precision the model is loaded and audited at (default float32)")
    group.addoption("--device", dest="audit_device", default="auto",
                    help="auto (default: cuda if present, else cpu; one GPU per pytest-xdist worker), cpu, cuda, "
                         "cuda:N or mps")
    group.addoption("--device-map", dest="audit_device_map", default=None,
                    help=f"spread the model over devices: {', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON file mapping "
                         "module names to devices (excludes --device)")
    group.addoption("--audit-threads", dest="audit_threads", default=None, type=int, metavar="N",
                    help="torch CPU threads (default: torch's; a pytest-xdist worker on the CPU takes its share of "
                         "the cores, so workers never oversubscribe them)")
    group.addoption("--audit-seed", dest="audit_seed", default=0, type=int)
    group.addoption("--trust-remote-code", dest="trust_remote_code", action="store_true", default=False,
                    help="allow model repositories to run their own code (off by default)")
    group.addoption("--audit-pin", dest="audit_pin", default=None, metavar="PATH",
                    help="write a pinned regression suite for --model from this run (a YAML file, e.g. "
                         "audits/pins/audit_mymodel.yaml)")
    group.addoption("--audit-pins", dest="audit_pins", action="append", default=[], metavar="DIR_OR_FILE",
                    help="also run these pin files (pins are not collected from audits/pins/ otherwise); repeatable")
    group.addoption("--audit-verify", dest="audit_verify", action="store_true", default=False,
                    help="check every file of the model's cache entry in full (sha256) before loading it, not only "
                         "the cheap size, mtime and sampled-block check")
    group.addoption("--audit-no-cache", dest="audit_no_cache", action="store_true", default=False,
                    help="neither read nor write the result cache (~/.cache/lmaudit/results or $LMAUDIT_CACHE)")


@dataclass
class AuditOptions:
    model: str = DEFAULT_MODEL
    compare_model: str | None = None
    report: Path | None = Path("audit-report.html")
    json: Path | None = None
    baseline: Path | None = None
    profile: str = "full"
    corpus: str | None = None  # None: pydoc, or the file --corpus-path names
    corpus_path: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    device_map: str | None = None
    seed: int = 0
    threads: int | None = None
    trust_remote_code: bool = False
    report_explicit: bool = False  # --audit-report given: write even when no audit item ran
    pin: Path | None = None
    pins: list[Path] = field(default_factory=list)
    no_cache: bool = False
    verify: bool = False

    @property
    def wants_report(self) -> bool:
        return self.report_explicit or self.json is not None

    @classmethod
    def from_config(cls, config: pytest.Config) -> AuditOptions:
        """Read the options; raise :class:`pytest.UsageError` for any that cannot work (before anything runs)."""
        report = config.getoption("audit_report")
        json_path = config.getoption("audit_json")
        baseline = config.getoption("audit_baseline")
        pin = config.getoption("audit_pin")
        options = cls(
            model=config.getoption("audit_model") or DEFAULT_MODEL,
            compare_model=config.getoption("compare_model"),
            report=Path(report or "audit-report.html"),
            json=Path(json_path) if json_path else None,
            baseline=Path(baseline) if baseline else None,
            profile=config.getoption("audit_profile"),
            corpus=config.getoption("audit_corpus"),
            corpus_path=config.getoption("corpus_path"),
            dtype=config.getoption("audit_dtype"),
            device=config.getoption("audit_device"),
            device_map=config.getoption("audit_device_map"),
            seed=config.getoption("audit_seed"),
            threads=config.getoption("audit_threads"),
            trust_remote_code=config.getoption("trust_remote_code"),
            report_explicit=report is not None,
            pin=Path(pin) if pin else None,
            pins=[Path(p) for p in config.getoption("audit_pins")],
            no_cache=config.getoption("audit_no_cache"),
            verify=config.getoption("audit_verify"),
        )
        options.validate()
        return options

    def validate(self) -> None:
        self._validate_corpus()
        if self.threads is not None and self.threads < 1:
            raise pytest.UsageError(f"--audit-threads {self.threads}: give at least 1")
        if not _DEVICE.match(self.device):
            raise pytest.UsageError(f"--device {self.device}: expected auto, cpu, cuda, cuda:N or mps")
        if self.device_map is not None:
            if self.device != "auto":
                raise pytest.UsageError(f"--device {self.device} and --device-map {self.device_map}: give one; "
                                        "a device map places every module")
            if self.device_map not in DEVICE_MAP_STRATEGIES and not Path(self.device_map).is_file():
                raise pytest.UsageError(f"--device-map {self.device_map}: neither "
                                        f"{' nor '.join(DEVICE_MAP_STRATEGIES)} nor an existing JSON file")
        if self.pin is not None and self.pin.suffix not in (".yaml", ".yml"):
            raise pytest.UsageError(f"--audit-pin {self.pin}: a pin is a YAML audit file; name it *.yaml")
        for path in self.pins:
            if not path.exists():
                raise pytest.UsageError(f"--audit-pins {path}: no such file or directory")

    def _validate_corpus(self) -> None:
        """``--corpus-path`` alone names the corpus file (or the wikitext-2 directory); with ``--corpus`` it must
        be where that named corpus lives, which only ``wikitext2`` reads."""
        if self.corpus_path is not None:
            path = Path(self.corpus_path).expanduser()
            if not path.exists():
                raise pytest.UsageError(f"--corpus-path {self.corpus_path}: no such file or directory "
                                        f"(resolved to {path.resolve()})")
            if self.corpus is not None and self.corpus != "wikitext2":
                raise pytest.UsageError(
                    f"--corpus {self.corpus} and --corpus-path {self.corpus_path} conflict: --corpus-path says where "
                    "wikitext2 lives, or names a text corpus on its own; give one of them")
        elif self.corpus is not None and self.corpus not in CORPUS_NAMES and not Path(self.corpus).expanduser().is_file():
            raise pytest.UsageError(f"--corpus {self.corpus}: neither a corpus name ({', '.join(CORPUS_NAMES)}) "
                                    "nor an existing text file")
