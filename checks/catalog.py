"""Imports every module that registers a check, so ``lmaudit.checks.harness.registry.CHECKS`` is complete."""

import lmaudit.checks.arithmetic.checks  # noqa: F401
import lmaudit.checks.bias.checks  # noqa: F401
import lmaudit.checks.model.checks  # noqa: F401
import lmaudit.checks.quantization.checks  # noqa: F401
import lmaudit.checks.superweights.detect  # noqa: F401
import lmaudit.checks.superweights.impact  # noqa: F401
