"""The main example runs unchanged under `zerojax launch` and matches a single-process run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run(cmd, out_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(cmd + ["--max-steps", "4", "--seq-len", "32", "--output-dir", str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if "final_eval_loss" in l)
    return json.loads(line[line.index("{"):])


@pytest.mark.slow
def test_example_under_launcher_matches_one_process(tmp_path):
    example = [sys.executable, "examples/train_llama.py"]
    single = run(example, tmp_path / "one")
    launched = run([sys.executable, "-m", "zerojax.cli", "launch", "--nproc", "2", "--devices-per-proc", "4", "--"]
                   + example, tmp_path / "two")
    assert launched["steps"] == single["steps"] == 4
    assert launched["initial_eval_loss"] == pytest.approx(single["initial_eval_loss"], rel=1e-5)
    assert launched["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=1e-5)
    assert (tmp_path / "two" / "hf" / "config.json").exists()
