"""Registers the super-weight checks (transitional: the registrations still live beside the science)."""

import lmaudit.checks.superweights.detect  # noqa: F401
import lmaudit.checks.superweights.impact  # noqa: F401
