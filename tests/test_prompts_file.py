"""The ``prompts:`` file: loading (ours by default, the reference code's wording shipped), its one-line
errors, and custom wording reaching the roles in both stages (generate stage and policy env, host path and
the jitted in-process operator/judge).

Each test's docstring names the mutation it catches.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml

from teams_rl_jax.backends.base import Completion, QueryCounter
from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.env import OPERATIONS, make
from teams_rl_jax.env import factory
from teams_rl_jax.env.config import EnvConfig
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.evolve import GenerateConfig, run_generate_stage
from teams_rl_jax.models import init
from teams_rl_jax.roles.prompts import DEFAULT_PROMPTS, OPERATION_PROMPTS, instructor_content, load_prompts

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs" / "prompts" / "teams_rl_reference.yaml"
CUSTOM_OPS = {op: f"zebra {op} says rewrite\n{{instruction}}\nzebra end" for op in OPERATION_PROMPTS}
CUSTOM_JUDGE = "walrus compares\nfirst {old}\nsecond {new}\nwalrus answer"


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.fixture
def custom(tmp_path):
    return load_prompts(_write(tmp_path / "custom.yaml", {"operations": CUSTOM_OPS, "judge": CUSTOM_JUDGE}))


def test_default_is_ours_and_the_reference_file_keeps_the_reference_text():
    """Mutations caught: a default that is not our wording; the reference file's text edited (quotes made
    straight, the typo fixed, a trailing cue added after the instruction, the judge's slots swapped)."""
    assert load_prompts(None) is DEFAULT_PROMPTS and dict(DEFAULT_PROMPTS.operations) == OPERATION_PROMPTS
    ref = load_prompts(REFERENCE)
    assert set(ref.operations) == set(OPERATION_PROMPTS) and ref.source == str(REFERENCE)
    ac = ref.operations["add_constraints"]
    assert ac.startswith("\n            I want you act as a Prompt Rewriter.\n")
    assert "\u2018#Given Prompt#\u2019, \u2018#Rewritten Prompt#\u2019" in ac
    assert "can only add or replace 10 to 20 words" in ac
    assert "can only add 10 to 20 words" in ref.operations["deepening"]
    for op in OPERATION_PROMPTS:  # the instruction follows the last line directly: no trailing cue
        assert ref.operations[op].endswith("\n            {instruction}"), op
    assert ref.operations["complicate_input"].endswith("The Given Prompt:  \n            {instruction}")
    assert ref.operations["breadth"].startswith("I want you act as a Prompt Creator.\n")
    assert "1. They have same constraints and requirments." in ref.judge
    assert ref.judge.index("The First Instruction: {old}.") < ref.judge.index("The Second Instruction: {new}.")
    text = instructor_content("breadth", "  Name a bird. ", ref)
    assert text.endswith("#Given Prompt#:\n            Name a bird.") and text.startswith("I want you act")


BAD = [  # (edit of the custom file, what the one-line error names)
    (lambda d: d["operations"].update(deepening="no slot here"), ["operations.deepening", "{instruction}"]),
    (lambda d: d["operations"].update(breadth="{instruction} and {input}"), ["operations.breadth", "{input}"]),
    (lambda d: d["operations"].update(breadth="{instruction} {instruction}"), ["operations.breadth", "{instruction}"]),
    (lambda d: d["operations"].update(paraphrase="{instruction}"), ["operations.paraphrase", "unknown operation"]),
    (lambda d: d["operations"].pop("complicate_input"), ["operations.complicate_input", "missing"]),
    (lambda d: d.update(judge="first {old} only"), ["judge", "{new}"]),
    (lambda d: d.update(judge="{old} {new} {verdict}"), ["judge", "{verdict}"]),
    (lambda d: d.pop("judge"), ["judge", "missing"]),
    (lambda d: d.update(expert="{instruction}"), ["expert", "unknown key"]),
]


@pytest.mark.parametrize("edit,names", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_prompts_file_is_one_line_naming_file_template_placeholder(tmp_path, edit, names):
    """Mutations caught: a template without its placeholder accepted (it would send no instruction), an
    unknown placeholder or operation accepted, a missing operation silently falling back to ours."""
    data = {"operations": dict(CUSTOM_OPS), "judge": CUSTOM_JUDGE}
    edit(data)
    path = _write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and all(n in msg for n in names), msg


def test_missing_prompts_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="prompts: file not found: .*nope.yaml"):
        load_prompts(tmp_path / "nope.yaml")


class Recorder:
    """A text backend for one role that keeps every prompt: the instructor appends a clause, the
    reviewer says "Not Equal", the expert answers."""

    def __init__(self, role):
        self.role, self.model, self.counter, self.contents = role, f"stub-{role}", QueryCounter(), []

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.counter.add(self.role, len(prompts))
        out = []
        for p in prompts:
            content = p[-1]["content"]
            self.contents.append(content)
            if self.role == "instructor":
                old = content.split("rewrite\n", 1)[1].split("\nzebra end", 1)[0] if "zebra" in content else "x"
                out.append(Completion(f"{old} with careful extra steps"))  # the same rewrite of the same text
            elif self.role == "reviewer":
                out.append(Completion("Not Equal"))
            else:
                out.append(Completion(f"A detailed answer number {len(self.contents)} to the request."))
        return out

    def score(self, prompts, continuations):
        raise NotImplementedError


def test_custom_prompts_reach_the_roles_in_the_generate_stage_and_input_stays_apart(tmp_path, custom):
    """Mutations caught: the generate stage's instructor or reviewer ignoring the ``prompts`` file; the
    Alpaca input folded into the instruction the instructor sees, or dropped from the record and from
    the expert's question."""
    seeds = tmp_path / "alpaca.json"
    seeds.write_text(json.dumps([{"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
                                 {"instruction": "Name a bird.", "input": "", "output": "Robin"},
                                 {"instruction": "Sort the numbers.", "input": "9, 8", "output": "8, 9"}]))
    bk = {r: Recorder(r) for r in ("instructor", "reviewer", "expert")}
    cfg = GenerateConfig(selector="random", operator_role="instructor", steps=2, batch_seeds=3, baselines=(),
                         cache=False, near_dup_threshold=None, progress=False)
    s = run_generate_stage(cfg, tmp_path / "run", backends=bk, log=lambda m: None, seeds=seeds, prompts=custom)
    ins, rev, exp = bk["instructor"].contents, bk["reviewer"].contents, bk["expert"].contents
    assert len(ins) == 6 and all(c.startswith("zebra ") and c.endswith("zebra end") for c in ins), ins
    assert all("3, 1, 2" not in c and "9, 8" not in c for c in ins)  # the instructor sees the instruction alone
    assert len(rev) == 6 and all(c.startswith("walrus compares\nfirst ") for c in rev), rev
    recs = [json.loads(line) for line in (tmp_path / "run" / "data" / "generated.jsonl").read_text().splitlines()]
    # Seeds 0 and 2 share an instruction and differ by input: same rewrites, not duplicates of each other.
    assert s["kept"] == len(recs) == 6
    by_seed = {r["meta"]["seed_id"]: r for r in recs}
    assert [by_seed[f"seed-0000{i}"]["input"] for i in range(3)] == ["3, 1, 2", "", "9, 8"]
    assert all("3, 1, 2" not in r["instruction"] for r in recs)
    assert sum(c.endswith("\n\n3, 1, 2") for c in exp) == 2  # the expert answers instruction + input


def test_custom_prompts_reach_the_host_env_roles(custom):
    """Mutations caught: the policy env's text instructor or reviewer (host path) built without the file's
    templates."""
    bk = {r: Recorder(r) for r in ("instructor", "reviewer")}
    cfg = EnvConfig(max_len=96, episode_length=2, elimination={}, reward_weights={"reviewer": 1.0})
    env, params = make("llm", cfg, roles=bk, prompts=custom, seeds=["Name a bird.", "Sort three numbers."])
    assert env.host_roles == ("instructor", "reviewer")
    _, state = jax.vmap(env.reset_to, in_axes=(0, None))(jnp.arange(2), params)
    _, _, reward, _, _ = env.step_batch(jax.random.key(0), state, jnp.zeros((2,), jnp.int32), params)
    op = OPERATIONS[0]
    assert bk["instructor"].contents and all(c.startswith(f"zebra {op} says") for c in bk["instructor"].contents)
    assert bk["reviewer"].contents and all(c.startswith("walrus compares") for c in bk["reviewer"].contents)
    assert jnp.allclose(reward, 1.0)


class InProcess:
    """An in-process role: a tiny random Llama and its tokenizer (what the env compiles into its step)."""

    def __init__(self, role, lm, tokenizer):
        self.role, self.model, self.counter = role, "tiny", QueryCounter()
        self.lm, self.tokenizer, self.params, self.chat = lm, tokenizer, lm.params, False

    def complete(self, prompts, **kw):
        raise AssertionError("the jitted env never calls the text path")


def test_custom_prompts_reach_the_jitted_operator_and_judge(custom, monkeypatch):
    """Mutations caught: the jitted operator's templates or the logit judge's template taken from our
    wording instead of the ``prompts`` file."""
    seeds = ["Name a bird.", "Sort three numbers."]
    texts = seeds + list(CUSTOM_OPS.values()) + [CUSTOM_JUDGE, "Equal", "Not Equal", "USER: ASSISTANT:"]
    tok = build_word_tokenizer(texts, 512)
    lm = init(dict(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=0),
              jax.random.key(7))
    judged = []
    real = factory.reviewer_term
    monkeypatch.setattr(factory, "reviewer_term", lambda *a, **kw: judged.append(kw.get("instruction")) or real(*a, **kw))
    bk = {r: InProcess(r, lm, tok) for r in ("instructor", "reviewer")}
    env, params = make("llm", EnvConfig(max_len=16, episode_length=2), roles=bk, prompts=custom, seeds=seeds)
    assert env.host_roles == ()
    prefix = tok.decode([int(i) for i in params.operator.prefix[0] if int(i) != env.operator.pad_id])
    assert "zebra" in prefix and "says" in prefix, prefix  # the file's add_constraints template, as ids
    assert judged == [CUSTOM_JUDGE]
