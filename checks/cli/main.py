"""The ``lmaudit`` command line: list models, inspect one, and run single checks outside pytest."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lmaudit.checks.cli.output import print_json
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.loading import ALIASES, DEFAULT_MODEL, DTYPES, load_model

Command = Callable[[argparse.Namespace], int]


def cmd_models(args: argparse.Namespace) -> int:
    """List the registry aliases and whether each is installed."""
    rows = []
    for alias in ALIASES.values():
        path = alias.path()
        rows.append({"alias": alias.name, "installed": path is not None, "path": str(path) if path else None,
                     "install": alias.install, "description": alias.description})
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        state = "installed" if row["installed"] else f"not installed ({row['install']})"
        default = " (default)" if row["alias"] == DEFAULT_MODEL else ""
        print(f"{row['alias']}{default}: {state}\n    {row['description']}")
        if row["path"]:
            print(f"    {row['path']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the architecture summary and where each adapter module was found."""
    loaded = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmaudit", description="Audit the internals of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Command, *, model: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        if model:
            p.add_argument("--model", default=DEFAULT_MODEL, help="alias, HF directory, .gguf file or hub id")
            p.add_argument("--dtype", default="float32", choices=DTYPES)
            p.add_argument("--trust-remote-code", action="store_true", default=False)
        p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
        p.set_defaults(func=fn)
        return p

    add("models", cmd_models, model=False)
    add("inspect", cmd_inspect)
    for module in _command_modules():
        module.register(add)
    return parser


def _command_modules() -> list[object]:
    """The subcommand modules, listed explicitly; each defines ``register(add)`` and calls
    ``add(name, fn) -> argparse.ArgumentParser`` for its subcommands (e.g. ``quantize``, ``bias``)."""
    from lmaudit.checks.cli import arithmetic, bias, quantize, superweights

    return [arithmetic, bias, quantize, superweights]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmAuditError as exc:
        print(f"lmaudit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
