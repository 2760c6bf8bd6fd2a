"""What a check receives: the model under audit, the run's settings, and typed session artifacts.

Expensive intermediate results that several checks share (a super-weight detection, a fine-tuned model, a
corpus, a clean residual cache) are *artifacts*: each is stored under its own type and a key naming what
determines it, and comes back with that type (:meth:`AuditContext.artifact`). An area may also *provide* an
artifact type that another area needs without importing it (:func:`provide` / :meth:`AuditContext.require`):
the quantization checks ask for :class:`~lmaudit.checks.core.outliers.SuperWeightSites`, which the
super-weight area provides from its detection.

Every corpus a check reads goes through :meth:`AuditContext.corpus`, which labels it, so the report can say
which corpus each result used.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from lmaudit.checks.core.errors import LmAuditError, PremiseMissing
from lmaudit.checks.core.loading import LoadedModel

if TYPE_CHECKING:
    from lmaudit.checks.core.corpora import Corpus
    from lmaudit.checks.core.finetune import LoraRecipe

T = TypeVar("T")

PROVIDERS: dict[type, Callable[[AuditContext], Any]] = {}


def provide(kind: type[T]) -> Callable[[Callable[[AuditContext], T]], Callable[[AuditContext], T]]:
    """Decorator: ``fn(context) -> kind`` builds the session's ``kind`` artifact for :meth:`AuditContext.require`."""

    def register(fn: Callable[[AuditContext], T]) -> Callable[[AuditContext], T]:
        if kind in PROVIDERS and PROVIDERS[kind] is not fn:
            raise ValueError(f"artifact {kind.__name__} has two providers: {PROVIDERS[kind]} and {fn}")
        PROVIDERS[kind] = fn
        return fn

    return register


@dataclass
class Artifacts:
    """Session artifacts keyed by their type and a hashable key; retrieval checks the type."""

    _store: dict[tuple[type, Hashable], Any] = field(default_factory=dict)
    _missing: dict[tuple[type, Hashable], PremiseMissing] = field(default_factory=dict)

    def get_or_build(self, kind: type[T], key: Hashable, build: Callable[[], T]) -> T:
        """The artifact, built once. A builder that finds the premise absent (:class:`PremiseMissing`) is not
        retried: every later request re-raises the same reason, so dependent checks skip with it at no cost."""
        slot = (kind, key)
        if slot in self._missing:
            missing = self._missing[slot]
            raise type(missing)(*missing.args)  # a fresh exception: no traceback piling up across checks
        if slot not in self._store:
            try:
                value = build()
            except PremiseMissing as exc:
                self._missing[slot] = exc
                raise
            if not isinstance(value, kind):
                raise TypeError(f"artifact {kind.__name__} {key!r}: the builder returned {type(value).__name__}")
            self._store[slot] = value
        return cast(T, self._store[slot])

    def peek(self, kind: type[T], key: Hashable) -> T | None:
        """The stored artifact, or ``None`` when it was not built."""
        return cast("T | None", self._store.get((kind, key)))

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class AuditContext:
    """The model under audit plus the session's options and artifacts."""

    model: LoadedModel
    corpus_spec: str | None = None  # None: not given (pydoc, or what corpus_path names: core.corpora)
    corpus_path: str | None = None
    profile: str = "full"
    seed: int = 0
    compare_model_spec: str | None = None
    load: Callable[[str], LoadedModel] | None = None  # loads (and caches) another model by spec
    artifacts: Artifacts = field(default_factory=Artifacts)
    _corpora_used: list[str] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ corpora

    def corpus(self, spec: str | None = None) -> Corpus:
        """The session corpus (``--corpus`` / ``--corpus-path``), or the named corpus ``spec``; labelled for the
        report as used by the running check."""
        from lmaudit.checks.core.corpora import Corpus, load_corpus

        path = self.corpus_path if spec is None else None
        name = self.corpus_spec if spec is None else spec
        corpus = self.artifacts.get_or_build(Corpus, ("corpus", name, path),
                                             lambda: load_corpus(name, corpus_path=path))
        label = f"{corpus.name}: {corpus.source} ({len(corpus.text):,} characters)"
        if label not in self._corpora_used:
            self._corpora_used.append(label)
        return corpus

    def corpus_identity(self) -> str:
        """What the session corpus is, for a result-cache key: ``name:sha256 of its text``, or why it is
        unavailable. Loads it (once; it is a session artifact) without labelling it as read by a check."""
        import hashlib

        from lmaudit.checks.core.corpora import Corpus, load_corpus

        name, path = self.corpus_spec, self.corpus_path
        try:
            corpus = self.artifacts.get_or_build(Corpus, ("corpus", name, path),
                                                 lambda: load_corpus(name, corpus_path=path))
        except LmAuditError as exc:
            return f"unavailable: {type(exc).__name__}: {exc}"
        return f"{corpus.name}:{hashlib.sha256(corpus.text.encode()).hexdigest()}"

    def session_corpus_label(self) -> str | None:
        """The session corpus's label when a check has read it, else ``None`` (it is loaded lazily)."""
        from lmaudit.checks.core.corpora import Corpus

        corpus = self.artifacts.peek(Corpus, ("corpus", self.corpus_spec, self.corpus_path))
        return None if corpus is None else f"{corpus.name}: {corpus.source} ({len(corpus.text):,} characters)"

    def begin_check(self) -> None:
        """Start labelling corpora for a new check."""
        self._corpora_used = []

    def corpora_used(self) -> list[str]:
        return list(self._corpora_used)

    # ------------------------------------------------------------------ models

    def compare_model(self) -> LoadedModel | None:
        """``--compare-model``, loaded once per session; ``None`` when not given."""
        if self.compare_model_spec is None or self.load is None:
            return None
        return self.load(self.compare_model_spec)

    def finetuned(self, recipe: LoraRecipe) -> LoadedModel:
        """The model under audit after the seeded LoRA fine-tune ``recipe`` (cached on disk and per session)."""
        from lmaudit.checks.core.finetune import lora_finetune

        return self.artifacts.get_or_build(
            LoadedModel, ("lora", recipe),
            lambda: lora_finetune(self.model, steps=recipe.steps, seed=recipe.seed, rank=recipe.rank,
                                  alpha=recipe.alpha, lr=recipe.lr, batch_size=recipe.batch_size))

    # ------------------------------------------------------------------ artifacts

    def artifact(self, kind: type[T], key: Hashable, build: Callable[[], T]) -> T:
        """The session's ``kind`` artifact for ``key``, built once."""
        return self.artifacts.get_or_build(kind, key, build)

    def require(self, kind: type[T]) -> T:
        """The session's ``kind`` artifact from its registered provider (another area's result)."""
        if kind not in PROVIDERS:
            raise LmAuditError(f"no area provides {kind.__name__}; known: "
                               f"{', '.join(k.__name__ for k in PROVIDERS) or 'none'}")
        return self.artifacts.get_or_build(kind, ("provided",), lambda: PROVIDERS[kind](self))
