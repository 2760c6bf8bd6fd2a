"""``lmaudit run CHECK [--param key=value ...]``: any registered check with its own defaults (what an audit entry
with ``params: {}`` runs), printing every metric an audit file may gate. The named commands are readable views of
the same checks; this one reaches all of them, including those no command shows."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lmaudit.checks.cli.output import finish, print_header, print_metrics
from lmaudit.checks.cli.session import Action, Session, plan_checks

if TYPE_CHECKING:
    from lmaudit.checks.cli.commands import Commands
    from lmaudit.checks.cli.session import Outcome


def prepare_run(args: argparse.Namespace) -> Action:
    """Run any registered check (`lmaudit checks` lists them) and print its metrics."""
    (planned,) = plan_checks(args, [args.check])

    def run(session: Session) -> int:
        def render(outcomes: list[Outcome]) -> None:
            print_header(session, f"check {planned.spec.name}")
            print_metrics(outcomes[0])

        return finish("run", session, session.run_each([planned]), as_json=args.json, render=render)

    return run


def register(commands: Commands) -> None:
    parser = commands.model("run", prepare_run, corpus=True)
    parser.add_argument("check", help="a registered check (`lmaudit checks` lists them)")
    parser.add_argument("--compare-model", default=None,
                        help="a second model for the checks that compare two (e.g. a fine-tune)")
