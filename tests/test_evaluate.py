"""evaluate.py: the benchmark's scores computed by hand, judge parsing, the judge path, report, predict."""
import json
import os
import subprocess
import sys

import pytest
import torch

from chat_server import ChatServer
from dataset import build_tokenizer, count_words
from evaluate import (DIMENSIONS, ChatClient, judge_all, length_score, parse_judge, quality_score, report, ruler,
                      summary)
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "longbench-write")


@pytest.mark.parametrize("required,produced,expected", [
    (100, 100, 100.0), (100, 0, 0.0), (1000, 500, 50.0), (100, 50, 50.0), (1000, 333, 0.0), (1000, 400, 25.0),
    (100, 200, 100 * (1 - 1 / 3)), (100, 400, 0.0), (100, 1000, 0.0), (200, 250, 100 * (1 - 0.25 / 3)),
])
def test_length_score_equals_the_hand_computed_value(required, produced, expected):
    assert length_score(required, produced) == pytest.approx(expected)


def test_count_words_follows_the_benchmark_rule():
    assert count_words("写一篇1000字的中国旅游指南") == 11  # Chinese characters, digits not counted
    assert count_words("Write a 1000-word China travel guide") == 6


FULL = {d: 4 for d in DIMENSIONS}


@pytest.mark.parametrize("text,expected", [
    (json.dumps(FULL), FULL),
    ("Reasoning here.\n```json\n" + json.dumps({**FULL, "Clarity": 5}) + "\n```\nThanks", {**FULL, "Clarity": 5}),
    ("Scores: " + json.dumps({k.lower(): f"{v}/5" for k, v in FULL.items()}) + " done.", FULL),
    (str({k: 3 for k in DIMENSIONS}), {k: 3 for k in DIMENSIONS}),  # single quotes
    ("Example: " + json.dumps({k: 1 for k in DIMENSIONS}) + "\nVerdict: " + json.dumps(FULL), FULL),
    (json.dumps({k: 4 for k in DIMENSIONS[:5]}), None),               # a dimension missing
    (json.dumps({**FULL, "Accuracy": 6}), None),                       # out of range
    ("no json at all", None),
])
def test_judge_scores_are_extracted_from_messy_answers(text, expected):
    got = parse_judge(text)
    assert got == (None if expected is None else {k: float(v) for k, v in expected.items()})


def preds_file(path, rows):
    path.write_text("".join(json.dumps({"index": i, **r}) + "\n" for i, r in enumerate(rows)))
    return str(path)


PREDS = [  # required, produced -> S_l by hand: 100, 50, 100*(1-1/3), 0
    {"prompt": "Write 100 words", "type": "A", "length": 100, "response": "x", "response_length": 100},
    {"prompt": "Write 1000 words", "type": "A", "length": 1000, "response": "x", "response_length": 500},
    {"prompt": "写3000字", "type": "B", "length": 3000, "response": "x", "response_length": 6000},
    {"prompt": "Write 10000 words", "type": "B", "length": 10000, "response": "", "response_length": 0},
]


def test_the_quality_path_against_a_scripted_judge(tmp_path):
    asked = {}

    def judge(content):  # prediction 1's first verdict misses a dimension; prediction 3 never answers well
        n = asked[content] = asked.get(content, 0) + 1
        if "Write 1000 words" in content and n == 1:
            return json.dumps({k: 5 for k in DIMENSIONS[:5]})
        if "Write 10000 words" in content:
            return "I refuse to score."
        score = 5 if "Write 100 words" in content else 3
        return "Fine.\n```json\n" + json.dumps({k: score for k in DIMENSIONS}) + "\n```"
    server = ChatServer(judge)
    preds = [{"index": i, **p} for i, p in enumerate(PREDS)]
    client = ChatClient(server.url, "judge", "", timeout=5, max_retries=1, backoff=0.01)
    judged = judge_all(client, preds, str(tmp_path / "j.jsonl"), log=lambda s: None)
    assert sorted(judged) == [0, 1, 2]
    # S_q: each dimension's mean over (5, 3, 3) is 11/3 -> (11/3 - 1) * 25
    assert summary(preds, judged)["S_q"] == pytest.approx((11 / 3 - 1) * 25)
    assert quality_score([judged[0]]) == 100.0
    lines = [json.loads(l) for l in open(tmp_path / "j.jsonl")]
    assert {l["index"]: l.get("failed") for l in lines}[3] == "no parseable scores"
    calls = len(server.calls)
    judge_all(client, preds[:3], str(tmp_path / "j.jsonl"), log=lambda s: None)  # resumed: nothing to ask
    assert len(server.calls) == calls
    server.close()


def test_report_numbers_on_a_file_with_known_scores(tmp_path):
    path = preds_file(tmp_path / "pred.jsonl", PREDS)
    (tmp_path / "pred.jsonl.judged.jsonl").write_text(
        "".join(json.dumps({"index": i, "scores": {d: s for d in DIMENSIONS}}) + "\n" for i, s in enumerate([5, 3, 1])))
    lines = []
    out = report([path], plot=str(tmp_path / "plot.svg"), log=lines.append)
    s_l = (100 + 50 + 100 * (1 - 1 / 3) + 0) / 4
    s_q = (3 - 1) * 25  # mean score 3 over the three judged predictions
    assert out["S_l"] == pytest.approx(s_l) and out["S_q"] == pytest.approx(s_q) and out["S"] == pytest.approx((s_l + s_q) / 2)
    b = out["files"][path]
    assert b["length"]["[0,500)"]["S_l"] == 100 and b["length"]["[500,2000)"]["S_l"] == 50
    assert b["length"]["[4000,20000)"]["S_l"] == 0 and b["length"]["[4000,20000)"]["judged"] == 0
    assert b["language"]["zh"]["n"] == 1 and b["type"]["B"]["S_l"] == pytest.approx(100 * (1 - 1 / 3) / 2)
    assert "S_l [2000,4000)" in lines[0] and "66.7" in lines[0]
    svg = open(tmp_path / "plot.svg").read()
    assert svg.startswith("<svg") and svg.count("<circle") == 4 + 1  # four points and one legend mark


def test_side_by_side_report_of_two_files(tmp_path):
    a = preds_file(tmp_path / "a.jsonl", PREDS)
    b = preds_file(tmp_path / "b.jsonl", [{**p, "response_length": p["length"]} for p in PREDS])
    lines = []
    out = report([a, b], log=lines.append)
    table = lines[0].splitlines()
    assert table[2].startswith("| a.jsonl") and table[3].startswith("| b.jsonl") and "100.0" in table[3]
    assert out["files"][b]["overall"]["S_l"] == 100.0


def test_ruler_reports_length_per_requested_length_and_language():
    preds = [{"prompt": "Write 1000 words", "length": 1000, "response_length": 900},
             {"prompt": "Write 1000 words", "length": 1000, "response_length": 1100},
             {"prompt": "写1000字", "length": 1000, "response_length": 700},
             {"prompt": "Write 2000 words", "length": 2000, "response_length": 1500}]
    r = ruler(preds)
    assert r["en"][1000] == {"mean_length": 1000, "max_length": 1100, "n": 2}
    assert r["zh"][1000]["mean_length"] == 700 and r["en"][2000]["max_length"] == 1500


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/longbench-write is not beside the checkout")
def test_the_benchmark_files_are_read_by_path():
    from evaluate import read_rows
    rows = read_rows(os.path.join(SHARED, "longbench_write.jsonl"))
    assert len(rows) == 120 and all({"prompt", "type", "length"} <= set(r) for r in rows)
    assert len(read_rows(os.path.join(SHARED, "longwrite_ruler.jsonl"))) == 48


def test_predict_with_a_tiny_local_checkpoint_end_to_end(tmp_path):
    build_tokenizer(str(tmp_path / "ckpt"), ["write a word essay about the sea ."])
    from dataset import load_tokenizer
    tok = load_tokenizer(str(tmp_path / "ckpt"))
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(tmp_path / "ckpt")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the sea .", "type": "T", "length": n})
                             + "\n" for n in (100, 200, 300)))
    cmd = [sys.executable, "evaluate.py", "predict", str(bench), "--checkpoint", str(tmp_path / "ckpt"), "--output",
           str(tmp_path / "pred.jsonl"), "--max-new-tokens", "30", "--batch-size", "2", "--out", str(tmp_path / "s.json")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    preds = [json.loads(l) for l in open(tmp_path / "pred.jsonl")]
    assert sorted(p["index"] for p in preds) == [0, 1, 2]
    assert all(p["response_length"] == count_words(p["response"]) and p["type"] == "T" for p in preds)
    assert "S_l" in json.load(open(tmp_path / "s.json"))
    before = open(tmp_path / "pred.jsonl").read()
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    assert open(tmp_path / "pred.jsonl").read() == before  # resumed: nothing redone
    run = subprocess.run([sys.executable, "evaluate.py", "length", str(tmp_path / "pred.jsonl"), "--out",
                          str(tmp_path / "l.json")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and set(json.load(open(tmp_path / "l.json"))) >= {"S_l", "n"}


def test_a_bad_prediction_file_names_its_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"index": 0, "prompt": "p", "length": 10, "response_length": 3}) + "\n{\"index\": 1}\n")
    run = subprocess.run([sys.executable, "evaluate.py", "length", str(f)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "p.jsonl:2: missing field 'prompt'" in run.stderr and "Traceback" not in run.stderr
