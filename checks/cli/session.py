"""What every model command shares: its options, their validation before any model loads, and the session that
loads the model and runs registered checks the way the audits run them.

A command runs in two phases, and :func:`lmaudit.checks.cli.main.main` keeps them apart:

1. ``prepare(args)`` validates everything it can without a model (the check's parameters through its pydantic
   model, the model spec's form, dtype, device, device map, corpus) and returns the action to run;
2. the action receives a :class:`Session`, which loads the model when first asked.

So a typo is an error in well under a second, never after a minute of loading. The session builds one
:class:`~lmaudit.checks.harness.context.AuditContext` for the loaded model, and :meth:`Session.run` runs a
registered check exactly as the plugin does: seeded with ``torch.manual_seed(seed)``, corpora labelled, inside
:func:`~lmaudit.checks.core.hooks.nonfinite_guard` (a NaN or inf is an error naming the first layer, never an
empty answer), with a forward-pass counter on stderr.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lmaudit.checks.cli.params import ParamError, build_params, known, parse_pairs, unknown_key_error
from lmaudit.checks.cli.progress import Progress
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.loading import DEFAULT_MODEL, DEVICE_MAP_STRATEGIES, DTYPES, LoadedModel, load_model

if TYPE_CHECKING:
    from lmaudit.checks.core.results import CheckResult
    from lmaudit.checks.harness.context import AuditContext
    from lmaudit.checks.harness.registry import CheckParams, CheckSpec

T = TypeVar("T")
Action = Callable[["Session"], int]

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class UsageError(LmAuditError):
    """A command-line argument that cannot work (found before any model loads)."""


# ------------------------------------------------------------------------------------------------ options


def add_model_options(parser: argparse.ArgumentParser, *, params: bool = True, corpus: bool = False,
                      output: bool = True) -> None:
    """The options of every command that loads a model (``params``: it runs registered checks; ``output``: it
    prints its own results, with ``--json`` and progress)."""
    group = parser.add_argument_group("model and placement")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"registry alias, HF directory, .gguf file or hf:org/name (default {DEFAULT_MODEL})")
    group.add_argument("--dtype", default="float32", choices=DTYPES, help="precision the model is loaded at")
    group.add_argument("--device", default="auto",
                       help="auto (default: cuda if present, else cpu), cpu, cuda, cuda:N or mps")
    group.add_argument("--device-map", default=None,
                       help=f"spread the model over devices: {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
                            "mapping module names to devices (excludes --device)")
    group.add_argument("--trust-remote-code", action="store_true", default=False,
                       help="allow the model repository to run its own code (off by default)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0, as the audits)")
    if corpus:
        run.add_argument("--corpus", default=None,
                         help="session corpus: pydoc, wikitext2 or a text file (default pydoc)")
    if params:
        run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="any parameter of the check (`lmaudit checks` lists them), as YAML: "
                              "--param n_windows=2 --param 'scales=[0, 1]'")
    if output:
        run.add_argument("--json", action="store_true", help="strict JSON on stdout (progress stays on stderr)")
        run.add_argument("--no-progress", action="store_true", help="no progress on stderr")


@dataclass(frozen=True)
class ModelOptions:
    """The validated model and placement options: :func:`load_model` gets exactly these."""

    spec: str
    dtype: str
    device: str | None  # None with a device map
    device_map: str | None
    trust_remote_code: bool
    seed: int
    corpus: str | None
    compare_model: str | None  # --compare-model, for the commands that take it

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        """Check every option without loading anything (:class:`UsageError` or the loader's own error)."""
        from lmaudit.checks.core.loading import resolve_dtype, resolve_placement

        resolve_dtype(args.dtype)
        if not _DEVICE.match(args.device):
            raise UsageError(f"--device {args.device}: expected auto, cpu, cuda, cuda:N or mps")
        if args.device_map is not None and args.device != "auto":
            raise UsageError(f"--device {args.device} and --device-map {args.device_map}: give one; a device map "
                             "places every module")
        device = None if args.device_map is not None else _auto_device(args.device)
        resolve_placement(device or "cpu", args.device_map)  # device availability, the device map file's content
        check_model_spec(args.model)
        corpus = getattr(args, "corpus", None)
        if corpus is not None:
            check_corpus(corpus)
        compare_model = getattr(args, "compare_model", None)
        if compare_model is not None:
            check_model_spec(compare_model)
        return cls(args.model, args.dtype, device, args.device_map, args.trust_remote_code, args.seed, corpus,
                   compare_model)

    def load(self, spec: str | None = None) -> LoadedModel:
        placement: dict[str, Any] = ({"device_map": self.device_map} if self.device_map is not None
                                     else {"device": self.device})
        return load_model(spec or self.spec, dtype=self.dtype, trust_remote_code=self.trust_remote_code, **placement)


def _auto_device(device: str) -> str:
    """``auto``: the first GPU when there is one, else the CPU (MPS only when asked for, as in the plugin)."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def check_model_spec(spec: str) -> None:
    """The spec resolves (an installed alias, an existing path of a known layout, or ``hf:org/name``) without
    loading anything. A path-like spec that does not exist is "no such file or directory", never a hub id."""
    from lmaudit.checks.core import loading

    # core.loading resolves specs in one private function; a public name for it is requested in the CLI's report.
    loading._resolve(spec)


def check_corpus(spec: str) -> None:
    from lmaudit.checks.core.corpora import CORPUS_NAMES

    if spec not in CORPUS_NAMES and not Path(spec).expanduser().is_file():
        raise UsageError(f"--corpus {spec}: neither a corpus name ({', '.join(CORPUS_NAMES)}) nor an existing "
                         "text file")


# ------------------------------------------------------------------------------------------------ planned checks


@dataclass(frozen=True)
class PlannedCheck:
    """A registered check with its validated parameters."""

    spec: CheckSpec
    params: CheckParams


def plan_checks(args: argparse.Namespace, names: list[str], *, quick: dict[str, dict[str, Any]] | None = None,
                flags: dict[str, Any] | None = None) -> list[PlannedCheck]:
    """Validate the parameters of the checks ``names`` (no model needed): their defaults, then ``quick[name]``
    unless ``--thorough``, then the named ``flags``, then ``--param``. A ``--param`` key that none of the checks
    takes is an error."""
    from lmaudit.checks.catalog import load_checks
    from lmaudit.checks.harness.registry import get_check

    load_checks()
    specs = [get_check(name) for name in names]
    pairs = parse_pairs(getattr(args, "param", []))
    for key in pairs:
        if not any(known(spec, key) for spec in specs):
            raise unknown_key_error(key, specs)
    thorough = getattr(args, "thorough", False)
    return [PlannedCheck(spec, build_params(spec, quick=None if thorough else (quick or {}).get(spec.name),
                                            flags=flags, pairs=pairs))
            for spec in specs]


# ------------------------------------------------------------------------------------------------ session


@dataclass
class Outcome:
    """One measurement for the output: a registered check's result (``check`` set) or a science result; or a
    check that could not apply (``skipped``: its premise is missing, or its optional data is absent)."""

    result: Any
    check: str | None = None
    area: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    corpora: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: LmAuditError | None = None


@dataclass
class Session:
    """The loaded model (on first use), its audit context and the progress stream of one command."""

    options: ModelOptions
    progress: Progress
    _guards: ExitStack = field(default_factory=ExitStack)
    _others: dict[str, LoadedModel] = field(default_factory=dict)
    _context: AuditContext | None = None

    @cached_property
    def model(self) -> LoadedModel:
        with self.progress.loading(f"{self.options.spec} ({self.options.dtype})"):
            return self.options.load()

    def other(self, spec: str) -> LoadedModel:
        """Another model (``--compare-model``), loaded once with the same options and guarded like the first
        while a check runs."""
        if spec not in self._others:
            with self.progress.loading(f"{spec} ({self.options.dtype})"):
                self._others[spec] = self.options.load(spec)
        loaded = self._others[spec]
        from lmaudit.checks.core.hooks import nonfinite_guard

        self._guards.enter_context(nonfinite_guard(loaded.adapter))
        return loaded

    @property
    def context(self) -> AuditContext:
        """The audit context of the loaded model: corpus, seed and ``--compare-model`` as the plugin sets them."""
        from lmaudit.checks.harness.context import AuditContext

        if self._context is None:
            self._context = AuditContext(model=self.model, corpus_spec=self.options.corpus, seed=self.options.seed,
                                         compare_model_spec=self.options.compare_model, load=self.other)
        return self._context

    @contextmanager
    def guarded(self, what: str) -> Iterator[None]:
        """The block's forward passes counted on stderr and checked for NaN/inf (the first non-finite layer is
        named); guards entered for other models inside the block end with it."""
        import torch

        from lmaudit.checks.core.hooks import nonfinite_guard

        torch.manual_seed(self.options.seed)
        adapter = self.model.adapter
        with self._guards, nonfinite_guard(adapter), self.progress.passes(adapter, what):
            yield

    def run(self, planned: PlannedCheck) -> Outcome:
        """The registered check on the session's model, as an audit entry runs it."""
        import time

        context = self.context
        context.begin_check()
        started = time.perf_counter()
        with self.guarded(planned.spec.name):
            result: CheckResult = planned.spec.run(context, planned.params)
        return Outcome(result, planned.spec.name, planned.spec.area, planned.params.model_dump(mode="json"),
                       context.corpora_used(), time.perf_counter() - started)

    def run_each(self, plans: list[PlannedCheck]) -> list[Outcome]:
        """Every check in order; one whose premise is missing or whose data is absent is kept as ``skipped`` (as
        an audit entry would be) and the others still run. Any other error stops the command."""
        from lmaudit.checks.core.errors import DataUnavailableError, PremiseMissing

        outcomes = []
        for planned in plans:
            try:
                outcomes.append(self.run(planned))
            except (PremiseMissing, DataUnavailableError) as exc:
                outcomes.append(Outcome(None, planned.spec.name, planned.spec.area,
                                        planned.params.model_dump(mode="json"), skipped=exc))
        return outcomes

    def science(self, what: str, fn: Callable[[], T]) -> T:
        """A science function outside the registry (one prompt's CNA), guarded and counted the same way."""
        with self.guarded(what):
            return fn()


def reject_param(args: argparse.Namespace, why: str) -> None:
    """For a mode that runs no registered check: ``--param`` has nothing to apply to."""
    if getattr(args, "param", None):
        raise ParamError(f"--param {args.param[0]}: {why}")
