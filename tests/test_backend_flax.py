"""The ``flax`` backend on a tiny random Llama checkpoint, checked against transformers+torch.

Batched, left-padded, bucketed generation must give each prompt exactly the tokens torch's greedy
``generate`` gives it alone; EOS is the tokenizer/config EOS list (never pad); stop strings and the
length limit set ``finish_reason``; ``score`` equals torch's summed log-probs.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import helpers
from hf_models import make_hf_model
from teams_rl_jax import config as config_lib
from teams_rl_jax.backends import FlaxBackend, QueryCounter, RoleConfig, build
from teams_rl_jax.backends.flax_backend import bucket, eos_ids_of

PROMPTS = ["Name three primary colors.", "Explain why the sky looks blue during the day, please.",
           "Convert 25 degrees Celsius to Fahrenheit.", "Hello!"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flax_backend")
    tok = helpers.make_tokenizer(tmp / "tok", vocab_size=300, bos=True)  # Llama-style: tokenizer(text) adds BOS
    seed = helpers.seed(11, "torch")
    model, path = make_hf_model(tmp, "llama3", seed=seed, vocab_size=len(tok), initializer_range=0.5)
    tok.save_pretrained(str(path))
    return model, path


@pytest.fixture(scope="module")
def backend(ckpt):
    _, path = ckpt
    cfg = config_lib.from_dict(RoleConfig, {"checkpoint": str(path), "dtype": "float32", "max_batch": 2,
                                            "chat": False}, "roles.instructor")
    return build(cfg, "instructor", QueryCounter())


def _torch_greedy(model, ids, max_new, eos):
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=0)
    new = out[0, len(ids):].tolist()
    cut = next((k for k, t in enumerate(new) if t in eos), None)
    return new if cut is None else new[:cut]


def test_batched_greedy_equals_torch_per_prompt(ckpt, backend):
    """Mutations caught: right- instead of left-padding, a dropped attention mask, pad treated as EOS,
    no BOS, rows reordered when un-sorting the length-sorted chunks, wrong chunking over max_batch; (slot
    engine) the per-row cache column ignored, a slot's stale columns left visible to its next request."""
    from teams_rl_jax import slot_engine

    def programs():
        return slot_engine.insert._cache_size() + slot_engine.decode._cache_size()

    model, _ = ckpt
    before_calls = backend.generate_calls
    out = backend.complete(PROMPTS, max_new_tokens=10)
    # 4 prompts through 2 slots: at least 2 inserts, and decode chunks of <= 8 steps for 10 tokens each.
    assert backend.generate_calls - before_calls >= 4
    assert backend.engine.max_live == 2  # both slots busy at once, never more
    lengths = sorted(len(backend.encode(p)) for p in PROMPTS)
    buckets = {bucket(n, 16) for n in lengths}
    # New prompt lengths inside an already compiled bucket, same limit: no new program.
    compiled = programs()
    again = ["Hello! Hello!", "Name three primary colors, please."]
    assert {bucket(len(backend.encode(p)), 16) for p in again} <= buckets
    assert {len(backend.encode(p)) for p in again}.isdisjoint(lengths)
    backend.complete(again, max_new_tokens=10)
    assert programs() == compiled
    assert backend.counter.snapshot()["instructor"] == len(PROMPTS) + 2
    for p, o in zip(PROMPTS, out):
        ids = backend.encode(p)
        assert ids[0] == 1 and ids.count(1) == 1  # exactly one BOS
        want = _torch_greedy(model, ids, 10, backend.eos_ids)
        assert list(o.token_ids) == want, (p, o.token_ids, want)
        assert o.finish_reason == ("length" if len(want) == 10 else "stop")
        assert o.text == backend.tokenizer.decode(want, skip_special_tokens=True)


def test_finish_eos_list_pad_stop_and_length(backend, tmp_path):
    """Mutations caught: pad id cut as EOS, only the first EOS id honoured, stop strings ignored or
    kept in the text, 'length' reported for EOS-finished rows."""
    b = FlaxBackend.from_lm(backend.lm, backend.tokenizer, role="reviewer", eos_ids=(2, 7), chat=False)
    tok = backend.tokenizer
    a, c = tok.encode("Red", add_special_tokens=False), tok.encode(" blue", add_special_tokens=False)
    row = np.asarray(a + [0] + c + [7, 5, 5])  # pad (0) inside the text, then the second EOS id
    out = b._finish(row, 20, None)
    assert out.token_ids == tuple(a + [0] + c) and out.finish_reason == "stop"
    out = b._finish(row, 2, None)
    assert out.finish_reason == "length" and len(out.token_ids) == 2
    out = b._finish(np.asarray(a + c + [5, 5]), 20, ["blue"])
    assert out.finish_reason == "stop" and out.text == tok.decode(a, skip_special_tokens=True) + " "
    assert tok.decode(list(out.token_ids)) in out.text
    # The EOS list reads generation_config.json (Llama-3 style list); pad is never in it.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 0]}))
    assert eos_ids_of(tok, backend.lm.config, tmp_path) == (2, 9)
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_chat_template_or_vicuna(backend):
    """Mutations caught: BOS doubled after a template that writes it, template ignored, role text lost."""
    tok = backend.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    vicuna = FlaxBackend.from_lm(backend.lm, tok, role="expert")
    text = vicuna.render(msgs)
    assert text.startswith("Be brief.") and text.endswith("USER: Hello! ASSISTANT:")
    templated = FlaxBackend.from_lm(backend.lm, tok, role="expert")
    old = tok.chat_template
    try:
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                             "{% if add_generation_prompt %}[assistant]{% endif %}")
        text = templated.render(msgs)
        assert text == "<s>[system]Be brief.[user]Hello![assistant]"
        ids = templated.encode(text)
        assert ids[0] == 1 and ids.count(1) == 1
        # A bare string is one user turn in chat mode.
        assert templated.render("Hi") == "<s>[user]Hi[assistant]"
    finally:
        tok.chat_template = old


def test_score_equals_torch_logprobs(ckpt, backend):
    """Mutations caught: off-by-one target shift, continuation tokenized on its own, prompt tokens summed."""
    import torch

    model, _ = ckpt
    prompts, conts = ["Name three primary", "The sky is"], [" colors.", " blue during the day"]
    got = backend.score(prompts, conts)
    for p, c, g in zip(prompts, conts, got):
        head, full = backend.encode(p), backend.encode(p + c)
        k = len(head)
        while full[:k] != head[:k]:
            k -= 1
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor([full])).logits[0].double(), -1)
        want = float(sum(lp[t - 1, full[t]] for t in range(k, len(full))))
        assert g == pytest.approx(want, abs=2e-3), (p, c, g, want)


@pytest.mark.slow
def test_sharded_backend_matches_single_device(ckpt, tmp_path):
    """On 8 simulated devices (data=2, fsdp=2, tensor=2) the backend answers what one device answers."""
    _, path = ckpt
    script = tmp_path / "mesh_check.py"
    script.write_text(textwrap.dedent(f"""
        from teams_rl_jax.backends import RoleConfig, build
        prompts = {PROMPTS!r}
        one = build(RoleConfig(checkpoint={str(path)!r}, dtype="float32", chat=False), "a")
        many = build(RoleConfig(checkpoint={str(path)!r}, dtype="float32", chat=False,
                                mesh={{"data": 2, "fsdp": 2, "tensor": 2}}), "b")
        a = [o.token_ids for o in one.complete(prompts, max_new_tokens=6)]
        b = [o.token_ids for o in many.complete(prompts, max_new_tokens=6)]
        assert a == b, (a, b)
        print("OK")
    """))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                         cwd=str(Path(__file__).parent.parent))
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_build_roles_from_yaml_shares_one_model(ckpt):
    """The README recipe: roles from a YAML mapping. Mutations caught: each role loading its own copy
    of the same checkpoint; roles counted under the wrong name."""
    import yaml

    _, path = ckpt
    doc = yaml.safe_load(f"""
    roles:
      instructor: {{backend: flax, checkpoint: {path}, dtype: float32, max_batch: 2}}
      reviewer: {{backend: flax, checkpoint: {path}, dtype: float32, chat: false}}
      expert: {{backend: openai, base_url: "http://127.0.0.1:9/v1", model: m}}
    """)
    from teams_rl_jax.backends import OpenAIBackend, RolesConfig, build_roles

    counter = QueryCounter()
    roles = build_roles(config_lib.from_dict(RolesConfig, doc["roles"], "roles"), counter)
    assert roles["instructor"].lm is roles["reviewer"].lm
    assert isinstance(roles["expert"], OpenAIBackend) and not roles["reviewer"].chat
    roles["reviewer"].score(["Hello"], ["!"])
    assert counter.snapshot() == {"reviewer": 1}
