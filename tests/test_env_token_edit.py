"""Token-edit operator: each operation does what its name says (decoded), splice / n-gram search vs Python,
phrase-bank hygiene, prompt templates."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from helpers import rng as make_rng  # seeded; a failure's report prints the seed
import pytest

from env_helpers import default_env
from teams_rl_jax.env import OPERATIONS, phrases, prompts
from teams_rl_jax.env.buffers import build_ngram_set, ngram_match, splice
from teams_rl_jax.env.seeds import read_seed_records

OP = {name: i for i, name in enumerate(OPERATIONS)}


def _edit(texts, op_names, key=0, batch=10):
    """Apply the jitted token-edit operator to ``texts``; returns the decoded results."""
    env, params, f = default_env()
    n = len(texts)  # pad to one batch size: one compile for all tests
    texts, op_names = list(texts) + [texts[0]] * (batch - n), list(op_names) + [op_names[0]] * (batch - n)
    ids = [env.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = params.max_len
    buf = np.zeros((len(ids), L), np.int32)
    for i, r in enumerate(ids):
        buf[i, : len(r)] = r
    lens = jnp.asarray([len(r) for r in ids], jnp.int32)
    ops = jnp.asarray([OP[o] for o in op_names], jnp.int32)
    ctx = {"domain": jnp.full((len(ids),), -1, jnp.int32), "seed": jnp.full((len(ids),), -1, jnp.int32)}
    new, new_len, q = f["apply"](jax.random.PRNGKey(key), ops, jnp.asarray(buf), lens, params.operator, ctx)
    assert np.asarray(q).tolist() == [0.0] * len(ids)  # token edits cost no queries
    return env.decode(new, new_len)[:n]


def _norm(text):
    """Word-level form (the offline tokenizer's decode spaces punctuation)."""
    return " ".join(re.findall(r"[^\W_]+|[^\w\s]|_", text))


def _appended(old, new, bank):
    """The bank phrase that ``new`` is ``old`` + (None if it is not such an append)."""
    old_n, new_n = _norm(old), _norm(new)
    if not new_n.startswith(old_n):
        return None
    tail = new_n[len(old_n):].strip()
    return next((p for p in bank if _norm(p) == tail), None)


@pytest.mark.parametrize("op", ["add_constraints", "deepening", "increase_reasoning_steps", "complicate_input"])
def test_append_operations_add_a_clause_from_their_bank(op):
    text = "Describe how a company could reduce its energy costs."
    outs = _edit([text] * 8, [op] * 8, key=3)
    seen = set()
    for out in outs:
        phrase = _appended(text, out, phrases.BANKS[op])
        assert phrase is not None, (op, out)
        seen.add(phrase)
    assert len(seen) > 1  # the clause is drawn by key, not fixed
    if op == "complicate_input":
        assert all("|" in o or "{" in o for o in outs)  # a table or JSON input block
    if op == "increase_reasoning_steps":
        assert all(re.search(r"step|first|stages|approaches", o, re.I) for o in outs)


def test_concretizing_swaps_a_generic_term_for_a_specific_one():
    text = "Describe an animal in a city."
    outs = _edit([text] * 10, ["concretizing"] * 10, key=5)
    swapped = set()
    for out in outs:
        for generic in ("an animal", "a city"):
            before, after = text.split(generic)
            m = re.fullmatch(re.escape(_norm(before)) + r"\s*(.+?)\s*" + re.escape(_norm(after)), _norm(out))
            if m and _norm(m.group(1)) in {_norm(s) for s in phrases.CONCRETE_TERMS[generic]}:
                swapped.add(generic)
                break
        else:
            raise AssertionError(f"not a single generic->specific swap: {out!r}")
    assert swapped == {"an animal", "a city"}  # the term to swap is chosen by key


def test_concretizing_without_generic_term_appends_a_specific_request():
    text = "Explain how to calculate the area of an irregular garden."
    for out in _edit([text] * 4, ["concretizing"] * 4):
        assert _appended(text, out, phrases.BANKS["concretizing"]) is not None, out


def test_breadth_starts_a_rarer_prompt_from_another_seed_of_the_same_domain():
    env, params, f = default_env()
    texts, domains = read_seed_records()
    # a seed of a three-seed domain (civics, finance, ... in the bundled file): 8 draws see both others
    idx = next(i for i, d in enumerate(domains) if domains.count(d) == 3)
    s = jax.jit(env.reset_to)(idx, params)[1]
    outs = set()
    for k in range(8):
        _, s2, *_ = f["step"](jax.random.PRNGKey(k), s, OP["breadth"], params)
        out = _norm(env.decode_state(s2))
        frame = next((p for p in phrases.BANKS["breadth"] if out.startswith(_norm(p))), None)
        assert frame is not None, out
        rest = out[len(_norm(frame)):].strip()
        j = [_norm(t) for t in texts].index(rest)
        assert domains[j] == domains[idx] and j != idx
        outs.add(rest)
    assert len(outs) == 2  # both other seeds of the domain get drawn


def test_edit_that_does_not_fit_is_not_applied():
    env, params, f = default_env()
    long = " ".join(["Explain"] * (params.max_len - 3))
    out = _edit([long], ["complicate_input"])[0]
    assert out == long


def test_splice_matches_python():
    rng = make_rng(702)
    L = 16
    fn = jax.jit(jax.vmap(splice, in_axes=(0, 0, 0, 0, 0, 0)))
    B = 32
    toks = rng.integers(1, 50, (B, L)).astype(np.int32)
    lens = rng.integers(0, L + 1, B).astype(np.int32)
    pos = np.asarray([rng.integers(0, n + 1) for n in lens], np.int32)
    cut = np.asarray([rng.integers(0, n - p + 1) for n, p in zip(lens, pos)], np.int32)
    ins = rng.integers(50, 99, (B, 7)).astype(np.int32)
    ins_len = rng.integers(0, 8, B).astype(np.int32)
    out, n, fits = fn(toks, lens, pos, cut, ins, ins_len)
    for b in range(B):
        ref = toks[b, : pos[b]].tolist() + ins[b, : ins_len[b]].tolist() + toks[b, pos[b] + cut[b]: lens[b]].tolist()
        assert bool(fits[b]) == (len(ref) <= L)
        assert int(n[b]) == min(len(ref), L)
        assert np.asarray(out[b]).tolist() == (ref[:L] + [0] * L)[:L]


def test_ngram_match_matches_python():
    rng = make_rng(703)
    phrases_ = [rng.integers(1, 6, rng.integers(1, 4)).tolist() for _ in range(12)]
    ngrams = build_ngram_set([[p] for p in phrases_])
    toks = rng.integers(1, 6, 40).astype(np.int32)
    n = 33
    for group in ngrams.groups:
        k = group.patterns.shape[1]
        hit, row = jax.jit(ngram_match)(jnp.asarray(toks), n, group)
        pats = np.asarray(group.patterns).tolist()
        for i in range(40):
            window = toks[i: i + k].tolist()
            expect = i + k <= n and window in pats
            assert bool(hit[i]) == expect
            if expect:
                assert pats[int(row[i])] == window


def test_phrase_bank_hygiene():
    generics = [_norm(g).lower() for g in phrases.CONCRETE_TERMS]

    def has_generic(text):
        t = f" {_norm(text).lower()} "
        return any(f" {g} " in t for g in generics)

    for specifics in phrases.CONCRETE_TERMS.values():
        assert not any(has_generic(s) for s in specifics)  # repeated concretizing cannot loop
    for name, bank in phrases.BANKS.items():
        assert not any(has_generic(p) for p in bank), name  # swaps target the instruction, not our clauses
    for name in ("add_constraints", "deepening", "increase_reasoning_steps"):
        words = [len(re.findall(r"\w+", p)) for p in phrases.BANKS[name]]
        assert min(words) >= 8 and max(words) <= 20, name  # the in-depth ops add about 10-20 words
    texts, domains = read_seed_records()
    assert len(texts) == 150 and len(set(domains)) >= 12  # the one bundled seed file (data/seeds.jsonl)


def test_prompt_templates():
    pieces = prompts.operation_templates(OPERATIONS)
    assert len(pieces) == 6
    for name, (prefix, suffix) in zip(OPERATIONS, pieces):
        assert prefix and suffix.endswith("\n") and "{instruction}" not in prefix + suffix
        full = prompts.render_prompt(name, "Describe a city.")
        assert "Describe a city." in full
    assert "10 to 20 words" in prompts.OPERATION_PROMPTS["deepening"]
    assert "rarer" in prompts.OPERATION_PROMPTS["breadth"] and "same domain" in prompts.OPERATION_PROMPTS["breadth"]
