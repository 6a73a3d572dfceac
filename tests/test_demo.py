"""demo.py: the whole pipeline on a very small setting (the full demo is not a test)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_demo_pipeline_runs_end_to_end_and_leaves_every_artifact(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--steps", "12", "--prompts-per-length", "1",
                          "--eval-lengths", "100,400", "--short-cap", "200", "--long-cap", "400",
                          "--pair-instructions", "4", "--pair-samples", "3", "--dpo-steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("data/short/train.jsonl", "data/short+long.jsonl", "data/tokenizer/tokenizer.json",
                 "sft-a/latest", "sft-b/latest", "pred-a.jsonl", "pred-b.jsonl", "pairs.jsonl", "lengths.svg",
                 "scores.json"):
        assert (out / name).exists(), name
    scores = json.load(open(out / "scores.json"))
    assert set(scores["models"]) >= {"a", "b"} and "S_l" in scores
    table = run.stdout[run.stdout.index("| asked (words)"):]
    assert "| 100 " in table and "| 400 " in table and "| all " in table
    # the closing sentence is derived from the numbers in the table
    mean_a = max(scores["models"]["a"][n]["mean"] for n in ("100", "400"))
    assert f"{mean_a:.0f} words" in scores["conclusion"] and scores["conclusion"] in run.stdout
