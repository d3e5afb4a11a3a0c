"""The one prepared GPU command, ``benchmarks/gpu_figures.sh``, run on the CPU at toy sizes (``SMOKE=1``).

A session is lent a GPU for 15 minutes at most, and the script must produce every figure in one run: a
flag that a benchmark no longer accepts, a reference variant that errors, or a step that silently times an
eager torch under a "torch.compile" label would waste that run. ``SMOKE=1`` keeps every step and flag and
shrinks the model; the torch references run the same variants on the CPU (the static-cache and compiled HF
``generate`` included), and the script exits non-zero when any step fails, is cut by its timeout or is
skipped. Slow (~3-4 min on 2 cores): ``.ci/run`` runs it.

Mutations caught: a benchmark flag renamed in the script (``--torch-variants`` -> ``--torch-variant``:
argparse error, rc=2); the compiled HF variant without transformers' compile switch on the CPU (the
script's own check stops it: "skipped torch.compile"); a step's failure not recorded (the exit status).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_gpu_figures_script_runs_every_step_at_toy_size(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("fastapi")
    env = dict(os.environ, SMOKE="1", BUDGET="1300",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(["bash", "benchmarks/gpu_figures.sh", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1400)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "every step ran (rc=0)" in log and "SKIPPED" not in log, log[-4000:]
    for step in ("SFT ~1B", "decode + prefill ~1B bf16, batch 2", "decode + prefill ~1B bf16, batch 4",
                 "generate stage vs bare decode", "continuous-batching engine", "eval scorer", "server c="):
        assert f"=== {step}" in log, f"step {step!r} did not run:\n{log[-4000:]}"
    # every reference the GPU run compares with, in a table with its ratio
    for label in ("torch.compile default (cpu)", "HF generate static cache (eager)",
                  "HF generate static cache (torch.compile default)", "lm-eval hf (torch)"):
        assert label in log, f"no {label!r} row:\n{log[-4000:]}"
    assert (tmp_path / "gpu_figures.log").read_text() == p.stdout
    # the decode steps' profiles: printed (no device plane on the CPU) and kept for the device tool to return
    assert log.count("profile of ours, batch") == 2 and "no /device: plane" in log, log[-4000:]
    kept = sorted(f.name for f in tmp_path.iterdir())
    assert kept == ["decode_b2_n1.xplane.pb.gz", "decode_b2_n8.xplane.pb.gz", "decode_b4_n1.xplane.pb.gz",
                    "decode_b4_n8.xplane.pb.gz", "failed_steps", "gpu_figures.log"], kept  # <= 8 files come back
