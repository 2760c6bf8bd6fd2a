"""The explicit list of areas: the only module that imports every area, so that their checks register.

Each area's ``checks`` module registers that area's checks in :mod:`lmaudit.checks.harness.registry` when it is
imported. The plugin and the command line call :func:`load_checks` before they look a check name up; nothing
below this module imports an area.
"""

from __future__ import annotations

from lmaudit.checks.harness.registry import CHECKS, CheckSpec


def load_checks() -> dict[str, CheckSpec]:
    """Import every area's registration module (idempotent) and return the registry."""
    import lmaudit.checks.arithmetic.checks  # noqa: F401
    import lmaudit.checks.bias.checks  # noqa: F401
    import lmaudit.checks.model.checks  # noqa: F401
    import lmaudit.checks.quantization.checks  # noqa: F401
    import lmaudit.checks.superweights.checks  # noqa: F401

    return CHECKS
