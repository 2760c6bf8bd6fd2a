"""Registers the super-weight checks (Yu et al. 2024, "The Super Weight in Large Language Models"): the area's only
module that imports the harness. Each check turns the audit context into plain arguments for the science
(:mod:`.detect`, :mod:`.invariance`, :mod:`.impact`, :mod:`.stopwords`, :mod:`.scaling`).

One detection per session and settings is shared by every check, and so are the perplexity windows and the
zero-shot scores under each edit (typed artifacts): the entries that gate different metrics of Table 1, and the
scaling curve (whose factors 0 and 1 are Table 1's pruning and original), measure each edit once. A model on which no super
weight is confirmed makes the directory entry and every dependent entry skip with the detection's reason
(:class:`~lmaudit.checks.core.errors.PremiseMissing`), and the quantization area, which asks for
:class:`~lmaudit.checks.core.outliers.SuperWeightSites`, gets empty sites carrying the same reason.
"""

from __future__ import annotations

from typing import Literal

from lmaudit.checks.core.errors import DataUnavailableError
from lmaudit.checks.core.finetune import LoraRecipe
from lmaudit.checks.core.outliers import SuperActivation, SuperWeightSites
from lmaudit.checks.core.perplexity import corpus_windows
from lmaudit.checks.core.zero_shot import ScoreBook, ZeroShotTask, zero_shot_tasks
from lmaudit.checks.harness.context import AuditContext, provide
from lmaudit.checks.harness.registry import CheckParams, register_check
from lmaudit.checks.superweights.conditions import PAPER_OTHERS_SHARE, WindowCache
from lmaudit.checks.superweights.detect import (
    DEFAULT_PROMPT,
    DetectionSettings,
    SuperWeightDetection,
    SuperWeightDirectory,
    detect,
)
from lmaudit.checks.superweights.impact import CONDITIONS, SuperWeightImpact, superweight_impact
from lmaudit.checks.superweights.invariance import (
    INVARIANCE_PROMPTS,
    FinetuneInvariance,
    PromptInvariance,
    finetune_invariance,
    prompt_invariance,
)
from lmaudit.checks.superweights.scaling import PAPER_SCALES, SuperWeightScaling, superweight_scaling
from lmaudit.checks.superweights.stopwords import STOPWORDS, StopwordShift, stopword_shift

_DEFAULTS = DetectionSettings()


class DetectionParams(CheckParams):
    """How the super weights are found (every check of the area detects with these)."""

    prompt: str = DEFAULT_PROMPT
    spike_factor: float = _DEFAULTS.spike_factor
    collapse_factor: float = _DEFAULTS.collapse_factor
    confirm_layers: int = _DEFAULTS.confirm_layers
    max_super_weights: int = _DEFAULTS.max_super_weights

    def settings(self) -> DetectionSettings:
        return DetectionSettings(self.spike_factor, self.collapse_factor, self.confirm_layers, self.max_super_weights)


def detection(context: AuditContext, params: DetectionParams) -> SuperWeightDetection:
    """The session's detection with these settings (built once, shared by every check)."""
    model = context.model
    return context.artifact(SuperWeightDetection, ("superweights", params.prompt, params.settings()),
                            lambda: detect(model, params.prompt, settings=params.settings()))


@provide(SuperWeightSites)
def super_weight_sites(context: AuditContext) -> SuperWeightSites:
    """The confirmed super weights with the default settings, for other areas; empty, with the reason, when none."""
    found = detection(context, DetectionParams())
    if not found.super_weights:
        return SuperWeightSites((), (), found.why_none())
    first: dict[tuple[int, int], SuperActivation] = {}
    for sw in found.super_weights:  # one super activation per (layer, row), whatever the number of weights
        first.setdefault((sw.layer, sw.row), SuperActivation(sw.layer, sw.token, sw.row, sw.activation))
    return SuperWeightSites(tuple(found.coordinates), tuple(first.values()),
                            f"data-free detection on {found.prompt!r}, each confirmed causally")


# ------------------------------------------------------------------------------------------------ directory


@register_check("superweights", params=DetectionParams, area="superweights")
def superweights_audit(context: AuditContext, params: DetectionParams) -> SuperWeightDirectory:
    """The super-weight directory found data-free from one prompt and confirmed causally (Yu et al. 2024, §3.2)."""
    found = detection(context, params)
    found.require()
    return SuperWeightDirectory(found)


# ------------------------------------------------------------------------------------------------ invariance


class PromptInvarianceParams(DetectionParams):
    prompts: list[str] = list(INVARIANCE_PROMPTS)  # all start with different tokens
    bos: bool = False  # with a BOS in front, every prompt would start alike (the invariance module's docstring)


@register_check("superweights_prompt_invariance", params=PromptInvarianceParams, area="superweights")
def prompt_invariance_audit(context: AuditContext, params: PromptInvarianceParams) -> PromptInvariance:
    """The same super weights on prompts that start differently, without BOS (Yu et al. 2024, §3.2)."""
    reference = detection(context, params)
    key = ("superweight-prompts", params.model_dump_json())
    return context.artifact(PromptInvariance, key,
                            lambda: prompt_invariance(context.model, reference, params.prompts, bos=params.bos))


class FinetuneInvarianceParams(DetectionParams):
    steps: int = 30  # LoRA steps when no --compare-model is given (core.finetune holds the recipe)
    seed: int = 0


@register_check("superweights_finetune_invariance", params=FinetuneInvarianceParams, area="superweights")
def finetune_invariance_audit(context: AuditContext, params: FinetuneInvarianceParams) -> FinetuneInvariance:
    """The super weights stay put after fine-tuning (--compare-model, else a seeded offline LoRA fine-tune)."""
    reference = detection(context, params)
    reference.require()  # before paying for a fine-tune
    tuned, source = context.compare_model(), "compare-model"
    if tuned is None:
        tuned, source = context.finetuned(LoraRecipe(steps=params.steps, seed=params.seed)), "lora"
    return finetune_invariance(context.model, reference, tuned, source=source)


# ------------------------------------------------------------------------------------------------ impact


def shared_windows(context: AuditContext, found: SuperWeightDetection, seq_len: int, n_windows: int, *,
                   layer_skip: bool = True) -> WindowCache:
    """The session corpus's perplexity windows for these super weights, shared by every check that scores them
    (an edit measured by one check is not measured again by another); the clean state entering the super
    weights' layer is kept, where every edit of theirs starts."""
    corpus, model = context.corpus(), context.model
    key = ("superweight-windows", corpus.source, len(corpus.text), seq_len, n_windows, layer_skip,
           found.coordinate_set)
    layer = min(sw.layer for sw in found.super_weights)
    return context.artifact(WindowCache, key, lambda: WindowCache(
        model, corpus_windows(model.tokenizer, corpus, seq_len, n_windows), [layer], layer_skip=layer_skip))


def shared_scores(context: AuditContext, found: SuperWeightDetection, tasks: list[ZeroShotTask],
                  limit: int) -> ScoreBook:
    """Zero-shot scores on these tasks and documents, shared by every check that compares the same edits."""
    key = ("superweight-scores", tuple(t.name for t in tasks), limit, found.coordinate_set)
    return context.artifact(ScoreBook, key, lambda: ScoreBook(context.model, tasks, limit=limit))


def available_tasks(context: AuditContext, names: list[str]) -> tuple[list[ZeroShotTask], list[str]]:
    """The zero-shot tasks asked for; :class:`DataUnavailableError` (a skip) when some were asked for and the
    data of none of them is on this machine."""
    tasks, skipped = zero_shot_tasks(names, seed=context.seed)
    if names and not tasks:
        raise DataUnavailableError(f"none of the zero-shot tasks {names} has its data here (../shared/data or "
                                   "$LMAUDIT_DATA)")
    return tasks, skipped


class ImpactParams(DetectionParams):
    others_share: float = PAPER_OTHERS_SHARE  # of the parameter count: the paper's 7000 of Llama-7B's 6.74e9
    seq_len: int = 128
    n_windows: int = 8
    tasks: list[str] = []  # zero-shot tasks (core.zero_shot); none: perplexity only
    limit: int = 30  # documents per task and condition
    # lm-eval re-runs every choice's context: each condition scored costs ~20x its perplexity windows
    accuracy_conditions: list[Literal["original", "prune_sw", "prune_others", "prune_sw_restore"]] = list(CONDITIONS)
    layer_skip: bool = True


@register_check("superweight_impact", params=ImpactParams, area="superweights")
def superweight_impact_audit(context: AuditContext, params: ImpactParams) -> SuperWeightImpact:
    """Prune the super weights, as many of the largest other weights, or prune and restore the super activation
    (Yu et al. 2024, Table 1)."""
    found = detection(context, params)
    found.require()
    tasks, skipped = available_tasks(context, params.tasks)
    windows = shared_windows(context, found, params.seq_len, params.n_windows, layer_skip=params.layer_skip)
    book = shared_scores(context, found, tasks, params.limit)
    return superweight_impact(context.model, found, context.corpus(), tasks=tasks, tasks_skipped=skipped,
                              accuracy_conditions=params.accuracy_conditions, others_share=params.others_share,
                              seq_len=params.seq_len, n_windows=params.n_windows, limit=params.limit,
                              windows=windows, book=book)


# ------------------------------------------------------------------------------------------------ stopwords


class StopwordParams(DetectionParams):
    n_prompts: int = 100
    prompt_tokens: int = 32
    top_k: int = 20
    stopwords: list[str] = list(STOPWORDS)  # NLTK's English list; give the model's language's for another


@register_check("superweight_stopwords", params=StopwordParams, area="superweights")
def stopword_audit(context: AuditContext, params: StopwordParams) -> StopwordShift:
    """Pruning the super weights moves next-token probability onto stopwords (Yu et al. 2024, §3.3)."""
    found = detection(context, params)
    found.require()
    return stopword_shift(context.model, found, context.corpus(), n_prompts=params.n_prompts,
                          prompt_tokens=params.prompt_tokens, top_k=params.top_k, stopwords=params.stopwords)


# ------------------------------------------------------------------------------------------------ scaling


class ScalingParams(DetectionParams):
    scales: list[float] = list(PAPER_SCALES)
    seq_len: int = 128
    n_windows: int = 4
    tasks: list[str] = []  # zero-shot tasks (core.zero_shot); none: perplexity only
    limit: int = 30  # documents per task and factor


@register_check("superweight_scaling", params=ScalingParams, area="superweights")
def scaling_audit(context: AuditContext, params: ScalingParams) -> SuperWeightScaling:
    """Perplexity and accuracy as the super weights are scaled from 0 up (Yu et al. 2024, §3.4)."""
    found = detection(context, params)
    found.require()
    tasks, skipped = available_tasks(context, params.tasks)
    return superweight_scaling(context.model, found, context.corpus(), scales=params.scales, tasks=tasks,
                               tasks_skipped=skipped, seq_len=params.seq_len, n_windows=params.n_windows,
                               limit=params.limit, windows=shared_windows(context, found, params.seq_len,
                                                                          params.n_windows),
                               book=shared_scores(context, found, tasks, params.limit))
