"""lm-evaluation-harness adapter: our Flax LM as the lm-eval model ``teams_rl_jax``.

Importing :mod:`teams_rl_jax.eval` registers it, so after ``import teams_rl_jax.eval``::

    lm_eval.simple_evaluate(model="teams_rl_jax", model_args="pretrained=DIR,batch_size=16", tasks=[...])

lm-eval's own CLI cannot discover models from other packages, hence our CLI, which registers the
model and hands every flag to lm-eval's CLI unchanged::

    python -m teams_rl_jax.eval.harness --model teams_rl_jax --model_args pretrained=DIR \
        --tasks my_task --include_path tasks/

Model args: ``pretrained`` (local HF dir: config.json + safetensors + tokenizer), ``batch_size``,
``max_length`` (default: the config's max_position_embeddings), ``dtype`` (float32 | bfloat16),
``add_bos_token``, ``prefix_token_id``, ``max_gen_toks`` (256), ``mesh_data``/``mesh_fsdp``/
``mesh_tensor`` (7B: shard weights over a device mesh; default all devices on ``data``).

It subclasses lm-eval's ``TemplateLM``, which does the context/continuation tokenization; scoring is
:class:`~teams_rl_jax.eval.multiple_choice.LoglikelihoodScorer` (batched, jitted, sharded) and
generation is :func:`teams_rl_jax.generation.generate` (batched, KV cache, greedy or sampled).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import lm_eval.models  # noqa: F401 - fills lm-eval's registry first: its get_model() only loads the
import numpy as np     # built-in models (hf, vllm ...) when the registry is empty, so registering ours
from lm_eval import utils as lm_utils  # into an empty registry would hide them
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from teams_rl_jax import host_malloc
from teams_rl_jax.data.tokenizer import load_tokenizer
from teams_rl_jax.eval.multiple_choice import LoglikelihoodScorer, build_mesh, tok_encode, tokenizer_prefix_id
from teams_rl_jax.generation import generate
from teams_rl_jax.models import load_pretrained

MODEL_NAME = "teams_rl_jax"


def _opt_bool(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    return str(v).lower() in ("1", "true", "yes")


class TeamsRLJaxLM(TemplateLM):
    """lm-eval model over a local HF checkpoint dir loaded into :mod:`teams_rl_jax.models`."""

    def __init__(self, pretrained: str, batch_size: int | str = 32, max_length: int | None = None,
                 dtype: str = "float32", add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 max_gen_toks: int = 256, mesh_data: int = -1, mesh_fsdp: int = 1, mesh_tensor: int = 1,
                 seed: int = 0, **_ignored):  # device, max_batch_size ...: lm-eval passes them to every model
        super().__init__()
        self.mesh = build_mesh(int(mesh_data), int(mesh_fsdp), int(mesh_tensor))
        self.lm = load_pretrained(str(pretrained), dtype=dtype, mesh=self.mesh)
        self.tokenizer = load_tokenizer(str(pretrained))
        bs = str(batch_size).split(":")[0]
        self.batch_size = int(bs) if bs.isdigit() else 32  # "auto": a fixed size (shapes must be static under jit)
        self._max_length = int(max_length) if max_length else int(self.lm.config.max_position_embeddings)
        self.add_bos_token = _opt_bool(add_bos_token)
        self.custom_prefix_token_id = int(prefix_token_id) if prefix_token_id is not None else None
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.scorer = LoglikelihoodScorer(self.lm, batch_size=self.batch_size, max_length=self._max_length,
                                          mesh=self.mesh, pad_id=self.tokenizer.pad_token_id or 0)

    # ---- TemplateLM plumbing ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return tokenizer_prefix_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = tok_encode(self.tokenizer, string, add_special_tokens, self.add_bos_token, self.prefix_token_id)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "").replace("/", "__")

    # ---- the three request types --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        res = self.scorer.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probs of each whole string, in disjoint windows of ``max_length`` (as HFLM does)."""
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            w = list(map(lm_utils.make_disjoint_window,
                         lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1)))
            windows.extend(w)
            counts.append(len(w))
        scores = self.scorer.score_tokens(windows)
        out, i = [], 0
        for req, n in zip(requests, counts):
            total = float(sum(s[0] for s in scores[i:i + n]))
            i += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation; each answer is cut at the first ``until`` string (default: EOS text)."""
        args = [r.args for r in requests]
        out: list[str | None] = [None] * len(args)
        # Group by generation settings (one compiled program per group and padded length).
        groups: dict[tuple, list[int]] = {}
        for i, (_, kw) in enumerate(args):
            kw = dict(kw or {})
            until = kw.get("until") or [self.tok_decode([self.eot_token_id], skip_special_tokens=False)]
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)), temp, kw.get("top_p"))
            groups.setdefault(key, []).append(i)
        rng = jax.random.key(self.seed)
        for (until, max_gen, temp, top_p), idx in groups.items():
            max_ctx = max(1, self.max_length - max_gen)
            encs = {i: self.tok_encode(args[i][0], left_truncate_len=max_ctx) for i in idx}
            idx = sorted(idx, key=lambda i: -len(encs[i]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                T = min(max_ctx, 32 * math.ceil(max(len(encs[i]) for i in chunk) / 32))
                ids = np.full((self.batch_size, T), self.tokenizer.pad_token_id or 0, np.int32)
                mask = np.zeros((self.batch_size, T), np.int32)
                for r, i in enumerate(chunk):  # left padding
                    e = encs[i][-T:]
                    ids[r, T - len(e):], mask[r, T - len(e):] = e, 1
                mask[len(chunk):, -1] = 1  # filler rows: one token, discarded
                rng, key = jax.random.split(rng)
                toks = np.asarray(generate(self.lm, self.scorer.params, ids, mask, max_new_tokens=max_gen, rng=key,
                                           temperature=temp, top_p=top_p, eos_token_id=self.eot_token_id,
                                           pad_token_id=self.tokenizer.pad_token_id or 0))
                for r, i in enumerate(chunk):
                    text = self.tok_decode([t for t in toks[r].tolist() if t != (self.tokenizer.pad_token_id or 0)])
                    for u in until:
                        if u and u in text:
                            text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return out


# Registered here only when imported as ``teams_rl_jax.eval.harness``: under ``python -m`` this file
# is ``__main__`` and its class a second copy; main() then imports the real module, which registers.
if __name__ != "__main__":
    register_model(MODEL_NAME)(TeamsRLJaxLM)


def main(argv: list[str] | None = None) -> None:
    """``python -m teams_rl_jax.eval.harness ...``: lm-eval's CLI with ``teams_rl_jax`` registered."""
    from lm_eval.__main__ import cli_evaluate

    host_malloc.configure()  # before JAX starts its CPU threads

    import teams_rl_jax.eval.harness  # noqa: F401 - registers the model (see above)

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
