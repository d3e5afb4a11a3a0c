"""In-process backend: a local Hugging Face checkpoint, batched jitted generation over a mesh.

Prompts are rendered once on the host (chat messages through the checkpoint's own chat template,
else Vicuna v1.1 wording: ``data.chat.render_chat``), tokenized without the tokenizer's automatic
specials, then given the front specials the tokenizer's own ``tokenizer(text)`` would add (Llama's BOS,
none for Qwen2: ``data.tokenizer.front_special_ids``) unless the text already starts with them (a chat template
that writes its own BOS gets no second one), then
generated ``max_batch`` rows at a time by ``teams_rl_jax.generate`` (left-padded, finished rows
stop, the loop exits when every row is done).

Compile count is bounded: prompt lengths are padded up to a power of two (min 16) and the number of
rows up to a power of two (min the mesh's batch ways), so a run sees O(log T * log B) programs per
``max_new_tokens`` value instead of one per distinct shape. The weights are an ARGUMENT of the jitted
generate (``generation._generate(params, ...)``), never a closure constant, so a 7B model is not
baked into the program.

EOS is the tokenizer's EOS token plus every id of the checkpoint's ``eos_token_id`` (config.json and
generation_config.json: Llama-3 lists ``<|eot_id|>`` and ``<|end_of_text|>``). The pad id is never
treated as EOS (id 0 is "!" in Llama-3).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax import sharding
from teams_rl_jax.backends.base import Completion, Prompt, QueryCounter
from teams_rl_jax.data.chat import render_chat
from teams_rl_jax.data.tokenizer import choose_pad_id, front_special_ids, load_tokenizer
from teams_rl_jax.errors import BackendError
from teams_rl_jax.generation import generate
from teams_rl_jax.models import load_pretrained

MIN_LEN_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def eos_ids_of(tokenizer, lm_config=None, checkpoint: str | Path | None = None) -> tuple[int, ...]:
    """Every id that ends a completion: tokenizer EOS + config/generation_config ``eos_token_id``.

    The pad id is excluded unless it is also the tokenizer's own EOS token (e.g. pad = eos).
    """
    ids: list[int] = []

    def add(v):
        if v is None:
            return
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if int(i) not in ids:
                ids.append(int(i))

    add(getattr(tokenizer, "eos_token_id", None))
    if lm_config is not None:
        add(getattr(lm_config, "eos_token_id", None))
    if checkpoint is not None:
        gen = Path(checkpoint) / "generation_config.json"
        if gen.is_file():
            try:
                add(json.loads(gen.read_text()).get("eos_token_id"))
            except (ValueError, OSError):
                pass  # a broken generation_config is not fatal: the tokenizer's EOS still applies
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return tuple(i for i in ids if i != pad or i == tok_eos)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> int | None:
    """Index where the earliest stop string starts in ``text`` (None if none occurs)."""
    cuts = [text.find(s) for s in (stop or ()) if s]
    cuts = [c for c in cuts if c >= 0]
    return min(cuts) if cuts else None


class FlaxBackend:
    """``Backend`` over an in-process ``models.LM`` (see the module docstring).

    Attributes: ``lm`` (the ``models.LM``), ``params`` (its weights, possibly sharded),
    ``tokenizer``, ``eos_ids``, ``role``, ``model``, ``counter``, ``generate_calls`` (batched
    generate calls so far; the server reports it).
    """

    kind = "flax"  # implementation name (response-cache keys, provenance)

    def __init__(self, lm, tokenizer, *, role: str, counter: QueryCounter | None = None, model: str | None = None,
                 max_batch: int = 32, chat: bool = True, mesh=None, eos_ids: Sequence[int] | None = None,
                 checkpoint: str | Path | None = None, min_batch: int = 1, seed: int = 0):
        if tokenizer is None:
            raise BackendError(f"{role}: the flax backend needs a tokenizer")
        self.lm = lm
        self.tokenizer = tokenizer
        self.role = role
        self.counter = counter if counter is not None else QueryCounter()
        self.model = model or (Path(checkpoint).name if checkpoint else "flax-lm")
        self.max_batch = int(max_batch)
        self.chat = chat
        self.mesh = mesh
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else eos_ids_of(tokenizer, lm.config, checkpoint)
        self.pad_id = choose_pad_id(tokenizer, self.eos_ids)  # never an EOS id
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.front_ids = front_special_ids(tokenizer)  # what tokenizer(text) puts before the text's tokens
        self.generate_calls = 0
        # Sampling calls without a seed draw from fold_in(key(seed), call number): reproducible run to
        # run, yet two calls with the same prompts do not return the same samples.
        self.seed = int(seed)
        self._unseeded_calls = 0
        self._lock = threading.Lock()  # one generate at a time (server threads, host env loops)
        self._score_fn = None
        # Rows are padded to a power of two >= the mesh's batch ways (so the batch shards evenly) and
        # >= min_batch (a server may trade idle rows for fewer programs: min_batch = max_batch gives
        # one program per prompt-length bucket).
        ways = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
        self._batch_ways = max(ways, min(int(min_batch), self.max_batch))

    @property
    def params(self):
        return self.lm.params

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_lm(cls, lm, tokenizer, *, role: str, counter: QueryCounter | None = None, **kw) -> "FlaxBackend":
        """Wrap an already loaded ``models.LM`` + tokenizer (tests, in-process callers, shared models)."""
        return cls(lm, tokenizer, role=role, counter=counter, **kw)

    @classmethod
    def from_config(cls, cfg, *, role: str, counter: QueryCounter | None = None, **kw) -> "FlaxBackend":
        """Load ``cfg.checkpoint`` (a ``RoleConfig`` with ``backend: flax``) in ``cfg.dtype`` onto ``cfg.mesh``;
        ``kw`` go to the constructor (e.g. ``min_batch``).

        A role's mesh is over this process's own devices (``jax.local_devices()``): in a multi-process run
        every host holds its own replica and serves its own share of the seeds (the generate stage gives
        seed ``i`` to process ``i % count``), so ``roles.<role>.mesh`` sizes are per host."""
        mesh = None
        if cfg.mesh is not None:
            mesh = sharding.make_mesh(**cfg.mesh, devices=jax.local_devices())
        lm = load_pretrained(cfg.checkpoint, cfg.dtype, mesh=mesh)
        tok = load_tokenizer(cfg.checkpoint)
        return cls(lm, tok, role=role, counter=counter, model=cfg.model, max_batch=cfg.max_batch, chat=cfg.chat,
                   mesh=mesh, checkpoint=cfg.checkpoint, **kw)

    # ---- prompts --------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """Prompt text: messages (or a bare string when ``chat``) through the chat template; else as-is."""
        if isinstance(prompt, str):
            return render_chat(self.tokenizer, [{"role": "user", "content": prompt}]) if self.chat else prompt
        return render_chat(self.tokenizer, list(prompt))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: its own tokens, preceded by the tokenizer's front specials
        (:func:`front_special_ids`) unless the text already starts with them."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        front = list(self.front_ids)
        if front and ids[:len(front)] != front:
            ids = front + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- generation -----------------------------------------------------------------------------
    def complete(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None
                 ) -> list[Completion]:
        """One completion per prompt (see ``base.Backend``); counts ``len(prompts)`` queries."""
        prompts = list(prompts)
        self.counter.add(self.role, len(prompts))
        ids = [self.encode(self.render(p)) for p in prompts]
        return self.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 stop=stop, seed=seed)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                     temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                     seed: int | None = None, stops: Sequence[Sequence[str] | None] | None = None
                     ) -> list[Completion]:
        """Completions of tokenized prompts, ``max_batch`` rows per generate call (not counted).

        ``stop`` applies to every row; ``stops`` (one list per row) overrides it row by row.

        ``max_new_tokens`` may be per row (the server batches requests with different limits): the
        batch decodes up to the largest and each row is cut to its own limit. Greedy rows are
        unaffected by their batch neighbours; sampled rows depend on ``seed`` and the batch layout.
        """
        n = len(prompt_ids)
        limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, (int, np.integer)) else \
            [int(m) for m in max_new_tokens]
        if len(limits) != n:
            raise BackendError(f"{self.role}: {len(limits)} max_new_tokens for {n} prompts")
        if any(m < 1 for m in limits):
            raise BackendError(f"{self.role}: max_new_tokens must be >= 1")
        if any(len(p) == 0 for p in prompt_ids):
            raise BackendError(f"{self.role}: empty prompt (no tokens)")
        limit = self.lm.config.max_position_embeddings
        out: list[Completion | None] = [None] * n
        # Sort by length so each chunk pads little; results go back to their original slots.
        order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
        if seed is None:
            with self._lock:
                rng = jax.random.fold_in(jax.random.key(self.seed), self._unseeded_calls)
                self._unseeded_calls += 1
        else:
            rng = jax.random.key(int(seed))
        for c, start in enumerate(range(0, n, self.max_batch)):
            rows = order[start:start + self.max_batch]
            new = max(limits[i] for i in rows)
            longest = max(len(prompt_ids[i]) for i in rows)
            if longest + new > limit:
                raise BackendError(f"{self.role}: prompt ({longest} tokens) + max_new_tokens ({new}) exceeds the "
                                   f"model's {limit} positions")
            toks = self._generate_chunk([prompt_ids[i] for i in rows], new, float(temperature), float(top_p),
                                        jax.random.fold_in(rng, c))
            for r, i in enumerate(rows):
                out[i] = self._finish(toks[r], limits[i], stops[i] if stops is not None else stop)
        return out  # type: ignore[return-value]

    def _generate_chunk(self, rows: list[Sequence[int]], max_new: int, temperature: float, top_p: float, rng):
        T = bucket(max(len(r) for r in rows), MIN_LEN_BUCKET)
        B = bucket(len(rows), self._batch_ways)
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        for b, r in enumerate(rows):
            ids[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
        mask[len(rows):, -1] = 1  # filler rows: one real token, so no row is all padding
        with self._lock:
            if self.mesh is not None:
                batch = sharding.batch_sharding(self.mesh)
                with sharding.activation_rules(self.mesh):
                    toks = generate(self.lm, self.lm.params, jax.device_put(ids, batch), jax.device_put(mask, batch),
                                    max_new_tokens=max_new, rng=rng, temperature=temperature,
                                    top_p=None if top_p >= 1.0 else top_p, eos_token_id=list(self.eos_ids),
                                    pad_token_id=self.pad_id)
            else:
                toks = generate(self.lm, self.lm.params, ids, mask, max_new_tokens=max_new, rng=rng,
                                temperature=temperature, top_p=None if top_p >= 1.0 else top_p,
                                eos_token_id=list(self.eos_ids), pad_token_id=self.pad_id)
            toks = np.asarray(jax.device_get(toks))
            self.generate_calls += 1
        return toks[:len(rows)]

    def _finish(self, row: np.ndarray, limit: int, stop: Sequence[str] | None) -> Completion:
        """Tokens of one row -> Completion: cut at EOS, at the row's limit, at the first stop string."""
        toks = [int(t) for t in row[:limit]]
        eos = set(self.eos_ids)
        hit = next((k for k, t in enumerate(toks) if t in eos), None)
        reason = "length"
        if hit is not None:
            toks, reason = toks[:hit], "stop"
        text = self.decode(toks)
        cut = cut_at_stop(text, stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
            # Keep the longest token prefix whose text lies within the cut text (binary search: a
            # longer prefix decodes to a longer string).
            lo, hi = 0, len(toks)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if text.startswith(self.decode(toks[:mid])) and len(self.decode(toks[:mid])) <= len(text):
                    lo = mid
                else:
                    hi = mid - 1
            toks = toks[:lo]
        return Completion(text=text, token_ids=tuple(toks), finish_reason=reason)

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of log-probs of each continuation given its prompt: one batched forward pass.

        Continuation ids are taken from the encoding of prompt + continuation minus the prompt's
        (tokenizing the continuation alone gives different pieces for SentencePiece's leading space).
        Prompts are rendered like ``complete``'s string prompts. Counts ``len(prompts)`` queries.
        """
        prompts, continuations = list(prompts), list(continuations)
        if len(prompts) != len(continuations):
            raise BackendError(f"{self.role}: {len(prompts)} prompts for {len(continuations)} continuations")
        self.counter.add(self.role, len(prompts))
        seqs, starts = [], []
        for p, c in zip(prompts, continuations):
            text = self.render(p)
            head = self.encode(text)
            full = self.encode(text + c)
            k = len(head)
            while k > 0 and full[:k] != head[:k]:  # the boundary piece may merge across the join
                k -= 1
            if k < 1:
                raise BackendError(f"{self.role}: empty prompt (no tokens to condition on)")
            if len(full) <= k:
                raise BackendError(f"{self.role}: continuation {c[:40]!r} adds no tokens")
            seqs.append(full)
            starts.append(k)
        per_token = self.token_logprobs(seqs)
        return [float(sum(lp[k:])) for lp, k in zip(per_token, starts)]

    def token_logprobs(self, seqs: Sequence[Sequence[int]]) -> list[list[float]]:
        """``out[i][t]`` = log p(seqs[i][t] | seqs[i][:t]) for t >= 1 (``out[i][0]`` = 0.0): one batched
        forward pass per ``max_batch`` rows (not counted; ``score`` and the server's echo use it)."""
        if self._score_fn is None:
            def logp(params, ids, mask, targets):
                logits = self.lm.apply(params, ids, mask)
                lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
            self._score_fn = jax.jit(logp)  # params are an argument: never baked into the program
        out: list[list[float]] = []
        for s in range(0, len(seqs), self.max_batch):
            chunk = [list(q) for q in seqs[s:s + self.max_batch]]
            T = bucket(max(len(q) for q in chunk), MIN_LEN_BUCKET)
            B = bucket(len(chunk), self._batch_ways)
            ids = np.full((B, T), self.pad_id, np.int32)
            mask = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            for b, seq in enumerate(chunk):
                # Right-padded: position t predicts token t+1.
                ids[b, :len(seq)] = seq
                mask[b, :len(seq)] = 1
                targets[b, :len(seq) - 1] = seq[1:]
            mask[len(chunk):, 0] = 1
            with self._lock:
                if self.mesh is not None:
                    with sharding.activation_rules(self.mesh):
                        res = self._score_fn(self.lm.params, ids, mask, targets)
                else:
                    res = self._score_fn(self.lm.params, ids, mask, targets)
            res = np.asarray(jax.device_get(res))
            out.extend([0.0] + [float(x) for x in res[b, :len(seq) - 1]] for b, seq in enumerate(chunk))
        return out

    def __repr__(self) -> str:
        return f"FlaxBackend(role={self.role!r}, model={self.model!r}, max_batch={self.max_batch})"
