"""Named text corpora, resolved offline.

``load_corpus(spec, corpus_path=...)`` takes a corpus name or file (``spec``) and where it lives (``corpus_path``),
either of which may be ``None`` ("not given"):

=====================  =====================================================================================
``(None, None)``        ``"pydoc"``, the default
``("pydoc", None)``     the English reference text every CPython ships in ``pydoc_data/topics.py`` (the values
                        of ``pydoc_data.topics.topics`` joined with ``"\\n\\n"`` in sorted-key order)
``("wikitext2", p)``    the raw WikiText-2 test split (``wiki.test.raw``, the RAW release, byte-for-byte): ``p``
                        is the file or the directory holding it; with ``p`` ``None`` it is looked for under
                        ``$LMAUDIT_DATA/wikitext-2``, then ``../shared/data/wikitext-2`` relative to the current
                        directory and to the repository root (absent everywhere: :class:`CorpusDataMissing`)
``(None, p)``           the text file ``p``, or WikiText-2 when ``p`` is a directory holding ``wiki.test.raw``
``(file, None)``        the text file ``file`` (the same as ``(None, file)``)
``("pydoc", p)``,       a :class:`CorpusError`: the path would be silently ignored, or two files are named
``(file, p)``
=====================  =====================================================================================

Text files are read as UTF-8, byte for byte (a BOM, if any, stays in the text). A file that is not UTF-8, or holds
NUL bytes (a binary file), is a one-line :class:`CorpusError` naming the file, the encoding and the byte offset; an
explicit path that does not exist is a :class:`CorpusNotFoundError` naming it. An unknown name is a
:class:`CorpusNotFoundError` naming the valid ones.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from lmaudit.checks.core.errors import CorpusDataMissing, CorpusError, CorpusNotFoundError

CORPUS_NAMES = ("pydoc", "wikitext2")
DEFAULT_CORPUS = "pydoc"  # always available: every CPython ships it
ENCODING = "utf-8"
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
            return Corpus("wikitext2", read_text(path), str(path.resolve()))
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


def read_text(path: Path) -> str:
    """``path`` decoded as UTF-8. Raises a one-line :class:`CorpusError` naming the file,
    the encoding and the first bad byte's offset when it is not UTF-8 text or holds a NUL byte (a binary file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from exc
    if (nul := data.find(b"\0")) >= 0:
        raise CorpusError(f"corpus file {path} is binary, not {ENCODING} text (NUL byte at offset {nul})")
    try:
        return data.decode(ENCODING)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not {ENCODING} text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason}); re-encode it as {ENCODING}"
        ) from None  # the decoder's own traceback adds nothing to the offset


def _load_path(corpus_path: str) -> Corpus:
    """An explicit path: a text file, or a directory holding ``wiki.test.raw`` (WikiText-2)."""
    path = Path(corpus_path).expanduser()
    if path.is_dir():
        if (path / WIKITEXT2_FILE).is_file():
            return _load_wikitext2(corpus_path)
        raise CorpusNotFoundError(f"corpus directory {corpus_path} ({path.resolve()}) holds no {WIKITEXT2_FILE}; "
                                  "pass a text file, or the WikiText-2 directory")
    if not path.is_file():
        raise CorpusNotFoundError(f"no such corpus file: {corpus_path} (resolved to {path.resolve()})")
    return Corpus(path.stem, read_text(path), str(path.resolve()))


def load_corpus(spec: str | None = None, *, corpus_path: str | None = None) -> Corpus:
    """Resolve a corpus name, a text file or a path (see the module docstring) without touching the network.

    Both arguments are checked against each other before anything is read.
    """
    if spec is None:
        return _load_pydoc() if corpus_path is None else _load_path(corpus_path)
    if spec == "wikitext2":
        return _load_wikitext2(corpus_path)
    if corpus_path is not None:
        detail = ("pydoc is built in and lives at no path" if spec == DEFAULT_CORPUS
                  else "both name a file; pass one")
        raise CorpusError(f"corpus {spec!r} and corpus path {corpus_path!r} conflict: {detail} "
                          "(a corpus path goes with wikitext2, or alone)")
    if spec == DEFAULT_CORPUS:
        return _load_pydoc()
    path = Path(spec).expanduser()
    if path.exists() or os.sep in spec or "/" in spec or path.suffix:
        return _load_path(spec)
    suggestion = difflib.get_close_matches(spec, CORPUS_NAMES, n=1)
    hint = f" Did you mean: {suggestion[0]}?" if suggestion else ""
    raise CorpusNotFoundError(
        f"Unknown corpus {spec!r}: it is neither a name ({', '.join(CORPUS_NAMES)}) nor an existing text file.{hint}"
    )
