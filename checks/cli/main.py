"""The ``lmaudit`` command line: one module per command, each running registered checks through the catalog, so a
command measures exactly what the audit entry of the same check measures.

    lmaudit models | checks [NAME] | inspect | run CHECK | superweights | quantize | bias | heads | neurons | pin

How a command runs (:func:`main`):

1. argparse reads the arguments; the command's ``prepare(args)`` validates its checks' parameters (each check's
   own pydantic model), and :meth:`ModelOptions.from_args` the model spec's form, dtype, device, device map and
   corpus: every argument error is reported before any model loads;
2. the action gets a :class:`~lmaudit.checks.cli.session.Session`, which loads the model on first use.

Exit status: 0 done; 2 an argument error or any :class:`~lmaudit.checks.core.errors.LmAuditError` (one line on
stderr: a NaN or inf in the model is a ``NonFiniteOutputError`` naming the first layer; a check whose premise is
absent on the model says what was looked for and found); 130 interrupted (Ctrl-C, one line).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lmaudit.checks.cli.commands import EXIT_ERROR, EXIT_INTERRUPTED, Commands


def build_parser() -> argparse.ArgumentParser:
    from lmaudit.checks.cli import bias, heads, list_checks, models, neurons, pin, quantize, run, superweights

    parser = argparse.ArgumentParser(prog="lmaudit", description="Audit the internals of a language model.")
    commands = Commands(parser)
    for module in (models, list_checks, run, superweights, quantize, bias, heads, neurons, pin):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmaudit.checks.core.errors import LmAuditError

    try:
        ours, extra = split_extra(list(sys.argv[1:] if argv is None else argv))
        parser = build_parser()
        args = parser.parse_args(ours)
        args.extra = extra
        if extra and not getattr(args, "takes_extra", False):
            parser.error(f"arguments after -- are only for `lmaudit pin` (got {' '.join(extra)})")
        if hasattr(args, "run"):
            return args.run(args)
        from lmaudit.checks.cli.progress import Progress
        from lmaudit.checks.cli.session import ModelOptions, Session

        action = args.prepare(args)  # the checks' parameters: validated before any model loads
        options = ModelOptions.from_args(args)  # and the model spec, dtype, placement, corpus
        return action(Session(options, Progress(enabled=not args.no_progress)))
    except KeyboardInterrupt:
        print("lmaudit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LmAuditError as exc:
        print(f"lmaudit: {describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # stdout closed early (`lmaudit checks | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(lmaudit's arguments, those after --)``: the latter are for the program a command wraps (pytest, for
    ``lmaudit pin``). argparse would let a trailing positional swallow the options before it, so it splits here."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def describe(exc: BaseException) -> str:
    """An lmaudit error on one line: what kind it is, then its message with line breaks folded."""
    from lmaudit.checks.core.errors import DataUnavailableError, PremiseMissing

    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, PremiseMissing):
        return f"premise missing (an audit of this check would be skipped): {message}"
    if isinstance(exc, DataUnavailableError):
        return f"data unavailable (an audit of this check would be skipped): {message}"
    return f"error: {type(exc).__name__}: {message}"


if __name__ == "__main__":
    raise SystemExit(main())
