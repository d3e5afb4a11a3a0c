"""``python -m teams_rl_jax.train`` end to end, and the generate stage against the project's own server.

The default suite runs a scaled-down pipeline (every stage, all four artifacts, rerun skips finished
stages); ``-m slow`` runs the real offline default (no arguments) and the wheel/package-data check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "policy.num_updates=3", "--set", "policy.num_envs=16", "--set", "generate.max_seeds=16",
         "--set", "generate.batch_seeds=16", "--set", "sft.max_steps=6", "--set", "sft.checkpoint.every=3",
         "--set", "eval.mia.max_examples=8", "--set", "generate.near_dup_threshold=null",
         "--set", "eval.report.encoder=none", "--set", "sft.tensorboard=false"]


def _train(run_dir: Path, *args: str, timeout: int = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "teams_rl_jax.train", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def _check_artifacts(run: Path, min_records: int) -> list[dict]:
    """The four things the pipeline must leave."""
    assert (run / "policy" / "checkpoint").is_dir() and (run / "policy" / "policy.json").is_file()
    recs = [json.loads(x) for x in (run / "data" / "generated.jsonl").read_text().splitlines()]
    assert len(recs) >= min_records
    for r in recs:
        m = r["meta"]
        assert r["instruction"] and r["output"] and m["seed_id"] and m["ops"] and m["selector"] == "policy"
        assert m["queries"]["expert"] >= 1
    # exact duplicates are filtered (instruction + Alpaca input: records sharing an instruction with
    # different inputs are different examples)
    distinct = {(r["instruction"].lower(), r["input"].lower()) for r in recs}
    assert len(distinct) == len(recs)
    summary = json.loads((run / "data" / "summary.json").read_text())
    assert summary["kept"] == len(recs) and summary["queries"]["expert"] == sum(summary["paid"].values()) + \
        sum(summary["replayed"].values())
    assert (run / "data" / "baselines" / "random" / "summary.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "hf")
    tok = AutoTokenizer.from_pretrained(run / "sft" / "hf")
    assert model.config.vocab_size >= len(tok)
    assert (run / "eval" / "report.json").is_file()
    return recs


@pytest.mark.slow
def test_small_pipeline_end_to_end(tmp_path):
    """policy -> generate -> sft -> eval leave their artifacts; a rerun skips all; --force redoes one.

    Catches: a stage reading something other than earlier artifacts, the SFT stage falling back to the
    demo set although generate ran (records would not be the generated ones), stages rerun when complete.
    """
    run = tmp_path / "run"
    p = _train(run, *SMALL)
    assert p.returncode == 0, p.stderr[-4000:]
    _check_artifacts(run, min_records=8)
    assert "small-scale offline run" in p.stdout and str(run / "data" / "generated.jsonl") in p.stdout
    assert "PyTorch was not found" not in p.stdout + p.stderr
    assert f"[sft] {run / 'data' / 'generated.jsonl'}:" in p.stdout  # SFT trained on the generated file
    q = _train(run, *SMALL)
    assert q.returncode == 0, q.stderr[-3000:]
    assert all(f"[{s}] complete in" in q.stdout for s in ("policy", "generate", "sft", "eval")), q.stdout
    r = _train(run, *SMALL, "--stages", "eval", "--force")
    assert r.returncode == 0 and "[eval] complete" not in r.stdout, r.stderr[-3000:]
    s = _train(run, *SMALL, "--set", "generate.steps=2")
    assert s.returncode == 2 and "generate" in s.stderr and "--force" in s.stderr, s.stderr


def test_generate_through_own_serve_openai_backend(tmp_path):
    """Instructor, reviewer and expert are the project's `serve` on loopback, through the openai backend.

    Catches: prompts/answers lost between the stage and an HTTP backend, queries miscounted over HTTP.
    """
    from teams_rl_jax.backends.config import RoleConfig, RolesConfig
    from teams_rl_jax.evolve import GenerateConfig, run_generate_stage
    from teams_rl_jax.demo import tiny_expert

    ckpt = tiny_expert(tmp_path)
    port = helpers.free_port()
    server = subprocess.Popen([sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(ckpt), "--port",
                               str(port), "--dtype", "float32", "--log-level", "warning"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        import httpx

        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.time() < deadline, "server did not come up"
            time.sleep(1)
        role = RoleConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model=ckpt.name,
                          max_concurrency=8, timeout_s=120, max_retries=1)
        roles = RolesConfig(instructor=dataclasses.replace(role, max_new_tokens=16), reviewer=role,
                            expert=dataclasses.replace(role, max_new_tokens=12))
        cfg = GenerateConfig(selector="random", operator_role="instructor", max_seeds=4, steps=2, batch_seeds=4,
                             near_dup_threshold=None, baselines=(),
                             progress=False, drop_truncated=False)  # a random model never stops: keep its rewrites
        s = run_generate_stage(cfg, tmp_path, roles, log=lambda m: None)
        assert s["seeds_done"] == 4
        assert s["queries"]["instructor"] == 8 and s["queries"]["reviewer"] == 8  # 4 seeds x 2 steps
        assert s["queries"]["expert"] == s["kept"] + s["eliminated"]["sorry_short"] + s["eliminated"]["stopwords_only"]
        assert s["kept"] > 0 and s["queries"]["expert"] > 0
        # fresh cache: a repeated identical request (same text, same op) is replayed, never paid twice
        assert all(s["paid"][r] + s["replayed"][r] == s["queries"][r] for r in s["queries"])
        recs = [json.loads(x) for x in (tmp_path / "data" / "generated.jsonl").read_text().splitlines()]
        assert len(recs) == s["kept"] and all(r["output"] and r["meta"]["queries"]["instructor"] for r in recs)
        again = run_generate_stage(cfg, tmp_path, roles, log=lambda m: None, out_dir=tmp_path / "again")
        assert again["queries"] == s["queries"] and sum(again["paid"].values()) == 0  # all replayed
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # the real default pipeline, twice (~4.5 min); .ci/run also runs it as the main job
@pytest.mark.timeout(1200)
def test_default_pipeline_no_arguments(tmp_path):
    """The real offline default, `python -m teams_rl_jax.train` with no config from another directory
    (~2-2.5 min on 2 idle cores), leaves the four artifacts; a rerun skips every finished stage.

    Catches: a default config or seed set that is not package data, SFT not reading the generated file,
    a stage rerun although complete, library noise in the output.
    """
    t0 = time.time()
    run = tmp_path / "run"
    p = _train(run, timeout=1100, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    recs = _check_artifacts(run, min_records=100)
    assert len({r["meta"]["seed_id"] for r in recs}) >= 90
    assert f"[sft] {run / 'data' / 'generated.jsonl'}:" in p.stdout
    assert "small-scale offline run" in p.stdout and "PyTorch was not found" not in p.stdout + p.stderr
    print(f"default pipeline: {time.time() - t0:.0f} s, {len(recs)} records")
    q = _train(run, timeout=600, cwd=tmp_path)
    assert q.returncode == 0 and all(f"[{s}] complete in" in q.stdout for s in ("policy", "generate", "sft", "eval"))


@pytest.mark.slow
def test_wheel_contains_default_config_and_seeds(tmp_path):
    """A non-editable install needs the default config and the seeds as package data."""
    import zipfile

    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "teams_rl_jax/data/seeds.jsonl" in names
    assert "teams_rl_jax/configs/default.yaml" in names
