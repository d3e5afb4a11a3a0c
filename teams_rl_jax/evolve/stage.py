"""The generate stage runner: seeds -> evolved, filtered, answered Alpaca records.

``run_generate_stage(cfg, run_dir, roles)`` writes ``run_dir/data/``:

* ``generated.jsonl``: ``{"instruction", "input", "output", "meta": {"seed_id", "selector", "ops",
  "step", "judge", "queries": {role: n}, "answer_finish"}}`` (``queries``: what that seed had cost
  when the record was made).
* ``summary.json``: kept, eliminations by rule, duplicates dropped, unparseable reviewer replies (by
  role), queries by role (paid + replayed),
  paid and replayed separately, queries per kept instruction, operation histogram.
* ``hf/``: the records as a Hugging Face dataset (Parquet + dataset card with the run's provenance;
  ``evolve.hf_dataset``), written by process 0 just before ``summary.json``.
* ``baselines/<name>/``: the same for each baseline selector, over the same seeds and query budget.
* ``trace.jsonl``: every step of every seed, kept or eliminated (:func:`_trace`): ``{"seed_id", "step"
  (protocol wizardlm: the round), "op", "before", "instruction" (the rewrite), "reviewer_reply",
  "verdict" (null when the reviewer was not asked), "rule" (the elimination rule or ``duplicate_exact``/
  ``duplicate_near`` that dropped it; null: kept), "answer" (the expert's, when one was made),
  "selector"}``. With ``keep: final`` the one answer (and a final duplicate drop) goes on the seed's last
  kept step. Written per seed through ``shards/trace.<proc>.jsonl`` like the records (a resumed run's
  trace has each step once).
* ``shards/``: per-process record, progress and trace files (merged into ``generated.jsonl`` and
  ``trace.jsonl`` at the end).
* ``decontamination.json`` (``generate.decontaminate: report | drop``): the n-gram overlap of the merged
  records with the benchmarks in ``decontaminate_benchmarks_dir``; ``drop`` removes the contaminated
  records from ``generated.jsonl`` (they still count in ``kept``: they were made and paid for) and
  ``summary.json`` gets ``decontaminated: {task: n}``. Baselines are filtered the same way.

The instructor rewrites a seed's ``instruction`` alone (as the TeaMs-RL reference does); its Alpaca
``input`` is kept unchanged as the record's own ``input`` field and shown to the expert with the
instruction. Per batch of ``batch_seeds`` seeds and per step: the selector picks each live seed's operation; the
operator role rewrites (one batched ``complete``, the text instructor of ``roles.instructor``); the
reviewer judges (one batched call, ``roles.reviewer``); each role's reply length is
``roles.<role>.max_new_tokens``; rules 1/4
and duplicates filter; the expert answers the survivors (one batched call); rules 2-3 filter the
answers. An eliminated evolution is dropped and the seed continues from its previous instruction
(as in the env, ``revert_eliminated``). Multi-host: seed ``i`` belongs to process ``i % count``.

That is ``generate.protocol: filtered`` (ours). The other protocols share this runner (seeds, batches,
progress lines, response cache, resume) and differ only in the per-batch loop:

* ``paper`` (:func:`_evolve_batch_paper`, the reference generator): the selector's choice under the
  reference's overrides (``selectors.PaperOverrides``), the instructor rewrites, no reviewer call, no
  rule, no de-duplication: every step is kept, each with one expert answer (``steps`` records per seed).
* ``wizardlm`` (:func:`_evolve_batch_wizardlm`, WizardLM's Evol-Instruct): ``rounds`` rounds over every
  seed; per round one uniformly random operation, the instructor rewrites, the reviewer judges, the
  expert answers (3 queries per seed per round); the four elimination rules (and ``truncated``) send an
  eliminated instruction back unchanged to the next round; every round's survivors are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from teams_rl_jax.backends import build_roles
from teams_rl_jax.backends.base import QueryCounter
from teams_rl_jax.backends.cache import CachedBackend, ResponseCache
from teams_rl_jax.backends.config import max_new_tokens, public_identity, role_config
from teams_rl_jax.env.prompts import expert_messages
from teams_rl_jax.errors import ConfigError, DataError
from teams_rl_jax.eval.decontaminate import decontamination_report
from teams_rl_jax.eval.tasks import found_tasks
from teams_rl_jax.evolve import filters as F
from teams_rl_jax.evolve.config import GenerateConfig, worker_spec
from teams_rl_jax.evolve.hf_dataset import provenance, write_hf_dataset
from teams_rl_jax.evolve.records import (AppendLog, Seed, _read_lines, keep_seeds, read_seeds, recover,
                                         write_json_atomic, write_jsonl_atomic)
from teams_rl_jax.evolve.operators import LLMRewriter, token_edit_operator
from teams_rl_jax.evolve.selectors import STOP, make_selector
from teams_rl_jax.layout import GenerateDir, RunLayout, response_cache_file
from teams_rl_jax.roles.prompts import DEFAULT_PROMPTS, Prompts
from teams_rl_jax.roles.reviewer import Reviewer

ROLES = ("instructor", "reviewer", "expert")


def outputs_complete(out: Path) -> bool:
    """Whether a generate output dir holds a finished run (its summary is written last)."""
    return (out / "generated.jsonl").is_file() and (out / "summary.json").is_file()


def needed_roles(cfg: GenerateConfig, roles: Any) -> tuple[str, ...]:
    """Roles the stage calls: the operator role (unless token_edit), the expert, the reviewer if set."""
    need = ["expert"]
    if cfg.operator_role != "token_edit":
        need.append(cfg.operator_role)
    if cfg.judge and cfg.protocol != "paper" and roles is not None and getattr(roles, "reviewer", None) is not None:
        need.append("reviewer")
    return tuple(dict.fromkeys(need))


def cache_store(cfg: GenerateConfig, run_dir: Path, worker: int | None = None) -> ResponseCache:
    """The response cache this process writes (``generate.cache_dir``, else ``run_dir/cache``): the
    single-process file, or worker ``worker``'s own file reading every other worker's."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else RunLayout(run_dir).cache_dir
    if worker is None:
        return ResponseCache(response_cache_file(cache_dir))
    return ResponseCache(response_cache_file(cache_dir, worker), read_dir=cache_dir)


def build_backends(cfg: GenerateConfig, roles: Any, run_dir: Path, backends: dict | None = None,
                   tag: str = "data", worker: int | None = None) -> dict:
    """``{role: backend}`` for the roles this stage calls, each wrapped in the response cache when
    ``cfg.cache`` (``backends`` given = use those, e.g. tests' counting backends; ``worker``: this
    process's index when there are several, see :func:`cache_store`)."""
    import dataclasses

    wrap = None
    if cfg.cache:
        store = cache_store(cfg, Path(run_dir), worker)
        wrap = lambda b: CachedBackend(b, store, tag=tag)  # noqa: E731
    if backends is not None:
        return {r: wrap(b) if wrap else b for r, b in backends.items()}
    need = needed_roles(cfg, roles)
    for role in need:
        if roles is None or getattr(roles, role, None) is None:
            raise ConfigError(f"roles.{role}: the generate stage needs this role (a flax checkpoint dir or an "
                              f"openai endpoint)")
    only = dataclasses.replace(roles, **{r: None for r in ROLES if r not in need})
    return build_roles(only, QueryCounter(), cache=wrap, state_dir=RunLayout(run_dir).batch_state)


@dataclasses.dataclass
class _Roles:
    """What the evolve loop calls besides the operator: the expert (and its reply length) and the
    text reviewer (None: no reviewer, rule 1 by text only)."""

    expert: Any
    expert_max_new_tokens: int
    reviewer: Reviewer | None


def text_roles(bk: dict, roles: Any, prompts: Prompts | None = None) -> _Roles:
    """The expert and the text :class:`Reviewer` (its ``max_new_tokens`` and ``parser`` from
    ``roles.reviewer``, its judge template from ``prompts``) over the stage's backends."""
    reviewer = None
    if bk.get("reviewer") is not None:
        cfg = role_config(roles, "reviewer")
        reviewer = Reviewer(bk["reviewer"], max_new_tokens(roles, "reviewer"), cfg.parser if cfg else "lenient",
                            (prompts or DEFAULT_PROMPTS).judge)
    return _Roles(bk.get("expert"), max_new_tokens(roles, "expert"), reviewer)


def _process(cfg: GenerateConfig | None = None) -> tuple[int, int]:
    """``(index, count)`` of this process: ``generate.worker`` in worker mode, else jax's."""
    if cfg is not None and cfg.worker is not None:
        got = worker_spec(cfg.worker, os.environ)
        if got is not None:
            return got
    try:
        import jax

        return jax.process_index(), jax.process_count()
    except Exception:  # noqa: BLE001 - no backend initialised: single process
        return 0, 1


class _Batch:
    """Mutable state of the seeds evolved together."""

    def __init__(self, seeds: list[Seed], rows: list[int]):
        n = len(seeds)
        self.seeds, self.rows = seeds, rows
        self.cur = [s.instruction for s in seeds]  # the instructor sees the instruction; input stays apart
        self.prev = [-1] * n
        self.alive = [True] * n
        self.chain: list[list[str]] = [[] for _ in range(n)]
        self.queries: list[dict[str, int]] = [dict.fromkeys(ROLES, 0) for _ in range(n)]
        self.elim: list[dict[str, int]] = [dict.fromkeys(F.RULES, 0) for _ in range(n)]
        self.dups: list[dict[str, int]] = [{"exact": 0, "near": 0} for _ in range(n)]
        self.records: list[list[dict]] = [[] for _ in range(n)]
        self.judge: list[float | None] = [None] * n
        self.unparseable: list[dict[str, int]] = [{"reviewer": 0} for _ in range(n)]
        self.stopped = [False] * n
        self.kept_per_round: list[list[int]] = [[] for _ in range(n)]  # protocol wizardlm
        self.trace: list[list[dict]] = [[] for _ in range(n)]  # every step (trace.jsonl)
        self.open: list[dict | None] = [None] * n  # the trace step the next expert answer belongs to

    def charge(self, i: int, q: dict[str, int]) -> None:
        for r, n in q.items():
            self.queries[i][r] = self.queries[i].get(r, 0) + n


def _answer(rs: _Roles, cfg: GenerateConfig, batch: _Batch, items: list[tuple[int, str, int]],
            rules: bool = True, seed: int | None = None) -> list[tuple[int, str, int, str, str]]:
    """Expert answers for ``(i, instruction, step)``; returns survivors of rules 2-3 (all of them when
    not ``rules``) with answer + finish. ``seed``: the sampling seed (default ``cfg.seed``)."""
    if not items:
        return []
    got = rs.expert.complete([expert_messages(x, batch.seeds[i].input) for i, x, _ in items],
                             max_new_tokens=rs.expert_max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=cfg.seed if seed is None else seed)
    out = []
    for (i, text, step), c in zip(items, got):
        batch.charge(i, {"expert": 1})
        flags = F.answer_flags(c.text)
        hit = [r for r in F.ANSWER_RULES if flags[r] and rules]
        if batch.open[i] is not None:  # the trace step this answer belongs to
            batch.open[i]["answer"] = c.text.strip()
            if hit:
                batch.open[i]["rule"] = hit[0]
        if hit:
            batch.elim[i][hit[0]] += 1
            continue
        out.append((i, text, step, c.text.strip(), c.finish_reason))
    return out


def dedup_text(instruction: str, input: str = "") -> str:
    """What de-duplication compares: the instruction with its input (Alpaca has many records that share
    an instruction, e.g. "Classify the following", and differ by their input)."""
    return instruction if not input else f"{instruction}\n{input}"


def _record(batch: _Batch, i: int, text: str, step: int, answer: str, finish: str, selector: str) -> dict:
    return {"instruction": text, "input": batch.seeds[i].input, "output": answer,
            "meta": {"seed_id": batch.seeds[i].id, "selector": selector, "ops": list(batch.chain[i]), "step": step,
                     "judge": batch.judge[i], "queries": {r: n for r, n in batch.queries[i].items() if n},
                     "answer_finish": finish}}


def _trace(batch: _Batch, i: int, step: int, op: str, text: str, selector: str, reply: str | None = None,
           verdict: float | None = None, rule: str | None = None) -> dict:
    """Append one step of seed row ``i`` to its trace (before ``batch.cur[i]`` moves on); returns the
    entry (the caller sets ``rule``/``answer`` when they are known)."""
    e = {"seed_id": batch.seeds[i].id, "step": step, "op": op, "before": batch.cur[i], "instruction": text,
         "reviewer_reply": reply, "verdict": verdict, "rule": rule, "answer": None, "selector": selector}
    batch.trace[i].append(e)
    return e


def _choose(batch: _Batch, selector, t: int) -> list[tuple[int, str]]:
    """``(row, op)`` for the live seeds at step ``t``; a seed whose selector says ``stop`` ends."""
    live = [i for i, a in enumerate(batch.alive) if a]
    if not live:
        return []
    ops = selector.choose([batch.seeds[i].id for i in live], [batch.cur[i] for i in live],
                          [batch.prev[i] for i in live], t)
    act = []
    for i, op in zip(live, ops):
        if op == STOP:  # the policy ends the episode: no queries, current instruction kept
            batch.alive[i] = False
            batch.stopped[i] = True
        else:
            act.append((i, op))
    return act


def _rewrite(batch: _Batch, selector, operator, act: list[tuple[int, str]], t: int) -> list[tuple[str, bool, dict]]:
    """The operator's ``(text, truncated, queries)`` for each ``(row, op)``, charged; ``prev`` set."""
    idx = [i for i, _ in act]
    new = operator.apply([batch.cur[i] for i in idx], [op for _, op in act], [batch.rows[i] for i in idx],
                         [batch.seeds[i].id for i in idx], t)
    for (i, op), (_, _, q) in zip(act, new):
        batch.charge(i, q)
        batch.prev[i] = list(selector.operations).index(op) if op in selector.operations else -1
    return new


def _evolve_batch_paper(cfg: GenerateConfig, batch: _Batch, selector, operator, rs: _Roles, dedup) -> None:
    """The reference generator: chain ``steps`` rewrites, keep every one with one expert answer."""
    for t in range(cfg.steps):
        act = _choose(batch, selector, t)
        if not act:
            break
        new = _rewrite(batch, selector, operator, act, t)
        for (i, op), (text, _, _) in zip(act, new):
            batch.open[i] = _trace(batch, i, t + 1, op, text, selector.name)
            batch.chain[i].append(op)
            batch.cur[i] = text
        todo = [(i, batch.cur[i], t + 1) for i, _ in act]
        for i, text, step, answer, finish in _answer(rs, cfg, batch, todo, rules=False):
            batch.records[i].append(_record(batch, i, text, step, answer, finish, selector.name))


def round_seed(cfg: GenerateConfig, r: int) -> int:
    """Sampling seed of WizardLM round ``r`` (instructor and expert): a fresh draw per round, so an
    instruction sent back to the pool is rewritten anew next round instead of replayed from the cache."""
    return cfg.seed + 7919 * r


@contextlib.contextmanager
def _operator_seed(operator, seed: int):
    """``operator.seed`` set to ``seed`` for the block (operators are shared: restored after)."""
    old = operator.seed
    operator.seed = seed
    try:
        yield operator
    finally:
        operator.seed = old


def _evolve_batch_wizardlm(cfg: GenerateConfig, batch: _Batch, selector, operator, rs: _Roles, dedup) -> None:
    """WizardLM's rounds: every pool instruction evolved, judged and answered per round; a survivor
    replaces it in the pool (and is kept), an eliminated one stays as it was for the next round."""
    for r in range(cfg.rounds):
        act = _choose(batch, selector, r)
        idx = [i for i, _ in act]
        with _operator_seed(operator, round_seed(cfg, r)):
            new = _rewrite(batch, selector, operator, act, r)
        verdict: dict[int, float | None] = {}
        replies: list[str] = []
        if rs.reviewer is not None:
            for i, v in zip(idx, rs.reviewer.judge([batch.cur[i] for i in idx], [x for x, _, _ in new],
                                                   seed=cfg.seed, replies=replies)):
                batch.charge(i, {"reviewer": 1})
                batch.unparseable[i]["reviewer"] += v is None
                verdict[i] = v
        reply = dict(zip(idx, replies))
        for (i, op), (text, _, _) in zip(act, new):
            batch.open[i] = _trace(batch, i, r + 1, op, text, selector.name, reply.get(i), verdict.get(i))
        answers = {i: (answer, finish) for i, _, _, answer, finish in
                   _answer(rs, cfg, batch, [(i, x, r + 1) for i, (x, _, _) in zip(idx, new)], rules=False,
                           seed=round_seed(cfg, r))}
        for (i, op), (text, truncated, _) in zip(act, new):
            answer, finish = answers[i]
            judge = verdict.get(i)
            flags = {**F.instruction_flags(batch.cur[i], text, judge_equal=(judge == 0.0) if judge is not None else None,
                                           truncated=truncated and cfg.drop_truncated), **F.answer_flags(answer)}
            hit = [rule for rule in F.RULES if flags[rule]]
            batch.kept_per_round[i].append(0 if hit else 1)
            batch.trace[i][-1]["rule"] = hit[0] if hit else None
            if hit:
                batch.elim[i][hit[0]] += 1  # back to the pool unchanged
                continue
            batch.chain[i].append(op)
            batch.cur[i], batch.judge[i] = text, judge
            batch.records[i].append(_record(batch, i, text, r + 1, answer, finish, selector.name))


def _evolve_batch(cfg: GenerateConfig, batch: _Batch, selector, operator, rs: _Roles, dedup: F.Deduper) -> None:
    reviewer = rs.reviewer
    name = selector.name
    for t in range(cfg.steps):
        act = _choose(batch, selector, t)
        if not act:
            break
        idx = [i for i, _ in act]
        new = _rewrite(batch, selector, operator, act, t)
        verdict: dict[int, float | None] = {}
        replies: list[str] = []
        if reviewer is not None:
            got = reviewer.judge([batch.cur[i] for i in idx], [x for x, _, _ in new], seed=cfg.seed, replies=replies)
            for i, v in zip(idx, got):
                batch.charge(i, {"reviewer": 1})
                batch.unparseable[i]["reviewer"] += v is None
                verdict[i] = v
        reply = dict(zip(idx, replies))
        accepted = []
        for (i, op), (text, truncated, _) in zip(act, new):
            judge = verdict.get(i)
            flags = F.instruction_flags(batch.cur[i], text, judge_equal=(judge == 0.0) if judge is not None else None,
                                        truncated=truncated and cfg.drop_truncated)
            hit = [r for r in ("truncated", "no_gain", "template_copy") if flags[r]]
            entry = _trace(batch, i, t + 1, op, text, name, reply.get(i), judge, hit[0] if hit else None)
            if hit:
                batch.elim[i][hit[0]] += 1  # dropped: the seed continues from its previous instruction
                continue
            batch.open[i] = entry
            accepted.append((i, op, text, judge))
        if cfg.keep == "all":
            fresh = dedup.filter([dedup_text(text, batch.seeds[i].input) for i, _, text, _ in accepted])
            todo = []
            for (i, op, text, judge), dup in zip(accepted, fresh):
                batch.chain[i].append(op)
                batch.cur[i], batch.judge[i] = text, judge
                if dup:
                    batch.dups[i][dup] += 1
                    batch.open[i]["rule"] = f"duplicate_{dup}"
                else:
                    todo.append((i, text, t + 1))
            for i, text, step, answer, finish in _answer(rs, cfg, batch, todo):
                batch.records[i].append(_record(batch, i, text, step, answer, finish, name))
        else:
            for i, op, text, judge in accepted:
                batch.chain[i].append(op)
                batch.cur[i], batch.judge[i] = text, judge
    if cfg.keep == "final":
        cand = [i for i in range(len(batch.seeds)) if batch.chain[i]]
        fresh = dedup.filter([dedup_text(batch.cur[i], batch.seeds[i].input) for i in cand])
        todo = []
        for i, dup in zip(cand, fresh):
            if dup:
                batch.dups[i][dup] += 1
                batch.open[i]["rule"] = f"duplicate_{dup}"
            else:
                todo.append((i, batch.cur[i], len(batch.chain[i])))
        for i, text, step, answer, finish in _answer(rs, cfg, batch, todo):
            batch.records[i].append(_record(batch, i, text, step, answer, finish, name))


_EVOLVE = {"filtered": _evolve_batch, "paper": _evolve_batch_paper, "wizardlm": _evolve_batch_wizardlm}


def _progress_line(cfg: GenerateConfig, batch: _Batch, i: int) -> dict:
    line = {"seed_id": batch.seeds[i].id, "records": len(batch.records[i]), "eliminated": batch.elim[i],
            "duplicates": batch.dups[i], "queries": batch.queries[i], "ops": batch.chain[i],
            "stopped": batch.stopped[i], "unparseable": batch.unparseable[i]}
    if cfg.protocol == "wizardlm":
        line["kept_per_round"] = batch.kept_per_round[i]
    return line


def protocol_summary(cfg: GenerateConfig, progress: list[dict]) -> dict:
    """The protocol's own summary keys: its name, and for ``wizardlm`` the rounds and kept per round."""
    out: dict[str, Any] = {"protocol": cfg.protocol}
    if cfg.protocol == "wizardlm":
        out["rounds"] = cfg.rounds
        out["kept_per_round"] = [sum(p["kept_per_round"][r] for p in progress if len(p["kept_per_round"]) > r)
                                 for r in range(cfg.rounds)]
    return out


def protocol_settings(cfg: GenerateConfig) -> dict:
    """How the records were made, for the dataset card: the protocol, its length and the rewriting role."""
    length = {"rounds": cfg.rounds} if cfg.protocol == "wizardlm" else {"steps": cfg.steps, "keep": cfg.keep}
    return {"protocol": cfg.protocol, **length, "operator_role": cfg.operator_role}


def config_hash(cfg: GenerateConfig) -> str:
    """sha256 (16 hex digits) of the generate section alone."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def summarize(progress: list[dict], paid_by_role: dict[str, int] | None, selector: str, total_seeds: int) -> dict:
    """The stage summary from per-seed progress lines and the cache's paid rows (None: no cache)."""
    kept = sum(p["records"] for p in progress)
    queries = {r: sum(p["queries"].get(r, 0) for p in progress) for r in ROLES}
    # Paid = answers stored by this output dir (work of seeds killed mid-way included: it was paid);
    # replayed = queries answered from the cache.
    paid = dict(queries) if paid_by_role is None else {r: int(paid_by_role.get(r, 0)) for r in ROLES}
    replayed = {r: max(queries[r] - paid[r], 0) for r in ROLES}
    hist: dict[str, int] = {}
    for p in progress:
        for op in p["ops"]:
            hist[op] = hist.get(op, 0) + 1
    total = sum(queries.values())
    return {
        "selector": selector,
        "seeds": total_seeds,
        "seeds_done": len(progress),
        "kept": kept,
        "eliminated": {r: sum(p["eliminated"].get(r, 0) for p in progress) for r in F.RULES},
        "duplicates": {k: sum(p["duplicates"][k] for p in progress) for k in ("exact", "near")},
        "queries": queries,
        "queries_total": total,
        "paid": paid,
        "replayed": replayed,
        "queries_per_kept": total / kept if kept else None,
        "stopped_early": sum(bool(p.get("stopped")) for p in progress),
        # Replies the reviewer's parser could not read (scored Equal), by role.
        "unparseable": {"reviewer": sum(p.get("unparseable", {}).get("reviewer", 0) for p in progress)},
        "op_histogram": dict(sorted(hist.items())),
    }


def run_generate_stage(cfg: GenerateConfig, run_dir: str | Path, roles: Any = None, *, backends: dict | None = None,
                       log: Callable[[str], None] = print, selector: str | None = None,
                       out_dir: str | Path | None = None, max_queries: int | None = None,
                       run_baselines: bool = True, seeds: str | Path | None = None,
                       prompts: Prompts | None = None, fingerprint: str | None = None) -> dict:
    """Run the stage (resuming a killed run); returns the summary. See the module docstring.

    ``seeds``: the seed file (the pipeline's top-level ``seeds``; None: the bundled seeds);
    ``prompts``: the roles' wording (the pipeline's ``prompts:`` file, loaded; None: ours);
    ``fingerprint``: the config's hash for the dataset card (the pipeline passes the stage's marker
    fingerprint; None: :func:`config_hash` of ``cfg``)."""
    cfg.validate()
    if cfg.decontaminate != "off" and not found_tasks(cfg.decontaminate_benchmarks_dir):  # fail before paying
        raise DataError(f"generate.decontaminate_benchmarks_dir: no benchmark files in "
                        f"{cfg.decontaminate_benchmarks_dir} (layouts: teams_rl_jax.eval.tasks)")
    run_dir = Path(run_dir)
    name = selector or cfg.selector
    out = Path(out_dir) if out_dir is not None else run_dir / "data"
    budget = max_queries if max_queries is not None else cfg.max_queries
    seed_file, seeds = seeds, read_seeds(seeds, cfg.max_seeds)
    tag = str(out.relative_to(run_dir)) if out.is_relative_to(run_dir) else str(out)
    workers = cfg.worker is not None  # worker mode: no collectives, per-worker done markers
    gen = GenerateDir(out)
    if workers and worker_spec(cfg.worker, os.environ) is None:  # merge only
        count = _finished_count(gen)
        bk: dict = {}
        summary = _finish_workers(cfg, run_dir, roles, out, count, name, seeds, seed_file, tag, bk, fingerprint,
                                  log, time.perf_counter(), strict=True)
    else:
        summary = _evolve_shard(cfg, run_dir, roles, backends, out, name, seeds, seed_file, tag, budget, prompts,
                                fingerprint, log)

    if run_baselines and out_dir is None:
        for b in cfg.baselines:
            if b == name:
                continue
            bout = out / "baselines" / b
            if outputs_complete(bout):
                continue
            # Worker mode: a worker cannot wait for the others' total, so its baseline share gets its own
            # share's queries (the same seeds, the same budget, summed over the workers).
            run_generate_stage(cfg, run_dir, roles, backends=backends, log=log, selector=b, out_dir=bout,
                               max_queries=(summary.get("queries_this_worker") if workers
                                            else summary["queries_total"]) or None,
                               run_baselines=False, seeds=seed_file, prompts=prompts, fingerprint=fingerprint)
    return summary


def _evolve_shard(cfg: GenerateConfig, run_dir: Path, roles: Any, backends: dict | None, out: Path, name: str,
                  seeds: list, seed_file, tag: str, budget: int | None, prompts: Prompts | None,
                  fingerprint: str | None, log: Callable[[str], None]) -> dict:
    """Evolve this process's seeds into its shards, then merge (process 0, or the last worker)."""
    proc, count = _process(cfg)
    workers = cfg.worker is not None
    mine = [(i, s) for i, s in enumerate(seeds) if i % count == proc]
    gen = GenerateDir(out)
    shards = gen.shards
    shards.mkdir(parents=True, exist_ok=True)
    rec_path = gen.shard_records(proc)
    prog_path = gen.shard_progress(proc)
    kept, progress = recover(rec_path, prog_path)
    done = {p["seed_id"] for p in progress}
    trace_path = gen.shard_trace(proc)
    keep_seeds(trace_path, done, lambda e: e.get("seed_id"))
    todo = [(i, s) for i, s in mine if s.id not in done]

    bk = build_backends(cfg, roles, run_dir, backends, tag=tag, worker=proc if workers or count > 1 else None)
    sel = make_selector(name, cfg, run_dir, roles)
    if cfg.operator_role == "token_edit":
        operator = token_edit_operator(seeds, seed=cfg.seed, batch=cfg.batch_seeds)
    else:
        operator = LLMRewriter(bk[cfg.operator_role], max_new_tokens=max_new_tokens(roles, cfg.operator_role),
                               temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, prompts=prompts)
    rs = text_roles(bk, roles, prompts)
    dedup = F.Deduper(cfg.near_dup_threshold if cfg.protocol == "filtered" else None, cfg.encoder)
    dedup.add([dedup_text(r["instruction"], r.get("input", "")) for r in kept])
    if todo:
        log(f"[generate:{name}] {len(todo)} of {len(mine)} seeds to evolve ({len(done)} done before), "
            f"protocol {cfg.protocol}, {cfg.rounds if cfg.protocol == 'wizardlm' else cfg.steps} "
            f"{'rounds' if cfg.protocol == 'wizardlm' else 'steps'}, operator {cfg.operator_role}, roles {', '.join(bk) or 'none'}")

    records, prog, trace = AppendLog(rec_path), AppendLog(prog_path), AppendLog(trace_path)
    used = sum(sum(p["queries"].values()) for p in progress)
    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"generate:{name}", unit="seed",
               dynamic_ncols=True, disable=None if cfg.progress else True)
    t0, asked = time.perf_counter(), 0  # loop time only: setup (model loads, compiles of the env) excluded
    try:
        for start in range(0, len(todo), cfg.batch_seeds):
            if budget is not None and used >= budget:
                log(f"[generate:{name}] query budget {budget} reached after {used} queries; stopping")
                break
            chunk = todo[start:start + cfg.batch_seeds]
            batch = _Batch([s for _, s in chunk], [i for i, _ in chunk])
            _EVOLVE[cfg.protocol](cfg, batch, sel, operator, rs, dedup)
            for i, s in enumerate(batch.seeds):
                for r in batch.records[i]:
                    records.write(r)
                for e in batch.trace[i]:
                    trace.write(e)
                prog.write(_progress_line(cfg, batch, i))  # last: the seed is done
                q = sum(batch.queries[i].values())
                used += q
                asked += q
            bar.update(len(chunk))
            bar.set_postfix(q_per_s=f"{asked / max(time.perf_counter() - t0, 1e-9):.1f}")
    finally:
        bar.close()
        records.close()
        prog.close()
        trace.close()

    if workers:
        write_json_atomic(gen.shard_done(proc), {"worker": proc, "count": count})
        return _finish_workers(cfg, run_dir, roles, out, count, name, seeds, seed_file, tag, bk, fingerprint,
                               log, t0, strict=False, proc=proc)
    _merge(out, count, proc, dedup=cfg.protocol == "filtered")
    return _finish(cfg, roles, out, count, name, seeds, seed_file, tag, bk, fingerprint, log, t0, lead=proc == 0)


def _finished_count(gen: GenerateDir) -> int:
    """The worker count written in the done markers of ``gen`` (``--worker merge``)."""
    marks = sorted(gen.shards.glob("done.*.json"))
    if not marks:
        raise DataError(f"{gen.shards}: no finished workers (no done.*.json); run the workers first "
                        f"(generate.worker: I/N)")
    return int(json.loads(marks[0].read_text())["count"])


def _finish_workers(cfg: GenerateConfig, run_dir: Path, roles: Any, out: Path, count: int, name: str, seeds: list,
                    seed_file, tag: str, bk: dict, fingerprint: str | None, log: Callable[[str], None], t0: float,
                    strict: bool, proc: int | None = None) -> dict:
    """Worker mode: merge and finish once every worker's done marker is there (the last worker to
    finish does it; ``strict`` (``--worker merge``): a missing worker is an error). Under an exclusive
    lock, so two workers finishing together merge one after the other (the merge is idempotent)."""
    gen = GenerateDir(out)
    missing = [k for k in range(count) if not gen.shard_done(k).is_file()]
    own = _read_lines(gen.shard_progress(proc))[0] if proc is not None else []
    if missing:
        if strict:
            raise DataError(f"generate.worker: workers {', '.join(map(str, missing))} of {count} have not finished "
                            f"(no {gen.shard_done(missing[0]).name} in {gen.shards}); rerun them (finished seeds are kept)")
        log(f"[generate:{name}] worker {proc}/{count} done; waiting for workers {', '.join(map(str, missing))}: "
            f"the last one to finish merges (or run --worker merge)")
        part = summarize(own, None, name, len(seeds))
        part["queries_this_worker"] = part["queries_total"]
        return part
    if not bk and cfg.cache:  # --worker merge: the paid counts from every worker's cache file
        bk = {"_store": _CacheOnly(cache_store(cfg, run_dir, 0))}
    with open(gen.merge_lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _merge(out, count, 0, dedup=cfg.protocol == "filtered", sync=False)
            summary = _finish(cfg, roles, out, count, name, seeds, seed_file, tag, bk, fingerprint, log, t0,
                              lead=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    summary["queries_this_worker"] = sum(sum(p["queries"].values()) for p in own)
    return summary


@dataclasses.dataclass
class _CacheOnly:
    """Only the response cache (``--worker merge`` counts paid queries without building any role)."""

    cache: ResponseCache


def _finish(cfg: GenerateConfig, roles: Any, out: Path, count: int, name: str, seeds: list, seed_file, tag: str,
            bk: dict, fingerprint: str | None, log: Callable[[str], None], t0: float, lead: bool) -> dict:
    """After the merge: decontamination, the summary, and (``lead``) ``hf/`` then ``summary.json``."""
    shards = out / "shards"
    decontaminated = decontaminate(cfg, out, log) if lead else {}
    progress_all = [p for k in range(count) for p in _read_lines(shards / f"progress.{k:05d}.jsonl")[0]]
    caches = [b.cache for b in bk.values() if hasattr(b, "cache")]
    summary = summarize(progress_all, caches[0].paid_by_role(tag) if caches else None, name, len(seeds))
    summary.update(protocol_summary(cfg, progress_all))
    summary.update(decontaminated)
    summary["loop_seconds_this_run"] = round(time.perf_counter() - t0, 3)
    if lead:  # hf/ before summary.json: a finished output dir (summary written last) has its dataset
        ident = {r: public_identity(roles, r, b) for r, b in bk.items() if r in ROLES} or \
            {r: public_identity(roles, r) for r in needed_roles(cfg, roles)}
        prov = provenance(summary, seeds_file=None if seed_file is None else str(seed_file),
                          protocol=protocol_settings(cfg), roles=ident, fingerprint=fingerprint or config_hash(cfg))
        write_hf_dataset(GenerateDir(out).hf, _read_lines(out / "generated.jsonl")[0], prov)
        write_json_atomic(out / "summary.json", summary)
        log(f"[generate:{name}] kept {summary['kept']} instructions from {summary['seeds_done']} seeds; "
            f"eliminated {sum(summary['eliminated'].values())}, duplicates {sum(summary['duplicates'].values())}; "
            f"queries {summary['queries_total']} (paid {sum(summary['paid'].values())}, replayed "
            f"{sum(summary['replayed'].values())}) -> {out / 'generated.jsonl'}")
    return summary


def _merge(out: Path, count: int, proc: int, dedup: bool = True, sync: bool = True) -> None:
    """Process 0 merges the shard files into ``generated.jsonl`` (exact duplicates across shards dropped
    when ``dedup``: protocol filtered; the paper's and WizardLM's keep every record) and ``trace.jsonl``
    (every line). Rebuilt from the shards each time: merging twice writes the same files. ``sync``:
    wait for every jax process first (worker mode has no collectives: done markers instead)."""
    if count > 1 and sync:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("teams_rl_jax.generate.merge")
    if proc != 0:
        return
    seen: set[str] = set()
    rows = []
    for k in range(count):
        for r in _read_lines(out / "shards" / f"generated.{k:05d}.jsonl")[0]:
            key = F.normalize(dedup_text(r["instruction"], r.get("input", "")))
            if key not in seen or not dedup:
                seen.add(key)
                rows.append(r)
    write_jsonl_atomic(out / "generated.jsonl", rows)
    gen = GenerateDir(out)
    write_jsonl_atomic(gen.trace, [e for k in range(count) for e in _read_lines(gen.shard_trace(k))[0]])


def decontaminate(cfg: GenerateConfig, out: Path, log: Callable[[str], None]) -> dict:
    """``generate.decontaminate`` on the merged ``generated.jsonl`` (process 0, after :func:`_merge`).

    ``report``/``drop``: writes ``decontamination.json`` (see :mod:`teams_rl_jax.eval.decontaminate`)
    and returns the summary keys ``decontaminated`` ({task: contaminated records}) and
    ``decontamination`` (mode, n, records scanned, contaminated, dropped); ``drop`` also rewrites
    ``generated.jsonl`` without them. The merge rebuilds the file from the shards on every call, so a
    resumed run filters the same records the same way (``off``: returns {})."""
    if cfg.decontaminate == "off":
        return {}
    gen = GenerateDir(out)
    rows = _read_lines(gen.records)[0]
    rep, bad = decontamination_report(rows, cfg.decontaminate_benchmarks_dir, cfg.decontaminate_n)
    write_json_atomic(gen.decontamination, rep)
    dropped = len(bad) if cfg.decontaminate == "drop" else 0
    if dropped:
        write_jsonl_atomic(gen.records, [r for i, r in enumerate(rows) if i not in bad])
    log(f"[generate] decontamination ({cfg.decontaminate}, {cfg.decontaminate_n}-grams): {len(bad)} of "
        f"{len(rows)} records overlap a benchmark, {dropped} dropped -> {gen.decontamination}")
    return {"decontaminated": {t: b["contaminated_records"] for t, b in rep["benchmarks"].items()},
            "decontamination": {"mode": cfg.decontaminate, "n": cfg.decontaminate_n, "records_scanned": len(rows),
                                "contaminated_records": len(bad), "dropped": dropped}}


def read_summary(out: Path) -> dict:
    """``summary.json`` of a finished generate output dir."""
    return json.loads((out / "summary.json").read_text())
