"""Registers the model area's checks: the architecture summary and perplexity against the unigram baseline."""

from __future__ import annotations

from pydantic import Field

from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import CheckParams, register_check
from lmaudit.checks.model.summary import (
    ArchitectureSummary,
    PerplexityAudit,
    architecture_summary,
    perplexity_audit,
)


class ArchitectureParams(CheckParams):
    pass


@register_check("architecture", params=ArchitectureParams, area="model")
def check_architecture(context: AuditContext, params: ArchitectureParams) -> ArchitectureSummary:
    """The architecture summary (layers, heads, kv heads, sizes, parameter count) as the adapter sees it."""
    return architecture_summary(context.model)


class PerplexityParams(CheckParams):
    seq_len: int = Field(256, ge=2)
    n_windows: int = Field(16, ge=1)  # 16 x 256 = 4096 scored tokens
    batch_size: int = Field(4, ge=1)  # windows per forward pass: 4 x 257 x a 49k vocabulary of float32 logits


@register_check("perplexity", params=PerplexityParams, area="model")
def check_perplexity(context: AuditContext, params: PerplexityParams) -> PerplexityAudit:
    """Perplexity on the session's corpus (pinned definition) against the corpus's unigram baseline."""
    return perplexity_audit(context.model, context.corpus(), seq_len=params.seq_len, n_windows=params.n_windows,
                            batch_size=params.batch_size)
