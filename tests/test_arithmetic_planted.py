"""A tiny GPT-2 that solves zero-shot 1-digit ``+ - *`` problems by construction, with known critical heads and
known answer neurons: the known-answer model of the arithmetic audit's tests and counterexamples.

Prompt ``"<s>a op b="`` (byte tokenizer of :mod:`tests.checkpoints`: BOS at position 0, ``a`` at 1, ``op`` at 2,
``b`` at 3, ``=`` at 4). Every vector the model writes is a sum of *features*, each feature ``f`` encoded as
``E(f) = e_{2f} − e_{2f+1}`` (zero mean), so each LayerNorm (weight 1, bias 0) only rescales by
``c = sqrt(d)/‖x‖``; thresholds are written against the constant feature ``ONE`` (in every position embedding),
so they scale with ``c`` too and firing does not depend on the norm.

- **Layer 0 attention, the operand heads.** For each operand slot (``A``, ``OP``, ``B``) ``heads_per_operand``
  heads at positions 4 and 5 attend to position 1, 2 or 3 (absolute position embeddings) and copy the token
  there into the slot's features, each with strength ``1/heads_per_operand``. Every other head of every layer
  is zero (ablating it changes nothing).
- **Layer ``n_layer − 2`` MLP, the lookup.** One neuron per problem fires when all of ``A = a``, ``OP = op``,
  ``B = b`` and "the current token is ``=``" hold (first answer digit), one per two-digit answer when the
  current token is the first answer digit (second digit); each writes the feature ``ANS[d]`` (``ANS[op, d]``
  with ``per_op_answers``).
- **Last layer MLP, the answer neurons.** ``neurons_per_digit`` neurons per digit read ``ANS[d]`` and write
  ``OUT[d]`` (each ``1/neurons_per_digit`` of it); the unembedding reads ``OUT[d]`` for token ``d`` and a weak
  constant ``OUT[newline]`` otherwise, so after the answer the model emits a newline (the stop check passes).

Variants: ``heads_per_operand=2, redundant=True``: either copy of an operand suffices, so no single head is
critical; ``redundant=False`` with more heads per operand: every copy is needed, so many heads are critical;
``neurons_per_digit=50``: the answer is spread over 500 neurons, none of which matters alone;
``per_op_answers=True``: each operation has its own answer neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForCausalLM

from lmaudit.checks.core.loading import LoadedModel
from tests.checkpoints import byte_tokenizer

OPS = "+-*"
DIGITS = "0123456789"


@dataclass
class _Features:
    """Feature name -> index; ``E(f)`` and the reading vector ``R(f) = E(f)/2`` (``R(f)·E(g) = δ_fg``)."""

    dim: int
    index: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.index:
            self.index[name] = len(self.index)
            if 2 * len(self.index) > self.dim:
                raise ValueError(f"{len(self.index)} features do not fit {self.dim} dimensions")
        f = self.index[name]
        out = torch.zeros(self.dim)
        out[2 * f], out[2 * f + 1] = 1.0, -1.0
        return out

    def read(self, name: str) -> torch.Tensor:
        return self(name) / 2


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def planted_arithmetic_model(*, heads_per_operand: int = 1, redundant: bool = False, neurons_per_digit: int = 1,
                             per_op_answers: bool = False, n_layer: int = 5, n_head: int = 16,
                             d: int = 224, n_inner: int = 512) -> LoadedModel:
    """The model of the module docstring, wrapped as a :class:`LoadedModel` (byte tokenizer)."""
    tokenizer = byte_tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=d, n_inner=n_inner, n_layer=n_layer,
                                     n_head=n_head, n_positions=64, tie_word_embeddings=False,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hd = d // n_head
    if 3 * heads_per_operand > n_head or hd < len(DIGITS) + len(OPS):
        raise ValueError("not enough heads or head dimensions for the operand heads")
    feat = _Features(d)
    token = {c: tokenizer.convert_tokens_to_ids(c) for c in DIGITS + OPS + "="}
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.transformer.ln_f] + [x for b in model.transformer.h for x in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1.0)
        # embeddings: the token's feature, the position's feature, ONE and a weak newline default
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        for t in range(len(tokenizer)):
            name = next((c for c, i in token.items() if i == t), "other")
            wte[t] = feat(f"tok:{'BOS' if t == tokenizer.bos_token_id else name}")
        for p in range(wpe.shape[0]):
            wpe[p] = feat(f"pos:{p if p < 8 else 'far'}") + feat("ONE") + 0.5 * feat("OUT:nl")
        c_src = (d / (2 * 3.25)) ** 0.5  # LayerNorm scale at positions 1-3: tok, pos, ONE, 0.5·OUT:nl
        attn = model.transformer.h[0].attn
        w_attn, w_out = attn.c_attn.weight, attn.c_proj.weight  # Conv1D: (d, 3d) and (d, d), x @ W
        beta = 4.0  # query/key scale: softmax logit ≈ β²·c²/sqrt(hd), far sharper than needed
        for slot, (name, position) in enumerate((("A", 1), ("OP", 2), ("B", 3))):
            vocab = OPS if name == "OP" else DIGITS
            for copy in range(heads_per_operand):
                h = slot * heads_per_operand + copy
                q, k, v = h * hd, d + h * hd, 2 * d + h * hd
                w_attn[:, q] = beta * (feat.read("pos:4") + feat.read("pos:5"))
                w_attn[:, k] = beta * feat.read(f"pos:{position}")
                for j, c in enumerate(vocab):
                    w_attn[:, v + j] = feat.read(f"tok:{c}") / (c_src * heads_per_operand)
                    w_out[h * hd + j] = feat(f"{name}:{c}")
        # the lookup MLP: one neuron per (problem, answer digit position)
        k_ops = 1.0 / heads_per_operand
        threshold = (3.0 + k_ops / 2) if redundant else (4.0 - k_ops / 2)
        lookup = model.transformer.h[n_layer - 2].mlp
        n = 0
        for op in OPS:
            for a in range(10):
                for b in range(10):
                    if op == "-" and a < b:
                        continue
                    answer = str(_answer(a, op, b))
                    for place, (current, digit) in enumerate(zip("=" + answer[0], answer, strict=False)):
                        if place and len(answer) < 2:
                            break
                        read = (feat.read(f"A:{a}") + feat.read(f"OP:{op}") + feat.read(f"B:{b}")
                                + feat.read(f"tok:{current}") - threshold * feat.read("ONE"))
                        lookup.c_fc.weight[:, n] = 20.0 * read
                        lookup.c_proj.weight[n] = 0.1 * feat(f"ANS:{op if per_op_answers else ''}:{digit}")
                        n += 1
        # the answer neurons of the last layer
        last = model.transformer.h[n_layer - 1].mlp
        n = 0
        groups = [f"{op}:" for op in OPS] if per_op_answers else [":"]
        for group in groups:
            for digit in DIGITS:
                for _ in range(neurons_per_digit):
                    last.c_fc.weight[:, n] = 5.0 * (feat.read(f"ANS:{group}{digit}") - 0.5 * feat.read("ONE"))
                    last.c_proj.weight[n] = (0.5 / neurons_per_digit) * feat(f"OUT:{digit}")
                    n += 1
        lm_head = model.lm_head.weight
        for digit in DIGITS:
            lm_head[token[digit]] = 10.0 * feat.read(f"OUT:{digit}")
        lm_head[newline] = 10.0 * feat.read("OUT:nl")
    return LoadedModel.from_model(model, tokenizer, spec="planted-arithmetic")


def answer_neurons(loaded: LoadedModel) -> dict[int, list[int]]:
    """``{last layer: [the answer neurons]}`` of a planted model (the last layer's live neurons)."""
    adapter = loaded.adapter
    last = adapter.n_layers - 1
    up = adapter.weight(adapter.layer(last).up_proj)  # (intermediate, hidden)
    return {last: torch.nonzero(up.abs().sum(1) > 0).flatten().tolist()}


def operand_heads(loaded: LoadedModel) -> list[str]:
    """Names of the planted operand heads (``L0.H<h>``)."""
    adapter = loaded.adapter
    w_o = adapter.weight(adapter.attn_out(0))  # (hidden, n_heads·head_dim)
    return [f"L0.H{h}" for h in range(adapter.heads.n_heads) if float(w_o[:, adapter.heads.columns(h)].abs().sum())]


def test_the_planted_model_solves_every_zero_shot_problem_and_knows_its_parts():
    import pytest

    from lmaudit.checks.core.accuracy import arithmetic_accuracy, generated_correct
    from lmaudit.checks.core.arithmetic_problems import draw_prompts
    from lmaudit.checks.core.interventions import ablate_heads, zero_neurons

    torch.set_num_threads(1)
    loaded = planted_arithmetic_model()
    problems = draw_prompts(ops=OPS, digits=[1], templates=["symbolic"], n_per_op=24, few_shot=0, seed=0)
    assert arithmetic_accuracy(loaded.model, loaded.tokenizer, problems).accuracy == 1.0
    assert bool(generated_correct(loaded.model, loaded.tokenizer, problems[::9]).all())  # greedy agrees
    assert operand_heads(loaded) == ["L0.H0", "L0.H1", "L0.H2"]
    with ablate_heads(loaded.adapter, {0: [1]}):
        assert arithmetic_accuracy(loaded.model, loaded.tokenizer, problems).accuracy == 0.0
    with zero_neurons(loaded.adapter, answer_neurons(loaded)):
        assert arithmetic_accuracy(loaded.model, loaded.tokenizer, problems).accuracy == 0.0
    with pytest.raises(ValueError, match="not enough heads"):
        planted_arithmetic_model(heads_per_operand=6)
