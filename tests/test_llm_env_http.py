"""The LLM env with every role behind HTTP and no local tokenizer (issue 17, part 2): a real
``python -m teams_rl_jax.serve`` subprocess serves both the instructor and the reviewer.

The served model is a chain Llama (``test_llm_operator._chain_lm``): after the prompt's last token
(":" of "ASSISTANT:") it writes "Explain how an animal adapts" and stops, so every rewrite is accepted
and every reviewer reply is unreadable (counted as unparseable, scored Equal).
Catches: the env refusing an HTTP instructor without a tokenizer (the shipped openai_endpoint.yaml
exited at once); words outside every vocabulary lost between the buffers and the HTTP prompt
(``<unk>``); served lengths not taken from the endpoint's usage; unparseable replies not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from teams_rl_jax import backends
from teams_rl_jax.backends.config import RoleConfig, RolesConfig
from teams_rl_jax.env import EnvConfig, make
from teams_rl_jax.env.seeds import offline_tokenizer, read_seed_records
from teams_rl_jax.models import save_pretrained
from teams_rl_jax.rl import PolicyConfig
from teams_rl_jax.rl.stage import run_policy_stage
from test_llm_operator import _chain_lm

ANSWER = "Explain how an animal adapts"
OOV = ["Describe the zorbliquent flanx of Übergrößenträger ☃ in 日本語.",
       "Compare qwzxv-7 with the Ærøskøbing thrumble, step by step.",
       "List three glimmerquast uses of ĳsselmeer mud.", "Explain frost~heave (\"Frostaufbruch\") in Oslo."]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    texts, _ = read_seed_records()
    tok = offline_tokenizer(texts)
    words = ANSWER.split()
    ids = [tok.convert_tokens_to_ids(w) for w in [":", *words]]
    lm = _chain_lm(len(tok), dict(zip(ids[:-1], ids[1:])), eos=tok.eos_token_id)
    ckpt = tmp / "chain"
    save_pretrained(lm, ckpt)
    tok.save_pretrained(str(ckpt))
    port = helpers.free_port()
    log = tmp / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(ckpt), "--port",
                                 str(port), "--dtype", "float32", "--log-level", "warning"],
                                stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)
        seeds = tmp / "seeds.jsonl"
        seeds.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in OOV))
        role = dict(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model=ckpt.name, timeout_s=120,
                    max_retries=1)
        roles = RolesConfig(instructor=RoleConfig(**role, max_new_tokens=12),
                            reviewer=RoleConfig(**role, max_new_tokens=6))
        yield roles, str(seeds)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Recorder:
    """A real backend, with every prompt and completion kept; ``config``: its role's settings (what the
    env reads a built backend's reply length and parser from)."""

    def __init__(self, inner, config):
        self.inner, self.role, self.model, self.counter = inner, inner.role, inner.model, inner.counter
        self.config = config
        self.prompts, self.outs, self.kw = [], [], []

    def complete(self, prompts, **kw):
        outs = self.inner.complete(prompts, **kw)
        self.kw.append(kw)
        self.prompts += list(prompts)
        self.outs += outs
        return outs


def test_http_env_round_trips_any_text_and_counts_served_tokens(served):
    roles, seeds = served
    built = {r: Recorder(b, getattr(roles, r)) for r, b in backends.build_roles(roles).items()}
    # No elimination rules: the unreadable reviewer replies (scored Equal) would drop every rewrite.
    cfg = EnvConfig(seeds_path=seeds, max_len=96, episode_length=2, elimination={},
                    reward_weights={"reviewer": 1.0, "length_gain": 0.5})
    env, params = make("llm", cfg, roles=built)
    assert env.host_roles == ("instructor", "reviewer") and not params.buffer_is_served
    _, state = jax.vmap(env.reset_to, in_axes=(0, None))(jnp.arange(4), params)
    assert env.decode_state(state) == OOV  # words of no vocabulary, accents, CJK, a snowman: lossless
    assert np.all(np.asarray(state.instruction.served) == -1)  # a seed's served length is not known
    _, new, reward, _, info = env.step_batch(jax.random.key(0), state, jnp.zeros((4,), jnp.int32), params)
    ins, rev = built["instructor"], built["reviewer"]
    assert len(ins.outs) == 4 and all(o.finish_reason == "stop" for o in ins.outs)
    for text, p in zip(OOV, ins.prompts):
        assert text in p[-1]["content"]  # the seed reached the endpoint verbatim
    assert env.decode_state(new) == [ANSWER] * 4
    usage = [o.completion_tokens for o in ins.outs]
    assert all(u is not None and u > 0 for u in usage)
    assert np.asarray(new.instruction.served).tolist() == usage  # served model's tokens, from usage
    assert np.asarray(new.instruction.length).tolist() != usage  # (the byte-level buffer counts differ)
    for old, p in zip(OOV, rev.prompts):
        assert old in p[-1]["content"] and ANSWER in p[-1]["content"]
    assert env.role_stats()["reviewer"] == {"calls": 1, "rows": 4, "unparseable": 4}
    # Reply lengths are the roles' own settings (roles.<role>.max_new_tokens).
    assert ins.kw[0]["max_new_tokens"] == 12 and rev.kw[0]["max_new_tokens"] == 6
    assert np.asarray(info["queries"]["instructor"]).tolist() == [1.0] * 4


def test_policy_stage_runs_with_http_roles_and_no_tokenizer(served, tmp_path):
    roles, seeds = served
    cfg = PolicyConfig(algo="ppo", env="llm", env_config=EnvConfig(seeds_path=seeds, max_len=96, episode_length=2),
                       num_envs=4, num_steps=2, num_updates=2, hidden_sizes=(8,), compare=(), seed=3)
    cfg = cfg.replace(ppo=cfg.ppo.__class__(num_minibatches=2))
    logs = []
    summary = run_policy_stage(cfg, tmp_path / "run", roles=roles, log=logs.append)
    assert any("host-step" in line for line in logs)
    assert summary["policy"]["total_queries"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "policy" / "curves.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["queries"]["instructor"] > 0 for r in rows)
