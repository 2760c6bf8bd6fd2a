"""Corpus resolution: names, files and paths, the (spec, corpus_path) rules, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmaudit.checks.core.corpora import WIKITEXT2_FILE, load_corpus
from lmaudit.checks.core.errors import CorpusDataMissing, CorpusError, CorpusNotFoundError, LmAuditError

WIKI_TEXT = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles \n"


@pytest.fixture
def wiki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "wikitext-2"
    directory.mkdir()
    (directory / WIKITEXT2_FILE).write_text(WIKI_TEXT, encoding="utf-8")
    return directory


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("naïve café – ünïcödé\n", encoding="utf-8")
    return path


def test_nothing_given_is_pydoc() -> None:
    corpus = load_corpus(None, corpus_path=None)
    assert corpus.name == "pydoc" and len(corpus.text) > 100_000
    assert load_corpus().text == corpus.text == load_corpus("pydoc").text


def test_a_path_alone_is_that_file(text_file: Path) -> None:
    corpus = load_corpus(None, corpus_path=str(text_file))
    assert (corpus.name, corpus.text, corpus.source) == ("notes", text_file.read_text("utf-8"), str(text_file))
    assert load_corpus(str(text_file)) == corpus


def test_a_directory_holding_wiki_test_raw_is_wikitext2(wiki_dir: Path) -> None:
    for corpus in (load_corpus(None, corpus_path=str(wiki_dir)), load_corpus("wikitext2", corpus_path=str(wiki_dir)),
                   load_corpus("wikitext2", corpus_path=str(wiki_dir / WIKITEXT2_FILE))):
        assert corpus.name == "wikitext2" and corpus.text == WIKI_TEXT
        assert corpus.source == str((wiki_dir / WIKITEXT2_FILE).resolve())


@pytest.mark.parametrize("spec", ["pydoc", "FILE"])
def test_a_path_with_another_corpus_is_a_conflict(spec: str, text_file: Path, wiki_dir: Path) -> None:
    spec = str(text_file) if spec == "FILE" else spec
    with pytest.raises(CorpusError, match=r"conflict") as caught:
        load_corpus(spec, corpus_path=str(wiki_dir))
    assert spec in str(caught.value) and str(wiki_dir) in str(caught.value)


@pytest.mark.parametrize("given", ["spec", "path"])
def test_a_missing_explicit_path_is_an_error_naming_it(given: str, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(CorpusNotFoundError, match=rf"no such corpus file: {missing} \(resolved to {missing}\)"):
        if given == "spec":
            load_corpus(str(missing))
        else:
            load_corpus(None, corpus_path=str(missing))


def test_a_missing_wikitext2_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(CorpusNotFoundError, match=str(tmp_path / "nowhere")) as caught:
        load_corpus("wikitext2", corpus_path=str(tmp_path / "nowhere"))
    assert not isinstance(caught.value, CorpusDataMissing)  # an explicit path fails; it is not "data absent"


def test_a_directory_without_wiki_test_raw_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusNotFoundError, match=f"holds no {WIKITEXT2_FILE}"):
        load_corpus(None, corpus_path=str(tmp_path))


def test_unknown_name_suggests_one() -> None:
    with pytest.raises(CorpusNotFoundError, match="Did you mean: wikitext2"):
        load_corpus("wikitext")


@pytest.mark.parametrize(("content", "message"), [
    ("latin-1 caf\xe9 au lait\n".encode("latin-1"), r"is not utf-8 text: byte 0xe9 at offset 11"),
    (b"PK\x03\x04\x00\x00binary", r"is binary, not utf-8 text \(NUL byte at offset 4\)"),
])
def test_undecodable_file_is_one_line_naming_file_and_encoding(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    for call in (lambda: load_corpus(str(path)), lambda: load_corpus(None, corpus_path=str(path))):
        with pytest.raises(CorpusError, match=message) as caught:
            call()
        text = str(caught.value)
        assert str(path) in text and "\n" not in text and isinstance(caught.value, LmAuditError)
        assert caught.value.__cause__ is None  # no decoder traceback chained under the one line
        assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_undecodable_wikitext2_file_is_one_line(wiki_dir: Path) -> None:
    (wiki_dir / WIKITEXT2_FILE).write_bytes(b"fine so far \xff\xfe")
    with pytest.raises(CorpusError, match=r"wiki.test.raw is not utf-8 text: byte 0xff at offset 12"):
        load_corpus("wikitext2", corpus_path=str(wiki_dir))
