"""evaluate.py: the benchmark's scores computed by hand, judge parsing, the judge path, report, predict."""
import json
import os
import subprocess
import sys

import pytest
import torch

from chat_server import ChatServer
from cli import run_cli
from dataset import build_tokenizer, count_words
from evaluate import (DIMENSIONS, JUDGE_PROMPT, ChatClient, answer_sha, breakdown, judge_all, judge_prompt, length_score,
                      parse_judge, quality_score, read_preds, read_rows, report, ruler, summary, table)
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
    # the failure quotes what the judge wrote, so that a user can see why it was unreadable
    assert {l["index"]: l.get("failed") for l in lines}[3] == "no parseable scores; the last verdict began 'I refuse to score.'"
    calls = len(server.calls)
    judge_all(client, preds[:3], str(tmp_path / "j.jsonl"), log=lambda s: None)  # resumed: nothing to ask
    assert len(server.calls) == calls
    server.close()


def test_verdicts_count_only_for_the_answers_and_the_judge_they_were_given_for(tmp_path):
    """Keyed by index alone, the verdicts of answers replaced by `predict --overwrite` (or of another judge)
    were reused for the new ones without a call: S_q of the old answers, reported for the new."""
    server = ChatServer(lambda c: json.dumps({k: 5 if "good" in c else 1 for k in DIMENSIONS}))
    jp, lines = str(tmp_path / "p.judged.jsonl"), []
    client = lambda model: ChatClient(server.url, model, "", timeout=5, max_retries=0)
    old = [{"index": 0, "prompt": "Write 10 words", "length": 10, "response": "bad " * 10, "response_length": 10}]
    new = [{**old[0], "response": "good " * 10}]
    assert summary(old, judge_all(client("j"), old, jp, log=lines.append))["S_q"] == 0.0
    assert summary(new, judge_all(client("j"), new, jp, log=lines.append))["S_q"] == 100.0 and len(server.calls) == 2
    assert lines == [f"{jp}: 1 verdicts are of other answers or another judge: not counted"]
    judge_all(client("j"), new, jp, log=lines.append)  # resumed: nothing asked again
    judge_all(client("j"), new, jp, prompt_template=JUDGE_PROMPT + " ", log=lines.append)  # another judge prompt
    judge_all(client("k"), new, jp, log=lines.append)                                       # another judge model
    assert len(server.calls) == 4
    path = preds_file(tmp_path / "p.jsonl", new)
    assert report([path], [jp], log=lambda s: None)["S_q"] == 100.0  # the last verdict of the answer counts
    server.close()


def test_scores_with_no_verdict_are_null_in_strict_json_not_nan(tmp_path):
    path = preds_file(tmp_path / "p.jsonl", PREDS[:2])
    (tmp_path / "p.jsonl.judged.jsonl").write_text(json.dumps({"index": 0, "failed": "no parseable scores"}) + "\n")
    run = run_cli("evaluate.py", "report", path, "--out", tmp_path / "r.json")
    row = next(l for l in run.stdout.splitlines() if l.startswith("| overall"))
    assert run.returncode == 0 and [c.strip() for c in row.strip("|").split("|")][2:] == ["2", "?", "-", "75.0", "-"]
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    out = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert out["S_q"] is None and out["S"] is None and out["S_l"] == pytest.approx(75.0)


def test_report_numbers_on_a_file_with_known_scores(tmp_path):
    path = preds_file(tmp_path / "pred.jsonl", PREDS)
    (tmp_path / "pred.jsonl.judged.jsonl").write_text(
        "".join(json.dumps({"index": i, "scores": {d: s for d in DIMENSIONS}, "answer": answer_sha(PREDS[i])}) + "\n"
                for i, s in enumerate([5, 3, 1])))
    lines = []
    out = report([path], plot=str(tmp_path / "plot.svg"), log=lines.append)
    s_l = (100 + 50 + 100 * (1 - 1 / 3) + 0) / 4
    s_q = (3 - 1) * 25  # mean score 3 over the three judged predictions
    assert out["S_l"] == pytest.approx(s_l) and out["S_q"] == pytest.approx(s_q) and out["S"] == pytest.approx((s_l + s_q) / 2)
    b = out["files"][path]
    assert b["length"]["[0,500)"]["S_l"] == 100 and b["length"]["[500,2000)"]["S_l"] == 50
    assert b["length"]["[4000,inf)"]["S_l"] == 0 and b["length"]["[4000,inf)"]["judged"] == 0
    assert b["language"]["zh"]["n"] == 1 and b["type"]["B"]["S_l"] == pytest.approx(100 * (1 - 1 / 3) / 2)
    row = next(l for l in lines[0].splitlines() if l.startswith("| [2000,4000)"))
    # n, cut ("?": the file does not say), S = (S_l 66.7 + S_q 0) / 2, S_l
    assert [c.strip() for c in row.strip("|").split("|")][2:6] == ["1", "?", "33.3", "66.7"]
    svg = open(tmp_path / "plot.svg").read()
    assert svg.startswith("<svg") and svg.count("<circle") == 3 + 1  # three answers and one legend mark
    assert svg.count("<path") == 1 + 1  # the empty answer, drawn apart, and its legend mark


def test_side_by_side_report_of_two_files(tmp_path):
    a = preds_file(tmp_path / "a.jsonl", PREDS)
    b = preds_file(tmp_path / "b.jsonl", [{**p, "response_length": p["length"]} for p in PREDS])
    lines = []
    out = report([a, b], log=lines.append)
    table = lines[0].splitlines()
    assert not any(l.startswith("note:") for l in lines)  # the same requests: nothing to say
    assert "a.jsonl" in table[2] and "b.jsonl" in table[3] and table[3].rstrip(" |").endswith("100.0")
    assert out["files"][b]["overall"]["S_l"] == 100.0


def test_ruler_reports_length_per_requested_length_and_language():
    preds = [{"prompt": "Write 1000 words", "length": 1000, "response_length": 900},
             {"prompt": "Write 1000 words", "length": 1000, "response_length": 1100},
             {"prompt": "写1000字", "length": 1000, "response_length": 700},
             {"prompt": "Write 2000 words", "length": 2000, "response_length": 1500}]
    r = ruler(preds)
    assert r["en"][1000] == {"mean_length": 1000, "max_length": 1100, "n": 2, "S_l": pytest.approx((100 * (1 - (1000 / 900 - 1) / 2) + 100 * (1 - 0.1 / 3)) / 2)}
    assert r["zh"][1000]["mean_length"] == 700 and r["en"][2000]["max_length"] == 1500


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/longbench-write is not beside the checkout")
def test_the_benchmark_files_are_read_by_path():
    from evaluate import read_rows
    rows = read_rows(os.path.join(SHARED, "longbench_write.jsonl"))
    assert len(rows) == 120 and all({"prompt", "type", "length"} <= set(r) for r in rows)
    assert len(read_rows(os.path.join(SHARED, "longwrite_ruler.jsonl"))) == 48


def tiny_checkpoint(path):
    """A random one-layer model with the built-in word-level tokenizer, saved as a checkpoint folder."""
    from dataset import load_tokenizer
    build_tokenizer(str(path), ["write a word essay about the sea ."])
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=load_tokenizer(str(path)).vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16)).save_pretrained(path)


def test_predict_with_a_tiny_local_checkpoint_end_to_end(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the sea .", "type": "T", "length": n})
                             + "\n" for n in (100, 200, 300)))
    cmd = ["predict", bench, "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "new" / "pred.jsonl",
           "--max-new-tokens", "30", "--batch-size", "2", "--out", tmp_path / "new2" / "s.json"]
    run = run_cli("evaluate.py", *cmd)  # into folders not made yet
    assert run.returncode == 0, run.stderr
    preds = [json.loads(l) for l in open(tmp_path / "new" / "pred.jsonl")]
    assert sorted(p["index"] for p in preds) == [0, 1, 2]
    assert all(p["response_length"] == count_words(p["response"]) and p["type"] == "T" for p in preds)
    assert "S_l" in json.load(open(tmp_path / "new2" / "s.json"))
    before = open(tmp_path / "new" / "pred.jsonl").read()
    assert run_cli("evaluate.py", *cmd).returncode == 0
    assert open(tmp_path / "new" / "pred.jsonl").read() == before  # resumed: nothing redone
    run = run_cli("evaluate.py", "report", tmp_path / "new" / "pred.jsonl", "--out", tmp_path / "r" / "l.json",
                  "--plot", tmp_path / "p" / "lengths.svg")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "p" / "lengths.svg").read_text().startswith("<svg")
    run = run_cli("evaluate.py", "length", tmp_path / "new" / "pred.jsonl", "--out", tmp_path / "l.json")
    assert run.returncode == 0 and set(json.load(open(tmp_path / "l.json"))) >= {"S_l", "n"}
    run = run_cli("evaluate.py", "length", tmp_path / "new" / "pred.jsonl", "--out", tmp_path / "new" / "pred.jsonl")
    assert run.returncode == 1 and "pred.jsonl is also an input file" in run.stderr  # the scores replaced the answers
    assert open(tmp_path / "new" / "pred.jsonl").read() == before


def test_rows_left_without_an_answer_fail_the_command_and_an_empty_endpoint_is_refused(tmp_path):
    from agentwrite import ChatClient
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "write a 100 word essay about the sea .", "type": "T", "length": 100}) + "\n")
    run = run_cli("evaluate.py", "predict", bench, "--model", "m", "--api-base", "http://127.0.0.1:9", "--max-retries", "0",
                  "--output", tmp_path / "p.jsonl")  # nothing listens on port 9: it printed "S_l 0.0" and exited 0
    assert run.returncode == 1 and "no prediction" in run.stdout and "1 of 1 rows got no answer" in run.stderr
    with pytest.raises(ValueError, match="--api-base '': the URL of an OpenAI-compatible endpoint"):
        ChatClient("", "m", "")  # train_dpo --sampler-model without --api-base: every call failed on "Invalid URL"


def test_predictions_of_a_thinking_model_count_only_the_answer(tmp_path):
    """A reasoning model served without a parser: the thinking is not the response, nor its words."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"write {n} words about the sea .", "type": "T", "length": n}) + "\n"
                             for n in (10, 20)))
    def think(call):
        if "10 words" in call["content"]:
            message = {"content": "<think>\n" + "ten words, then, " * 40 + "\n</think>\n\n" + "wave " * 10}
        else:  # vLLM with a reasoning parser, out of tokens before the answer began
            message = {"content": None, "reasoning_content": "twenty words " * 40}
        reply = {"choices": [{"message": message, "finish_reason": "length" if message["content"] is None else "stop"}]}
        return 200, json.dumps(reply), {}, 0
    server = ChatServer(lambda c: "", think)
    run = run_cli("evaluate.py", "predict", bench, "--model", "m", "--api-base", server.url, "--max-retries", "0",
                  "--output", tmp_path / "p.jsonl")
    server.close()
    assert run.returncode == 1 and "1 of 2 rows got no answer" in run.stderr
    assert "empty answer after the model's reasoning (finish_reason: length)" in run.stdout + run.stderr
    [pred] = [json.loads(l) for l in open(tmp_path / "p.jsonl")]
    assert pred["response"] == "wave " * 10 and pred["response_length"] == 10


def test_predict_through_an_endpoint_sends_top_p_and_the_system_turn_and_refuses_local_flags(tmp_path):
    """The endpoint got neither --top-p (0.8 by default, the benchmark's) nor --system, and --repetition-penalty
    and the like were taken without a word: the answers were sampled otherwise than the record said."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "write 10 words about the sea .", "type": "T", "length": 10}) + "\n")
    server = ChatServer(lambda c: "wave " * 10)
    base = ["evaluate.py", "predict", bench, "--model", "m", "--api-base", server.url, "--max-retries", "0"]
    run = run_cli(*base, "--output", tmp_path / "a.jsonl", "--system", "Be brief.")
    run2 = run_cli(*base, "--output", tmp_path / "b.jsonl", "--top-p", "1")
    refused = [run_cli(*base, "--output", tmp_path / "c.jsonl", *flags) for flags in
               (["--repetition-penalty", "1.1"], ["--no-repeat-ngram", "10", "--device", "cpu"])]
    server.close()
    assert run.returncode == 0 and run2.returncode == 0, run.stderr + run2.stderr
    first, second = (c["body"] for c in server.calls)
    assert first["top_p"] == 0.8 and first["temperature"] == 0.5
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "write 10 words about the sea ."}]
    assert "top_p" not in second and [m["role"] for m in second["messages"]] == ["user"]
    [pred] = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
    assert pred["generation"]["top_p"] == 0.8 and pred["generation"]["system"] == "Be brief."
    assert json.loads(open(tmp_path / "b.jsonl").readline())["generation"]["top_p"] is None
    assert refused[0].returncode == 2 and "--repetition-penalty: only with --checkpoint" in refused[0].stderr
    assert "--no-repeat-ngram, --device: only with --checkpoint" in refused[1].stderr
    assert len(server.calls) == 2 and not (tmp_path / "c.jsonl").exists()


def test_joined_prediction_files_and_extra_files_are_refused_not_scored(tmp_path):
    """`cat a b > all` counted every row twice (n 6 of 3) and judged both with one verdict; `length a b`
    scored a alone without a word about b."""
    a, b = preds_file(tmp_path / "a.jsonl", PREDS[:3]), preds_file(tmp_path / "b.jsonl", PREDS[:3])
    (tmp_path / "all.jsonl").write_text(open(a).read() + open(b).read())
    run = run_cli("evaluate.py", "length", tmp_path / "all.jsonl")
    assert run.returncode == 1 and "all.jsonl:4: a second prediction with index 0" in run.stderr
    for command in ("length", "ruler", "quality", "predict"):
        run = run_cli("evaluate.py", command, a, b)
        assert run.returncode == 2 and f"{command} takes one file, not 2; `report` compares several" in run.stderr
    run = run_cli("evaluate.py", "report", a, b)
    assert run.returncode == 0 and "a.jsonl" in run.stdout and "b.jsonl" in run.stdout
    for flag in ("--batch-size", "--workers"):
        run = run_cli("evaluate.py", "predict", a, "--model", "m", flag, "0")
        assert run.returncode == 2 and f"{flag} 0: at least 1" in run.stderr
    run = run_cli("evaluate.py", "report", a, b, "--judged", tmp_path / "j.jsonl")  # was an IndexError
    assert run.returncode == 2 and "--judged names the verdicts of one prediction file" in run.stderr


def test_a_bad_prediction_file_names_its_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"index": 0, "prompt": "p", "length": 10, "response_length": 3}) + "\n{\"index\": 1}\n")
    run = run_cli("evaluate.py", "length", f)
    assert run.returncode != 0 and "p.jsonl:2: missing field 'prompt'" in run.stderr and "Traceback" not in run.stderr


# -----------------------------------------------------------------------------
# official formats and files other tools write

ANALYSIS = {"Analysis": "The essay {opens} well.\nIts middle drags; the \"ending\" is rushed.", **FULL}


@pytest.mark.parametrize("text", [
    '{"Analysis": "Line one.\nLine two, a raw newline inside the string.", ' + json.dumps(FULL)[1:],
    "Here is my verdict: " + json.dumps(ANALYSIS) + " That is all.",
    "```json\n" + json.dumps({"verdict": FULL, "note": "nested {braces}"}) + "\n```",
])
def test_judge_answers_the_official_parser_accepts_are_read(text):
    assert parse_judge(text) == {k: 4.0 for k in DIMENSIONS}


def test_our_judge_prompt_gives_no_scores_a_judge_could_copy():
    assert parse_judge(JUDGE_PROMPT) is None and not any(ch.isdigit() for ch in JUDGE_PROMPT.split("Then end")[1].replace("1 to 5", ""))


def test_judge_prompts_take_either_marker_style_and_refuse_neither(tmp_path):
    assert judge_prompt("Q: $INST$ A: $RESPONSE$", "inst", "has $INST$ in it") == "Q: inst A: has $INST$ in it"
    assert judge_prompt("Q: {instruction} A: {response}", "i", "r") == "Q: i A: r"
    bad = tmp_path / "judge.txt"
    bad.write_text("Rate this: {response}")
    preds = preds_file(tmp_path / "p.jsonl", PREDS)
    run = run_cli("evaluate.py", "quality", preds, "--model", "j", "--judge-prompt", bad, "--api-base", "http://127.0.0.1:9/v1")
    assert run.returncode != 0 and "judge.txt: the judge prompt needs both" in run.stderr


def test_a_verdict_cut_at_the_judge_token_limit_says_so(tmp_path):
    """SmolLM2-135M as the judge wrote a page of prose until its limit: the failure said only "no parseable
    scores". A judge that reasons before its JSON fails the same way, and the fix is a larger limit."""
    start = json.dumps({k: 4 for k in DIMENSIONS})[:30]
    cut = {"choices": [{"message": {"role": "assistant", "content": "Analysis: good.\n" + start}, "finish_reason": "length"}]}
    server = ChatServer(lambda c: "", lambda call: (200, json.dumps(cut), {}, 0))
    client = ChatClient(server.url, "judge", "", timeout=5, max_retries=0)
    path, lines = str(tmp_path / "j.jsonl"), []
    assert judge_all(client, [{"index": 0, **PREDS[0]}], path, attempts=2, log=lines.append, max_tokens=300) == {}
    assert [c["body"]["max_tokens"] for c in server.calls] == [300, 300]
    assert lines == [f"quality: prediction 0 not judged: no parseable scores; the last verdict was cut at its limit of "
                     f"300 tokens and began {'Analysis: good.' + chr(10) + start!r}"]
    server.close()


def test_the_judge_samples_so_that_a_retry_can_differ(tmp_path):
    server = ChatServer(lambda c: "no scores")
    client = ChatClient(server.url, "judge", "", timeout=5, max_retries=0)
    judge_all(client, [{"index": 0, **PREDS[0]}], str(tmp_path / "j.jsonl"), attempts=2, log=lambda s: None)
    assert [c["body"]["temperature"] for c in server.calls] == [0.5, 0.5]
    server.close()


def test_prediction_files_without_index_or_response_length_are_read(tmp_path):
    f = tmp_path / "other-tool.jsonl"
    f.write_text("".join(json.dumps({"prompt": p["prompt"], "type": p["type"], "length": p["length"],
                                     "response": w}) + "\n" for p, w in zip(PREDS, ["one two", "", "写了五个字", "x y z"])))
    preds = read_preds(str(f))
    assert [p["index"] for p in preds] == [0, 1, 2, 3]
    assert [p["response_length"] for p in preds] == [2, 0, 5, 3]
    run = run_cli("evaluate.py", "length", f)
    assert run.returncode == 0, run.stderr


def test_the_longest_requests_fall_in_the_last_bucket():
    preds = [{"index": i, "prompt": "p", "length": n, "response_length": n} for i, n in enumerate([4000, 20000, 30000])]
    assert breakdown(preds)["length"]["[4000,inf)"]["n"] == 3
    if os.path.isdir(SHARED):
        for name, n in (("longbench_write.jsonl", 120), ("longwrite_ruler.jsonl", 48)):
            rows = [{**r, "index": i, "response_length": 1} for i, r in enumerate(read_rows(os.path.join(SHARED, name)))]
            assert sum(b["n"] for b in breakdown(rows)["length"].values()) == n


def test_reports_tell_same_named_files_apart_and_plots_are_valid_xml(tmp_path):
    import xml.etree.ElementTree as ET
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = preds_file(tmp_path / "a" / "pred.jsonl", PREDS)
    b = preds_file(tmp_path / "b" / "pred.jsonl", [{**p, "response_length": p["length"]} for p in PREDS])
    odd = preds_file(tmp_path / "r&d<v2>.jsonl", PREDS[:3])
    lines = []
    out = report([a, b, odd], plot=str(tmp_path / "plot.svg"), log=lines.append)
    table = lines[0].splitlines()
    assert any("a/pred.jsonl" in l for l in table) and any("b/pred.jsonl" in l for l in table)
    assert set(out["files"]) == {a, b, odd} and out["files"][b]["overall"]["S_l"] == 100.0
    # the third file answers 3 of the 4 requests: said, since its scores are over other prompts
    assert lines[1] == "note: the files answer different requests (a/pred.jsonl 4, b/pred.jsonl 4, r&d<v2>.jsonl 3; " \
                       "3 in all of them): their rows do not compare the same prompts"
    assert table[0].split("|")[3].strip() == "n" and max(len(l) for l in lines[0].splitlines()) < 100
    svg = ET.fromstring(open(tmp_path / "plot.svg").read())  # a legend of "r&d<v2>.jsonl" must not break it
    texts = [e.text for e in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "r&d<v2>.jsonl" in texts and "no countable words (0)" in texts and "Required vs. output length" in texts
    # axes fitted to the data (100 .. 10,000 words): ticks from 100 to 10,000, none at 10 or 100,000
    assert "100" in texts and "10,000" in texts and "10" not in texts and "100,000" not in texts


def test_predict_killed_mid_run_and_rerun_answers_every_prompt_once(tmp_path):
    import signal
    import time
    tiny_checkpoint(tmp_path / "ckpt")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the sea .", "type": "T", "length": n})
                             + "\n" for n in range(100, 1300, 100)))
    pred = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "evaluate.py", "predict", str(bench), "--checkpoint", str(tmp_path / "ckpt"), "--output",
           str(pred), "--max-new-tokens", "600", "--batch-size", "3", "--temperature", "1.0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (pred.exists() and pred.read_text().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = pred.read_text()
    first = [json.loads(l)["index"] for l in before.splitlines() if l.endswith("}")]
    assert 2 <= len(first) < 12  # killed in the middle, each answer written as it ended
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    after = [json.loads(l) for l in pred.read_text().splitlines()]
    assert sorted(p["index"] for p in after) == list(range(12))  # none twice, none lost
    assert [p["index"] for p in after[:len(first)]] == first  # what the killed run wrote is kept as it was


def test_predict_never_reuses_answers_of_another_checkpoint_or_setting(tmp_path):
    tiny_checkpoint(tmp_path / "base")
    tiny_checkpoint(tmp_path / "sft")
    Transformer(ModelConfig(vocab_size=Transformer.from_pretrained(str(tmp_path / "sft")).config.vocab_size, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16)).save_pretrained(tmp_path / "sft")  # other weights, same folder name kind
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the sea .", "length": n}) + "\n"
                             for n in (100, 200, 300)))
    pred = str(tmp_path / "pred.jsonl")
    predict = lambda ckpt, *extra: run_cli("evaluate.py", "predict", bench, "--checkpoint", tmp_path / ckpt, "--output",
                                           pred, "--max-new-tokens", "12", "--batch-size", "2", *extra)
    first = predict("base")
    assert first.returncode == 0, first.stderr
    rows = [json.loads(l) for l in open(pred)]
    assert all(r["generation"]["model"] == "base" and r["generation"]["max_new_tokens"] == 12 and
               r["finish_reason"] in ("stop", "length") for r in rows)
    again = predict("base")
    assert again.returncode == 0 and "reusing 3 answers" in again.stdout
    other = predict("sft")
    assert other.returncode != 0 and "made by other settings" in other.stderr and "--overwrite" in other.stderr
    assert predict("base", "--temperature", "0.9").returncode != 0  # another setting: refused too
    # another chat format asked by name: other prompts, refused (the files' own format named: the same answers)
    forced = predict("base", "--template", "inst")
    assert forced.returncode != 0 and "(template: None there, 'inst' now" in forced.stderr, forced.stderr
    assert "reusing 3 answers" in predict("base", "--template", "plain").stdout
    # the same settings but another request at index 1 (a row removed from the file): refused, never reused
    shifted = tmp_path / "shifted.jsonl"
    shifted.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the sea .", "length": 100}) + "\n"
                               for n in (100, 300)))
    moved = run_cli("evaluate.py", "predict", shifted, "--checkpoint", tmp_path / "base", "--output", pred,
                    "--max-new-tokens", "12", "--batch-size", "2")
    assert moved.returncode != 0 and "row 1 answers another request" in moved.stderr and "prompt" in moved.stderr
    fewer = predict("base", "--limit", "2")  # row 2 answered, but asked no more: said so, not "other settings"
    assert fewer.returncode != 0 and "row 2 is past the 2 rows asked now (a smaller --limit" in fewer.stderr
    fresh = predict("sft", "--overwrite", "--limit", "2")
    assert fresh.returncode == 0 and "2 predictions" in fresh.stdout
    assert {json.loads(l)["generation"]["model"] for l in open(pred)} == {"sft"}
    # the default output name says which model made it
    default = run_cli("evaluate.py", "predict", bench, "--checkpoint", tmp_path / "sft", "--max-new-tokens", "5",
                      "--limit", "1", cwd=tmp_path)
    assert default.returncode == 0 and (tmp_path / "bench.sft.pred.jsonl").exists(), default.stderr


def test_answers_decoded_before_the_rules_kept_the_stop_odds_are_not_reused(tmp_path):
    """Under a repetition penalty or n-gram ban, answers from before generate.keep_stop_odds ended early: a rerun
    must not mix them with new ones. Answers made without either rule decode as before and still resume."""
    from evaluate import generation_record, resume_predictions
    row = {"prompt": "write 300 words .", "length": 300}
    pred = tmp_path / "pred.jsonl"
    for rules, reused in (((1.0, 0), True), ((1.1, 10), False), ((1.0, 10), False)):
        old = generation_record({"model": "m"}, 600, 0.7, 0.9, 0, "", *rules)
        old.pop("stop_odds", None)  # as written before the field existed
        pred.write_text(json.dumps({"index": 0, **row, "response": "x", "generation": old}) + "\n")
        want = [generation_record({"model": "m"}, 600, 0.7, 0.9, 0, "", *rules)]
        if reused:
            assert resume_predictions(str(pred), want, [row], log=lambda s: None) == {0}
        else:
            with pytest.raises(ValueError, match=r"pred.jsonl: row 0 was made by other settings \(stop_odds: None there"):
                resume_predictions(str(pred), want, [row], log=lambda s: None)


def test_predict_refuses_a_limit_past_the_context_before_decoding(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt")  # max_position_embeddings 4096
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "write a 100 word essay about the sea .", "length": 100}) + "\n")
    run = run_cli("evaluate.py", "predict", bench, "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "p.jsonl",
                  "--max-new-tokens", "5000")
    assert run.returncode != 0 and "more than the model's context of 4096 tokens" in run.stderr
    assert not (tmp_path / "p.jsonl").exists() or not (tmp_path / "p.jsonl").read_text()


def test_report_counts_answers_cut_at_the_limit_per_bucket(tmp_path):
    rows = [{"index": i, "prompt": "Write", "length": n, "response_length": n // 2, "finish_reason": f}
            for i, (n, f) in enumerate([(100, "length"), (200, "stop"), (1000, "length"), (1000, "length")])]
    path = preds_file(tmp_path / "p.jsonl", rows)
    out = report([path], log=lambda s: None)
    length = out["files"][path]["length"]
    assert out["files"][path]["overall"]["cut"] == 3 and length["[0,500)"]["cut"] == 1 and length["[500,2000)"]["cut"] == 2
    assert ruler(read_preds(path))["en"][1000]["cut"] == 2


def test_the_plot_legend_names_zero_counted_words_not_empty_answers(tmp_path):
    path = preds_file(tmp_path / "p.jsonl", [{"index": 0, "prompt": "Write", "length": 100, "response": "1234 !!"}])
    report([path], plot=str(tmp_path / "p.svg"), log=lambda s: None)
    assert "no countable words" in open(tmp_path / "p.svg").read()


def test_table_columns_line_up_in_a_terminal_with_chinese_labels():
    """The official Ruler file labels every prompt's type in Chinese (社区论坛, ...): a terminal shows each of those
    characters two columns wide, so padding by len() pushed their rows' bars out of line."""
    import unicodedata
    text = table([["社区论坛", 12, 50.2], ["Popular Science", 1, 62.6]], ["type", "n", "S_l"])
    shown = lambda s: sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)
    lines = text.splitlines()
    assert len({shown(l) for l in lines}) == 1, text
    bars = {tuple(i for i, _ in enumerate(l) if l[i] == "|") for l in lines if "社" not in l}
    assert len(bars) == 1 and "| Popular Science |  1 | 62.6 |" in text
