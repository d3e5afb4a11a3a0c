"""Generation protocols of the generate stage (issue 18): ``paper`` (the reference generator),
``wizardlm`` (WizardLM's rounds with elimination), and the renamed ``selector: paper``.

Counting stub backends stand in for the LLM roles: the instructor appends `` +`` to the instruction it
is given (so a kept record's text tells which pool text it grew from), the reviewer and the expert
answer by a rule each test picks.
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teams_rl_jax.backends.base import Completion, QueryCounter  # noqa: E402
from teams_rl_jax.errors import ConfigError  # noqa: E402
from teams_rl_jax.evolve import GenerateConfig, run_generate_stage  # noqa: E402
from teams_rl_jax.evolve.selectors import RandomSelector, bias_vector  # noqa: E402
from teams_rl_jax.env.operations import OPERATIONS  # noqa: E402
from teams_rl_jax.roles.prompts import instructor_messages  # noqa: E402

N_SEEDS = 7
_TEXT = re.compile(r"(SEED\d+ [^\n]*)")


class Stub:
    """One role's counting backend: ``reply(content) -> str``; every prompt is remembered."""

    def __init__(self, role, reply):
        self.role, self.model, self.counter = role, f"stub-{role}", QueryCounter()
        self.reply, self.prompts, self.seen = reply, [], 0

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.counter.add(self.role, len(prompts))
        self.seen += len(prompts)
        self.prompts += [p[-1]["content"] for p in prompts]
        return [Completion(self.reply(p[-1]["content"])) for p in prompts]

    def score(self, prompts, continuations):
        raise NotImplementedError


def grow(content: str) -> str:
    """The instructor: the instruction it was shown, plus `` +``."""
    return _TEXT.search(content).group(1).strip() + " +"


def answer(content: str) -> str:
    """The expert: a fine answer that names the instruction it answers (records pair them right)."""
    return f"A careful, complete answer to [{content.strip()}], with reasons."


def stubs(reviewer=lambda c: "Not Equal", instructor=grow, expert=answer) -> dict:
    return {"instructor": Stub("instructor", instructor), "reviewer": Stub("reviewer", reviewer),
            "expert": Stub("expert", expert)}


def _seeds(tmp_path: Path, n: int = N_SEEDS) -> str:
    path = tmp_path / "seeds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"s{k}", "instruction": f"SEED{k} explain topic {k}.", "input": ""})
                            + "\n" for k in range(n)))
    return str(path)


def _cfg(tmp_path, **kw) -> GenerateConfig:
    base = dict(selector="random", batch_seeds=3, near_dup_threshold=None, baselines=(),
                cache=False, progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]


def _run(cfg, tmp_path, bk, **kw):
    """The stage on the test's seeds (the pipeline's top-level ``seeds``, passed as the stage gets it)."""
    return run_generate_stage(cfg, tmp_path / "run", backends=bk, log=lambda m: None, seeds=_seeds(tmp_path), **kw)


# ------------------------------------------------------------------------------------------ paper
@pytest.mark.parametrize("selector,schedule", [("random", ("add_constraints",)), ("fixed", ("breadth",)),
                                               ("fixed", ("deepening", "breadth", "concretizing"))])
def test_paper_protocol_overrides_no_reviewer_every_step_kept(tmp_path, selector, schedule):
    """Breadth at 0-based steps 1 and 4 (and nowhere else) for every seed and every selector; no reviewer
    query although a reviewer backend is there; exactly ``steps`` records per seed, one answer each, even
    when every rewrite is the same text (nothing eliminated or de-duplicated).

    Catches: overrides not applied (or applied to the record's meta only, not to what the instructor
    is asked), the reviewer called, a filter or the de-duplication left on, the merge dropping repeats.
    """
    bk = stubs(instructor=lambda c: "SEED0 the same rewrite for everybody.")
    cfg = _cfg(tmp_path, protocol="paper", selector=selector, schedule=schedule)
    s = _run(cfg, tmp_path, bk)
    recs = _records(tmp_path / "run" / "data")
    assert bk["reviewer"].seen == 0 and s["queries"]["reviewer"] == 0
    assert s["queries"]["instructor"] == s["queries"]["expert"] == 6 * N_SEEDS == bk["instructor"].seen
    assert len(recs) == s["kept"] == 6 * N_SEEDS
    assert s["protocol"] == "paper" and sum(s["eliminated"].values()) == 0
    by_seed = Counter(r["meta"]["seed_id"] for r in recs)
    assert set(by_seed.values()) == {6}, by_seed
    for r in recs:
        if r["meta"]["step"] == 6:
            ops = r["meta"]["ops"]
            assert [t for t, op in enumerate(ops) if op == "breadth"] == [1, 4], ops
    # what the instructor was actually asked: breadth exactly twice per seed
    breadth_prompts = sum(p.startswith(instructor_messages("breadth", "X")[0]["content"].split("X")[0])
                          for p in bk["instructor"].prompts)
    assert breadth_prompts == 2 * N_SEEDS
    assert all(r["output"] == answer(r["instruction"]) for r in recs)


def test_paper_protocol_chains_each_step_from_the_last(tmp_path):
    """Step t rewrites step t-1's text (the reference mutates the record in place), whatever it is."""
    _run(_cfg(tmp_path, protocol="paper"), tmp_path, stubs())
    for r in _records(tmp_path / "run" / "data"):
        k = int(r["meta"]["seed_id"][1:])
        assert r["instruction"] == f"SEED{k} explain topic {k}." + " +" * r["meta"]["step"], r


def test_paper_bias_is_a_logit_bias_on_add_constraints():
    """RandomSelector with the paper bias draws the categorical of logits ``bias``: P(add_constraints) =
    e^b / (e^b + 5). Catches the bias on the wrong operation, ignored, or not a logit (e.g. + to a prob)."""
    seed = 3
    ids = [f"x{k}" for k in range(6000)]
    for b in (0.0, 0.7, 2.0):
        sel = RandomSelector(seed, bias=bias_vector(OPERATIONS, b))
        got = Counter(sel.choose(ids, ids, [-1] * len(ids), 0))
        want = np.exp(b) / (np.exp(b) + len(OPERATIONS) - 1)
        assert got["add_constraints"] / len(ids) == pytest.approx(want, abs=0.025), (seed, b, got)


def test_paper_bias_shows_at_free_steps(tmp_path):
    """A huge bias makes every free step add_constraints; none leaves them mixed."""
    for bias, all_ac in ((50.0, True), (0.0, False)):
        out = tmp_path / f"b{bias}"
        s = _run(_cfg(tmp_path, protocol="paper", add_constraints_bias=bias), out, stubs())
        free = [op for r in _records(out / "run" / "data") if r["meta"]["step"] == 6
                for t, op in enumerate(r["meta"]["ops"]) if t not in (1, 4)]
        assert (set(free) == {"add_constraints"}) is all_ac, (bias, Counter(free), s["op_histogram"])


# ---------------------------------------------------------------------------------------- wizardlm
def _h(text: str) -> int:
    return zlib.crc32(text.encode())


def test_wizardlm_rounds_queries_and_pool(tmp_path):
    """rounds x seeds queries of each role; an eliminated instruction goes back unchanged (so each kept
    record is its seed's previous kept text, or the seed, plus one ``+``); summary rounds and kept per
    round add up; every rule's elimination is counted and nothing eliminated is kept.

    Catches: eliminated texts entering the pool, a seed skipped in a round (e.g. only survivors
    re-evolved), the expert skipped for rejected rewrites (WizardLM asks 3 queries per seed per round),
    a rule not applied, kept_per_round wrong.
    """
    asked = Counter()  # a text sent back to the pool is asked again: let the rules fire anew

    def fate(c):
        asked[c] += 1
        return _h(f"{c}#{asked[c]}")

    def reviewer(c):  # Equal for a deterministic quarter of the pairs
        return "Equal" if fate(c) % 4 == 0 else "Not Equal"

    def expert(c):
        return "Sorry, I cannot." if fate(c) % 6 == 0 else answer(c)

    def instructor(c):
        return grow(c) + " Use the given prompt." if fate(c) % 8 == 0 else grow(c)

    bk = stubs(reviewer=reviewer, instructor=instructor, expert=expert)
    rounds = 5
    s = _run(_cfg(tmp_path, protocol="wizardlm", rounds=rounds), tmp_path, bk)
    for role in ("instructor", "reviewer", "expert"):
        assert bk[role].seen == s["queries"][role] == rounds * N_SEEDS, role
    recs = _records(tmp_path / "run" / "data")
    assert s["rounds"] == rounds and sum(s["kept_per_round"]) == s["kept"] == len(recs)
    assert s["kept"] + sum(s["eliminated"].values()) == rounds * N_SEEDS
    assert min(s["eliminated"][r] for r in ("no_gain", "sorry_short", "template_copy")) > 0, s["eliminated"]
    assert 0 < s["kept"] < rounds * N_SEEDS
    last = {f"s{k}": f"SEED{k} explain topic {k}." for k in range(N_SEEDS)}
    for r in recs:  # in round order per seed
        sid = r["meta"]["seed_id"]
        assert r["instruction"] == last[sid] + " +", (sid, r["instruction"], last[sid])
        assert "Sorry" not in r["output"] and "given prompt" not in r["instruction"]
        assert r["output"] == answer(r["instruction"]), r
        last[sid] = r["instruction"]


@pytest.mark.parametrize("verdict,kept", [("Equal", 0), ("Not Equal", 4 * N_SEEDS)])
def test_wizardlm_reviewer_decides(tmp_path, verdict, kept):
    """An always-Equal reviewer eliminates everything (rule 1), an always-Not-Equal one nothing."""
    bk = stubs(reviewer=lambda c: verdict)
    s = _run(_cfg(tmp_path, protocol="wizardlm"), tmp_path, bk)
    assert s["kept"] == kept and s["eliminated"]["no_gain"] == 4 * N_SEEDS - kept
    assert s["kept_per_round"] == [kept // 4] * 4
    assert bk["instructor"].seen == 4 * N_SEEDS


def test_wizardlm_resumes_without_paying_twice(tmp_path):
    """Stopped by a budget after one batch and rerun: the same records as one uninterrupted run, and
    no query paid twice (the response cache replays the first batch's work, the progress lines skip it)."""
    def reviewer(c):
        return "Equal" if _h(c) % 3 == 0 else "Not Equal"

    full = stubs(reviewer=reviewer)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run(_cfg(tmp_path / "a", protocol="wizardlm", cache=True), tmp_path / "a", full)
    bk = stubs(reviewer=reviewer)
    cfg = _cfg(tmp_path / "b", protocol="wizardlm", cache=True)
    first = _run(cfg, tmp_path / "b", bk, max_queries=1)
    assert first["seeds_done"] == cfg.batch_seeds
    s = _run(cfg, tmp_path / "b", bk)
    assert s["seeds_done"] == N_SEEDS
    assert s["queries"] == {r: 4 * N_SEEDS for r in full}  # issued, cache replays included
    for role in full:  # paid: once each; the greedy reviewer's repeated (old, new) pairs are replays
        assert bk[role].seen == full[role].seen == (4 * N_SEEDS if role != "reviewer" else full[role].seen), role
    strip = lambda rs: [(r["instruction"], r["output"], r["meta"]["seed_id"]) for r in rs]  # noqa: E731
    assert sorted(strip(_records(tmp_path / "b" / "run" / "data"))) == sorted(strip(_records(tmp_path / "a" / "run" / "data")))


def test_wizardlm_needs_the_random_selector(tmp_path):
    with pytest.raises(ConfigError, match="selector: random"):
        _cfg(tmp_path, protocol="wizardlm", selector="policy").validate()


# ------------------------------------------------------------------------------------------ rename
@pytest.mark.parametrize("kw", [{"selector": "paper"}, {"baselines": ("random", "paper")}])
def test_selector_paper_was_renamed(tmp_path, kw):
    """The old fixed-schedule ``paper`` selector is a one-line error naming what to use instead."""
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **kw).validate()
    msg = str(e.value)
    assert "\n" not in msg and "selector: fixed" in msg and "schedule: [paper]" in msg and "protocol: paper" in msg


def test_paper_protocol_drives_the_policy(tmp_path):
    """The trained policy's choice under the paper protocol: breadth at steps 1 and 4, its logit bias on
    add_constraints at the free steps (a huge bias: all add_constraints; none: a mix).

    Catches: the bias not reaching the policy's logits, the overrides skipped for the policy selector.
    """
    from test_generate_stage import _save_policy

    _save_policy(tmp_path / "policy")
    for bias, all_ac in ((50.0, True), (0.0, False)):
        out = tmp_path / f"b{bias}"
        cfg = _cfg(tmp_path, protocol="paper", selector="policy", policy_dir=str(tmp_path / "policy"),
                   add_constraints_bias=bias, max_seeds=N_SEEDS)
        _run(cfg, out, stubs())
        last = [r["meta"]["ops"] for r in _records(out / "run" / "data") if r["meta"]["step"] == 6]
        assert len(last) == N_SEEDS and all([t for t, op in enumerate(ops) if op == "breadth"] == [1, 4]
                                            for ops in last), last
        free = {op for ops in last for t, op in enumerate(ops) if t not in (1, 4)}
        assert (free == {"add_constraints"}) is all_ac, (bias, free)


def test_query_budget_stops_within_one_batch_and_still_covers_members_and_non_members(tmp_path):
    """More seeds than the budget covers (the equal-budget arms of the experiment): generation stops
    starting batches once the budget is spent, so it issues at least the budget and less than one
    batch more, leaves seeds undone, and the seeds it did cover hold both members and non-members of
    the experiment's seeded split (which is shuffled, not file order). Mutations caught: the budget
    ignored (every seed done), the split taken in file order (a capped arm covers members only)."""
    from types import SimpleNamespace

    from teams_rl_jax.experiment.runner import seed_split

    n, batch, steps, budget = 24, 4, 2, 30
    seeds = _seeds(tmp_path, n)
    per_seed = 2 * steps  # protocol paper: one rewrite and one answer per step, every step kept
    cfg = _cfg(tmp_path, protocol="paper", steps=steps, keep="all", batch_seeds=batch, max_queries=budget)
    summary = run_generate_stage(cfg, tmp_path / "run", backends=stubs(), seeds=seeds, log=lambda m: None)
    assert budget <= summary["queries_total"] < budget + batch * per_seed, summary["queries_total"]
    assert summary["seeds_done"] < n
    exp = SimpleNamespace(experiment=SimpleNamespace(member_fraction=0.5, split_seed=0), seeds=seeds,
                          generate=SimpleNamespace(max_seeds=None))
    split = seed_split(exp, tmp_path)
    done = {json.loads(line)["meta"]["seed_id"] for line in (tmp_path / "run" / "data" / "generated.jsonl").open()}
    assert len(done) == summary["seeds_done"]
    assert done & set(split["members"]) and done & set(split["non_members"]), \
        f"split_seed 0: the capped run covered {sorted(done)}; members {split['members']}"
