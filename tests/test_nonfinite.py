"""A NaN or inf anywhere in a forward pass is an error naming the first module whose output it reached."""

from __future__ import annotations

import math
import re
from copy import deepcopy

import pytest
import torch

from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import NonFiniteOutputError
from lmaudit.checks.core.finite import all_finite
from lmaudit.checks.core.hooks import capture, nonfinite_guard
from lmaudit.checks.core.logprobs import answer_is_greedy, greedy_answers, next_token_logprobs
from lmaudit.checks.core.perplexity import perplexity
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = Corpus("tiny", "The quick brown fox jumps over the lazy dog. " * 40, "memory")
PROMPTS = ["3+5=", "12*3=", "hello"]


def broken(value: float, *, module: str = "model.layers.1.mlp.down_proj") -> torch.nn.Module:
    """A tiny Llama whose ``module`` weight holds one ``value`` (NaN or inf)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_submodule(module).weight[2, 5] = value
    return model


LAYER_1 = re.escape("layer 1 (model.layers.1) output holds ")
WEIGHT = re.escape("model.layers.1.mlp.down_proj.weight (")


@pytest.mark.parametrize(("value", "counts"), [(math.nan, "1 NaN / 0 inf"), (math.inf, "0 NaN / 1 inf")])
def test_guard_names_the_first_layer_and_the_bad_weight(value: float, counts: str) -> None:
    model = broken(value)
    adapter = adapter_for(model)
    ids = random_ids(2, 7)
    with capture({"model.layers.1": model.model.layers[1]}, what="output") as seen:
        model(ids)
    output = seen.output("model.layers.1")
    expected = (f"{int(output.isnan().sum())} NaN / {int(output.isinf().sum())} inf of {output.numel()} values; "
                f"its weights hold non-finite values: model.layers.1.mlp.down_proj.weight ({counts})")
    assert not all_finite(output) and all_finite(capture_layer0(model, ids))
    with pytest.raises(NonFiniteOutputError, match=LAYER_1 + re.escape(expected)), nonfinite_guard(adapter):
        model(ids)
    assert not any(m._forward_hooks for m in model.modules())  # removed, also after the raise


def capture_layer0(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with capture({"l0": model.model.layers[0]}, what="output") as seen:
        model(ids)
    return seen.output("l0")


def test_guard_names_the_embedding() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[6, 0] = math.nan  # one NaN in the embedding row of token 6
    ids = torch.tensor([[256, 5, 6]])
    with pytest.raises(NonFiniteOutputError, match=re.escape("embedding (model.embed_tokens) output holds 1 NaN")), \
            nonfinite_guard(adapter_for(model)):
        model(ids)


def test_guard_names_the_unembedding_when_only_the_head_is_broken() -> None:
    model = broken(math.inf, module="lm_head")
    with pytest.raises(NonFiniteOutputError, match=re.escape("unembedding (lm_head) output holds")), \
            nonfinite_guard(adapter_for(model)):
        model(random_ids(1, 5))


def test_guard_is_silent_and_exact_on_a_finite_model() -> None:
    model = tiny_model("llama")
    ids = random_ids(2, 7)
    plain = model(ids).logits
    with nonfinite_guard(adapter_for(model)), nonfinite_guard(adapter_for(model)):  # nested: one set of hooks
        assert sum(len(m._forward_hooks) for m in model.modules()) == model.config.num_hidden_layers + 3
        guarded = model(ids).logits
    assert torch.equal(plain, guarded)
    assert not any(m._forward_hooks for m in model.modules())


def test_an_edit_that_overflows_is_named_with_finite_weights() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        for proj in (model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj):
            proj.weight.mul_(1e25)  # finite weights; silu(gate) * up ~ 1e46 overflows float32
    with pytest.raises(NonFiniteOutputError, match=LAYER_1 + r".*its weights are finite"), \
            nonfinite_guard(adapter_for(model)):
        model(random_ids(1, 5))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_perplexity_names_the_first_nonfinite_layer(value: float) -> None:
    model = broken(value)
    with pytest.raises(NonFiniteOutputError, match=r"perplexity windows 0\.\.1: .*first non-finite output: "
                                                   + LAYER_1 + ".*" + WEIGHT):
        perplexity(model, byte_tokenizer(), CORPUS, seq_len=32, n_windows=2, batch_size=2)
    with pytest.raises(NonFiniteOutputError, match="^" + LAYER_1), nonfinite_guard(adapter_for(model)):
        perplexity(model, byte_tokenizer(), CORPUS, seq_len=32, n_windows=2, batch_size=2)


@pytest.mark.parametrize("score", [
    lambda m, t: answer_is_greedy(m, t, PROMPTS, ["8", "36", " world"]),
    lambda m, t: greedy_answers(m, t, PROMPTS, max_new_tokens=3),
    lambda m, t: next_token_logprobs(m, t, PROMPTS),
], ids=["answer_is_greedy", "greedy_answers", "next_token_logprobs"])
def test_greedy_scoring_names_the_first_nonfinite_layer(score: object) -> None:
    model = broken(math.nan)
    with pytest.raises(NonFiniteOutputError, match=r"first non-finite output: " + LAYER_1 + ".*" + WEIGHT):
        score(model, byte_tokenizer())  # type: ignore[operator]


def test_all_finite_is_exact() -> None:
    big = torch.full((4, 8), 3e38)  # the float32 sum overflows; every element is finite
    assert all_finite(big) and all_finite(torch.zeros(0)) and all_finite(torch.arange(3))
    for bad in (math.nan, math.inf, -math.inf):
        tensor = torch.randn(3, 5)
        tensor[1, 2] = bad
        assert not all_finite(tensor) and not all_finite(tensor.bfloat16())
    mixed = torch.tensor([math.inf, -math.inf])
    assert not all_finite(mixed)


def test_a_copy_made_inside_the_guard_is_not_checked() -> None:
    model = tiny_model("llama")
    with nonfinite_guard(adapter_for(model)):
        copy = deepcopy(model)  # what a fine-tune does with its base; the copy carries the hooks along
    with torch.no_grad():
        copy.model.layers[1].mlp.down_proj.weight[2, 5] = math.nan
    assert not all_finite(copy(random_ids(1, 5)).logits)  # no error: the copy was never guarded
