"""``--param key=value`` becomes the check's own validated parameters: YAML values, text kept for text fields,
dotted keys for nested models, and the precedence defaults < quick look < named flags < ``--param``."""

from __future__ import annotations

import pytest

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.cli.params import ParamError, build_params, defaults, parse_pairs
from lmaudit.checks.harness.registry import get_check

load_checks()


def test_values_are_yaml_except_for_text_fields():
    spec = get_check("arithmetic_head_sweep")
    params = build_params(spec, pairs=parse_pairs(["ops=-", "layer_fraction=[0.1, 0.2]", "n_per_op=3"]))
    assert params.ops == "-" and params.layer_fraction == (0.1, 0.2) and params.n_per_op == 3


def test_dotted_keys_reach_nested_parameter_models():
    spec = get_check("arithmetic_cna_head_ablation")
    params = build_params(spec, pairs=parse_pairs(["sweep.n_per_op=4", "heads=[L1.H2]"]))
    assert params.sweep.n_per_op == 4 and params.heads == ["L1.H2"]
    # a nested default is listed as plain data
    assert defaults(spec)["sweep"]["n_per_op"] == spec.params().sweep.n_per_op


def test_precedence_defaults_quick_flags_param():
    spec = get_check("quantization_recovery")
    params = build_params(spec, quick={"n_windows": 2, "seq_len": 64}, flags={"seq_len": 32, "bits": None},
                          pairs={"calibration_windows": "1"})
    assert (params.n_windows, params.seq_len, params.calibration_windows, params.bits) == (2, 32, 1, 4)
    with pytest.raises(ParamError, match="repeats a value its own flag"):
        build_params(spec, flags={"seq_len": 32}, pairs={"seq_len": "64"})


@pytest.mark.parametrize(("pairs", "message"), [(["n_windows"], "expected key=value"),
                                                (["n_windows=1", "n_windows=2"], "given twice")])
def test_malformed_pairs(pairs, message):
    with pytest.raises(ParamError, match=message):
        parse_pairs(pairs)


def test_invalid_values_name_the_parameter_on_one_line():
    with pytest.raises(ParamError) as raised:
        build_params(get_check("bias_editing"), pairs={"neuron_fraction": "0.9", "n_control_draws": "3"})
    message = str(raised.value)
    assert "\n" not in message and "neuron_fraction" in message and "n_control_draws" in message
