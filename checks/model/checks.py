"""Basic audits of the model under audit: its architecture and its perplexity on a named corpus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmaudit.checks.core.perplexity import PerplexityResult, perplexity
from lmaudit.checks.core.results import CheckResult, metric_group
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import CheckParams, register_check


@dataclass(frozen=True)
class ArchitectureSummary(CheckResult):
    """Where the adapter found each module, and the shape numbers read from the config."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    parameters: int
    dtype: str
    modules: dict[str, Any]

    @metric_group(*("model_type", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size",
             "intermediate_size", "parameters", "dtype"))
    def _metrics(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "modules"}


class ArchitectureParams(CheckParams):
    pass


@register_check(
    "architecture",
    params=ArchitectureParams,
    area="model")
def architecture_audit(context: AuditContext, params: ArchitectureParams) -> ArchitectureSummary:
    """The architecture summary (layers, heads, kv heads, sizes, parameter count) as the adapter sees it."""
    summary = context.model.adapter.summary()
    return ArchitectureSummary(
        model_type=summary["model_type"],
        n_layers=summary["n_layers"],
        n_heads=summary["n_heads"],
        n_kv_heads=summary["n_kv_heads"],
        head_dim=summary["head_dim"],
        hidden_size=summary["hidden_size"],
        intermediate_size=summary["intermediate_size"],
        parameters=summary["parameters"],
        dtype=summary["dtype"],
        modules=summary["modules"],
    )


class PerplexityParams(CheckParams):
    seq_len: int = 256
    n_windows: int = 16  # 16 x 256 = 4096 tokens: about 19 s for a 135M model on 2 cores
    quick_n_windows: int = 4


@dataclass(frozen=True)
class PerplexityAudit(CheckResult):
    result: PerplexityResult

    @metric_group(*("perplexity", "mean_nll", "n_tokens"))
    def _metrics(self) -> dict[str, Any]:
        return {"perplexity": self.result.perplexity, "mean_nll": self.result.mean_nll,
                "n_tokens": self.result.n_tokens}


@register_check("perplexity", params=PerplexityParams, area="model")
def perplexity_audit(context: AuditContext, params: PerplexityParams) -> PerplexityAudit:
    """Perplexity on the session's corpus with the pinned definition (lmaudit.checks.core.perplexity)."""
    model = context.model
    n_windows = params.quick_n_windows if context.quick else params.n_windows
    result = perplexity(model.model, model.tokenizer, context.corpus(), seq_len=params.seq_len, n_windows=n_windows)
    return PerplexityAudit(result)
