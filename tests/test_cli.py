"""CLI and config files: every shipped config loads; user errors exit 2 with one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from teams_rl_jax import config as cfglib
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.train import STAGES, TrainConfig, default_config_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = CONFIGS.parent


def test_shipped_configs_load():
    def sft_of(name):  # a file is a TrainConfig (with an sft: section) or a bare SFTConfig
        data = cfglib.read_yaml(CONFIGS / name)
        if "sft" in data:
            return cfglib.load(TrainConfig, CONFIGS / name).sft
        return cfglib.load(SFTConfig, CONFIGS / name)

    default = cfglib.load(TrainConfig, default_config_path())
    assert default.offline_demo and default.policy.env == "token_edit" and default.stages == STAGES
    for name in sorted(p.name for p in CONFIGS.glob("*.yaml")):  # one shape: every file is a pipeline config
        cfg = cfglib.load(TrainConfig, CONFIGS / name)
        assert not cfg.offline_demo, name
    for name in ("llama2_7b_gpu.yaml", "llama2_7b_tpu_pod.yaml", "openai_endpoint.yaml"):
        cfg = cfglib.load(TrainConfig, CONFIGS / name)
        assert cfg.roles.instructor and cfg.roles.expert and cfg.sft.model.path and cfg.generate.steps == 6, name
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


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd or ROOT)


def test_config_errors_one_line_and_source(tmp_path):
    """Unknown key -> the closest valid key; wrong type; missing file; a --set value blamed on --set.

    Catches: no difflib suggestion, a --set error reported as the YAML file's, multi-line tracebacks.
    """
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate:\n  selectr: random\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'generate.selectr' \(did you mean 'generate.selector'"):
        cfglib.load(TrainConfig, cfg)
    cfg.write_text("generate:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"^--set generate.steps=many: generate.steps: expected an integer"):
        cfglib.load(TrainConfig, cfg, ["generate.steps=many"])
    with pytest.raises(ConfigError, match=r"^--set sft.optim.lrr=1: unknown config key 'sft.optim.lrr' \(did you mean 'sft.optim.lr'"):
        cfglib.load(TrainConfig, cfg, ["sft.optim.lrr=1"])
    cfg.write_text("generate:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: generate.steps: expected an integer"):
        cfglib.load(TrainConfig, cfg, ["sft.optim.lr=1e-4"])  # an unrelated override does not take the blame


def test_cli_errors_exit_2(tmp_path):
    """The train and sft CLIs: one `error:` line and exit 2 for a wrong type, and for a real-model SFT
    config whose generated dataset is missing (the demo set is for the offline default only)."""
    p = _cli("teams_rl_jax.train", "--run-dir", str(tmp_path), "--set", "generate.steps=many")
    assert p.returncode == 2 and p.stderr.startswith("error: --set generate.steps=many") and p.stderr.count("\n") == 1
    for mod in ("teams_rl_jax.sft", "teams_rl_jax.train"):
        p = _cli(mod, "--config", "configs/sft_paper_llama7b.yaml", "--run-dir", str(tmp_path / mod))
        assert p.returncode == 2, (mod, p.stderr[-2000:])
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        assert str(tmp_path / mod / "data" / "generated.jsonl") in p.stderr, p.stderr


def test_sft_cli_honours_the_configs_run_dir(tmp_path):
    """`python -m teams_rl_jax.sft --config F` writes to F's run_dir (relative to the working dir), not runs/sft;
    --run-dir overrides it; a bare SFTConfig file (no run_dir) goes to runs/sft; bare --set keys mean sft.*.

    Catches: the SFT CLI's own default run dir winning over the config's.
    """
    from teams_rl_jax import cli
    from teams_rl_jax.sft.__main__ import SFTRun, as_sft_run, build_parser, sft_override

    data = cfglib.read_yaml(CONFIGS / "sft_tiny.yaml")
    data["run_dir"] = "from_file"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(data))
    p = _cli("teams_rl_jax.sft", "--config", str(cfg), "--set", "max_steps=2", "--set", "sft.tensorboard=false",
             "--set", "checkpoint.every=2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "from_file" / "sft" / "hf" / "config.json").is_file()
    assert not (tmp_path / "runs").exists()

    def load(*argv):
        args = build_parser().parse_args(list(argv))
        args.set = [sft_override(s) for s in args.set]
        return cli.load_config(SFTRun, args, reshape=as_sft_run)

    assert load("--config", str(cfg), "--run-dir", "elsewhere").run_dir == "elsewhere"
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(data["sft"]))
    run = load("--config", str(bare), "--set", "optim.lr=0.5")
    assert run.run_dir == "runs/sft" and run.sft.optim.lr == 0.5 and run.sft.model.config["hidden_size"] == 64


def test_serve_cli_user_error_one_line(tmp_path):
    """The serve CLI goes through the same wrapper: a missing checkpoint dir is one `error:` line, exit 2."""
    p = _cli("teams_rl_jax.serve", "--checkpoint", str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stderr == f"error: --checkpoint: no such directory: {tmp_path / 'nope'}\n", p.stderr
