"""Do the super weights stay put? Across prompts (Yu et al. 2024, §3.2: the super activation sits at the same
place whatever the input) and across fine-tuning (§3.2, Table 2: instruction-tuned models keep their base
model's super weights).

**Prompts.** With a BOS token in front, invariance would hold by construction: token 0 is then always the BOS,
which attends to nothing else, so its activations are the same on every prompt. So the prompts are detected
*without* the BOS token (``bos=False``) and start with different first tokens (words, digits, code, punctuation,
a newline, other scripts). For each prompt the coordinates found, where the super activation sits, and any
massive activation ruled out are reported. Against the reference detection (the directory's, under the BOS
policy) a prompt has

- *missed* the super weights when some reference super weight was not confirmed on it;
- *moved* when its confirmed set differs from the reference in any way (missing or extra weights).

**Fine-tuning.** Detection on a fine-tuned model (``--compare-model``, else a seeded offline LoRA fine-tune of
every decoder Linear, down projections included) with the reference's prompt and settings; the super weights'
values in both models are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.outliers import Coordinate
from lmaudit.checks.core.results import CheckResult, metric
from lmaudit.checks.superweights.detect import SuperWeightDetection, detect, detect_many

# Prompts whose first tokens all differ (for byte-level BPE and SentencePiece tokenizers alike).
INVARIANCE_PROMPTS: tuple[str, ...] = (
    "Apple Inc. is a worldwide tech company.",
    "the quick brown fox jumps over the lazy dog while the farmer watches from the fence.",
    "12+35=47 and 9*8=72, so 47+72=119.",
    "def add(a, b):\n    return a + b\n",
    "Le chat est assis sur le tapis et regarde la pluie tomber.",
    "Der Himmel ist heute blau und die Sonne scheint.",
    "東京は日本の首都です。",
    "?!... ;;; --- !!!",
    "Hello",
    " The history of the city goes back many centuries, and its old walls still stand.",
    "\nSELECT name FROM users WHERE id = 1;",
    "x",
)


@dataclass(frozen=True)
class PromptInvariance(CheckResult):
    """Detection on many prompts without BOS against the reference detection's super weights."""

    reference: SuperWeightDetection
    detections: tuple[SuperWeightDetection, ...]

    def _missed(self, d: SuperWeightDetection) -> bool:
        return not set(self.reference.coordinates) <= set(d.coordinates)

    @property
    def moved(self) -> list[str]:
        """One line per prompt whose confirmed super weights differ from the reference's."""
        ref = self.reference
        return [f"super weights moved: expected {', '.join(f'L{c[0]}[{c[1]}, {c[2]}]' for c in ref.coordinate_set)}, "
                f"found {', '.join(f'L{c[0]}[{c[1]}, {c[2]}]' for c in d.coordinate_set) or 'none'} "
                f"on prompt {d.prompt[:50]!r}"
                for d in self.detections if d.coordinate_set != ref.coordinate_set]

    @metric
    def n_prompts(self) -> int:
        return len(self.detections)

    @metric
    def n_first_tokens(self) -> int:
        """Distinct first tokens among the prompts (what the check varies)."""
        return len({d.first_token for d in self.detections})

    @metric
    def n_missed(self) -> int:
        """Prompts on which some reference super weight was not confirmed."""
        return sum(self._missed(d) for d in self.detections)

    @metric
    def n_moved(self) -> int:
        """Prompts whose confirmed set differs from the reference (missing or extra super weights)."""
        return len(self.moved)

    @metric
    def fraction_same(self) -> float:
        return 1 - self.n_moved / max(1, self.n_prompts)


def prompt_invariance(model: LoadedModel, reference: SuperWeightDetection,
                      prompts: Sequence[str] = INVARIANCE_PROMPTS, *, bos: bool = False) -> PromptInvariance:
    """Detect on every prompt (batched, without BOS unless ``bos``) with the reference's settings.

    Raises :class:`~lmaudit.checks.core.errors.PremiseMissing` when the reference confirmed no super weight."""
    reference.require()
    return PromptInvariance(reference, tuple(detect_many(model, prompts, bos=bos, settings=reference.settings)))


@dataclass(frozen=True)
class WeightChange:
    """A super weight's value in the base and in the fine-tuned model."""

    layer: int
    row: int
    col: int
    base: float
    tuned: float


@dataclass(frozen=True)
class FinetuneInvariance(CheckResult):
    """Detection on a fine-tuned model against the base model's."""

    base: SuperWeightDetection
    tuned: SuperWeightDetection
    tuned_model: str  # spec of the compared model
    source: str  # "compare-model" or "lora"
    changes: tuple[WeightChange, ...]

    @metric
    def same_coordinates(self) -> bool:
        return self.base.coordinate_set == self.tuned.coordinate_set

    @metric
    def same_channels(self) -> bool:
        return self.base.channels == self.tuned.channels

    @metric
    def base_coordinates(self) -> list[list[int]]:
        return [list(c) for c in self.base.coordinate_set]

    @metric
    def tuned_coordinates(self) -> list[list[int]]:
        return [list(c) for c in self.tuned.coordinate_set]

    @metric
    def max_relative_weight_change(self) -> float:
        """max over the super weights of |tuned − base| / |base|."""
        return max((abs(c.tuned - c.base) / max(abs(c.base), 1e-12) for c in self.changes), default=0.0)


def finetune_invariance(base: LoadedModel, reference: SuperWeightDetection, tuned: LoadedModel, *,
                        source: str) -> FinetuneInvariance:
    """Detect on ``tuned`` with the reference's prompt, BOS choice and settings; report the weights' values.

    Raises :class:`~lmaudit.checks.core.errors.PremiseMissing` when the reference confirmed no super weight."""
    reference.require()
    found = detect(tuned, reference.prompt, bos=reference.bos, settings=reference.settings)
    coordinates: list[Coordinate] = list(dict.fromkeys(reference.coordinates + found.coordinates))
    changes = tuple(WeightChange(layer, row, col, float(base.adapter.down_proj_weight(layer)[row, col]),
                                 float(tuned.adapter.down_proj_weight(layer)[row, col]))
                    for layer, row, col in coordinates)
    return FinetuneInvariance(reference, found, tuned.spec, source, changes)
