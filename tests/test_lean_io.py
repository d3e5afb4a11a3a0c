"""Lean checkpoint IO: loading without a mesh peaks near the model's bytes of host memory; a full fine-tuning
run resumes from Orbax with the HF model dir gone.

``python tests/test_lean_io.py measure MODEL_DIR`` prints the peak-memory figures for a checkpoint dir
(``python tests/test_lean_io.py make DIR MB`` writes a random one of about MB megabytes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05, bos_token_id=1, eos_token_id=2)


def _model_config(mb: float) -> dict:
    """A Llama config of about ``mb`` MB in float32 (8 layers, vocab 8000, width chosen to fit)."""
    for h in range(128, 4096, 64):
        cfg = dict(TINY, vocab_size=8000, hidden_size=h, intermediate_size=h * 11 // 4 // 8 * 8, num_hidden_layers=8,
                   num_attention_heads=h // 64, num_key_value_heads=h // 64)
        d, f, v = h, cfg["intermediate_size"], 8000
        if 4 * (2 * v * d + 8 * (4 * d * d + 3 * d * f)) / 1e6 >= mb:
            return cfg
    raise ValueError(mb)


def make_checkpoint(path: Path, mb: float, seed: int = 0) -> Path:
    import jax

    from teams_rl_jax.models import init, save_pretrained

    return save_pretrained(init(_model_config(mb), jax.random.key(seed)), path)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(model_dir: str) -> dict:
    """Peak host RSS above the pre-load baseline while loading ``model_dir``, over the params' bytes:
    ``cold`` (first load: includes compiling the per-shape fill functions) and ``warm`` (second load)."""
    import gc

    import jax

    from teams_rl_jax.models import load_pretrained

    jax.numpy.zeros(1).block_until_ready()  # runtime up before the baseline
    out = {}
    for run in ("cold", "warm"):
        gc.collect()
        base = _rss_kb()
        ok = _reset_peak()
        lm = load_pretrained(model_dir)
        jax.block_until_ready(lm.params)
        peak = _peak_kb() if ok else _peak_kb()
        model = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.params))
        out[run] = (peak - base) * 1024 / model
        out["model_mb"] = model / 1e6
        out["hwm_reset"] = ok
        del lm
    return out


def test_load_without_mesh_peaks_near_model_bytes(tmp_path):
    """Catches: memory-mapped reads left resident (~2x), stacking host copies of a [L, ...] leaf (~1.3x+), a
    host copy of the whole model before the device copy (~2x)."""
    make_checkpoint(tmp_path / "m", 60)
    p = subprocess.run([sys.executable, __file__, "measure", str(tmp_path / "m")], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["hwm_reset"], r  # otherwise the figure would include the imports' peak
    assert r["warm"] <= 1.2, r
    assert r["cold"] <= 1.35, r  # + the compiles of a few small per-shape fill functions


def test_full_finetune_resumes_without_the_hf_dir(tmp_path):
    """Catches: resume that reads model.path again (the dir is gone: CheckpointError), or that needs the
    original tokenizer dir; checks the resumed run continues at the checkpoint's step and exports bf16."""
    import jax

    from teams_rl_jax import config as cfglib
    from teams_rl_jax.data.tokenizer import build_word_tokenizer
    from teams_rl_jax.models import init, save_pretrained
    from teams_rl_jax.models.hf_io import CheckpointReader
    from teams_rl_jax.sft.config import SFTConfig
    from teams_rl_jax.sft.loop import DEMO_DATA, train

    base = tmp_path / "base"
    save_pretrained(init(TINY, jax.random.key(int(np.random.default_rng().integers(1 << 30)))), base)
    build_word_tokenizer(DEMO_DATA.read_text().splitlines(), 512, save_dir=base)
    common = {"model": {"path": str(base), "compute_dtype": "bfloat16"}, "global_batch": 2,
              "data": {"max_seq_len": 64, "path": str(DEMO_DATA)}, "tensorboard": False, "checkpoint": {"every": 2, "async_save": False},
              "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}}
    logs = []
    train(cfglib.from_dict(SFTConfig, {**common, "max_steps": 2, "export": False}), tmp_path / "run", logs.append)
    base.rename(tmp_path / "moved")  # the HF weights and tokenizer are gone
    train(cfglib.from_dict(SFTConfig, {**common, "max_steps": 3}), tmp_path / "run", logs.append)
    assert any("resumed from step 2" in m for m in logs), logs
    rows = [json.loads(l) for l in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    hf = CheckpointReader(tmp_path / "run" / "sft" / "hf")
    assert str(hf["model.norm.weight"].dtype) == "bfloat16"  # default export dtype: the compute dtype
    assert (tmp_path / "run" / "sft" / "hf" / "tokenizer_config.json").is_file()


if __name__ == "__main__":
    if sys.argv[1] == "measure":
        print(json.dumps(measure(sys.argv[2])))
    elif sys.argv[1] == "make":
        make_checkpoint(Path(sys.argv[2]), float(sys.argv[3]))
