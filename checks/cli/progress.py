"""Progress on stderr, never on stdout (which may carry ``--json``): what is running and how many forward passes it
has made.

The registered checks do not report progress themselves, and the command line must not reach into them. What every
check does, whatever it measures, is run the model: a forward hook on the last decoder layer (through
:func:`lmaudit.checks.core.hooks.hooks`, the one module that registers hooks) counts the passes that reach it, full
or restarted from a later layer (the prefix-cached evaluators), so the bar moves for every check without knowing
any of them. A bar appears only once a stage has run for :data:`DELAY` seconds: quick commands stay silent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmaudit.checks.core.adapter import ArchitectureAdapter

DELAY = 1.0  # seconds before a bar shows: a look that finishes sooner needs no progress report


class Progress:
    """Stage lines and forward-pass counters on stderr; every method is a no-op when ``enabled`` is false."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    def stage(self, text: str) -> None:
        """One line saying what starts now (e.g. loading a model, which has no passes to count)."""
        if self.enabled:
            print(f"lmaudit: {text}", file=sys.stderr, flush=True)

    @contextmanager
    def loading(self, what: str) -> Iterator[None]:
        """A model load: its stage line, and transformers' own bars silenced when progress is off."""
        self.stage(f"loading {what}")
        if self.enabled:
            yield
            return
        from transformers.utils import logging

        was_enabled = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_enabled:
                logging.enable_progress_bar()

    @contextmanager
    def passes(self, adapter: ArchitectureAdapter, what: str) -> Iterator[None]:
        """Count the forward passes of ``adapter``'s model inside the block under the label ``what``."""
        if not self.enabled:
            yield
            return
        from tqdm.auto import tqdm

        from lmaudit.checks.core.hooks import hooks

        bar = tqdm(desc=what, unit=" passes", file=sys.stderr, delay=DELAY, leave=False, dynamic_ncols=True)

        def count(module: Any, args: tuple[Any, ...], output: Any) -> None:
            bar.update(1)

        try:
            with hooks(forward=[(adapter.layer_list[-1], count)]):
                yield
        finally:  # also on Ctrl-C: the command's own message must be the last line on stderr
            bar.close()
