"""``lmaudit models`` (the registry aliases and whether each is installed) and ``lmaudit inspect`` (the loaded
model's card and where the adapter found each module)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lmaudit.checks.cli.output import print_json
from lmaudit.checks.cli.session import Action, Session

if TYPE_CHECKING:
    from lmaudit.checks.cli.commands import Commands


def cmd_models(args: argparse.Namespace) -> int:
    """List the registry aliases and whether each is installed."""
    from lmaudit.checks.core.loading import ALIASES, DEFAULT_MODEL

    rows = []
    for alias in ALIASES.values():
        path = alias.path()
        rows.append({"alias": alias.name, "default": alias.name == DEFAULT_MODEL, "installed": path is not None,
                     "path": str(path) if path else None, "install": alias.install,
                     "description": alias.description})
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        state = "installed" if row["installed"] else f"not installed ({row['install']})"
        default = " (default)" if row["default"] else ""
        print(f"{row['alias']}{default}: {state}\n    {row['description']}")
        if row["path"]:
            print(f"    {row['path']}")
    return 0


def prepare_inspect(args: argparse.Namespace) -> Action:
    """Print the architecture summary and where each adapter module was found."""

    def run(session: Session) -> int:
        loaded = session.model
        summary = {**loaded.card(), **loaded.adapter.summary()}
        if args.json:
            print_json(summary)
            return 0
        modules = summary.pop("modules", {})
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
        print("modules (layer index as {i}):")
        for role, name in modules.items():
            print(f"  {role:<{width - 2}}  {name}")
        return 0

    return run


def register(commands: Commands) -> None:
    commands.plain("models", cmd_models)
    commands.model("inspect", prepare_inspect, params=False)
