"""The launch scripts: each default command parses its default config with the CLI it calls, and runs it.

The run tests put stand-in ``srun`` / ``gcloud`` executables first on PATH that run the worker
command locally as 2 processes (a real ``jax.distributed`` group over gloo on the CPU), and pass the
tiny-scale overrides of :mod:`tiny_pipeline` through the scripts' extra-arguments mechanism, so the
script's own logic and the config it passes are what is checked.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import helpers
import tiny_pipeline as T

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


def _default_command(script: Path) -> tuple[str, str] | None:
    """(module, config path) of the script's `python -m ... --config $CONFIG` line, or None."""
    text = script.read_text()
    mod = re.search(r"python -m (teams_rl_jax(?:\.\w+)+)", text)
    if mod is None:
        return None
    cfg = re.search(r'CONFIG=\$\{CONFIG:-([^}]+)\}', text)
    assert cfg is not None, f"{script.name}: runs {mod.group(1)} without a default CONFIG"
    assert re.search(r"--config \"?\$CONFIG", text), f"{script.name}: the command does not pass --config $CONFIG"
    return mod.group(1), cfg.group(1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_default_command_parses_its_config(script):
    """Catches: a script pointing train at an SFT-only config (the old `unknown config key 'model'`)."""
    found = _default_command(script)
    if found is None:
        assert "pip install" in script.read_text(), f"{script.name}: neither a run nor a set-up script"
        return
    module, config = found
    assert (ROOT / config).is_file(), f"{script.name}: default config {config} does not exist"
    if module == "teams_rl_jax.train":
        from teams_rl_jax.train import build_parser, load_config

        cfg = load_config(build_parser().parse_args(["--config", str(ROOT / config)]))
        assert cfg.stages
    elif module == "teams_rl_jax.sft":
        from teams_rl_jax import config as cfglib
        from teams_rl_jax.sft.config import SFTConfig

        data = cfglib.read_yaml(ROOT / config)
        cfglib.from_dict(SFTConfig, data.get("sft", data))
    else:
        pytest.fail(f"{script.name}: unexpected module {module}")


def test_scripts_run_train_on_every_worker():
    """The pod script runs on --worker=all and SLURM through srun (one process per node)."""
    assert "--worker=all" in (ROOT / "launch" / "tpu_pod.sh").read_text()
    assert re.search(r"^srun python -m teams_rl_jax.train", (ROOT / "launch" / "slurm.sbatch").read_text(), re.M)


# ------------------------------------------------------------------ the scripts run, on 2 local processes
SRUN = r"""#!/usr/bin/env bash
# Stand-in for SLURM's srun: runs "$@" as $STANDIN_TASKS tasks on this machine, each with the variables
# SLURM gives a task (jax.distributed.initialize() reads them; the coordinator port is derived from the
# job id as JAX does); task i's output goes to $STANDIN_LOGS/task$i.log.
set -u
pids=()
for ((i = 0; i < STANDIN_TASKS; i++)); do
  SLURM_JOB_ID=$STANDIN_JOB_ID SLURM_NTASKS=$STANDIN_TASKS SLURM_PROCID=$i SLURM_LOCALID=0 \
  SLURM_STEP_NODELIST=127.0.0.1 SLURM_STEP_NUM_NODES=$STANDIN_TASKS SLURM_NODEID=$i \
    "$@" >"$STANDIN_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command CMD`: checks the
# arguments, then runs CMD with bash on $STANDIN_TASKS local "hosts", host i with the coordinator
# variables the project's distributed init reads; host i's output goes to $STANDIN_LOGS/task$i.log.
set -u
[ "${1-} ${2-} ${3-} ${4-}" = "compute tpus tpu-vm ssh" ] || { echo "gcloud stand-in: unexpected: $*" >&2; exit 64; }
name=$5; shift 5
zone= worker= cmd=
while [ $# -gt 0 ]; do
  case $1 in
    --zone) zone=$2; shift 2 ;;
    --worker=*) worker=${1#--worker=}; shift ;;
    --command) cmd=$2; shift 2 ;;
    *) echo "gcloud stand-in: unexpected argument $1" >&2; exit 64 ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] && [ "$worker" = all ] && [ -n "$cmd" ] || { echo "gcloud stand-in: need NAME, --zone, --worker=all, --command" >&2; exit 64; }
echo "$cmd" >"$STANDIN_LOGS/command.txt"
pids=()
for ((i = 0; i < STANDIN_TASKS; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$STANDIN_PORT JAX_NUM_PROCESSES=$STANDIN_TASKS JAX_PROCESS_ID=$i \
    bash -c "$cmd" >"$STANDIN_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
TASKS = 2
SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX's SLURM coordinator port: job id % 4096 + this


def _checkout(tmp_path: Path) -> Path:
    """A checkout-shaped dir to launch from: this repo's package, configs and launch scripts, and a
    ``.venv/bin/activate`` that puts this interpreter first on PATH."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("teams_rl_jax", "configs", "launch"):
        (repo / name).symlink_to(ROOT / name)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return repo


def _stand_in(bin_dir: Path, name: str, text: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)


def _slurm_port() -> int:
    """A free port that a SLURM job id maps to (the job id is then port - SLURM_PORT_BASE)."""
    for _ in range(200):
        port = helpers.free_port()
        if port >= SLURM_PORT_BASE:
            return port
    import socket

    for port in range(SLURM_PORT_BASE, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in JAX's SLURM range")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return T.tiny_checkpoint(tmp_path_factory.mktemp("launch") / "tiny-llama", seed=0)


@pytest.mark.slow  # a 2-process pipeline per script: 3.5-4 min each on the busy 2-core VM
@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", [p for p in SCRIPTS if _default_command(p)], ids=lambda p: p.name)
def test_launch_script_runs_its_default_config(script, checkpoint, tmp_path):
    """The script's own command, with its default config shrunk by extra arguments, runs as 2 processes
    (a gloo group on the CPU) through stand-in ``srun`` / ``gcloud``, and leaves every stage's artifact.

    Catches: a script that drops or mangles its extra arguments, points at a config that cannot run,
    or runs a command that does not start (activate, cd, module name), and a config whose stages do not
    run multi-process.
    """
    module, config = _default_command(script)
    cfg = yaml.safe_load((ROOT / config).read_text())
    entry = T.SHRINK[Path(config).name]
    repo = _checkout(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "srun", SRUN)
    _stand_in(bin_dir, "gcloud", GCLOUD)
    port = _slurm_port()
    run_dir = tmp_path / "run dir"  # an extra argument with a space must reach train as one argument
    bench = T.benchmark_dir(tmp_path / "benchmarks")
    # SFT's mesh spans every process's devices: the global batch must cover them all.
    sets = entry.sets + [f"sft.global_batch={entry.devices * TASKS}"]
    args = ["--run-dir", str(run_dir), *T.set_args(T.path_swaps(cfg, checkpoint, None, bench) + sets)]
    # Each task is one host with the devices the config's per-host role meshes ask for (8 GPUs per node).
    env = T.cpu_env(entry.devices, PATH=f"{bin_dir}:{os.environ['PATH']}", STANDIN_TASKS=str(TASKS),
                    STANDIN_LOGS=str(logs), STANDIN_PORT=str(port), STANDIN_JOB_ID=str(port - SLURM_PORT_BASE),
                    TPU_NAME="test-v5p-16", ZONE="test-zone", REPO=str(repo))
    env.pop("PYTHONPATH", None)  # the package comes from the checkout, as on a cluster
    t0 = time.time()
    p = subprocess.run(["bash", str(repo / "launch" / script.name), *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=840)
    tails = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.glob("task*.log")))
    print(f"{script.name} ({config}): {time.time() - t0:.0f} s\n{tails}")
    assert p.returncode == 0, f"{script.name} failed (exit {p.returncode}): {p.stderr[-2000:]}\n{tails}"
    assert len(list(logs.glob("task*.log"))) == TASKS
    for stage in cfg["stages"]:
        assert (run_dir / T.ARTIFACTS[stage]).is_file(), f"{script.name}: no {T.ARTIFACTS[stage]} after stage {stage}"
