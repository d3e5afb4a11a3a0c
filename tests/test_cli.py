"""CLI and config files: every shipped config loads; user errors exit 2 with one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from teams_rl_jax import config as cfglib
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    def sft_of(name):  # a file is a TrainConfig (with an sft: section) or a bare SFTConfig
        data = cfglib.read_yaml(CONFIGS / name)
        if "sft" in data:
            return cfglib.load(TrainConfig, CONFIGS / name).sft
        return cfglib.load(SFTConfig, CONFIGS / name)

    cfglib.load(TrainConfig, CONFIGS / "default.yaml")
    for name in ("sft_tiny.yaml", "sft_paper_llama7b.yaml"):
        assert sft_of(name).data.template == "alpaca"
    paper = sft_of("sft_paper_llama7b.yaml")
    assert (paper.optim.lr, paper.optim.warmup_steps, paper.global_batch, paper.data.max_seq_len, paper.epochs) == \
        (2e-5, 2, 256, 512, 3.0)
    assert (paper.optim.b1, paper.optim.b2, paper.optim.eps, paper.optim.weight_decay) == (0.9, 0.999, 1e-8, 0.0)


def test_overrides_and_type_errors(tmp_path):
    cfg = cfglib.load(TrainConfig, None, ["policy.algo=ppo", "sft.optim.lr=3e-4", "stages=[sft]"])
    assert cfg.policy.algo == "ppo" and cfg.sft.optim.lr == 3e-4 and cfg.stages == ("sft",)
    with pytest.raises(ConfigError, match="sft.global_batch: expected an integer"):
        cfglib.load(TrainConfig, None, ["sft.global_batch=lots"])
    with pytest.raises(ConfigError, match="stages: unknown stage 'polcy'"):
        cfglib.load(TrainConfig, None, ["stages=[polcy]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  optim: {lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        cfglib.load(TrainConfig, bad)


@pytest.mark.parametrize("args,needle", [(["--set", "sft.optim.lrr=1"], "sft.optim.lrr"),
                                         (["--stages", "sft,nope"], "nope"),
                                         (["--config", "missing.yaml"], "missing.yaml")])
def test_train_cli_user_errors_exit_2(tmp_path, args, needle):
    p = subprocess.run([sys.executable, "-m", "teams_rl_jax.train", "--run-dir", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and needle in p.stderr and p.stderr.count("\n") == 1, p.stderr
