"""The generate stage: query accounting, filters, policy hand-off, crash safety (kill -9), no query paid twice.

Run as a script (``python tests/test_generate_stage.py worker RUN_DIR KILL_AT PAID_LOG``) it is the
subprocess the kill -9 test kills: fake LLM roles whose K-th call SIGKILLs the process before paying.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teams_rl_jax.backends.base import Completion, QueryCounter  # noqa: E402
from teams_rl_jax.evolve import GenerateConfig, read_seeds, run_generate_stage  # noqa: E402
from teams_rl_jax.evolve.records import recover  # noqa: E402


def _h(text: str) -> int:
    return zlib.crc32(text.encode())


class FakeRole:
    """Deterministic counting backend for one role; outputs exercise every elimination rule.

    ``kill_at``: SIGKILL this process at the start of the kill_at-th call (shared ``calls`` box), before
    the call is paid, so every paid query has been cached. ``paid_log``: append each paid prompt.
    """

    def __init__(self, role, calls=None, kill_at=None, paid_log=None):
        self.role, self.model, self.counter = role, f"fake-{role}", QueryCounter()
        self.calls = calls if calls is not None else [0]
        self.kill_at, self.paid_log, self.seen = kill_at, paid_log, 0

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.calls[0] += 1
        if self.kill_at is not None and self.calls[0] == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen += len(prompts)
        self.counter.add(self.role, len(prompts))
        if self.paid_log is not None:
            with open(self.paid_log, "a") as f:
                for p in prompts:
                    f.write(json.dumps([self.role, p]) + "\n")
        return [self._one(p[-1]["content"]) for p in prompts]

    def _one(self, content):
        h = _h(content) % 100
        if self.role == "instructor":
            old = content.split("Original instruction:\n", 1)[1].rsplit("\nRewritten instruction:", 1)[0]
            old = old.split("\nNew instruction:")[0]
            if h < 6:
                return Completion(old)  # no gain
            if h < 12:
                return Completion(old + " Use the given prompt as a guide.")  # template copy
            if h < 16:
                return Completion(old + " and more", finish_reason="length")  # cut by the limit
            return Completion(f"{old} Consider case {h} and justify each step.")
        if self.role == "reviewer":
            return Completion("Equal" if h < 8 else "Not Equal")
        if h < 7:
            return Completion("Sorry, I cannot help with that.")  # sorry_short
        if h < 12:
            return Completion("the of and to.")  # stopwords only
        return Completion(f"A careful answer number {h} covering the request in detail.")

    def score(self, prompts, continuations):
        raise NotImplementedError


def fake_roles(**kw):
    calls = [0]
    return {r: FakeRole(r, calls=calls, **kw) for r in ("instructor", "reviewer", "expert")}


def _cfg(**kw):
    base = dict(selector="random", max_seeds=12, batch_seeds=5, near_dup_threshold=None, baselines=(), cache=False,
                progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counting_backend_accounting_and_filters(tmp_path):
    """Summary queries by role == calls the backends saw; every rule fires and no eliminated text is kept.

    Catches: a role's queries not counted (or counted twice), a rule not applied (e.g. rules 2-3 run on
    the instruction instead of the answer), an eliminated evolution written out, keep=final keeping all.
    """
    bk = fake_roles()
    s = run_generate_stage(_cfg(max_seeds=30, batch_seeds=8), tmp_path, backends=bk, log=lambda m: None)
    assert s["queries"] == {r: b.seen for r, b in bk.items()}
    assert s["queries_total"] == sum(b.seen for b in bk.values())
    assert s["seeds_done"] == 30 and s["kept"] == len(_records(tmp_path / "data" / "generated.jsonl"))
    assert all(v > 0 for v in s["eliminated"].values()), s["eliminated"]
    assert s["queries_per_kept"] == pytest.approx(s["queries_total"] / s["kept"])
    recs = _records(tmp_path / "data" / "generated.jsonl")
    for r in recs:
        assert "Sorry" not in r["output"] and r["output"] != "the of and to."
        assert "#Rewritten Prompt#" not in r["instruction"]
        m = r["meta"]
        assert 1 <= len(m["ops"]) <= m["step"] <= 6 and m["selector"] == "random"
        assert m["queries"]["expert"] >= 1 and m["queries"]["instructor"] >= m["step"]
    # per-seed queries of the last record never exceed the seed's total; totals add up per role
    prog = [json.loads(x) for x in (tmp_path / "data" / "shards" / "progress.00000.jsonl").read_text().splitlines()]
    assert {r: sum(p["queries"][r] for p in prog) for r in bk} == s["queries"]
    # keep: final -> at most one record per seed, at its last accepted step
    s2 = run_generate_stage(_cfg(max_seeds=30, batch_seeds=8, keep="final"), tmp_path / "final",
                            backends=fake_roles(), log=lambda m: None)
    recs2 = _records(tmp_path / "final" / "data" / "generated.jsonl")
    assert len({r["meta"]["seed_id"] for r in recs2}) == len(recs2) == s2["kept"] > 0


def _save_policy(path: Path, env_config=None, env="token_edit", seed=0):
    """A policy-stage output (random-init actor) for the token-edit env's observation."""
    import jax

    from teams_rl_jax.rl.config import PolicyConfig
    from teams_rl_jax.rl.stage import save_policy
    from teams_rl_jax.rl.train import init_params, make_network

    from teams_rl_jax import env as env_pkg
    from teams_rl_jax.config import from_dict
    from teams_rl_jax.env.config import EnvConfig

    cfg = PolicyConfig(env=env, env_config=from_dict(EnvConfig, env_config or {}), num_updates=1)
    e, p = env_pkg.make("token_edit", cfg.env_config)
    obs_dim = int(e.observation_size(p))
    net = make_network(cfg, e.num_actions)
    params = init_params(net, jax.random.PRNGKey(seed), obs_dim)
    save_policy(path, cfg, params, e.num_actions, obs_dim, tuple(e.operations))
    return e, p


def test_policy_sees_the_training_observation(tmp_path):
    """Generate's observation of a text == the env's own observation (reset, and after a step).

    Catches: a different tokenizer/embedding in generate, a missing previous-action one-hot or step
    fraction, an off-by-one step index.
    """
    import jax

    from teams_rl_jax.evolve.selectors import PolicySelector

    env, params = _save_policy(tmp_path / "policy")
    sel = PolicySelector(tmp_path / "policy", batch=4)
    idx = np.asarray([0, 5, 11])
    texts = env.decode(params.seeds.tokens[idx], params.seeds.lengths[idx])
    reset = jax.jit(jax.vmap(env.reset_to, in_axes=(0, None)))
    want, state = reset(jax.numpy.asarray(idx), params)
    np.testing.assert_allclose(sel.observations(texts, [-1] * 3, 0), np.asarray(want), atol=1e-6)
    # one env step, then the text it decodes to, seen by generate at t=1 with the previous op
    actions = jax.numpy.asarray([2, 0, 5])
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    obs1, state1, *_ = step(jax.random.split(jax.random.PRNGKey(0), 3), state, actions, params)
    text1 = env.decode_state(state1)
    assert text1 != texts
    np.testing.assert_allclose(sel.observations(text1, [2, 0, 5], 1), np.asarray(obs1), atol=1e-6)


def test_policy_trained_on_the_paper_observation_drives_generate(tmp_path):
    """``observation: paper``: generate feeds the policy the one-hot of the previous operation (reference
    order), zeros at the first step, the same vector the env gives; and the selector runs.

    Catches: generate rebuilding the embedding observation for a paper-observation policy (a width
    error), the one-hot in our action order, a non-zero first observation.
    """
    import jax

    from teams_rl_jax.evolve.selectors import PolicySelector

    env, params = _save_policy(tmp_path / "policy", env_config={"observation": "paper"})
    sel = PolicySelector(tmp_path / "policy", batch=4)
    idx = np.asarray([0, 5, 11])
    texts = env.decode(params.seeds.tokens[idx], params.seeds.lengths[idx])
    assert not sel.observations(texts, [-1] * 3, 0).any()
    actions = jax.numpy.asarray([2, 0, 5])
    reset = jax.jit(jax.vmap(env.reset_to, in_axes=(0, None)))
    _, state = reset(jax.numpy.asarray(idx), params)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    obs1, state1, *_ = step(jax.random.split(jax.random.PRNGKey(0), 3), state, actions, params)
    got = sel.observations(env.decode_state(state1), [2, 0, 5], 1)
    np.testing.assert_array_equal(got, np.asarray(obs1))
    ref = ("breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning_steps", "complicate_input")
    assert [ref[int(np.argmax(r))] for r in got] == [env.operations[a] for a in (2, 0, 5)]
    ops = sel.choose(["a", "b", "c"], texts, [-1] * 3, 0)
    assert len(ops) == 3 and all(op in sel.operations for op in ops)


def test_policy_drives_llm_operator_and_random_is_comparable(tmp_path):
    """A token-edit policy drives LLM roles; a random run on the same seeds reports the same figures' shape.

    Also: an LLM-env policy (env: llm, its tokenizer in env_config) is accepted by generate.
    """
    _save_policy(tmp_path / "policy")
    pol = run_generate_stage(_cfg(selector="policy"), tmp_path, backends=fake_roles(), log=lambda m: None)
    rnd = run_generate_stage(_cfg(selector="random"), tmp_path / "r", backends=fake_roles(), log=lambda m: None)
    assert pol.keys() == rnd.keys() and pol["seeds_done"] == rnd["seeds_done"] == 12
    assert pol["selector"] == "policy" and rnd["selector"] == "random"
    for s in (pol, rnd):
        assert s["kept"] > 0 and s["queries_per_kept"] > 0 and sum(s["op_histogram"].values()) > 0
    recs = _records(tmp_path / "data" / "generated.jsonl")
    assert all(r["meta"]["selector"] == "policy" for r in recs)
    # LLM-env policy: its observation comes from the env settings in policy.json (tokenizer dir here)
    from teams_rl_jax.env.seeds import offline_tokenizer

    tok_dir = tmp_path / "tok"
    offline_tokenizer([s.text for s in read_seeds()]).save_pretrained(str(tok_dir))
    _save_policy(tmp_path / "llm" / "policy", env_config={"tokenizer": str(tok_dir)}, env="llm")
    s = run_generate_stage(_cfg(selector="policy", max_seeds=4), tmp_path / "llm", backends=fake_roles(),
                           log=lambda m: None)
    assert s["seeds_done"] == 4


def test_recover_repairs_torn_tail(tmp_path):
    """A half-written last line is cut and records of a seed without a progress line are dropped.

    Catches: keeping every parsed record on recovery (the seed would be written twice on resume).
    """
    rec, prog = tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    r = lambda sid, step: json.dumps({"instruction": f"{sid}-{step}", "meta": {"seed_id": sid}}) + "\n"  # noqa: E731
    rec.write_text(r("a", 1) + r("a", 2) + r("b", 1) + r("c", 1) + '{"instruction": "c-2", "me')
    prog.write_text(json.dumps({"seed_id": "a"}) + "\n" + json.dumps({"seed_id": "b"}) + "\n" + '{"seed_id": "c"')
    kept, done = recover(rec, prog)
    assert [k["instruction"] for k in kept] == ["a-1", "a-2", "b-1"] and [d["seed_id"] for d in done] == ["a", "b"]
    assert [json.loads(x)["instruction"] for x in rec.read_text().splitlines()] == ["a-1", "a-2", "b-1"]
    assert prog.read_text().endswith("\n") and len(prog.read_text().splitlines()) == 2


def _worker(run_dir: str, kill_at: str, paid_log: str) -> None:
    bk = fake_roles(kill_at=int(kill_at) or None, paid_log=paid_log)
    run_generate_stage(_cfg(cache=True), Path(run_dir), backends=bk, log=lambda m: None)


def test_kill9_three_times_then_resume_exactly_once(tmp_path):
    """kill -9 the stage subprocess at 3 seeded random calls (mid-seed), resume: every seed's records
    appear exactly once, every line is valid JSON, the result equals an uninterrupted run, and no paid
    query was ever paid again (the response cache replayed them).

    Catches: records appended again on resume, a seed skipped, a cache miss on replay (paid twice;
    checked by turning the cache off: 59 queries paid twice), a resumed run that evolves differently.
    The kills land inside backend calls (mid-batch, before the batch's records are written); a kill
    during the record writes (torn tail, records of an unfinished seed) is test_recover_repairs_torn_tail's.
    """
    ref = tmp_path / "ref"
    run_generate_stage(_cfg(), ref, backends=fake_roles(), log=lambda m: None)
    want = _records(ref / "data" / "generated.jsonl")
    total_calls = 3 * 6 * 3  # batches x steps x roles: at most this many calls per run

    seed = 20240611
    rng = np.random.default_rng(seed)
    run, paid = tmp_path / "run", tmp_path / "paid.jsonl"
    for kill_at in [int(k) for k in rng.integers(2, total_calls // 2, size=3)] + [0]:
        p = subprocess.run([sys.executable, __file__, "worker", str(run), str(kill_at), str(paid)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        if kill_at:
            assert p.returncode == -signal.SIGKILL, f"seed={seed} kill_at={kill_at}: {p.returncode} {p.stderr[-2000:]}"
        else:
            assert p.returncode == 0, f"seed={seed}: {p.stderr[-2000:]}"
    got = _records(run / "data" / "generated.jsonl")  # every line parses
    keys = [(r["meta"]["seed_id"], r["meta"]["step"]) for r in got]
    assert len(keys) == len(set(keys)), f"seed={seed}: duplicated records"
    strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]  # noqa: E731
    assert strip(got) == strip(want), f"seed={seed}: resumed output differs from an uninterrupted run"
    lines = paid.read_text().splitlines()
    dup = [k for k, n in Counter(lines).items() if n > 1]
    assert not dup, f"seed={seed}: {len(dup)} queries paid twice, e.g. {dup[0][:200]}"
    summary = json.loads((run / "data" / "summary.json").read_text())
    assert sum(summary["paid"].values()) == len(lines)
    assert summary["seeds_done"] == 12


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker(*sys.argv[2:5])
