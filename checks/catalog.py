"""Imports every module that registers a check, so ``checks.registry.CHECKS`` is complete."""

import checks.arithmetic_audit  # noqa: F401
import checks.bias_audit  # noqa: F401
import checks.model_basics  # noqa: F401
import checks.quantization_audit  # noqa: F401
import checks.superweight_impact  # noqa: F401
import checks.superweights  # noqa: F401
