"""Imports every module that registers a check, so ``checks.registry.CHECKS`` is complete."""

from checks import model_basics  # noqa: F401

__all__ = ["model_basics"]
import checks.arithmetic_audit  # noqa: F401, E402
import checks.quantization_audit  # noqa: F401, E402
import checks.superweights  # noqa: F401, E402
import checks.superweight_impact  # noqa: F401, E402
import checks.bias_audit  # noqa: F401, E402
