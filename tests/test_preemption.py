"""Preemption of a multi-process run: SIGTERM checkpoints at the same step everywhere, exit 0, resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = [sys.executable, "examples/train_llama.py", "--max-steps", "12", "--seq-len", "32"]
LAUNCH = [sys.executable, "-m", "zerojax.cli", "launch", "--nproc", "2", "--devices-per-proc", "4", "--grace", "60", "--"]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def final(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if "final_eval_loss" in l)
    return json.loads(line[line.index("{"):])


@pytest.mark.slow
def test_sigterm_to_a_launched_run_checkpoints_exits_zero_and_resumes_identically(tmp_path):
    full = subprocess.run(LAUNCH + EXAMPLE + ["--output-dir", str(tmp_path / "full")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "preempted"
    proc = subprocess.Popen(LAUNCH + EXAMPLE + ["--output-dir", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").exists():  # written after the first step
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    interrupted = final(stdout)
    assert interrupted["interrupted"] and interrupted["steps"] < 12
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == interrupted["steps"]

    resumed = subprocess.run(LAUNCH + EXAMPLE + ["--output-dir", str(out), "--resume"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final(resumed.stdout) == dict(final(full.stdout), initial_eval_loss=final(resumed.stdout)["initial_eval_loss"])
