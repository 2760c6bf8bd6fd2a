"""Head sweep: the prefix-cached evaluator's replicas equal the naive deep-copy-per-head evaluation exactly, the
bounded screen finds the exact candidate set, the confirmation re-tests on fresh prompts with a Bonferroni
level, and the registered check keeps screening and confirmation problems apart."""

from __future__ import annotations

import pytest
import torch

from lmaudit.checks.arithmetic.head_sweep import (
    HeadSweepAudit,
    naive_correct,
    naive_screen,
    screen_heads,
    sweep_heads,
)
from lmaudit.checks.core.accuracy import (
    EncodedAnswer,
    arithmetic_accuracy,
    generated_correct,
    teacher_forced_correct,
)
from lmaudit.checks.core.arithmetic_problems import draw_prompts, generate_problems, problem_key
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.interventions import scale_heads_per_row
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.prefix_cache import PrefixCachedEvaluator, common_prefix_length
from tests.checkpoints import byte_tokenizer
from tests.test_arithmetic_planted import planted_arithmetic_model
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PREFIX = "1+2=3\n4+4=8\n"
QUERIES = [f"{a}+{b}=" for a, b in [(1, 1), (2, 7), (3, 5), (9, 9), (12, 3), (7, 45)]]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return planted_arithmetic_model()


def self_consistent_task(model, tokenizer, queries, n_answer=2):
    """Problems whose answer is the model's own greedy continuation, so the clean accuracy is high."""
    encoded = []
    for query in queries:
        ids = tokenizer(PREFIX + query)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n_answer, do_sample=False,
                                 pad_token_id=257)
        encoded.append(EncodedAnswer(tuple(ids), tuple(out[0, len(ids):].tolist())))
    return encoded


def plant_head(model, layer, head, factor=60.0):
    loaded = LoadedModel.from_model(model, byte_tokenizer())
    with torch.no_grad():
        loaded.adapter.weight(loaded.adapter.attn_out(layer))[:, loaded.adapter.heads.columns(head)] *= factor
    return loaded


def all_heads(evaluator, loaded, layer, subset=None):
    n_heads = loaded.adapter.heads.n_heads
    ablate = 1.0 - torch.eye(n_heads)
    return evaluator.correct_replicas(layer, n_heads,
                                      lambda rows: scale_heads_per_row(loaded.adapter, layer, ablate[rows]), subset)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_replicas_equal_the_naive_deep_copy_per_head(tokenizer, arch):
    model = tiny_model(arch, seed=4)
    loaded = plant_head(model, 1, 2)
    encoded = self_consistent_task(model, tokenizer, QUERIES)
    groups = [i % 2 for i in range(len(encoded))]
    evaluator = PrefixCachedEvaluator(loaded, encoded, groups=groups, layers=[0, 1, 2], stop_check=False, max_rows=5)
    fast = torch.stack([all_heads(evaluator, loaded, layer) for layer in range(3)])  # (3, 4, n)
    heads = [(layer, head) for layer in range(3) for head in range(4)]
    naive_base, naive = naive_correct(model, tokenizer, encoded, heads, stop_check=False)
    assert torch.equal(evaluator.baseline, naive_base) and bool(naive_base.all())
    assert torch.equal(fast.view(12, -1), naive)
    assert not fast[1, 2].any(), "ablating the planted head must break every answer"
    subset = torch.tensor([4, 1])
    assert torch.equal(all_heads(evaluator, loaded, 1, subset), fast[1][:, subset])


def test_prefix_split_changes_nothing(tokenizer):
    model = tiny_model("llama", seed=5)
    loaded = LoadedModel.from_model(model, tokenizer)
    encoded = self_consistent_task(model, tokenizer, QUERIES)
    assert common_prefix_length(encoded) == len(PREFIX)
    shared = PrefixCachedEvaluator(loaded, encoded, groups=[0] * len(encoded), layers=[1], stop_check=False)
    alone = PrefixCachedEvaluator(loaded, encoded, groups=list(range(len(encoded))), layers=[1], stop_check=False)
    assert torch.equal(shared.baseline, alone.baseline)
    assert torch.equal(all_heads(shared, loaded, 1), all_heads(alone, loaded, 1))
    with pytest.raises(ValueError, match="was not kept"):
        shared.correct(0)


def test_screen_equals_the_naive_screen_and_bounded_keeps_the_candidates(planted):
    """Division is beyond the planted model, so the baseline has both outcomes and the bound is exercised."""
    problems = draw_prompts(ops="+-*/", digits=[1], templates=["symbolic"], n_per_op=6, few_shot=0, seed=0)
    layers = [0, 3]
    exact = screen_heads(planted, problems, layers=layers, bounded=False)
    naive = naive_screen(planted, problems, layers=layers)
    assert exact.baseline == naive.baseline and exact.baseline[3] == 0.0 < exact.baseline[0]
    for layer in layers:
        assert exact.accuracy[layer] == naive.accuracy[layer]
    bounded = screen_heads(planted, problems, layers=layers)
    assert bounded.critical == exact.critical == naive.critical == ((0, 0), (0, 1), (0, 2))
    full = torch.tensor(bounded.exact)[layers]
    assert bool(full.any()) and not bool(full.all()), "most heads are proven below the threshold"
    assert all(bounded.max_drop(*h) >= exact.max_drop(*h) for h in [(0, 5), (3, 1)]), "the bound is an upper bound"


def test_confirmation_on_fresh_prompts_with_a_bonferroni_level(planted):
    screen_set = draw_prompts(ops="+-*", digits=[1], templates=["symbolic"], n_per_op=4, few_shot=0, seed=0)
    few = draw_prompts(ops="+-*", digits=[1], templates=["symbolic"], n_per_op=3, few_shot=0, seed=2,
                       exclude={problem_key(p) for p in screen_set})
    audit = sweep_heads(planted, screen_set, few)
    assert isinstance(audit, HeadSweepAudit) and audit.n_candidates == 3
    # 3 broken, 0 fixed: p = 1/8 > 0.05 / (3 candidates × 3 operations): a drop, but not significant
    assert audit.n_significant == 0 and audit.confirmed[0].breaks == 3 and audit.confirmed[0].p_value == 0.125
    many = draw_prompts(ops="+-*", digits=[1], templates=["symbolic"], n_per_op=12, few_shot=0, seed=2,
                        exclude={problem_key(p) for p in screen_set})
    audit = sweep_heads(planted, screen_set, many, screen=audit.screen)
    assert audit.significant_heads == ["L0.H0", "L0.H1", "L0.H2"] and audit.n_heads == 80
    assert audit.metrics()["significant_fraction"] == pytest.approx(3 / 80)


def test_sweep_needs_correct_answers(tokenizer):
    silent = LoadedModel.from_model(tiny_model("llama", seed=0), tokenizer)
    problems = draw_prompts(ops="+", digits=[1], templates=["symbolic"], n_per_op=4, few_shot=0, seed=0)
    with pytest.raises(PremiseMissing, match="screening problems"):
        sweep_heads(silent, problems, problems, layers=[0], min_correct=5)


def test_registered_sweep_confirms_on_problems_it_did_not_screen(planted, monkeypatch):
    import lmaudit.checks.arithmetic.checks as audit
    from lmaudit.checks.harness.context import AuditContext

    seen = {}
    original = audit.sweep_heads

    def spy(loaded, problems, fresh, **kwargs):
        seen["screen"], seen["fresh"] = problems, fresh
        return original(loaded, problems, fresh, **kwargs)

    monkeypatch.setattr(audit, "sweep_heads", spy)
    params = audit.HeadSweepParams(ops="+-*", few_shot=0, n_per_op=6, confirm_per_op=12, confirm_templates=["symbolic"])
    result = audit.check_head_sweep(AuditContext(model=planted), params)
    assert result.n_significant == 3 and len(seen["fresh"]) == 36
    assert not {problem_key(p) for p in seen["screen"]} & {problem_key(p) for p in seen["fresh"]}


def test_teacher_forcing_equals_generation_on_tiny_model(tokenizer):
    model = tiny_model("llama", seed=7)
    problems = generate_problems(ops="+*", digits=2, n_per_op=3, template="words", few_shot=1, seed=3)
    forced = arithmetic_accuracy(model, tokenizer, problems)
    assert forced.method == "teacher_forced"
    assert list(forced.correct) == generated_correct(model, tokenizer, problems).tolist()


def test_teacher_forcing_matches_generation_when_answers_are_greedy(tokenizer):
    model = tiny_model("llama", seed=8)
    encoded = self_consistent_task(model, tokenizer, QUERIES, n_answer=3)
    assert bool(teacher_forced_correct(model, tokenizer, encoded, batch_size=3, stop_check=False).all())


def test_report_renders_the_screen_and_the_confirmation(planted):
    from lmaudit.reports.charts import render_charts
    from lmaudit.reports.html import environment
    from lmaudit.reports.records import to_jsonable

    problems = draw_prompts(ops="+-", digits=[1], templates=["symbolic"], n_per_op=3, few_shot=0, seed=0)
    fresh = draw_prompts(ops="+-", digits=[1], templates=["symbolic"], n_per_op=8, few_shot=0, seed=2,
                         exclude={problem_key(p) for p in problems})
    data = to_jsonable(sweep_heads(planted, problems, fresh, layers=[0, 1]))
    charts = render_charts("HeadSweepAudit", data)
    assert [c.error for c in charts] == [""] * 3  # one heatmap per operation and the confirmation bars
    html = environment().get_template("sections/HeadSweepAudit.html.j2").render(record=None, result=data)
    assert "Confirmation" in html and "sign-test p" in html and html.count("<tr><td>L0.H") == 3


def test_special_tokens_with_digits_keep_teacher_forcing_exact() -> None:
    """Gemma's vocabulary has thousands of added tokens such as ``<unused12>``: they hold digits but can never spell
    part of an answer, so teacher forcing stays exact; an added token made of digits alone ("12") would not."""
    from lmaudit.checks.core.accuracy import teacher_forcing_is_exact

    tokenizer = byte_tokenizer()
    assert teacher_forcing_is_exact(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<unused12>", "<image_soft_token_3>"]})
    assert teacher_forcing_is_exact(tokenizer)
    tokenizer.add_tokens(["12"])
    assert not teacher_forcing_is_exact(tokenizer)
