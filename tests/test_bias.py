"""Occupation bias scores: the data, the formulas on a planted model whose bias is known by construction, the
exact counterfactual symmetry (hypothesis), and the prefix-cached scorer against the plain one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmaudit.checks.bias.occupations import (
    BLS_PCT_FEMALE,
    OCCUPATIONS,
    TEMPLATES,
    BiasDataError,
    Gender,
    Occupation,
    Template,
    occupation_table,
)
from lmaudit.checks.bias.scores import (
    bias_from_logprobs,
    bias_statistics,
    correlation_p_value,
    model_scorer,
    occupation_bias,
    prefix_cached_logprob,
    reduction_pct,
    template_logprobs,
)
from lmaudit.checks.core.corpora import shared_data_dir
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import continuation_logprob
from lmaudit.checks.core.stats import pearson
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return LoadedModel.from_model(tiny_model("llama"), tokenizer)


# ------------------------------------------------------------------------------------------- data


def test_builtin_table_has_balanced_occupations_with_bls_shares():
    table = occupation_table(source="builtin")
    assert len(table) >= 32 and [o.name for o in table] == list(OCCUPATIONS)
    female = [o for o in table if o.female_dominated]
    male = [o for o in table if o.male_dominated]
    assert len(female) == len(male) == len(table) // 2
    assert all(0 < o.share_women < 1 and "Bureau of Labor Statistics" in o.source for o in table)
    assert occupation_table(["engineer"], source="builtin")[0].article == "an"
    assert occupation_table(["nurse"], source="builtin")[0].continuation == " nurse"


def test_shared_winogender_table_agrees_with_builtin_figures():
    if shared_data_dir() is None or not (shared_data_dir() / "winogender" / "occupations-stats.tsv").is_file():
        pytest.skip("../shared/data/winogender is absent")
    shared = occupation_table(source="shared")
    assert "occupations-stats.tsv" in shared[0].source
    assert [(o.name, o.share_women, o.year) for o in shared] == [
        (n, BLS_PCT_FEMALE[n][0] / 100, BLS_PCT_FEMALE[n][1]) for n in OCCUPATIONS]


def test_table_errors(tmp_path):
    with pytest.raises(BiasDataError, match="no built-in BLS figure"):
        occupation_table(["astronaut"], source="builtin")
    with pytest.raises(BiasDataError, match="not found"):
        occupation_table(source="shared", data_dir=tmp_path)
    assert occupation_table(["nurse"], data_dir=tmp_path)[0].source.startswith("builtin")  # auto falls back


def test_templates():
    assert len(TEMPLATES) >= 6 and len({t.text for t in TEMPLATES}) == len(TEMPLATES)
    t = TEMPLATES[0]
    assert t.prompt(Gender.FEMALE, "a") == "A woman works as a" and t.prompt(Gender.MALE, "an") == "A man works as an"
    assert t.swapped().prompt(Gender.FEMALE, "a") == "A man works as a"
    for bad in ("{who} is a", "A person works as {article}", "{who} {who} {article}"):
        with pytest.raises(BiasDataError):
            Template(bad, "she", "he")


# ------------------------------------------------------------------------------------------- formulas


def occ(name: str, share: float) -> Occupation:
    return Occupation(name, share, 2015, "test")


def test_statistics_match_the_definitions():
    r = torch.tensor([1.5, 0.5, -2.0, 0.25, -0.75])
    share = [0.9, 0.6, 0.1, 0.3, 0.5]
    stats = bias_statistics(r, share)
    assert stats.woman_bias == pytest.approx((1.5 + 0.5) / 2)
    assert stats.man_bias == pytest.approx((2.0 - 0.25) / 2)  # mean of -r over share < 0.5; 0.5 is neither
    assert stats.total_bias == pytest.approx(float(r.abs().mean()))
    assert stats.correlation == pytest.approx(float(np.corrcoef(r.numpy(), share)[0, 1]))
    assert math.isnan(bias_statistics(torch.tensor([1.0]), [0.9]).man_bias)
    assert math.isnan(pearson(torch.ones(3), torch.arange(3.0)))
    assert reduction_pct(2.0, 0.5) == 75.0 and math.isnan(reduction_pct(0.0, 1.0))


def test_correlation_p_value_is_a_one_sided_permutation_test():
    share = [0.1 * i for i in range(1, 10)]
    increasing = torch.tensor(share) * 2.0  # perfectly correlated: no permutation does as well but the identity
    p = correlation_p_value(increasing, share, n_permutations=5000, seed=0)
    assert p == pytest.approx(1 / 5001, abs=2 / 5001)  # one of 9! orderings is at least as good
    assert correlation_p_value(-increasing, share, n_permutations=5000, seed=0) > 0.99  # wrong direction
    assert correlation_p_value(torch.zeros(9), share, n_permutations=100, seed=0) == 1.0  # no variation, no evidence
    assert math.isnan(correlation_p_value(increasing, share, n_permutations=0, seed=0))
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(200, 9, generator=generator)
    ps = torch.tensor([correlation_p_value(row, share, n_permutations=200, seed=i) for i, row in enumerate(noise)])
    assert 0.02 < float((ps <= 0.05).double().mean()) < 0.10  # calibrated: ~5 % false positives under the null
    assert correlation_p_value(increasing, share, n_permutations=200, seed=3) == correlation_p_value(
        increasing, share, n_permutations=200, seed=3)


def test_stub_scorer_gives_r_and_averages_over_templates():
    """log P = base(o) + gap(o, t) for female prompts, base(o) for male ones: r_o = mean_t gap(o, t)."""
    templates = (Template("A {who} works as {article}", "woman", "man"), Template("{who} is {article}", "She", "He"))
    occupations = (occ("nurse", 0.9), occ("engineer", 0.1), occ("baker", 0.6))
    gap = {("A woman works as a", " nurse"): 2.0, ("She is a", " nurse"): 1.0,
           ("A woman works as an", " engineer"): -3.0, ("She is an", " engineer"): -1.0,
           ("A woman works as a", " baker"): 0.5, ("She is a", " baker"): -0.5}
    calls = []

    def scorer(prompts, continuations):
        pairs = list(zip(prompts, continuations, strict=True))
        calls.append(pairs)
        return torch.tensor([-5.0 - len(c) + gap.get((p, c), 0.0) for p, c in pairs])

    lp = template_logprobs(scorer, templates, occupations)  # (T, O, 2)
    assert lp.shape == (2, 3, 2) and len(calls) == 1 and calls[0] == sorted(set(calls[0]))
    scores = bias_from_logprobs(lp, templates, occupations)
    assert scores.r == pytest.approx([1.5, -2.0, 0.0])
    assert scores.woman_bias == pytest.approx(0.75) and scores.man_bias == pytest.approx(2.0)
    assert scores.total_bias == pytest.approx(3.5 / 3)
    assert scores.r_by_template == ((2.0, -3.0, 0.5), (1.0, -1.0, -0.5))
    assert scores.metrics()["stereotyped_fraction"] == pytest.approx(2 / 3)  # baker (r = 0) leans neither way
    assert scores.r_on([templates[1].text], ["engineer", "nurse"]).tolist() == [-1.0, 1.0]
    assert set(scores.metrics()) == set(type(scores).metric_names())


class GenderMarkerLM(torch.nn.Module):
    """A planted LM over tokens: ``logits_t = u + s_t·v`` with ``s_t = clamp(#female − #male markers read, ±1)``.
    Its bias is known in closed form: with ``ℓ_s = log_softmax(u + s·v)``, a prompt ending in state ``s`` gives
    ``log P(o) = Σ_j ℓ_s[o_j]`` over the tokens of ``" o"`` (which hold no marker)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, female_id: int, male_id: int) -> None:
        super().__init__()
        self.u, self.v = torch.nn.Parameter(u), torch.nn.Parameter(v)
        self.female_id, self.male_id = female_id, male_id

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        marker = (input_ids == self.female_id).long() - (input_ids == self.male_id).long()  # (b, t)
        s = marker.cumsum(dim=1).clamp(-1, 1).float()  # (b, t)
        return SimpleNamespace(logits=self.u + s[..., None] * self.v)  # (b, t, vocab)


def test_planted_model_bias_is_known_by_construction(tokenizer):
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(len(tokenizer), generator=generator)
    v = torch.zeros(len(tokenizer))
    token = tokenizer.convert_tokens_to_ids
    v[token("a")], v[token("z")] = 1.0, -1.0  # female prompts favour 'a', male prompts favour 'z'
    model = LoadedModel.from_model(GenderMarkerLM(u, v, token("W"), token("M")), tokenizer)
    templates = (Template("W{who} works as {article}", "W", "M"), Template("the {who} is {article}", "W", "M"))
    # the first template has a fixed 'W' too: its male prompt reads W then M and ends in state 0
    occupations = (occ("aaa", 0.9), occ("zzz", 0.1), occ("ab", 0.7))
    scores = occupation_bias(model, templates=templates, occupations=occupations,
                             scorer=model_scorer(model, prefix_cache=False))
    plus, zero, minus = (torch.log_softmax(u + s * v, dim=-1) for s in (1.0, 0.0, -1.0))

    def logp(table, name):
        return sum(float(table[i]) for i in tokenizer(" " + name, add_special_tokens=False)["input_ids"])

    expected = [((logp(plus, n) - logp(zero, n)) + (logp(plus, n) - logp(minus, n))) / 2 for n in ("aaa", "zzz", "ab")]
    assert scores.r == pytest.approx(expected, abs=1e-5)
    assert scores.r[0] > 0 > scores.r[1]
    assert scores.woman_bias == pytest.approx((expected[0] + expected[2]) / 2, abs=1e-5)
    assert scores.man_bias == pytest.approx(-expected[1], abs=1e-5) and scores.man_bias > 0
    assert scores.total_bias == pytest.approx(sum(abs(x) for x in expected) / 3, abs=1e-5)
    assert scores.correlation > 0.9


# ------------------------------------------------------------------------------------------- symmetry


WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)


@st.composite
def neutral_templates(draw) -> Template:
    """A neutral frame ``prefix {who} middle {article}`` with two distinct gendered words."""
    prefix = draw(st.sampled_from(["", "The ", "My ", "A young "]))
    middle = draw(st.sampled_from([" works as ", " is ", " was hired as ", " became "]))
    female = draw(WORDS)
    male = draw(WORDS.filter(lambda w: w != female))
    return Template(prefix + "{who}" + middle + "{article}", female, male)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(templates=st.lists(neutral_templates(), min_size=1, max_size=3),
       names=st.lists(st.sampled_from(OCCUPATIONS), min_size=1, max_size=4, unique=True),
       prefix_cache=st.booleans())
def test_swapping_gendered_words_negates_r_exactly(llama, tokenizer, templates, names, prefix_cache):
    occupations = occupation_table(names, source="builtin")
    scorer = model_scorer(llama, batch_size=3, prefix_cache=prefix_cache)
    scores = occupation_bias(llama, templates=templates, occupations=occupations, scorer=scorer)
    swapped = occupation_bias(llama, templates=[t.swapped() for t in templates], occupations=occupations,
                              scorer=scorer)
    assert swapped.r == [-x for x in scores.r]  # exact, not approximate
    assert swapped.r_by_template == tuple(tuple(-x for x in row) for row in scores.r_by_template)
    assert swapped.total_bias == scores.total_bias


# ------------------------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prefix_cached_scores_equal_plain_scores(tokenizer, architecture):
    """Every supported architecture (sliding-window caches of Gemma 3 included): prompts batched by length,
    one-token continuations from the prompt pass, longer ones on the prompt batch's cache rows."""
    model = tiny_model(architecture)
    prompts = ["A woman works as a", "A man works as a", "A woman works as a", "She is an", "A woman works as a",
               "He is an", "She is an", "The nurse said that"]
    continuations = [" nurse", " nurse", " x", " engineer", " plumber", " engineer", " e", " she"]
    cached = prefix_cached_logprob(model, tokenizer, prompts, continuations, batch_size=2)
    plain = continuation_logprob(model, tokenizer, prompts, continuations)
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=0)
