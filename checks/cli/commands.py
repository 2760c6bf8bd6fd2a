"""How ``lmaudit`` commands are added to the parser, and the exit statuses they share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmaudit.checks.cli.session import Action

Prepare = Callable[[argparse.Namespace], "Action"]
Plain = Callable[[argparse.Namespace], int]

EXIT_ERROR = 2  # argparse's own status for a usage error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class Commands:
    """Adds subcommands: ``model`` ones get the model options and a session, ``plain`` ones only ``--json``."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def _parser(self, name: str, doc: str | None, description: str | None) -> argparse.ArgumentParser:
        summary = (doc or "").strip().splitlines()[0] if doc else ""
        return self._sub.add_parser(name, help=summary, description=description or summary,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)

    def model(self, name: str, prepare: Prepare, *, params: bool = True, corpus: bool = False,
              description: str | None = None) -> argparse.ArgumentParser:
        from lmaudit.checks.cli.session import add_model_options

        parser = self._parser(name, prepare.__doc__, description)
        add_model_options(parser, params=params, corpus=corpus)
        parser.set_defaults(prepare=prepare)
        return parser

    def plain(self, name: str, run: Plain, *, json: bool = True,
              description: str | None = None) -> argparse.ArgumentParser:
        parser = self._parser(name, run.__doc__, description)
        if json:
            parser.add_argument("--json", action="store_true", help="strict JSON on stdout")
        parser.set_defaults(run=run)
        return parser
