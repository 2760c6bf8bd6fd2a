"""The arithmetic prompt generator: determinism, answers, subsets, few-shot prefixes, files and lm-eval plumbing."""

from __future__ import annotations

import json
import operator
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmaudit.checks.core.arithmetic_problems import (  # noqa: E402
    ArithmeticDataError,
    ArithmeticProblem,
    Operation,
    Subset,
    Template,
    carry_positions,
    classify,
    count_problems,
    draw_prompts,
    generate_problems,
    lm_eval_task_dict,
    make_problem,
    operand_range,
    parse_operations,
    problem_key,
    read_jsonl,
    write_jsonl,
)
from lmaudit.checks.core.errors import LmAuditError  # noqa: E402
from tests.strategies_arithmetic import arithmetic_problems, operands  # noqa: E402

PYTHON_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def column_sums(a: int, b: int) -> list[int]:
    da, db = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]
    sums = [0] * (len(da) + len(db) - 1)
    for i, x in enumerate(da):
        for j, y in enumerate(db):
            sums[i + j] += x * y
    return sums


def oracle_carries(a: int, b: int, op: Operation) -> tuple[int, ...]:
    """Carries without a digit loop: position k carries iff the operands' low k+1 digits overflow 10**(k+1).

    For ``*`` the same holds for the partial sum of the column sums up to k (the top column never counts);
    ``/`` is the multiplication it inverts.
    """
    if op is Operation.DIV:
        a, b, op = b, a // b, Operation.MUL
    if op is Operation.MUL:
        sums = column_sums(a, b)
        partial = [sum(s * 10**m for m, s in enumerate(sums[: k + 1])) for k in range(len(sums))]
        return tuple(k for k in range(len(sums) - 1) if partial[k] >= 10 ** (k + 1))
    width = max(len(str(a)), len(str(b)))
    low = [(a % 10 ** (k + 1), b % 10 ** (k + 1)) for k in range(width)]
    if op is Operation.ADD:
        return tuple(k for k, (x, y) in enumerate(low) if x + y >= 10 ** (k + 1))
    return tuple(k for k, (x, y) in enumerate(low) if x < y)


def space(op: Operation, digits: int) -> list[tuple[int, int]]:
    """Every (a, b) of the (op, digits) space, by brute force over the module docstring's definition."""
    numbers = operand_range(digits)
    if op is Operation.SUB:
        return [(a, b) for a in numbers for b in numbers if a >= b]
    if op is Operation.DIV:
        return [(b * q, b) for b in numbers if b >= 1 for q in numbers]
    return [(a, b) for a in numbers for b in numbers]


# ------------------------------------------------------------------------------- operations, templates


def test_operation_symbols_words_and_parsing() -> None:
    assert [(op.symbol, op.word) for op in Operation] == [
        ("+", "plus"),
        ("-", "minus"),
        ("*", "times"),
        ("/", "divided by"),
    ]
    assert Operation("/") is Operation.DIV
    assert parse_operations("+-*/") == tuple(Operation)
    assert parse_operations(" * + ") == (Operation.MUL, Operation.ADD)
    assert parse_operations("plus,divided by") == (Operation.ADD, Operation.DIV)
    assert parse_operations(["×", Operation.SUB, "div"]) == (Operation.MUL, Operation.SUB, Operation.DIV)
    for bad in ("", "+%", "++", "+,"):
        with pytest.raises(ArithmeticDataError):
            parse_operations(bad)
    assert issubclass(ArithmeticDataError, LmAuditError) and issubclass(ArithmeticDataError, ValueError)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (Template.SYMBOLIC, [("3+5=", "8"), ("7-2=", "5"), ("3*4=", "12"), ("6/3=", "2")]),
        (
            Template.WORDS,
            [
                ("3 plus 5 is", " 8"),
                ("7 minus 2 is", " 5"),
                ("3 times 4 is", " 12"),
                ("6 divided by 3 is", " 2"),
            ],
        ),
        (
            Template.PHRASE,
            [
                ("The sum of 3 and 5 is", " 8"),
                ("The difference of 7 and 2 is", " 5"),
                ("The product of 3 and 4 is", " 12"),
                ("The quotient of 6 and 3 is", " 2"),
            ],
        ),
        (
            Template.QA,
            [
                ("Q: What is 3 plus 5? A:", " 8"),
                ("Q: What is 7 minus 2? A:", " 5"),
                ("Q: What is 3 times 4? A:", " 12"),
                ("Q: What is 6 divided by 3? A:", " 2"),
            ],
        ),
    ],
)
def test_template_text_is_exact(template: Template, expected: list[tuple[str, str]]) -> None:
    pairs = [(3, 5, Operation.ADD), (7, 2, Operation.SUB), (3, 4, Operation.MUL), (6, 3, Operation.DIV)]
    for (a, b, op), (prompt, continuation) in zip(pairs, expected, strict=True):
        problem = make_problem(a, b, op, template.value)
        assert (problem.prompt, problem.continuation, problem.answer) == (
            prompt,
            continuation,
            continuation.strip(),
        )
        assert problem.template is template and problem.query == prompt


def test_generated_prompt_text_for_a_known_problem() -> None:
    (problem,) = generate_problems(ops="+", digits=1, n_per_op=1, template="words", seed=0)
    assert problem.prompt == f"{problem.a} plus {problem.b} is"
    assert problem.continuation == f" {problem.a + problem.b}"
    (qa,) = generate_problems(ops="+", digits=1, n_per_op=1, template=Template.QA, seed=0)
    assert (qa.a, qa.b) == (problem.a, problem.b)  # the template does not change which problems are drawn
    assert qa.prompt == f"Q: What is {qa.a} plus {qa.b}? A:"


# ------------------------------------------------------------------------------------------- generator


def test_deterministic_per_seed_and_seeds_differ() -> None:
    kwargs = {"ops": "+-*/", "digits": 2, "n_per_op": 20, "template": "symbolic", "few_shot": 2}
    first = generate_problems(**kwargs, seed=7)
    assert first == generate_problems(**kwargs, seed=7)
    assert [p.prompt for p in first] != [p.prompt for p in generate_problems(**kwargs, seed=8)]
    assert len(first) == 80 and [p.op for p in first] == [op for op in Operation for _ in range(20)]


def test_operations_and_few_shot_do_not_change_the_test_problems() -> None:
    everything = generate_problems(ops="+-*/", digits=2, n_per_op=10, template="qa", seed=3)
    alone = generate_problems(ops="*", digits=2, n_per_op=10, template="qa", seed=3)
    assert alone == [p for p in everything if p.op is Operation.MUL]
    shot = generate_problems(ops="*", digits=2, n_per_op=10, template="qa", few_shot=3, seed=3)
    assert [(p.a, p.b) for p in shot] == [(p.a, p.b) for p in alone]
    assert all(s.prompt.endswith("\n" + z.prompt) for s, z in zip(shot, alone, strict=True))


@pytest.mark.parametrize("digits", [1, 2, 3])
@pytest.mark.parametrize("template", list(Template))
def test_answers_are_correct(digits: int, template: Template) -> None:
    n = 50
    for problem in generate_problems(ops="+-*/", digits=digits, n_per_op=n, template=template, seed=digits):
        expected = PYTHON_OPS[problem.op.symbol](problem.a, problem.b)
        assert expected >= 0 and problem.answer == str(expected) and problem.answer.isdigit()
        assert problem.continuation == template.answer_prefix + problem.answer
        assert not problem.prompt.endswith(" ")
        assert problem.digits == digits
        first, second = (problem.b, expected) if problem.op is Operation.DIV else (problem.a, problem.b)
        assert first in operand_range(digits) and second in operand_range(digits)
        if problem.op is Operation.SUB:
            assert problem.a >= problem.b


def test_division_is_exact_and_inverts_a_multiplication_fact() -> None:
    for digits in (1, 2, 3):
        problems = generate_problems(ops="/", digits=digits, n_per_op=60, template="symbolic", seed=1)
        for p in problems:
            assert p.b >= 1 and p.a % p.b == 0 and p.a == p.b * int(p.answer)
            assert len(str(p.a)) <= 2 * digits
    with pytest.raises(ArithmeticDataError, match="not exact"):
        make_problem(7, 2, "/", "symbolic")
    with pytest.raises(ArithmeticDataError, match="divisor"):
        make_problem(0, 0, "/", "symbolic")
    with pytest.raises(ArithmeticDataError, match="a >= b"):
        make_problem(2, 7, "-", "symbolic")


@pytest.mark.parametrize("op", list(Operation))
def test_whole_one_digit_space_without_duplicates_then_a_clear_error(op: Operation) -> None:
    total = count_problems(op, 1)
    assert total == {"+": 100, "-": 55, "*": 100, "/": 90}[op.symbol] == len(space(op, 1))
    problems = generate_problems(ops=[op], digits=1, n_per_op=total, template="symbolic", seed=0)
    assert {(p.a, p.b) for p in problems} == set(space(op, 1))
    assert len({p.prompt for p in problems}) == total
    with pytest.raises(ArithmeticDataError, match=rf"asked for {total + 1} .* only {total} exist"):
        generate_problems(ops=[op], digits=1, n_per_op=total + 1, template="symbolic", seed=0)


def test_no_duplicates_in_a_large_call() -> None:
    problems = generate_problems(ops="+-*/", digits=2, n_per_op=2000, template="symbolic", seed=11)
    assert len({(p.a, p.b, p.op) for p in problems}) == len(problems) == 8000


def test_bad_arguments_are_reported() -> None:
    ok = {"ops": "+", "digits": 1, "n_per_op": 3, "template": "symbolic"}
    for bad in (
        {"digits": 4},
        {"digits": 0},
        {"n_per_op": 0},
        {"few_shot": -1},
        {"seed": -1},
        {"template": "latex"},
        {"subset": "carry-two"},
        {"ops": "+%"},
    ):
        with pytest.raises(ArithmeticDataError):
            generate_problems(**{**ok, **bad})


# --------------------------------------------------------------------------------------------- few-shot


@pytest.mark.parametrize("template", list(Template))
@pytest.mark.parametrize("k", [1, 4])
def test_few_shot_prefix_has_k_solved_lines_and_never_a_test_problem(template: Template, k: int) -> None:
    problems = generate_problems(ops="+-*/", digits=1, n_per_op=40, template=template, few_shot=k, seed=5)
    tests = {(p.op, p.a, p.b) for p in problems}
    for p in problems:
        lines = p.prompt.split("\n")
        assert len(lines) == k + 1 and lines[-1] == p.query
        assert len(p.shots) == len(set(p.shots)) == k
        for line, (a, b) in zip(lines[:-1], p.shots, strict=True):
            assert line == template.solved(a, b, p.op)
            assert line == template.render(a, b, p.op) + template.answer_prefix + str(
                PYTHON_OPS[p.op.symbol](a, b)
            )
            assert (p.op, a, b) not in tests  # drawn from problems disjoint from every test problem
            assert line != template.solved(p.a, p.b, p.op) and p.query not in line


def test_shared_shots_give_every_prompt_of_an_operation_the_same_prefix() -> None:
    problems = generate_problems(ops="+-", digits=2, n_per_op=12, template="words", few_shot=3, seed=2,
                                 shared_shots=True)
    separate = generate_problems(ops="+-", digits=2, n_per_op=12, template="words", few_shot=3, seed=2)
    assert [(p.a, p.b) for p in problems] == [(p.a, p.b) for p in separate]  # the same test problems
    for op in ("+", "-"):
        group = [p for p in problems if p.op.symbol == op]
        assert len({p.shots for p in group}) == 1 and len(group[0].shots) == 3
        assert {p.prompt.rsplit("\n", 1)[0] for p in group} == {group[0].prompt.rsplit("\n", 1)[0]}
        assert not {(p.a, p.b) for p in group} & set(group[0].shots)


def test_few_shot_needs_enough_problems_outside_the_test_set() -> None:
    generate_problems(ops="+", digits=1, n_per_op=96, template="symbolic", few_shot=4, seed=0)
    with pytest.raises(ArithmeticDataError, match="only 3 of the 100"):
        generate_problems(ops="+", digits=1, n_per_op=97, template="symbolic", few_shot=4, seed=0)
    with pytest.raises(ArithmeticDataError, match="test problem"):
        make_problem(2, 3, "+", "symbolic", shots=[(1, 1), (2, 3)])


def test_excluded_problems_are_never_drawn_as_tests_or_shots() -> None:
    """A held-out set: another seed and the judged problems excluded, as tests and as few-shot examples."""
    judged = draw_prompts(ops="+-*/", digits=[1], templates=["symbolic", "words"], n_per_op=32, few_shot=4, seed=0)
    keys = {problem_key(p) for p in judged}
    assert len(keys) == 4 * 32  # both templates ask the same problems
    held_out = draw_prompts(ops="+-*/", digits=[1], templates=["symbolic"], n_per_op=12, few_shot=4, seed=1000,
                            exclude=keys)
    assert not keys & {problem_key(p) for p in held_out}
    assert not keys & {(p.op.symbol, a, b) for p in held_out for a, b in p.shots}
    assert generate_problems(ops="+", digits=1, n_per_op=5, template="symbolic", seed=3, exclude=()) == \
        generate_problems(ops="+", digits=1, n_per_op=5, template="symbolic", seed=3)
    with pytest.raises(ArithmeticDataError, match="outside the 32 excluded"):
        generate_problems(ops="-", digits=1, n_per_op=24, template="symbolic", seed=1, exclude=keys)


# ---------------------------------------------------------------------------------------------- subsets


def test_carry_positions_known_values() -> None:
    assert carry_positions(3, 5, "+") == () and carry_positions(5, 7, "+") == (0,)
    assert carry_positions(95, 15, "+") == (0, 1) and carry_positions(950, 50, "+") == (1, 2)
    assert carry_positions(12, 7, "-") == (0,) and carry_positions(100, 1, "-") == (0, 1)
    assert carry_positions(7, 8, "*") == ()  # a single table fact never carries
    assert carry_positions(15, 3, "*") == (0,) and carry_positions(12, 3, "*") == ()
    assert carry_positions(99, 99, "*") == (0, 1)
    assert carry_positions(45, 3, "/") == carry_positions(3, 15, "*") == (0,)
    assert classify(3, 5, "+") is Subset.MEMORIZE and classify(5, 7, "+") is Subset.CHANGE_ONE
    assert classify(95, 15, "+") is None


@settings(max_examples=300)
@given(data=st.data(), op=st.sampled_from(list(Operation)))
def test_carry_positions_match_an_independent_oracle(data: st.DataObject, op: Operation) -> None:
    a, b = data.draw(operands(op))
    positions = carry_positions(a, b, op)
    assert positions == oracle_carries(a, b, op)
    assert list(positions) == sorted(set(positions))
    assert classify(a, b, op) is {0: Subset.MEMORIZE, 1: Subset.CHANGE_ONE}.get(len(positions))


@given(problem=arithmetic_problems(few_shot=st.integers(0, 3)))
def test_problem_fields_agree_with_the_oracle(problem: ArithmeticProblem) -> None:
    assert int(problem.answer) == PYTHON_OPS[problem.op.symbol](problem.a, problem.b)
    assert problem.subset is {0: Subset.MEMORIZE, 1: Subset.CHANGE_ONE}.get(
        len(oracle_carries(problem.a, problem.b, problem.op))
    )
    assert problem.prompt.count("\n") == len(problem.shots)
    assert ArithmeticProblem.from_row(json.loads(json.dumps(problem.to_row()))) == problem


@given(problem=arithmetic_problems(ops=Operation.MUL, digits=st.integers(1, 3)))
def test_memorize_products_are_their_column_sums_written_out(problem: ArithmeticProblem) -> None:
    # No carry anywhere <=> the schoolbook columns, written out side by side, are the product
    # (for operands of equal length, as generated: 0 x 10 would write "00").
    written = "".join(str(s) for s in reversed(column_sums(problem.a, problem.b)))
    assert (written == problem.answer) == (problem.subset is Subset.MEMORIZE)


@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("op", list(Operation))
def test_subset_sizes_match_a_brute_force_count(op: Operation, digits: int) -> None:
    pairs = space(op, digits)
    counts = [len(oracle_carries(a, b, op)) for a, b in pairs]
    assert count_problems(op, digits) == len(pairs)
    assert count_problems(op, digits, "memorize") == counts.count(0)
    assert count_problems(op, digits, Subset.CHANGE_ONE) == counts.count(1)


@pytest.mark.parametrize("digits", [1, 2, 3])
@pytest.mark.parametrize("subset", list(Subset))
@pytest.mark.parametrize("op", list(Operation))
def test_subsets_are_what_they_claim(op: Operation, digits: int, subset: Subset) -> None:
    available = count_problems(op, digits, subset)
    if available == 0:  # 1-digit -, * and / have no change-one problems
        assert (digits, subset) == (1, Subset.CHANGE_ONE) and op is not Operation.ADD
        with pytest.raises(ArithmeticDataError, match="only 0 exist"):
            generate_problems(ops=[op], digits=digits, n_per_op=1, template="qa", subset=subset)
        return
    n = min(available, 100)
    problems = generate_problems(
        ops=[op],
        digits=digits,
        n_per_op=n,
        template="qa",
        subset=subset.value,
        few_shot=min(2, available - n),
        seed=2,
    )
    wanted = 0 if subset is Subset.MEMORIZE else 1
    for p in problems:
        assert p.subset is subset and len(oracle_carries(p.a, p.b, op)) == wanted
        assert all(len(oracle_carries(a, b, op)) == wanted for a, b in p.shots)


def test_one_digit_multiplication_and_division_are_all_table_facts() -> None:
    assert count_problems("*", 1, "memorize") == 100 and count_problems("/", 1, "memorize") == 90
    assert count_problems("+", 1, "memorize") == 55 and count_problems("+", 1, "change-one") == 45


# ------------------------------------------------------------------------------------- files and lm-eval


def test_jsonl_round_trip(tmp_path) -> None:
    problems = generate_problems(ops="+-*/", digits=2, n_per_op=5, template="phrase", few_shot=2, seed=4)
    path = write_jsonl(problems, tmp_path / "sub" / "arith.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and {"prompt", "continuation", "answer"} <= set(rows[0])
    assert rows[0]["prompt"] == problems[0].prompt and rows[0]["op"] == "+"
    assert read_jsonl(path) == problems
    rows[0]["answer"] = "0"
    with pytest.raises(ArithmeticDataError, match="answer"):
        ArithmeticProblem.from_row(rows[0])


def test_task_dict_is_a_valid_lm_eval_task_config(tmp_path) -> None:
    from lm_eval.config.task import TaskConfig

    task = lm_eval_task_dict(tmp_path / "a.jsonl", name="arith")
    assert task["output_type"] == "generate_until" and task["doc_to_target"] == "continuation"
    assert task["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}
    assert task["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "a.jsonl")}}
    config = TaskConfig(**task)
    assert config.metric_list[0]["metric"] == "exact_match" and config.target_delimiter == ""
    TaskConfig(**lm_eval_task_dict(tmp_path / "a.jsonl", name="arith", match="first_integer"))
    TaskConfig(**lm_eval_task_dict(tmp_path / "a.jsonl", name="arith", output_type="loglikelihood"))
    with pytest.raises(ArithmeticDataError):
        lm_eval_task_dict(tmp_path / "a.jsonl", name="arith", output_type="multiple_choice")
    with pytest.raises(ArithmeticDataError):
        lm_eval_task_dict(
            tmp_path / "a.jsonl", name="arith", output_type="loglikelihood", match="first_integer"
        )


def _tasks(tmp_path, problems):
    path = write_jsonl(problems, tmp_path / "arith.jsonl")
    variants = {
        "arith_strict": {},
        "arith_first_integer": {"match": "first_integer"},
        "arith_loglikelihood": {"output_type": "loglikelihood"},
    }
    tasks = []
    for name, kwargs in variants.items():
        task = lm_eval_task_dict(path, name=name, **kwargs)
        task["dataset_kwargs"]["cache_dir"] = str(tmp_path / "hf-datasets")  # keep the datasets cache local
        tasks.append(task)
    return tasks


def _evaluate(lm, tasks, limit):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's hundreds of built-in task YAMLs alone takes ~15 s.
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
    )


def test_lm_eval_scores_an_oracle_and_a_space_less_oracle(tmp_path) -> None:
    """The targets are right: a model emitting each continuation scores 1; dropping the space fails strict."""
    from lm_eval.api.model import LM

    problems = generate_problems(ops="+-*/", digits=2, n_per_op=3, template="words", few_shot=2, seed=9)
    expected = {p.prompt: p.continuation for p in problems}

    class Oracle(LM):
        def __init__(self, drop_space: bool) -> None:
            super().__init__()
            self.drop_space = drop_space

        def _emit(self, prompt: str) -> str:
            text = expected[prompt]
            return text.lstrip() if self.drop_space else text

        def generate_until(self, requests):
            assert all(r.args[1]["until"] == ["\n"] and r.args[1]["max_gen_toks"] == 8 for r in requests)
            return [self._emit(r.args[0]) for r in requests]

        def loglikelihood(self, requests):
            return [
                (0.0, self._emit(context) == continuation)
                for context, continuation in (r.args for r in requests)
            ]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    tasks = _tasks(tmp_path, problems)
    results = _evaluate(Oracle(drop_space=False), tasks, limit=None)["results"]
    assert results["arith_first_integer"]["exact_match,first_integer"] == 1.0
    assert results["arith_loglikelihood"]["acc,none"] == 1.0
    assert results["arith_strict"]["exact_match,none"] == 1.0

    spaceless = _evaluate(Oracle(drop_space=True), tasks, limit=None)["results"]
    assert spaceless["arith_strict"]["exact_match,none"] == 0.0  # " 42" is expected after "is", not "42"
    assert spaceless["arith_first_integer"]["exact_match,first_integer"] == 1.0
    assert spaceless["arith_loglikelihood"]["acc,none"] == 0.0


def test_lm_eval_runs_a_tiny_random_llama(tmp_path) -> None:
    """Plumbing only: HFLM around an in-memory random Llama with the byte tokenizer; it scores ~0."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.checkpoints import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    problems = generate_problems(ops="+*", digits=1, n_per_op=3, template="symbolic", few_shot=1, seed=0)
    out = _evaluate(lm, _tasks(tmp_path, problems), limit=4)
    results = out["results"]
    assert 0.0 <= results["arith_strict"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["arith_first_integer"]["exact_match,first_integer"] <= 1.0
    assert 0.0 <= results["arith_loglikelihood"]["acc,none"] <= 1.0
    samples = out["samples"]["arith_strict"]
    assert len(samples) == 4
    assert [s["target"] for s in samples] == [p.continuation for p in problems[:4]]
    assert samples[0]["arguments"][0][0] == problems[0].prompt


def test_constructor_rejects_fields_that_disagree() -> None:
    good = make_problem(3, 5, "+", "words")
    fields = {f: getattr(good, f) for f in ("a", "b", "op", "template", "prompt", "answer", "continuation")}
    fields |= {"digits": 1, "subset": Subset.MEMORIZE}
    assert ArithmeticProblem(**fields) == good
    for bad in (
        {"op": "+"},
        {"continuation": "8"},
        {"prompt": "3 plus 5 is "},
        {"digits": 2},
        {"subset": None},
    ):
        with pytest.raises(ArithmeticDataError, match="inconsistent"):
            ArithmeticProblem(**{**fields, **bad})
