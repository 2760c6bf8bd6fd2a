"""Named text corpora, resolved offline.

``load_corpus(spec)`` understands:

- ``"wikitext2"``: the raw WikiText-2 test split (``wiki.test.raw``, the RAW release, byte-for-byte), looked for in
  ``corpus_path`` (the file itself or the ``wikitext-2`` directory), else under ``$LMAUDIT_DATA/wikitext-2``, else
  under ``../shared/data/wikitext-2`` relative to the current working directory and relative to the repository root
  (the parent of the ``checks`` package). Absent everywhere: :class:`CorpusNotFoundError` listing every place looked.
- ``"pydoc"``: the English reference text every CPython ships in ``pydoc_data/topics.py`` (the values of
  ``pydoc_data.topics.topics`` joined with ``"\\n\\n"`` in sorted-key order). Always available, so it is the default.
- any existing text file path: that file (UTF-8).

Anything else is a :class:`CorpusNotFoundError` naming the valid names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmaudit.checks.core.errors import CorpusDataMissing, CorpusNotFoundError

CORPUS_NAMES = ("pydoc", "wikitext2")
DATA_ENV = "LMAUDIT_DATA"
WIKITEXT2_DIR = "wikitext-2"
WIKITEXT2_FILE = "wiki.test.raw"
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Corpus:
    """A named text; ``source`` is the path or module it was read from."""

    name: str
    text: str
    source: str

    def __repr__(self) -> str:  # the text can be megabytes: keep reprs (and pytest output) short
        return f"Corpus(name={self.name!r}, source={self.source!r}, chars={len(self.text)})"


def shared_data_candidates() -> list[Path]:
    """Every data root that :func:`shared_data_dir` considers, in order of preference."""
    candidates: list[Path] = []
    env = os.environ.get(DATA_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path.cwd() / ".." / "shared" / "data")
    candidates.append(_REPO_ROOT / ".." / "shared" / "data")
    return candidates


def shared_data_dir() -> Path | None:
    """The data root: ``$LMAUDIT_DATA`` if set and a directory, else ``../shared/data`` relative to the current
    directory, else relative to the repository root; ``None`` when none exists."""
    for candidate in shared_data_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _wikitext2_candidates(corpus_path: str | None) -> list[Path]:
    if corpus_path is not None:
        path = Path(corpus_path).expanduser()
        return [path / WIKITEXT2_FILE if path.is_dir() else path]
    return [root / WIKITEXT2_DIR / WIKITEXT2_FILE for root in shared_data_candidates()]


def _load_wikitext2(corpus_path: str | None) -> Corpus:
    looked = _wikitext2_candidates(corpus_path)
    for path in looked:
        if path.is_file():
            resolved = path.resolve()
            return Corpus("wikitext2", resolved.read_text(encoding="utf-8"), str(resolved))
    places = "\n".join(f"  - {p}" for p in looked)
    hint = "" if corpus_path is not None else f" (set ${DATA_ENV} to a data root holding {WIKITEXT2_DIR}/)"
    error = CorpusNotFoundError if corpus_path is not None else CorpusDataMissing
    raise error(
        f"Corpus 'wikitext2' ({WIKITEXT2_FILE}) not found{hint}. Looked in:\n{places}\n"
        f"Pass --corpus-path with the file or its directory."
    )


def _load_pydoc() -> Corpus:
    from pydoc_data import topics as topics_module

    topics = topics_module.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return Corpus("pydoc", text, topics_module.__file__ or "pydoc_data.topics")


def load_corpus(spec: str = "pydoc", *, corpus_path: str | None = None) -> Corpus:
    """Resolve a corpus name or a text file path (see the module docstring) without touching the network."""
    if spec == "wikitext2":
        return _load_wikitext2(corpus_path)
    if spec == "pydoc":
        return _load_pydoc()
    path = Path(spec).expanduser()
    if path.is_file():
        resolved = path.resolve()
        return Corpus(path.stem, resolved.read_text(encoding="utf-8"), str(resolved))
    raise CorpusNotFoundError(
        f"Unknown corpus {spec!r}: it is neither a name ({', '.join(CORPUS_NAMES)}) nor an existing text file."
    )
