"""lmaudit.checks.core.logprobs on tiny Llamas: BOS policy, padding invariance, planted known answers, greedy
equivalences."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM

from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.errors import NonFiniteOutputError
from lmaudit.checks.core.interventions import edit_weight
from lmaudit.checks.core.logprobs import (
    LogprobsError,
    answer_is_greedy,
    continuation_logprob,
    encode_prompts,
    greedy_answers,
    greedy_exact_match,
    next_token_logprobs,
)
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import CONFIGS, tiny_model

PROMPTS = [
    "a",
    "Hello, world",
    "3+5=",
    "The quick brown fox jumps",
    "xy",
    "Q: What is 12 plus 30? A:",
    "zz top",
]
CONTINUATIONS = [" b", "!", "8", " over the lazy dog", "z", " 42", " band"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=1)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Reference: one unpadded sequence, no attention mask, log-softmax at every position."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (t, vocab)


# ------------------------------------------------------------------------------------------- BOS policy


def test_bos_policy_prepends_exactly_one_bos(tok) -> None:
    assert tok("ab")["input_ids"] == _ids(tok, "ab")  # the byte tokenizer adds no BOS by itself
    assert encode_prompts(tok, ["ab", ""]) == [[tok.bos_token_id, *_ids(tok, "ab")], [tok.bos_token_id]]

    adds_bos = byte_tokenizer()
    adds_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", adds_bos.bos_token_id)]
    )
    assert adds_bos("ab")["input_ids"][0] == adds_bos.bos_token_id  # this one adds it itself ...
    assert encode_prompts(adds_bos, ["ab"]) == encode_prompts(tok, ["ab"])  # ... and still gets exactly one

    no_bos = byte_tokenizer()
    no_bos.bos_token = None
    assert encode_prompts(no_bos, ["ab"]) == [_ids(tok, "ab")]
    with pytest.raises(LogprobsError, match="no BOS"):
        encode_prompts(no_bos, ["ab", ""])


# ----------------------------------------------------------------------------------------- padding invariance


def test_next_token_logprobs_match_unpadded_single_sequences(model, tok) -> None:
    batched = next_token_logprobs(model, tok, PROMPTS, batch_size=4)  # (n, vocab), mixed lengths, padded
    single = next_token_logprobs(model, tok, PROMPTS, batch_size=1)
    assert batched.shape == (len(PROMPTS), model.config.vocab_size)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    for row, ids in zip(batched, encode_prompts(tok, PROMPTS), strict=True):
        torch.testing.assert_close(row, _plain_logprobs(model, ids)[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.exp().sum(-1), torch.ones(len(PROMPTS)))


def test_continuation_logprob_is_the_sum_over_continuation_tokens(model, tok) -> None:
    batched = continuation_logprob(model, tok, PROMPTS, CONTINUATIONS, batch_size=3)
    single = continuation_logprob(model, tok, PROMPTS, CONTINUATIONS, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    for value, prompt, cont in zip(batched, PROMPTS, CONTINUATIONS, strict=True):
        context, target = encode_prompts(tok, [prompt])[0], _ids(tok, cont)
        table = _plain_logprobs(model, context + target)
        expected = sum(float(table[len(context) - 1 + j, t]) for j, t in enumerate(target))
        assert float(value) == pytest.approx(expected, abs=1e-4)
    first = next_token_logprobs(model, tok, PROMPTS)
    one_token = continuation_logprob(
        model, tok, PROMPTS[:3], CONTINUATIONS[:3]
    )  # " b" is 2 tokens, "!" and "8" 1
    assert float(one_token[1]) == pytest.approx(float(first[1, _ids(tok, "!")[0]]), abs=1e-5)
    assert float(one_token[2]) == pytest.approx(float(first[2, _ids(tok, "8")[0]]), abs=1e-5)


# ------------------------------------------------------------------------------------ planted successor model

LETTERS = string.ascii_lowercase


@pytest.fixture(scope="module")
def successor(tok):
    """Every layer's output zeroed, so logits depend on the last token only; letter k is followed by letter
    k+1 with certainty, and "z" by "\\n" (one residual dimension per letter, unembedding rows planted on
    them)."""
    config = CONFIGS["llama"]()
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    adapter = adapter_for(model)
    letter_ids = [_ids(tok, c)[0] for c in LETTERS]
    newline = _ids(tok, "\n")[0]
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            adapter.weight(adapter.attn_out(layer)).zero_()
            adapter.weight(adapter.down_proj(layer)).zero_()
        embedding, unembedding = (
            adapter.embedding.weight,
            adapter.weight(adapter.unembedding),
        )  # (vocab, hidden)
        for k, token in enumerate(letter_ids):  # 26 letters, hidden size 32
            embedding[token] = torch.nn.functional.one_hot(torch.tensor(k), config.hidden_size).float()
            unembedding[:, k] = 0.0
            unembedding[letter_ids[k + 1] if k + 1 < len(LETTERS) else newline, k] = 10.0  # logit 10·√32 ≈ 57
    return model


def test_planted_successor_known_answers(successor, tok) -> None:
    prompts = ["abc", "say: m", "uvw", "x"]
    logprobs = next_token_logprobs(successor, tok, prompts)
    for row, expected in zip(logprobs[:3], "dnx", strict=True):
        assert float(row[_ids(tok, expected)[0]]) > -1e-6  # certain
    assert float(logprobs[3, _ids(tok, "y")[0]]) > -1e-6

    assert greedy_answers(successor, tok, prompts, max_new_tokens=30) == [
        "defghijklmnopqrstuvwxyz",
        "nopqrstuvwxyz",
        "xyz",
        "yz",
    ]
    assert greedy_answers(successor, tok, ["abc"], max_new_tokens=3, stop=()) == ["def"]
    assert greedy_answers(successor, tok, ["abc"], max_new_tokens=8, stop=("g", "f")) == ["de"]

    answers = ["defghijklmnopqrstuvwxyz", "nop", "xyz", "yy"]
    assert answer_is_greedy(successor, tok, prompts, answers).tolist() == [True, True, True, False]
    assert greedy_exact_match(successor, tok, prompts, answers).tolist() == [
        True,
        False,
        True,
        False,
    ]  # "nop" continues
    assert float(continuation_logprob(successor, tok, ["uvw"], ["xyz\n"])[0]) > -1e-5
    assert float(continuation_logprob(successor, tok, ["uvw"], ["xzy"])[0]) < -50


# --------------------------------------------------------------------------------------- greedy vs generate()


def test_greedy_agrees_with_generate_and_teacher_forcing(model, tok) -> None:
    """On a random model: greedy_answers equals HF generate(); answer_is_greedy holds exactly for prefixes of
    the greedy tokens; greedy_exact_match holds when the answer is followed by a stop, and then
    answer_is_greedy does."""
    generator = torch.Generator().manual_seed(0)
    prompts = [
        "".join(LETTERS[int(i)] for i in torch.randint(0, 26, (5,), generator=generator)) for _ in range(24)
    ]
    printable = {_ids(tok, c)[0] for c in string.ascii_letters + string.digits + string.punctuation}
    others = torch.tensor([t for t in range(model.config.vocab_size) if t not in printable])
    with edit_weight(
        adapter_for(model).unembedding, (others, slice(None)), scale=0.0
    ):  # logit 0: rarely the max
        _check_greedy_against_generate(model, tok, prompts)


def _check_greedy_against_generate(model, tok, prompts: list[str]) -> None:
    reference = []
    for ids in encode_prompts(tok, prompts):
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
        reference.append(out[0, len(ids) :].tolist())
    assert greedy_answers(model, tok, prompts, max_new_tokens=4, stop=(), batch_size=5) == [
        tok.decode(r, skip_special_tokens=True) for r in reference
    ]

    checked = 0
    for prompt, generated in zip(prompts, reference, strict=True):
        text = [tok.decode([t]) for t in generated]
        if len(text) < 3 or not all(len(c) == 1 and c.isascii() for c in text[:3]):
            continue  # text comparisons need tokens that decode one-to-one
        answer, stop = text[0] + text[1], text[2]
        if stop in answer:
            continue
        wrong = answer[0] + chr(ord(answer[1]) ^ 1)
        is_greedy = answer_is_greedy(model, tok, [prompt] * 3, [answer, answer[0], wrong]).tolist()
        assert is_greedy == [True, True, False], (prompt, answer)
        assert greedy_exact_match(model, tok, [prompt] * 2, [answer, answer[0]], stop=(stop,)).tolist() == [
            True,
            False,
        ]
        checked += 1
    assert checked >= 3, f"only {checked} prompts had a printable greedy continuation"


# -------------------------------------------------------------------------------------- interventions, errors


def test_every_call_sees_the_current_weights_and_a_custom_forward(model, tok) -> None:
    adapter = adapter_for(model)
    before = next_token_logprobs(model, tok, PROMPTS[:3])
    with edit_weight(adapter.unembedding, (slice(None), slice(None)), scale=0.0):  # all logits 0: uniform
        inside = next_token_logprobs(model, tok, PROMPTS[:3])
        uniform = continuation_logprob(model, tok, ["ab"], ["cde"])
    torch.testing.assert_close(inside, torch.full_like(inside, -torch.log(torch.tensor(258.0)).item()))
    assert float(uniform[0]) == pytest.approx(-3 * torch.log(torch.tensor(258.0)).item(), rel=1e-6)
    assert torch.equal(next_token_logprobs(model, tok, PROMPTS[:3]), before)

    target = _ids(tok, "Q")[0]

    def forward(input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        logits[..., target] += 100.0
        return logits

    assert greedy_answers(model, tok, PROMPTS[:2], max_new_tokens=3, forward=forward) == ["QQQ", "QQQ"]
    assert answer_is_greedy(model, tok, PROMPTS[:2], ["QQ", "Qa"], forward=forward).tolist() == [True, False]
    assert (next_token_logprobs(model, tok, PROMPTS[:2], forward=forward).argmax(-1) == target).all()


def test_non_finite_logits_raise(model, tok) -> None:
    adapter = adapter_for(model)
    with edit_weight(adapter.unembedding, (0, 0), value=float("nan")):
        for call in (
            lambda: next_token_logprobs(model, tok, PROMPTS),
            lambda: continuation_logprob(model, tok, PROMPTS, CONTINUATIONS),
            lambda: answer_is_greedy(model, tok, PROMPTS, CONTINUATIONS),
            lambda: greedy_answers(model, tok, PROMPTS),
        ):
            with pytest.raises(NonFiniteOutputError, match="NaN"):
                call()


def test_bad_arguments_are_refused_before_the_model_runs(model, tok) -> None:
    with pytest.raises(LogprobsError, match="2 prompts but 1 continuations"):
        continuation_logprob(model, tok, ["a", "b"], ["c"])
    with pytest.raises(LogprobsError, match="single string"):
        next_token_logprobs(model, tok, "abc")
    with pytest.raises(LogprobsError, match="encode to no tokens"):
        answer_is_greedy(model, tok, ["a"], [""])
    with pytest.raises(LogprobsError, match="batch_size"):
        next_token_logprobs(model, tok, ["a"], batch_size=0)
    with pytest.raises(LogprobsError, match="max_new_tokens"):
        greedy_answers(model, tok, ["a"], max_new_tokens=0)
