"""Subcommands of the ``lmaudit`` CLI beyond ``models`` and ``inspect``, one module per area.

Each module defines ``register(add)``; ``add(name, fn, *, model=True)`` creates the subparser (with ``--model``,
``--dtype``, ``--trust-remote-code`` and ``--json``), sets ``fn`` as its handler and returns it, so the module
can add its own options. ``fn(args) -> int`` is the exit status.
"""
