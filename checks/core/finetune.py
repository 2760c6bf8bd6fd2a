"""A real, offline, seeded fine-tune of the model under audit: LoRA (peft) on the harness's arithmetic data, merged.

Used where an audit needs "the same model after fine-tuning" and no ``--compare-model`` is given (super-weight
invariance, the arithmetic comparison). The recipe (:class:`LoraRecipe`) is deliberately small so it runs in
well under a minute for a 135M model on 2 cores:

- data: :func:`lmaudit.checks.core.arithmetic_problems.generate_problems` (2-digit ``+ - *``, symbolic template, zero-shot), seed
  ``derived_seed(seed, "train")`` (:mod:`lmaudit.checks.core.stats`), so the training problems come from their own
  seed stream, apart from every stream the audits judge or rank on;
- loss: next-token cross-entropy on the answer tokens only, inputs ``encode_prompts(prompt) + answer`` (the BOS
  policy of :mod:`lmaudit.checks.core.logprobs`);
- LoRA rank 8, alpha 16, no dropout, on every Linear of the decoder layers (``adapter.decoder_linears()``, so the
  MLP down projections that hold super weights are tuned too); AdamW, lr 2e-3, batch 8, ``steps`` steps;
- then ``merge_and_unload()``: the result is a plain model of the same architecture whose weights are
  ``W + (alpha / r) · B·A``.

The base model is never touched: the fine-tune runs on a copy. The merged model (safetensors, config, tokenizer,
``recipe.json``) is cached under ``cache_root()/finetune/<key>``, ``key = sha256(base content hash, recipe)``,
through :func:`~lmaudit.checks.core.cache_entry.cached_build`: trained and written under a file lock (two
processes asking for the same fine-tune train it once), renamed into place complete, checked against its manifest
on every load, and retrained once, with a warning, when damaged. A second call with the same base and recipe
loads it in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmaudit.checks.core.arithmetic_problems import generate_problems
from lmaudit.checks.core.cache_entry import cached_build
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.loading import LoadedModel, cache_root, load_model
from lmaudit.checks.core.logprobs import encode_continuations, encode_prompts
from lmaudit.checks.core.stats import derived_seed

RECIPE_VERSION = 2  # bump when the training code changes what a recipe produces


@dataclass(frozen=True)
class LoraRecipe:
    """Everything that determines the fine-tuned weights (together with the base model's content hash)."""

    steps: int = 30
    seed: int = 0
    rank: int = 8
    alpha: int = 16
    lr: float = 2e-3
    batch_size: int = 8
    ops: str = "+-*"
    digits: int = 2
    template: str = "symbolic"

    def validate(self) -> None:
        for name in ("steps", "rank", "alpha", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmAuditError(f"LoRA recipe: {name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise LmAuditError(f"LoRA recipe: lr must be > 0, got {self.lr}")

    def key(self, base_hash: str, dtype: str) -> str:
        payload = {"base": base_hash, "dtype": dtype, "version": RECIPE_VERSION, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def finetune_dir(loaded: LoadedModel, recipe: LoraRecipe) -> Path:
    return cache_root() / "finetune" / recipe.key(loaded.content_hash, loaded.dtype)


def _training_batches(loaded: LoadedModel, recipe: LoraRecipe) -> list[tuple[torch.Tensor, ...]]:
    """``steps`` batches of ``(input_ids, attention_mask, labels)``, each ``(b, t)``, right-padded; labels are
    -100 except on the answer tokens."""
    n_per_op = -(-recipe.steps * recipe.batch_size // len(recipe.ops))
    problems = generate_problems(ops=recipe.ops, digits=recipe.digits, n_per_op=n_per_op,
                                 template=recipe.template, seed=derived_seed(recipe.seed, "train"))
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    problems = [problems[i] for i in order]
    contexts = encode_prompts(loaded.tokenizer, [p.prompt for p in problems])
    targets = encode_continuations(loaded.tokenizer, [p.continuation for p in problems])
    pad = int(loaded.tokenizer.pad_token_id or 0)
    batches = []
    for step in range(recipe.steps):
        rows = range(step * recipe.batch_size, (step + 1) * recipe.batch_size)
        seqs = [(contexts[i % len(problems)], targets[i % len(problems)]) for i in rows]
        width = max(len(c) + len(t) for c, t in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for row, (context, target) in enumerate(seqs):
            ids[row, : len(context) + len(target)] = torch.tensor(context + target)
            mask[row, : len(context) + len(target)] = 1
            labels[row, len(context) : len(context) + len(target)] = torch.tensor(target)
        batches.append((ids, mask, labels))
    return batches


def _train(loaded: LoadedModel, recipe: LoraRecipe) -> tuple[torch.nn.Module, list[float]]:
    """LoRA-train a copy of the base model and merge it; returns the merged model and the loss per step."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(loaded.adapter.decoder_linears())
    batches = _training_batches(loaded, recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        base = copy.deepcopy(loaded.model)  # the audited model is never modified
        config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, target_modules=targets,
                            bias="none")
        model = get_peft_model(base, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        losses = []
        with torch.enable_grad():
            for ids, mask, labels in batches:
                out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(out.loss.detach()))
        merged = model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    return merged, losses


def lora_finetune(loaded: LoadedModel, *, steps: int = 30, seed: int = 0, rank: int = 8, alpha: int = 16,
                  lr: float = 2e-3, batch_size: int = 8, use_cache: bool = True, verify: bool = False) -> LoadedModel:
    """The merged LoRA fine-tune of ``loaded`` with the given recipe (cached; see the module docstring).

    ``use_cache=False`` trains again and replaces the cache entry; ``verify=True`` runs the entry's full sha256
    check even when it passed one before. Returns a new :class:`LoadedModel` (``kind="finetune"``,
    ``spec="<base spec>+lora(steps=…,seed=…)"``); ``extras`` holds the recipe key, the cache directory, whether
    the cache was hit, and, when this call trained, the training seconds and the first and last training loss.
    """
    recipe = LoraRecipe(steps=steps, seed=seed, rank=rank, alpha=alpha, lr=lr, batch_size=batch_size)
    recipe.validate()
    target = finetune_dir(loaded, recipe)
    started = time.perf_counter()
    extras = {"recipe_key": target.name, "cache_dir": str(target)}

    def build(staging: Path) -> None:
        merged, losses = _train(loaded, recipe)
        extras.update(train_seconds=f"{time.perf_counter() - started:.1f}", first_loss=f"{losses[0]:.4f}",
                      last_loss=f"{losses[-1]:.4f}")
        _write_entry(staging, merged, loaded, recipe, losses)

    entry = cached_build(target.parent, target.name, build, what=f"LoRA fine-tune of {loaded.spec}",
                         info={"base_content_hash": loaded.content_hash, "recipe": dataclasses.asdict(recipe)},
                         verify=verify, rebuild=not use_cache)
    extras["cache_hit"] = str(entry.hit)
    tuned = load_model(str(entry.path), dtype=loaded.dtype)
    return dataclasses.replace(
        tuned, spec=f"{loaded.spec}+lora(steps={steps},seed={seed})", kind="finetune",
        load_seconds=time.perf_counter() - started, cache_hit=entry.hit, extras=extras,
        cache_entry=str(entry.path), cache_check=entry.check,
    )


def _write_entry(staging: Path, merged: torch.nn.Module, loaded: LoadedModel, recipe: LoraRecipe,
                 losses: list[float]) -> None:
    """The entry's files: the merged model, the base tokenizer and ``recipe.json`` (what was trained, and how)."""
    merged.save_pretrained(staging, safe_serialization=True)
    loaded.tokenizer.save_pretrained(staging)
    info = {"base_spec": loaded.spec, "base_content_hash": loaded.content_hash, "dtype": loaded.dtype,
            "recipe": dataclasses.asdict(recipe), "version": RECIPE_VERSION, "losses": losses}
    (staging / "recipe.json").write_text(json.dumps(info, indent=2))
