"""Hypothesis strategies for prompts of every kind a detector must be indifferent to.

Compose them: ``prompts()`` is any one kind; ``prompt_batches()`` draws one prompt of each kind (plus a long one),
so a single example covers every kind in one batched forward pass, which matters on a real model.

Kinds: plain text of varying length, digits and arithmetic, code, non-English text (several scripts),
punctuation only, a single token (a single character or a very common short word).
"""

from __future__ import annotations

from hypothesis import strategies as st

WORDS = ("the", "model", "weight", "river", "city", "history", "of", "and", "a", "small", "green", "house",
         "is", "was", "people", "language", "light", "over", "under", "music", "winter", "apple", "company")
NON_ENGLISH = ("Le chat dort sur le canapé.", "Der Hund läuft schnell.", "El tiempo es bueno hoy.",
               "東京は日本の首都です。", "Москва — столица России.", "Ελληνικά γράμματα", "مرحبا بالعالم",
               "हिन्दी भाषा", "안녕하세요 세계", "Żółć gęślą jaźń")
CODE = ("def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i)", "int main() { return 0; }",
        "SELECT name FROM users WHERE id = 1;", "x = [i**2 for i in range(5)]", "<div class=\"a\">hi</div>",
        "fn main() { println!(\"hi\"); }", "if (a && b) { c++; }")
SINGLE_TOKENS = ("a", "I", "the", "Hello", "1", ".", "x", "The", "and", "?")
PUNCTUATION = "!?.,;:-_()[]{}'\"/*&%$#@"


def plain_text(*, min_words: int = 1, max_words: int = 60) -> st.SearchStrategy[str]:
    """Sentences of common English words, from one word to ``max_words`` (different lengths)."""
    return st.lists(st.sampled_from(WORDS), min_size=min_words, max_size=max_words).map(
        lambda words: " ".join(words).capitalize() + ".")


def digits_and_arithmetic() -> st.SearchStrategy[str]:
    """``"37+5=42"``-style equations and bare digit strings."""
    numbers = st.integers(min_value=0, max_value=999)
    equation = st.tuples(numbers, st.sampled_from("+-*"), numbers).map(
        lambda t: f"{t[0]}{t[1]}{t[2]}={eval(f'{t[0]}{t[1]}{t[2]}')}")  # noqa: S307 (ints and one operator)
    digits = st.text(alphabet="0123456789", min_size=1, max_size=20)
    return st.one_of(equation, digits, st.lists(equation, min_size=2, max_size=5).map(", ".join))


def code() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(CODE), min_size=1, max_size=3).map("\n".join)


def non_english() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(NON_ENGLISH), min_size=1, max_size=3).map(" ".join)


def punctuation_only() -> st.SearchStrategy[str]:
    return st.text(alphabet=PUNCTUATION + " ", min_size=1, max_size=20).filter(lambda s: s.strip())


def single_token() -> st.SearchStrategy[str]:
    """A single character or very common word (one token for byte-level and BPE tokenizers alike)."""
    return st.sampled_from(SINGLE_TOKENS)


def prompts() -> st.SearchStrategy[str]:
    """Any one kind of prompt."""
    return st.one_of(plain_text(), digits_and_arithmetic(), code(), non_english(), punctuation_only(),
                     single_token())


def prompt_batches(*, long_words: tuple[int, int] = (40, 80)) -> st.SearchStrategy[list[str]]:
    """One prompt of every kind, plus a long plain text of ``long_words`` (min, max) words: a batch that covers
    all kinds at once."""
    return st.tuples(plain_text(max_words=8), plain_text(min_words=long_words[0], max_words=long_words[1]),
                     digits_and_arithmetic(),
                     code(), non_english(), punctuation_only(), single_token()).map(list)
