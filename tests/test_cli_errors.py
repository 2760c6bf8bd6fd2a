"""How ``lmaudit`` fails: every argument error is found before any model loads (the loader is never called), every
lmaudit error is one line on stderr with exit status 2, a NaN in the weights is a ``NonFiniteOutputError`` naming
the first layer (never an empty answer), and ``--json`` keeps stdout strict JSON while progress goes to stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from lmaudit.checks.cli import progress, session
from lmaudit.checks.cli.main import main
from tests.checkpoints import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base`` (a random tiny Llama) and ``nan`` (the same with one NaN in layer 1's down projection)."""
    root = tmp_path_factory.mktemp("cli-errors")
    base = save_tiny_llama(root / "base", layers=2)
    nan = save_tiny_llama(root / "nan", layers=2)
    model = AutoModelForCausalLM.from_pretrained(nan)
    model.model.layers[1].mlp.down_proj.weight.data[3, 7] = math.nan
    model.save_pretrained(nan, safe_serialization=True)
    return {"base": base, "nan": nan}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(session, "load_model", refuse)


BAD_ARGUMENTS = {
    "unknown --param": (["superweights", "--param", "spike_factr=3"], "Did you mean: spike_factor"),
    "malformed --param": (["superweights", "--param", "spike_factor"], "expected key=value"),
    "--param of the wrong type": (["superweights", "--param", "spike_factor=abc"], "spike_factor"),
    "--param that repeats a flag": (["superweights", "--spike-factor", "3", "--param", "spike_factor=4"],
                                    "repeats"),
    "invalid detection setting": (["superweights", "--param", "max_super_weights=0"], "max_super_weights"),
    "quantize block size": (["quantize", "--scheme", "w4-block", "--block", "0"], "block"),
    "quantize bits": (["quantize", "--scheme", "w4-block", "--bits", "99"], "bits"),
    "quantize block of W8A8": (["quantize", "--block", "64"], "--scheme w4-block"),
    "quantize windows": (["quantize", "--n-windows", "0"], "n_windows"),
    "quantize corpus file": (["quantize", "--corpora", "no/such/corpus.txt"], "no/such/corpus.txt"),
    "bias neuron fraction": (["bias", "--edit", "--neuron-fraction", "0.9"], "neuron_fraction"),
    "bias fraction without --edit": (["bias", "--neuron-fraction", "0.01"], "--edit"),
    "heads prompts": (["heads", "--n-per-op", "0"], "n_per_op"),
    "heads template": (["heads", "--templates", "limerick"], "templates"),
    "heads layers": (["heads", "--layers", "0.8", "0.2"], "--layers"),
    "neurons without a target": (["neurons", "--prompt", "hello"], "--target"),
    "neurons --param with --prompt": (["neurons", "--prompt", "3+5=", "--param", "k=3"], "--param"),
    "unknown check": (["run", "superweigt"], "Did you mean: superweights"),
    "device": (["superweights", "--device", "tpu"], "--device tpu"),
    "device and device map": (["superweights", "--device", "cpu", "--device-map", "auto"], "give one"),
    "device map file": (["superweights", "--device-map", "no-such-map.json"], "no such file"),
    "corpus": (["bias", "--corpus", "no-such-corpus"], "--corpus no-such-corpus"),
    "model path": (["superweights", "--model", "./no/such/model"], "no such file or directory"),
    "model path that looks like a hub id": (["superweights", "--model", "org/name"], "hf:org/name"),
    "model alias typo": (["superweights", "--model", "smollm2-135m-instrct"], "Did you mean"),
    "compare model": (["neurons", "--compare-model", "./missing"], "no such file or directory"),
    "pin file name": (["pin", "pin.txt"], "*.yaml"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_argument_errors_are_one_line_before_any_model_loads(case, models, no_loading, capsys):
    argv, expected = BAD_ARGUMENTS[case]
    model = [] if argv[0] == "pin" or "--model" in argv else ["--model", str(models["base"])]
    status = main([*argv, *model])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("lmaudit: ")
    assert expected in captured.err


@pytest.mark.parametrize("argv", [["superweights", "--dtype", "float64"], ["quantize", "--scheme", "w3"],
                                  ["inspect", "--param", "x=1"], ["superweights", "--", "-x"]])
def test_argparse_rejects_unknown_options_and_choices(argv, no_loading, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "usage: lmaudit" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["superweights"], ["quantize"], ["bias", "--param", "n_permutations=100"],
                                  ["heads", "--ops", "+", "--n-per-op", "2"], ["neurons", "--prompt", "3+5="],
                                  ["run", "perplexity", "--param", "seq_len=16", "--param", "n_windows=1"]])
def test_nan_weights_are_a_one_line_error_naming_the_layer(argv, models, capsys):
    status = main([*argv, "--model", str(models["nan"]), "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""  # never a confident empty answer
    assert captured.err.count("\n") == 1 and "NonFiniteOutputError" in captured.err
    assert "layer 1 (model.layers.1)" in captured.err and "down_proj" in captured.err


def test_json_on_stdout_and_progress_on_stderr(models, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    status = main(["run", "perplexity", "--model", str(models["base"]), "--param", "seq_len=16", "--param",
                   "n_windows=2", "--param", "batch_size=1", "--json"])
    captured = capsys.readouterr()
    assert status == 0
    assert json.loads(captured.out)["results"][0]["metrics"]["n_tokens"] == 32  # stdout: nothing but the JSON
    assert "lmaudit: loading" in captured.err and "passes" in captured.err  # the stage line and the pass counter
