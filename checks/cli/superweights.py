"""``lmaudit superweights``: the super-weight directory of a model, through the registered ``superweights`` check
(data-free detection on one prompt, each candidate confirmed causally; Yu et al. 2024, §3.2), with the massive
activations the causal test ruled out.

A model on which no super weight is confirmed is not "0 super weights": the check's premise is missing, and the
command says what was seen (the spike layers and why each candidate failed) on one line, exit status 2.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lmaudit.checks.cli.output import finish, fmt, print_header, table
from lmaudit.checks.cli.session import Action, Session, plan_checks

if TYPE_CHECKING:
    from lmaudit.checks.cli.commands import Commands
    from lmaudit.checks.cli.session import Outcome
    from lmaudit.checks.superweights.detect import SuperWeightDetection


def prepare_superweights(args: argparse.Namespace) -> Action:
    """Detect the super weights data-free, confirm each causally, and print their directory."""
    (planned,) = plan_checks(args, ["superweights"], flags={"prompt": args.prompt, "spike_factor": args.spike_factor})
    planned.params.settings()  # DetectionSettings checks the factors and counts the parameter model leaves open

    def run(session: Session) -> int:
        def render(outcomes: list[Outcome]) -> None:
            detection = outcomes[0].result.detection
            print_header(session, f"{len(detection.super_weights)} super weight(s) confirmed in "
                                  f"{detection.seconds:.2f} s")
            print_detection(detection)

        return finish("superweights", session, session.run_each([planned]), as_json=args.json, render=render)

    return run


def print_detection(detection: SuperWeightDetection) -> None:
    print(f"prompt {detection.prompt!r} ({detection.n_tokens} tokens{', BOS first' if detection.bos else ''}); "
          f"spike ≥ {detection.settings.spike_factor:g}× the median layer, confirmed when zeroing collapses the "
          f"residual spike ≥ {detection.settings.collapse_factor:g}× over the next "
          f"{detection.settings.confirm_layers} layers")
    rows = [(sw.label(), sw.layer, sw.row, sw.col, sw.weight, sw.input_activation, sw.activation, sw.write, sw.token,
             f"{sw.collapse:.3g}×") for sw in detection.super_weights]
    print(table(("super weight", "layer", "row", "col", "weight", "input act.", "activation", "residual write",
                 "token", "collapse"), rows, indent="  "))
    if detection.massive_activations:
        print("massive activations ruled out by the causal test (not super weights):")
        for m in detection.massive_activations:
            print(f"  {m.label()}: write {fmt(m.write)} at token {m.token}, collapse "
                  f"{fmt(m.collapse, '{:.3g}')}×: {m.reason}")


def register(commands: Commands) -> None:
    parser = commands.model("superweights", prepare_superweights)
    parser.add_argument("--prompt", default=None, help="detection prompt (default: the paper's)")
    parser.add_argument("--spike-factor", type=float, default=None,
                        help="a spike layer's maxima are at least this times the median layer's (default 50)")
