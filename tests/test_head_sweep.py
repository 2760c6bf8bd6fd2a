"""Head sweep: the fast sweep (prefix cache, layer skip, batched head×prompt rows) equals the naive
deep-copy-per-head sweep exactly, and finds a planted head."""

from __future__ import annotations

import pytest
import torch

from lmaudit.checks.arithmetic.head_sweep import (
    common_prefix_length,
    head_sweep,
    naive_correct,
    naive_head_sweep,
    sign_test_p,
    sweep_correct,
)
from lmaudit.checks.core.accuracy import (
    EncodedAnswer,
    arithmetic_accuracy,
    generated_correct,
    teacher_forced_correct,
)
from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.arithmetic_problems import generate_problems
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import tiny_model

PREFIX = "1+2=3\n4+4=8\n"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


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


QUERIES = [f"{a}+{b}=" for a, b in [(1, 1), (2, 7), (3, 5), (9, 9), (12, 3), (7, 45)]]


def plant_head(model, layer, head, factor=60.0):
    adapter = adapter_for(model)
    with torch.no_grad():
        adapter.weight(adapter.attn_out(layer))[:, adapter.heads.columns(head)] *= factor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_sweep_equals_naive_deep_copy_sweep(tokenizer, arch):
    model = tiny_model(arch, seed=4)
    plant_head(model, 1, 2)
    encoded = self_consistent_task(model, tokenizer, QUERIES)
    groups = [i % 2 for i in range(len(encoded))]
    base, fast, evaluated = sweep_correct(model, tokenizer, encoded, groups, max_rows=12, stop_check=False)
    assert bool(evaluated.all())
    heads = [(layer, head) for layer in range(3) for head in range(4)]
    naive_base, naive = naive_correct(model, tokenizer, encoded, heads, stop_check=False)
    assert torch.equal(base, naive_base) and bool(base.all())
    assert torch.equal(fast.view(12, -1), naive)
    assert not fast[1, 2].any(), "ablating the planted head must break every answer"
    assert fast.float().mean() > 0.5


def test_prefix_cache_changes_nothing(tokenizer):
    model = tiny_model("llama", seed=5)
    encoded = self_consistent_task(model, tokenizer, QUERIES)
    assert common_prefix_length(encoded) == len(PREFIX)
    groups = [0] * len(encoded)
    with_prefix = sweep_correct(model, tokenizer, encoded, groups, use_prefix=True, stop_check=False)
    without = sweep_correct(model, tokenizer, encoded, groups, use_prefix=False, stop_check=False)
    assert torch.equal(with_prefix[0], without[0]) and torch.equal(with_prefix[1], without[1])


def test_planted_head_is_the_only_critical_one(tokenizer):
    model = tiny_model("llama", seed=4)
    plant_head(model, 1, 2)
    problems = generate_problems(ops="+-", digits=1, n_per_op=6, template="symbolic", few_shot=2, seed=1,
                                 shared_shots=True)
    # Teach the tiny model nothing; instead score the problems' answers as the model's own greedy tokens.
    encoded = self_consistent_task(model, tokenizer, [p.query for p in problems], n_answer=1)
    base, correct, _ = sweep_correct(model, tokenizer, encoded, [p.op.symbol == "+" for p in problems],
                                     stop_check=False)
    drop = base.float().mean() - correct.float().mean(dim=-1)  # (layers, heads)
    assert torch.nonzero(drop >= 0.5).tolist() == [[1, 2]]


def test_head_sweep_result_on_problems_matches_naive(tokenizer):
    model = tiny_model("llama", seed=6)
    problems = generate_problems(ops="+-*/", digits=1, n_per_op=3, template="symbolic", few_shot=2, seed=0,
                                 shared_shots=True)
    fast = head_sweep(model, tokenizer, problems, layers=[0, 2])
    naive = naive_head_sweep(model, tokenizer, problems, layers=[0, 2])
    assert fast.ops == naive.ops == ("+", "-", "*", "/")
    assert fast.baseline == naive.baseline
    for layer in (0, 2):
        assert fast.accuracy[layer] == naive.accuracy[layer]
    assert fast.critical == naive.critical
    assert set(fast.metrics()) >= {"n_critical", "critical_heads", "max_drop_points"}


@pytest.mark.parametrize(("breaks", "fixes", "p"), [(0, 0, 1.0), (3, 0, 0.125), (5, 1, 7 / 64), (1, 3, 15 / 16)])
def test_sign_test_p_is_the_binomial_tail(breaks, fixes, p):
    assert sign_test_p(breaks, fixes) == pytest.approx(p)


@pytest.mark.parametrize("threshold", [0.2, 0.34])
def test_bounded_sweep_finds_the_same_critical_heads(tokenizer, threshold):
    """The bounded sweep skips baseline-wrong problems only for heads it proved below the threshold: same
    critical set, identical correctness on every head it runs in full, and a valid bound on the others."""
    model = tiny_model("llama", seed=4)
    plant_head(model, 1, 2, factor=8.0)
    queries = [f"{a}+{b}=" for a in range(1, 5) for b in (2, 7, 9)]
    encoded = self_consistent_task(model, tokenizer, queries, n_answer=1)
    # Every third problem gets a wrong answer (the greedy token + 1), so the baseline has both outcomes.
    encoded = [e if i % 3 else EncodedAnswer(e.prompt_ids, (e.answer_ids[0] + 1,)) for i, e in enumerate(encoded)]
    ops = [i % 2 for i in range(len(encoded))]
    exact = sweep_correct(model, tokenizer, encoded, ops, stop_check=False)
    bounded = sweep_correct(model, tokenizer, encoded, ops, stop_check=False, bound=(ops, threshold))
    assert torch.equal(exact.baseline, bounded.baseline) and 0 < exact.baseline.float().mean() < 1
    assert bool(exact.evaluated.all())
    full = bounded.evaluated.all(dim=-1)  # (layers, heads)
    assert bool(full.any()) and not bool(full.all()), "some heads must be proven below the threshold"
    assert torch.equal(bounded.correct[full], exact.correct[full])
    op_of = torch.tensor(ops)

    def drop(correct):  # (layers, heads): largest drop over the two operations
        return torch.stack([(exact.baseline[op_of == j].float().mean() - correct[..., op_of == j].float().mean(-1))
                            for j in (0, 1)]).amax(0)

    assert torch.equal(drop(bounded.correct) >= threshold, drop(exact.correct) >= threshold)
    assert bool((drop(bounded.correct)[~full] < threshold).all())
    assert bool((drop(bounded.correct) >= drop(exact.correct)).all()), "the bound is an upper bound on the drop"


def test_teacher_forcing_equals_generation_on_tiny_model(tokenizer):
    model = tiny_model("llama", seed=7)
    problems = generate_problems(ops="+*", digits=2, n_per_op=3, template="words", few_shot=1, seed=3)
    forced = arithmetic_accuracy(model, tokenizer, problems)
    assert forced.method == "teacher_forced"
    assert list(forced.correct) == generated_correct(model, tokenizer, problems).tolist()


def test_teacher_forcing_matches_generation_when_answers_are_greedy(tokenizer):
    """With answers taken from greedy generation, teacher forcing (no stop check) marks every row correct."""
    model = tiny_model("llama", seed=8)
    encoded = self_consistent_task(model, tokenizer, QUERIES, n_answer=3)
    assert bool(teacher_forced_correct(model, tokenizer, encoded, batch_size=3, stop_check=False).all())


def test_report_renders_heatmaps_and_tables(tokenizer):
    from lmaudit.checks.arithmetic.checks import HeadSweepAudit
    from lmaudit.checks.arithmetic.cna import compare_prompts
    from lmaudit.reports.charts import render_charts
    from lmaudit.reports.html import environment
    from lmaudit.reports.records import to_jsonable

    model = tiny_model("llama", seed=6)
    problems = generate_problems(ops="+-", digits=1, n_per_op=2, template="symbolic", few_shot=1, seed=0,
                                 shared_shots=True)
    sweep = head_sweep(model, tokenizer, problems, layers=[0, 2])
    data = to_jsonable(HeadSweepAudit(sweep, ("L0.H1",), sweep.top_head_rows(5)))
    charts = render_charts("HeadSweepAudit", data)
    assert [c.error for c in charts] == [""] * 3  # one heatmap per operation and the top-heads bars
    env = environment()
    html = env.get_template("sections/HeadSweepAudit.html.j2").render(record=None, result=data)
    assert "Critical heads" in html and "pinned: L0.H1" in html
    assert "sign-test p" in html and html.count("<tr><td>L") == 5
    comparison = to_jsonable(compare_prompts(model, tokenizer, "1+1=", "2", "2+2=", "4", k=3, layers=[2]))
    table = env.get_template("sections/CnaComparison.html.j2").render(record=None, result=comparison)
    assert table.count("<tr>") >= 4
