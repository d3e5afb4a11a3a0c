"""The generate stage's trace (every step, kept or not) and the eval stage's dataset browser (issue 20).

Counting stub backends stand in for the LLM roles (as in tests/test_generate_protocols.py): the
instructor appends `` +`` to the instruction it is shown (and, for some seeds, HTML and ``</script>``
that must reach the page as text), the reviewer says Equal for some rewrites (rule ``no_gain``), the
expert says "Sorry." for some (rule ``sorry_short``). The page is opened in headless Chromium (skipped
only when no Chromium binary is found and ``CI`` is unset; in CI it must run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teams_rl_jax.backends.base import Completion, QueryCounter  # noqa: E402
from teams_rl_jax.eval.browse import PAGE_SEEDS, build_page, embed_json, page_data, write_browse  # noqa: E402
from teams_rl_jax.eval.config import EvalConfig, MIASection, ReportSection  # noqa: E402
from teams_rl_jax.eval.stage import run_eval_stage  # noqa: E402
from teams_rl_jax.evolve import GenerateConfig, run_generate_stage  # noqa: E402
from teams_rl_jax.evolve.records import AppendLog  # noqa: E402
from teams_rl_jax.layout import GenerateDir, RunLayout  # noqa: E402

N_SEEDS = 60
STEPS = 3
_TEXT = re.compile(r"(SEED\d+ [^\n]*)")
INJECT = ' <b class="injected">bold</b> </script><script>window.__report("broke out")</script>'


def _h(s: str) -> int:
    return zlib.crc32(s.encode())


class Stub:
    """One role's counting backend: ``reply(content) -> str``; ``fail_at``: raise on that call (a kill)."""

    def __init__(self, role, reply, fail_at=None):
        self.role, self.model, self.counter = role, f"stub-{role}", QueryCounter()
        self.reply, self.seen, self.calls, self.fail_at = reply, 0, 0, fail_at

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("killed")
        self.counter.add(self.role, len(prompts))
        self.seen += len(prompts)
        return [Completion(self.reply(p[-1]["content"])) for p in prompts]

    def score(self, prompts, continuations):
        raise NotImplementedError


def grow(content: str) -> str:
    text = _TEXT.search(content).group(1).strip()
    text = text.replace(INJECT, "")
    return text + " +" + (INJECT if text.startswith(("SEED0 ", "SEED5 ")) else "")


def reviewer(content: str) -> str:
    return "Equal" if _h(content) % 4 == 0 else "Not Equal"


def expert(content: str) -> str:
    return "Sorry." if _h(content) % 5 == 0 else f"A careful, complete answer to [{content.strip()[:40]}], with reasons."


def stubs(fail_at=None) -> dict:
    return {"instructor": Stub("instructor", grow, fail_at), "reviewer": Stub("reviewer", reviewer),
            "expert": Stub("expert", expert)}


def _seeds(tmp_path: Path) -> str:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{k}", "instruction": f"SEED{k} explain topic {k}.", "input": ""})
                            + "\n" for k in range(N_SEEDS)))
    return str(path)


def _cfg(**kw) -> GenerateConfig:
    base = dict(selector="random", batch_seeds=8, steps=STEPS, rounds=STEPS, near_dup_threshold=None, baselines=(),
                cache=False, progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def _generate(tmp_path: Path, bk: dict, **kw) -> dict:
    return run_generate_stage(_cfg(**kw), tmp_path / "run", backends=bk, log=lambda m: None, seeds=_seeds(tmp_path))


def _trace(tmp_path: Path) -> list[dict]:
    path = GenerateDir(tmp_path / "run" / "data").trace
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("protocol,keep", [("filtered", "all"), ("filtered", "final"), ("paper", "all"),
                                           ("wizardlm", "all")])
def test_trace_has_every_step_kept_and_eliminated(tmp_path, protocol, keep):
    """One trace line per rewrite (= instructor query) of every seed, steps 1..STEPS each; every rule that
    dropped a step is on its line and the rule counts equal the summary's eliminations; the reviewer's
    raw reply and verdict are there when it was asked (never in ``paper``); kept answered steps =
    records.

    Mutations that fail it: the trace not written for eliminated steps (a ``continue`` before
    ``_trace``), a rule not recorded (``rule`` left None in ``_answer`` or in the wizardlm loop), the
    reviewer reply not collected (``replies=`` dropped), the trace shard not merged.
    """
    bk = stubs()
    s = _generate(tmp_path, bk, protocol=protocol, keep=keep)
    tr = _trace(tmp_path)
    assert len(tr) == bk["instructor"].seen == N_SEEDS * STEPS
    steps = {}
    for e in tr:
        steps.setdefault(e["seed_id"], []).append(e["step"])
        assert e["selector"] == "random" and e["op"] and e["instruction"] and e["before"]
    assert len(steps) == N_SEEDS and all(v == list(range(1, STEPS + 1)) for v in steps.values()), steps
    rules = Counter(e["rule"] for e in tr if e["rule"] is not None)
    elim = {k: v for k, v in s["eliminated"].items() if v}
    dups = {f"duplicate_{k}": v for k, v in s["duplicates"].items() if v}
    assert rules == Counter({**elim, **dups}), (rules, s["eliminated"], s["duplicates"])
    kept_answered = [e for e in tr if e["rule"] is None and e["answer"] is not None]
    assert len(kept_answered) == s["kept"]
    if keep == "final":  # one answer per seed that kept a step, on its last kept step
        last = {}
        for e in tr:
            if e["rule"] not in ("truncated", "no_gain", "template_copy"):
                last[e["seed_id"]] = e
        assert [e for e in tr if e["answer"] is not None] == [e for e in tr if last.get(e["seed_id"]) is e]
    if protocol == "paper":
        assert not rules and all(e["reviewer_reply"] is None and e["verdict"] is None for e in tr)
    else:
        assert rules["no_gain"] > 0 and rules["sorry_short"] > 0, rules
        assert bk["reviewer"].seen == len(tr)
        for e in tr:
            assert e["reviewer_reply"] in ("Equal", "Not Equal")
            assert e["verdict"] == (0.0 if e["reviewer_reply"] == "Equal" else 1.0)
            if e["reviewer_reply"] == "Equal":
                assert e["rule"] == "no_gain"
        sorry = [e for e in tr if e["rule"] == "sorry_short"]
        assert all(e["answer"] == "Sorry." for e in sorry)
        # a step an instruction rule dropped (wizardlm: any rule) leaves the seed where it was; in filtered
        # an answer rule drops the record only, the chain goes on from the rewrite
        back = set(s["eliminated"]) if protocol == "wizardlm" else {"truncated", "no_gain", "template_copy"}
        for a, b in zip(tr, tr[1:]):
            if a["seed_id"] == b["seed_id"]:
                assert b["before"] == (a["before"] if a["rule"] in back else a["instruction"]), (a, b)


def test_resumed_trace_has_each_step_once(tmp_path):
    """Killed mid-run (the instructor raises in the third batch), with a torn trace line and a line of an
    unfinished seed left in the shard, then rerun: ``trace.jsonl`` equals one uninterrupted run's.

    Mutation that fails it: no :func:`keep_seeds` on the trace shard at start (the unfinished seed's line
    is doubled, the torn line swallows the next one).
    """
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _generate(tmp_path / "a", stubs())
    want = _trace(tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        _generate(tmp_path / "b", stubs(fail_at=2 * STEPS + 2))
    gen = GenerateDir(tmp_path / "b" / "run" / "data")
    shard = gen.shard_trace(0)
    before = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(before) == 2 * 8 * STEPS  # two batches of 8 seeds finished
    log = AppendLog(shard)
    log.write(dict(want[-1]))  # a seed killed between its trace and its progress line
    log.write_partial(want[-2])  # and a torn write
    log.close()
    _generate(tmp_path / "b", stubs())
    assert _trace(tmp_path / "b") == want


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _chrome(binary: str, url: str, tmp: Path, *extra: str) -> str:
    profile = tmp / "chrome-profile"
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=3000", *extra, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _count(dom: str, cls: str) -> int:
    return len(re.findall(rf'class="{cls}[" ]', dom))


def _ready(dom: str) -> None:
    assert 'data-ready="1"' in dom, dom[-3000:]
    m = re.search(r'<div id="errors">(.*?)</div>', dom, re.S)
    assert m is not None and m.group(1).strip() == "", m and m.group(1)[:2000]


def test_browser_page_in_chromium(tmp_path):
    """The eval stage writes ``eval/browse.html`` from a real generate trace (with the report's PNGs);
    Chromium renders it: page 1 shows PAGE_SEEDS seeds, ``#page=2`` the rest, a filter from the hash
    (op + rule) exactly the seeds that have such a step, no script error; the injected HTML shows as text
    (no ``.injected`` element) and ``</script>`` in the data does not break out; a screenshot is written.

    Mutations that fail it: the filter ignored in ``seedMatches`` (same count as unfiltered), paging
    off (60 seeds on page 1), a cell filled with ``innerHTML`` (a ``b.injected`` element appears), the
    ``<`` escape removed from :func:`embed_json` (the data tag closes early: JSON error and the
    injected script reports "broke out"), a JS typo (the errors div is not empty / not ready).
    """
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI: no chromium binary found (.ci/run installs it)")
        pytest.skip("no chromium binary on PATH (install Debian's chromium); CI runs this test")
    _generate(tmp_path, stubs())
    run = RunLayout(tmp_path / "run")
    rep = run_eval_stage(EvalConfig(report=ReportSection(encoder="none", compare=()), mia=MIASection(enabled=False)),
                         run.root, log=lambda m: None)
    assert rep["datasets"]
    page = run.eval.browse
    text = page.read_text()
    assert "<img" in text and "data:image/png;base64," in text  # the report's plots ride along
    assert "http://" not in text and "https://" not in text  # self-contained
    tr = _trace(tmp_path)

    dom = _chrome(binary, page.as_uri(), tmp_path, "--dump-dom")
    _ready(dom)
    assert _count(dom, "seed") == PAGE_SEEDS
    assert '<b class="injected">' not in dom and '&lt;b class="injected"&gt;' in dom

    dom2 = _chrome(binary, page.as_uri() + "#page=2", tmp_path, "--dump-dom")
    _ready(dom2)
    assert _count(dom2, "seed") == N_SEEDS - PAGE_SEEDS

    op = Counter(e["op"] for e in tr if e["rule"] == "no_gain").most_common(1)[0][0]
    want = {e["seed_id"] for e in tr if e["op"] == op and e["rule"] == "no_gain"}
    assert 0 < len(want) < N_SEEDS
    dom3 = _chrome(binary, page.as_uri() + f"#op={op}&rule=no_gain", tmp_path, "--dump-dom")
    _ready(dom3)
    assert _count(dom3, "seed") == len(want)
    assert _count(dom3, "step dropped match") == sum(e["op"] == op and e["rule"] == "no_gain" for e in tr)

    shot = tmp_path / "shot.png"
    _chrome(binary, page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_large_trace_builds_fast_and_escapes(tmp_path):
    """20,000 synthetic steps (4,000 seeds x 5) build into one page in a few seconds; the embedded JSON
    round-trips and holds no ``</script`` or ``<`` at all; Chromium (when found) renders its last page.

    Mutations that fail it: the ``<`` escape removed (``</script`` found in the data), a step lost in
    :func:`page_data` (counts differ), no trace -> a page written anyway.
    """
    assert write_browse([tmp_path / "missing.jsonl"], tmp_path / "none.html") is None
    assert not (tmp_path / "none.html").exists()
    ops = ["deepening", "breadth", "concretizing", "add_constraints", "complicate_input"]
    steps = [{"seed_id": f"s{k}", "step": t + 1, "op": ops[(k + t) % 5], "before": f"seed {k} </script>",
              "instruction": f"instruction {k}.{t} <script>alert(1)</script> " + "x" * 100,
              "reviewer_reply": "Not Equal", "verdict": 1.0, "rule": None if (k + t) % 3 else "no_gain",
              "answer": "answer " * 20, "selector": "random"} for k in range(4000) for t in range(5)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(e) + "\n" for e in steps))
    t0 = time.perf_counter()
    info = write_browse([trace], tmp_path / "browse.html")
    dt = time.perf_counter() - t0
    assert info["steps"] == 20_000 and info["seeds"] == 4000
    assert dt < 10, dt
    html = (tmp_path / "browse.html").read_text()
    assert info["bytes"] < 20_000_000, info
    data = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', html, re.S).group(1)
    assert "<" not in data
    got = json.loads(data)
    assert got == json.loads(embed_json(page_data(steps)))
    assert sum(len(s["steps"]) for s in got["seeds"]) == 20_000
    assert got["seeds"][0]["steps"][0]["instruction"].startswith("instruction 0.0 <script>")
    assert build_page(steps[:5]).count("</script>") == 3  # the three script tags, nothing from the data
    binary = _chromium()
    if binary is not None:  # the big page renders its last page (the Chromium test covers the rest)
        dom = _chrome(binary, (tmp_path / "browse.html").as_uri() + "#page=80", tmp_path, "--dump-dom")
        _ready(dom)
        assert _count(dom, "seed") == PAGE_SEEDS and "page 80 of 80" in dom
