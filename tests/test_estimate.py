"""The estimator: analytic bytes follow the ZeRO formula and the compiled step, collectives are counted
from real programs, `stage auto` picks the cheapest option that fits, and the command's JSON and errors."""

import json
import math

import numpy as np
import pytest

from zerojax import estimate as est
from zerojax.cli import main

TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}
LAYER = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # q, o; k, v (2 kv heads of 8); mlp; two norms
OUTSIDE = 2 * 128 * 32 + 32  # embedding, lm_head, final norm
PSI = 3 * LAYER + OUTSIDE
SEQ = 16


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_analytic_model_states_follow_zero_formula(stage):
    e = est.estimate(TINY, 8, stage, seq=SEQ)
    assert e.params == PSI
    # bf16 params, fp32 gradient accumulator, fp32 master + Adam m, v (K = 12); at stage 3 the fp32 shards
    # are the parameters (no 16-bit copy): 4 + 4 + 8 bytes a parameter, over N
    assert e.theory_model_state_bytes == pytest.approx(
        {0: 18 * PSI, 1: 6 * PSI + 12 * PSI / 8, 2: 2 * PSI + 16 * PSI / 8, 3: 16 * PSI / 8}[stage])
    assert e.model_state_bytes == pytest.approx(e.theory_model_state_bytes, rel=0.02)
    assert e.analytic_peak_bytes == e.model_state_bytes + e.activation_bytes


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_accumulator_matches_the_paper_formula(stage):
    from zerojax.report import zero_formula_bytes

    e = est.estimate(TINY, 8, stage, seq=SEQ, grad_accum_dtype="bf16")
    # the paper's, less the 16-bit parameter copy that stage 3 does not hold (14 bytes a parameter, over N)
    paper = zero_formula_bytes(stage, PSI, 8, param_bytes=0 if stage == 3 else 2)
    assert e.model_state_bytes == pytest.approx(paper, rel=0.02)


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_compiled_step_matches_analytic_and_collective_theory(stage):
    e = est.estimate(TINY, 8, stage, seq=SEQ, compiled=True)
    c = e.compiled
    assert c.state_bytes == pytest.approx(e.held_bytes, rel=0.10)
    assert c.peak_bytes == c.argument_bytes + c.output_bytes - c.alias_bytes + c.temp_bytes
    assert c.temp_bytes > 0 and e.peak_bytes == c.peak_bytes
    coll = e.collective_bytes
    assert coll["reduce-scatter"] == 2 * PSI  # every gradient once, bf16
    gathered = PSI if stage == 1 else 2 * 3 * LAYER + OUTSIDE  # stage 3: layers re-gathered by the remat
    assert coll["all-gather"] == 2 * gathered
    assert set(c.lowered_collectives["all-gather" if stage == 3 else "reduce-scatter"]) == {"bf16"}
    assert coll["total"] <= 1.05 * e.theory_collective_bytes


def test_offload_moves_optimizer_state_to_host():
    e = est.estimate(TINY, 8, 3, seq=SEQ, offload_optimizer=True, offload_param=True)
    assert e.host_bytes == e.held_bytes  # params, master and Adam moments all on the host
    assert e.analytic_peak_bytes == e.grad_bytes + e.activation_bytes


@pytest.mark.parametrize("offload_param", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_offload_keeps_host_state_off_the_device_peak(offload_param):
    """The compiled program places exactly the offloaded state in host memory (its entry layout), and
    that is what the device peak leaves out."""
    e = est.estimate(TINY, 8, 3, seq=SEQ, offload_optimizer=True, offload_param=offload_param, compiled=True)
    c = e.compiled
    assert c.host_layout_bytes == e.host_bytes == e.master_bytes + e.optimizer_bytes + offload_param * e.param_bytes
    # XLA:CPU does not split memory spaces: what stays on the device is the bf16 parameter shards,
    # the batch and three int32 counters (step, skipped, skips_in_a_row)
    assert c.host_argument_bytes == 0
    assert c.device_argument_bytes == (not offload_param) * e.param_bytes + c.batch_bytes + 12
    assert e.peak_bytes == c.device_argument_bytes + c.output_bytes - c.alias_bytes + c.temp_bytes


def test_choose_stage_picks_lowest_stage_that_fits():
    peaks = {s: est.estimate(TINY, 8, s, seq=SEQ, compiled=False).peak_bytes for s in range(4)}
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]
    chosen = est.choose_stage(TINY, 8, peaks[2], seq=SEQ, compiled=False)
    assert (chosen.stage, chosen.offload_optimizer, chosen.fits) == (2, False, True)
    assert est.choose_stage(TINY, 8, peaks[0], seq=SEQ, compiled=False).stage == 0
    offloaded = est.estimate(TINY, 8, 2, seq=SEQ, offload_optimizer=True).peak_bytes
    chosen = est.choose_stage(TINY, 8, offloaded, seq=SEQ, compiled=False)  # 2 + offload comes before 3
    assert (chosen.stage, chosen.offload_optimizer, chosen.offload_param) == (2, True, False)
    with pytest.raises(ValueError, match="no ZeRO stage or offload fits device_memory"):
        est.choose_stage(TINY, 8, 1000, seq=SEQ, compiled=False)


@pytest.mark.slow
def test_choose_stage_compiled():
    s2 = est.estimate(TINY, 8, 2, seq=SEQ, compiled=True)
    chosen = est.choose_stage(TINY, 8, s2.peak_bytes, seq=SEQ, compiled=True)
    assert chosen.stage == 2 and chosen.compiled.peak_bytes == s2.peak_bytes


ISSUE_KEYS = {"stage", "model_state_bytes", "peak_bytes", "theory_model_state_bytes", "host_bytes",
              "collective_bytes", "fits"}


def test_cli_json(tiny_json, capsys):
    assert main(["estimate", "--model", tiny_json, "--devices", "8", "--seq", str(SEQ), "--device-memory", "1MB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == PSI and [s["stage"] for s in out["stages"]] == [0, 1, 2, 3]
    for s in out["stages"]:
        assert ISSUE_KEYS <= set(s) and s["fits"] == (s["peak_bytes"] <= 10**6)
        comm = s["collective_bytes"]
        assert set(comm) == {"all-gather", "reduce-scatter", "all-reduce", "total"}
        assert comm["total"] == (3 if s["stage"] == 3 else 2) * PSI * 2 == s["theory_collective_bytes"]


def test_cli_auto_prints_choice(tiny_json, capsys):
    peak1 = est.estimate(TINY, 8, 1, seq=SEQ).peak_bytes
    assert main(["estimate", "--model", tiny_json, "--devices", "8", "--seq", str(SEQ), "--stage", "auto",
                 "--device-memory", str(peak1)]) == 0
    out = capsys.readouterr().out
    assert 'stage "auto" chooses stage 1' in out and "MiB per device" in out


def test_cli_reruns_with_more_simulated_devices(tiny_json, capfd):
    assert main(["estimate", "--model", tiny_json, "--devices", "16", "--stage", "3", "--seq", str(SEQ),
                 "--json"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["devices"] == 16
    assert out["stages"][0]["theory_model_state_bytes"] == math.floor(16 * PSI / 16)


@pytest.mark.parametrize("argv, needle", [
    (["--model", "llama-9000"], "model='llama-9000' is neither a preset"),
    (["--model", "gpt2", "--device-memory", "lots"], "--device-memory='lots' is not a memory size"),
    (["--model", "gpt2", "--stage", "1", "--offload-param", "cpu"], "parameter offload needs stage 3"),
    (["--model", "gpt2", "--stage", "auto"], "--stage auto needs --device-memory"),
    (["--model", "gpt2", "--seq", "0"], "--seq=0 must be a positive integer"),
    (["--model", "gpt2", "--devices", "0"], "--devices=0 must be a positive integer"),
])
def test_cli_bad_input_exits_2(argv, needle, capsys):
    assert main(["estimate", "--devices", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zerojax estimate: error:") and needle in err


def test_parse_bytes():
    assert est.parse_bytes("80GB") == 80 * 10**9 and est.parse_bytes("80GiB") == 80 * 2**30
    assert est.parse_bytes("1.5 MiB") == 3 * 2**19 and est.parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="device_memory='-1GB'"):
        est.parse_bytes("-1GB")
    assert np.isclose(est.parse_bytes("0.5KB"), 500)
