"""demo.py: the whole pipeline on a very small setting (the full demo is not a test), its reproducibility,
and the bootstrap interval it reports."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from demo import bootstrap_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "12", "--prompts-per-length", "2", "--eval-lengths", "100,400", "--short-cap", "200",
        "--long-cap", "400", "--pair-instructions", "4", "--pair-samples", "3", "--dpo-steps", "2", "--slots", "4"]


def demo(out, *extra):
    run = subprocess.run([sys.executable, "demo.py", "--out", str(out), *TINY, *extra], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def results_part(stdout):
    """What the demo prints from its results on: the table and the conclusion (no timings, no paths)."""
    return "\n".join(l for l in stdout[stdout.index("| asked (words)"):].splitlines() if not l.startswith("scatter plot:"))


def test_the_demo_pipeline_runs_end_to_end_and_leaves_every_artifact(tmp_path):
    out = tmp_path / "demo"
    stdout = demo(out)
    for name in ("data/short/train.jsonl", "data/short+long.jsonl", "data/tokenizer/tokenizer.json",
                 "sft-a/latest", "sft-b/latest", "pred-a.jsonl", "pred-b.jsonl", "pairs.jsonl", "lengths.svg",
                 "scores.json"):
        assert (out / name).exists(), name
    scores = json.load(open(out / "scores.json"))
    assert set(scores["models"]) >= {"a", "b"} and "S_l" in scores
    table = results_part(stdout)
    assert "| 100 " in table and "| 400 " in table and "| all " in table and "| <= 400 " in table
    # the closing sentences are derived from the numbers in the table
    words_a = scores["models"]["a"]["> 200"]["words"]
    assert f"{words_a[0]:.1f} [{words_a[1]:.1f}, {words_a[2]:.1f}]" in scores["conclusion"]
    assert scores["conclusion"] in stdout
    # pairs came from instructions whose lengths the evaluation never asks
    pair_lengths = {json.loads(l)["length"] for l in open(out / "pair-instructions.jsonl")}
    assert pair_lengths and not pair_lengths & {100, 400}


def test_the_same_command_prints_the_same_table_and_a_rerun_reuses_it(tmp_path):
    first = results_part(demo(tmp_path / "one"))
    assert results_part(demo(tmp_path / "two")) == first  # every stage seeded, no thread decides anything
    before = (tmp_path / "one" / "pred-b.jsonl").read_text()
    assert results_part(demo(tmp_path / "one")) == first  # finished stages are reused, not redone
    assert (tmp_path / "one" / "pred-b.jsonl").read_text() == before
    run = subprocess.run([sys.executable, "demo.py", "--out", str(tmp_path / "one"), *TINY, "--seed", "1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "--seed 0 -> 1" in run.stderr and "--overwrite" in run.stderr


def test_the_bootstrap_interval_covers_a_known_case():
    # 200 zeros and 200 hundreds: mean 50, standard error 50 / sqrt(400) = 2.5, so 95% is about 50 +- 4.9
    mean, low, high = bootstrap_ci([0] * 200 + [100] * 200)
    assert mean == 50 and low == pytest.approx(50 - 1.96 * 2.5, abs=0.6) and high == pytest.approx(50 + 1.96 * 2.5, abs=0.6)
    assert bootstrap_ci([7.0] * 5) == (7.0, 7.0, 7.0)  # no spread, no width
    assert bootstrap_ci(np.arange(10)) == bootstrap_ci(np.arange(10))  # seeded
