"""Every launch script's default command parses its default config with the CLI it calls."""

import re
from pathlib import Path

import pytest

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
