"""``lmaudit pin PATH``: run the audit suite on a model and write its pin file, i.e.
``pytest audits/ --model M --audit-pin PATH`` with the same model and placement options as every command.

pytest's ``--audit-pin`` is the interface CI uses (:mod:`lmaudit.checks.plugin.options`); this command only spells
it, after validating the arguments pytest would otherwise take a model load to reject. Anything after ``--`` goes
to pytest unchanged (``lmaudit pin p.yaml -- -x -q``). The exit status is pytest's (0: every entry passed, 1:
some failed their claim, recorded in the pin as deviations), except that an interrupted run exits 130 (and, as
the plugin guarantees, writes no pin).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lmaudit.checks.cli.session import ModelOptions, UsageError, add_model_options
from lmaudit.checks.harness.audit_file import PROFILES

if TYPE_CHECKING:
    from lmaudit.checks.cli.commands import Commands


def pytest_args(args: argparse.Namespace, options: ModelOptions) -> list[str]:
    """The pytest command line of ``args`` (validated ``options``)."""
    argv = [*args.audits, "--model", options.spec, "--audit-pin", str(args.path), "--audit-profile", args.profile,
            "--audit-dtype", options.dtype, "--audit-seed", str(options.seed)]
    argv += ["--device-map", options.device_map] if options.device_map else ["--device", args.device]
    if options.trust_remote_code:
        argv.append("--trust-remote-code")
    if options.corpus:
        argv += ["--corpus", options.corpus]
    if options.compare_model:
        argv += ["--compare-model", options.compare_model]
    return argv + list(args.extra)


def cmd_pin(args: argparse.Namespace) -> int:
    """Run the audits on a model and write its pin file (pytest audits/ --audit-pin PATH)."""
    import pytest

    from lmaudit.checks.cli.commands import EXIT_INTERRUPTED

    if Path(args.path).suffix not in (".yaml", ".yml"):
        raise UsageError(f"{args.path}: a pin is a YAML audit file; name it *.yaml")
    for audits in args.audits:
        if not Path(audits).exists():
            raise UsageError(f"--audits {audits}: no such file or directory")
    options = ModelOptions.from_args(args)
    status = pytest.main(pytest_args(args, options))
    return EXIT_INTERRUPTED if status == pytest.ExitCode.INTERRUPTED else int(status)


def register(commands: Commands) -> None:
    parser = commands.plain("pin", cmd_pin, json=False)
    parser.add_argument("path", help="the pin file to write, e.g. audits/pins/audit_my-model.yaml")
    parser.add_argument("--audits", nargs="+", default=["audits/"], help="audit files or folders (default audits/)")
    parser.add_argument("--profile", choices=PROFILES, default="full", help="audit profile (default full)")
    parser.add_argument("--compare-model", default=None, help="passed to pytest --compare-model")
    add_model_options(parser, params=False, corpus=True, output=False)
    parser.set_defaults(takes_extra=True)  # arguments after `--` go to pytest
