"""Tiny stand-ins for what a shipped config points at: a checkpoint dir, benchmark files, an endpoint.

Used by ``test_shipped_configs.py`` and ``test_launch.py`` to run every file in ``configs/`` and every
launch script through the real CLIs at tiny scale:

* :func:`tiny_checkpoint` - a random 2-layer Llama (the project's own ``models.init`` +
  ``save_pretrained``) with a word-level tokenizer over the bundled seeds and the env's phrase banks,
  in the layout of a Hugging Face checkpoint dir (what ``roles.*.checkpoint`` and ``sft.model.path``
  name). Its output head never writes "equal"/"same": a greedy random reviewer would otherwise say
  "Equal" to every rewrite by chance and the generate stage would keep nothing.
* :func:`benchmark_dir` - one document per benchmark task in the layouts ``eval/tasks.py`` reads.
* :func:`serve` - ``python -m teams_rl_jax.serve`` on a free loopback port, with a bearer key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import helpers

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "tiny-llama"
API_KEY_ENV = "OPENAI_API_KEY"  # what configs/openai_endpoint.yaml names
API_KEY = "test-key-not-a-secret"
DEMO_SFT = ROOT / "teams_rl_jax" / "data" / "demo_sft.jsonl"
TINY_SEEDS = ROOT / "teams_rl_jax" / "data" / "seeds.jsonl"  # the bundled seeds, for a config's `seeds:` file
# The reviewer's reply parser reads these as "Equal" (env/judge.py); the fixture never generates them.
JUDGE_EQUAL_WORDS = ("equal", "same")


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: JAX on the CPU with ``devices`` host devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama checkpoint dir with its tokenizer at ``path`` (see the module doc)."""
    import jax
    import numpy as np

    from teams_rl_jax.env.seeds import offline_tokenizer
    from teams_rl_jax.evolve.records import read_seeds
    from teams_rl_jax.models import init, save_pretrained

    tok = offline_tokenizer([s.text for s in read_seeds()], vocab_size=4096)
    tok.save_pretrained(str(path))
    vocab = (len(tok) + 63) // 64 * 64
    lm = init(dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0),
              jax.random.key(seed))
    banned = [i for w, i in tok.get_vocab().items() if w.lower() in JUDGE_EQUAL_WORDS]
    head = np.array(lm.params["lm_head"]["kernel"])
    head[:, banned] = 0.0  # logit 0 against ~1000 random logits: never the greedy pick
    params = {**lm.params, "lm_head": {"kernel": jax.numpy.asarray(head)}}
    save_pretrained(lm, path, params)
    return path


_ARC = {"question": "Which gas do plants take in?", "answerKey": "A",
        "choices": {"text": ["carbon dioxide", "helium"], "label": ["A", "B"]}}
_HELLASWAG = {"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "label": "0",
              "endings": ["stirs the bowl.", "flies away."]}
_MMLU = {"question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "elementary_mathematics"}
_TQA = {"question": "Can pigs fly?", "mc1_targets": {"choices": ["No.", "Yes."], "labels": [1, 0]},
        "mc2_targets": {"choices": ["No.", "Yes."], "labels": [1, 0]}}


def benchmark_dir(path: Path) -> Path:
    """One document per benchmark task (every task of ``eval.benchmarks.tasks``' default)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, rec in (("arc_easy", _ARC), ("arc_challenge", _ARC), ("hellaswag", _HELLASWAG), ("mmlu", _MMLU),
                      ("truthfulqa_mc", _TQA)):
        (path / f"{name}.jsonl").write_text(json.dumps(rec) + "\n")
    return path


@contextlib.contextmanager
def serve(checkpoint: Path, log_path: Path, timeout_s: float = 240):
    """``python -m teams_rl_jax.serve`` of ``checkpoint`` on loopback; yields its ``/v1`` base URL."""

    port = helpers.free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--dtype", "float32", "--model-name", SERVED_NAME,
                             "--api-key-env", API_KEY_ENV, "--log-level", "warning"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=cpu_env(**{API_KEY_ENV: API_KEY}))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        helpers.wait_for_http(f"{url}/models", proc, log_path, timeout_s, headers={"Authorization": f"Bearer {API_KEY}"})
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ------------------------------------------------------------------ shipped configs at tiny scale
# How each file in configs/ is run at tiny scale (test_shipped_configs.py; test_launch.py for the launch
# scripts' default configs): a config missing from SHRINK fails the test, asking for an entry.
# What each stage leaves (README, "The pipeline"): checked for every stage a config lists.
ARTIFACTS = {"policy": "policy/policy.json", "generate": "data/generated.jsonl", "sft": "sft/hf/config.json",
             "eval": "eval/report.json"}
# Size overrides, grouped by what they shrink (keys the lead may rename when the config schema moves).
POLICY = ["policy.num_envs=2", "policy.num_updates=1"]
LLM_ENV: list[str] = []  # the LLM env's buffer is roles.instructor.max_new_tokens (one setting)
INSTRUCTOR = ["roles.instructor.max_new_tokens=48"]  # reply lengths are the roles' own; the longest seed is 46
EXPERT = ["roles.expert.max_new_tokens=8"]
# The paper's exact rule reads every reply but "Not Equal" as Equal: a random reviewer would eliminate
# every rewrite (no_gain) and leave SFT an empty dataset. The lenient parser reads its noise as unparseable.
LENIENT = ["roles.reviewer.parser=lenient"]
GENERATE = ["generate.max_seeds=2", "generate.batch_seeds=2", "generate.steps=2",
            "generate.drop_truncated=false"]  # a random model never stops: keep its cut rewrites
SFT = ["sft.max_steps=2", "sft.global_batch=8", "sft.grad_accum=1", "sft.data.max_seq_len=160",
       "sft.data.drop_remainder=false"]  # 2 seeds give fewer rows than one batch
SFT_ONLY = SFT + [f"sft.data.path={DEMO_SFT}"]  # data.path auto = a generate stage this run does not have
EVAL = ["eval.mia.max_examples=4"]


@dataclasses.dataclass(frozen=True)
class Shrink:
    """How a shipped config is run at tiny scale."""

    sets: list[str]
    devices: int = 1  # simulated CPU devices (8 where the config's meshes ask for several)
    xfail: str | None = None  # a known failure fixed elsewhere (strict: the test says when it passes)


SHRINK: dict[str, Shrink] = {
    "llama2_7b_gpu.yaml": Shrink(POLICY + LLM_ENV + INSTRUCTOR + EXPERT + LENIENT + GENERATE + SFT + EVAL, devices=8),
    "llama2_7b_tpu_pod.yaml": Shrink(POLICY + LLM_ENV + INSTRUCTOR + EXPERT + LENIENT + GENERATE + SFT + EVAL,
                                     devices=8),
    "paper_llama2_7b_gpu.yaml": Shrink(POLICY + LLM_ENV + INSTRUCTOR + EXPERT + LENIENT + GENERATE + SFT + EVAL,
                                       devices=8),
    "paper_llama2_7b_tpu.yaml": Shrink(POLICY + LLM_ENV + INSTRUCTOR + EXPERT + LENIENT + GENERATE + SFT + EVAL,
                                       devices=8),
    "openai_endpoint.yaml": Shrink(POLICY + LLM_ENV + INSTRUCTOR + EXPERT + GENERATE + SFT + EVAL),
    "policy_llm.yaml": Shrink(POLICY + LLM_ENV + INSTRUCTOR),
    "sft_lora_llama7b.yaml": Shrink(SFT_ONLY),
    "sft_paper_llama7b.yaml": Shrink(SFT_ONLY, devices=8),
    "sft_tiny.yaml": Shrink(["sft.max_steps=2"]),  # already tiny: only fewer steps
}


def needs_server(cfg: dict) -> bool:
    """Whether a config (its YAML dict) has a role on an endpoint."""
    return any(spec.get("base_url") for spec in (cfg.get("roles") or {}).values())


def path_swaps(cfg: dict, checkpoint: Path, base_url: str | None, benchmarks: Path) -> list[str]:
    """``--set`` values pointing every path and endpoint the config names at the tiny fixtures (the
    ``seeds`` file at the bundled seeds)."""
    sets = [f"seeds={TINY_SEEDS}"] if cfg.get("seeds") else []
    for role, spec in sorted((cfg.get("roles") or {}).items()):
        if spec.get("checkpoint"):
            sets.append(f"roles.{role}.checkpoint={checkpoint}")
        if spec.get("base_url"):
            sets += [f"roles.{role}.base_url={base_url}", f"roles.{role}.model={SERVED_NAME}"]
    sft = cfg.get("sft") or {}
    if (sft.get("model") or {}).get("path"):
        sets.append(f"sft.model.path={checkpoint}")
    if ((cfg.get("eval") or {}).get("benchmarks") or {}).get("data_dir"):
        sets.append(f"eval.benchmarks.data_dir={benchmarks}")
    return sets


def set_args(sets: list[str]) -> list[str]:
    """``["--set", s, ...]`` for each override."""
    return [a for s in sets for a in ("--set", s)]
