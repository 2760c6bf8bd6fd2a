"""What a check receives: the model under audit and the run's settings, with shared lazily-built inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from lmaudit.checks.core.loading import LoadedModel

if TYPE_CHECKING:
    from lmaudit.checks.core.corpora import Corpus

T = TypeVar("T")


@dataclass
class AuditContext:
    """The model under audit plus the session's options. ``memo`` shares expensive intermediate results
    (a detected super-weight directory, a clean residual cache) between checks of one session."""

    model: LoadedModel
    corpus_spec: str = "pydoc"
    corpus_path: str | None = None
    profile: str = "full"
    seed: int = 0
    compare_model_spec: str | None = None
    load: Callable[[str], LoadedModel] | None = None  # loads (and caches) another model by spec
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def quick(self) -> bool:
        return self.profile == "quick"

    def corpus(self) -> Corpus:
        from lmaudit.checks.core.corpora import load_corpus

        return self.memo(("corpus", self.corpus_spec, self.corpus_path),
                         lambda: load_corpus(self.corpus_spec, corpus_path=self.corpus_path))

    def compare_model(self) -> LoadedModel | None:
        if self.compare_model_spec is None or self.load is None:
            return None
        return self.load(self.compare_model_spec)

    def memo(self, key: Any, build: Callable[[], T]) -> T:
        """Build once per session and key; later calls return the same object."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]
