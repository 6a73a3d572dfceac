"""agentwrite.py against a scripted chat-completions server on 127.0.0.1."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from agentwrite import AgentConfig, LocalClient, parse_plan, run
from chat_server import ChatServer, instruction_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-SECRET-4242"


def default_answer(content):
    """Plans of three 30-word paragraphs; paragraph K is 'pK' and 29 more words."""
    if "break down" in content:
        return "Here is the plan:\n\n" + "\n\n".join(
            f"Paragraph {k} - Main Point: part {k} of it - Word Count: 30 words" for k in (1, 2, 3))
    k = re.search(r"continue writing paragraph (\d+)", content).group(1)
    return f"p{k} " + "word " * 29


def call_key(call):
    c = call["content"]
    step = re.search(r"continue writing paragraph (\d+)", c)
    return (instruction_of(c), "plan" if "break down" in c else f"p{step.group(1)}")


@pytest.fixture
def inputs(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Write 90 words on topic {i}", "topic": i}) + "\n" for i in range(3)))
    return f


def config(server, inputs, tmp_path, **kw):
    base = dict(input=str(inputs), output=str(tmp_path / "out.jsonl"), api_base=server.url, model="m", workers=2,
                max_retries=5, backoff=0.01, timeout=2.0)
    return AgentConfig(**{**base, **kw})


def quiet(_):
    pass


def test_a_full_run_writes_one_record_per_instruction(inputs, tmp_path):
    server = ChatServer(default_answer)
    counts = run(config(server, inputs, tmp_path), log=quiet)
    records = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
    assert counts["done"] == 3 and len(records) == 3
    for r in records:
        user, assistant = r["messages"]
        assert user == {"role": "user", "content": f"Write 90 words on topic {r['topic']}"}
        assert assistant["role"] == "assistant"
        assert [p.split()[0] for p in assistant["content"].split("\n\n")] == ["p1", "p2", "p3"]
        assert r["plan"] == [{"point": f"part {k} of it", "words": 30} for k in (1, 2, 3)]
        assert r["paragraph_words"] == [29, 29, 29]  # "p1" is not an English word
    assert len(server.calls) == 3 * 4  # one plan and three paragraphs each
    # each paragraph call saw the plan and the text so far
    third = next(c for c in server.calls if "continue writing paragraph 3" in c["content"])
    assert "Paragraph 2 - Main Point: part 2 of it" in third["content"] and "p1 word" in third["content"]
    server.close()


def test_429_500_timeouts_and_malformed_bodies_are_survived(inputs, tmp_path):
    faults = {1: (429, "{}", {"Retry-After": "1"}, 0), 2: (500, "oops", {}, 0), 3: (200, "{}", {}, 2.5),
              5: (200, "not json", {}, 0), 7: (502, "", {}, 0), 9: (200, '{"choices": []}', {}, 0)}
    server = ChatServer(default_answer, lambda call: faults.get(call["n"]))
    t0 = time.time()
    counts = run(config(server, inputs, tmp_path, workers=1), log=quiet)
    assert counts["done"] == 3 and counts["failed"] == 0
    assert len(open(tmp_path / "out.jsonl").readlines()) == 3
    assert len(server.calls) == 12 + len(faults)  # each fault cost exactly one retry
    assert time.time() - t0 > 1 + 2.0  # Retry-After: 1 was waited for, and the 2 s timeout ran out
    server.close()


def test_401_stops_the_run_with_a_clear_message(inputs, tmp_path):
    server = ChatServer(default_answer, lambda call: (401, '{"error": "invalid api key"}', {}, 0))
    out = subprocess.run([sys.executable, "agentwrite.py", "--input", str(inputs), "--output", str(tmp_path / "o.jsonl"),
                          "--api-base", server.url, "--backoff", "0.01"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OPENAI_API_KEY": KEY})
    assert out.returncode != 0 and "HTTP 401" in out.stderr and "invalid api key" in out.stderr
    assert "Traceback" not in out.stderr and len(server.calls) <= 8  # stopped, not one failure per item
    server.close()


def test_the_key_is_sent_but_never_written_or_logged(inputs, tmp_path):
    def echo_auth(call):  # a server that echoes the Authorization header back in its error
        if "topic 1" in call["content"]:
            return 400, json.dumps({"error": f"bad request, header was {call['auth']}"}), {}, 0
    server = ChatServer(default_answer, echo_auth)
    out = subprocess.run([sys.executable, "agentwrite.py", "--input", str(inputs), "--output", str(tmp_path / "o.jsonl"),
                          "--api-base", server.url, "--backoff", "0.01"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OPENAI_API_KEY": KEY})
    assert all(c["auth"] == f"Bearer {KEY}" for c in server.calls)
    assert "HTTP 400" in out.stderr and "***" in out.stderr
    texts = [out.stdout, out.stderr] + [open(tmp_path / f).read() for f in ("o.jsonl", "o.jsonl.cache.jsonl")]
    assert not any(KEY in t for t in texts)
    server.close()


def test_refusals_and_empty_answers_fail_the_item_without_poisoning_the_text(inputs, tmp_path):
    def refuse(call):
        c = call["content"]
        if "topic 0" in c and "paragraph 2" in c:
            return 200, json.dumps({"choices": [{"message": {"content": "I can't"}, "finish_reason": "content_filter"}]}), {}, 0
        if "topic 2" in c and "break down" in c:
            return 200, json.dumps({"choices": [{"message": {"content": "  "}, "finish_reason": "stop"}]}), {}, 0
    server = ChatServer(default_answer, refuse)
    counts = run(config(server, inputs, tmp_path), log=quiet)
    assert counts["done"] == 1 and counts["failed"] == 2
    cache = [json.loads(l) for l in open(tmp_path / "out.jsonl.cache.jsonl")]
    assert not any("I can't" in json.dumps(r) for r in cache if r["kind"] == "paragraph")
    errors = sorted(r["error"] for r in cache if r["kind"] == "failed")
    assert errors == ["empty answer", "refused by the content filter"]
    server.close()


def test_answers_far_shorter_than_planned_are_dropped_and_counted(inputs, tmp_path):
    short = lambda c: default_answer(c) if "break down" in c else "too short"
    server = ChatServer(short)
    counts = run(config(server, inputs, tmp_path, min_ratio=0.5), log=quiet)
    assert counts["dropped"] == 3 and counts["done"] == 0
    assert not (tmp_path / "out.jsonl").exists()
    server.close()


def test_a_killed_run_reruns_only_unfinished_calls_and_writes_no_duplicate(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": f"Write 90 words on topic {i}"}) + "\n" for i in range(4)))
    slow = lambda call: None if "break down" in call["content"] else (  # paragraphs take 0.15 s each
        200, json.dumps({"choices": [{"message": {"content": default_answer(call["content"])}}]}), {}, 0.15)
    server = ChatServer(default_answer, slow)
    args = [sys.executable, "agentwrite.py", "--input", str(inputs), "--output", str(tmp_path / "o.jsonl"),
            "--api-base", server.url, "--workers", "2", "--backoff", "0.01"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_file = tmp_path / "o.jsonl.cache.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if cache_file.exists() and cache_file.read_text().count('"paragraph"') >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(l) for l in cache_file.read_text().splitlines() if l.endswith("}")]
    finished = {(r["id"], "plan" if r["kind"] == "plan" else f"p{r['i'] + 1}") for r in before}
    assert 0 < len(finished) < 4 * 4  # killed in the middle
    first_run_calls = len(server.calls)
    assert subprocess.run(args, cwd=ROOT, capture_output=True).returncode == 0
    second = [call_key(c) for c in server.calls[first_run_calls:]]
    records = [json.loads(l) for l in open(tmp_path / "o.jsonl")]
    id_of = {r["messages"][0]["content"]: r["id"] for r in records}
    assert not any((id_of[instr], kind) in finished for instr, kind in second)  # nothing finished was redone
    assert len(records) == 4 and len({r["id"] for r in records}) == 4 and set(id_of) == {f"Write 90 words on topic {i}" for i in range(4)}
    # a third run has nothing left to do
    calls = len(server.calls)
    assert subprocess.run(args, cwd=ROOT, capture_output=True).returncode == 0 and len(server.calls) == calls
    assert len(open(tmp_path / "o.jsonl").readlines()) == 4
    server.close()


MESSY_PLANS = [
    ("Paragraph 1 - Main Point: Intro - Word Count: 400 words\n\nParagraph 2 - Main Point: Body - Word Count: 600 words",
     [("Intro", 400), ("Body", 600)]),
    ("1. Opening scene (300 words)\n2) The storm, 1,200 words\n\n3 - Ending - 500 words",
     [("Opening scene", 300), ("The storm", 1200), ("Ending", 500)]),
    ("Here is my plan:\n**Paragraph 1** - Main Point: History - Word Count: 250\n- Paragraph 2: Today — 250 words\nThat's all.",
     [("History", 250), ("Today", 250)]),
    ("第1段 - 主要内容：介绍背景 - 字数：800字\n第2段 - 主要内容：发展历程 - 字数：1200字",
     [("介绍背景", 800), ("发展历程", 1200)]),
    ("No numbers here at all.\nJust text.", []),
]


@pytest.mark.parametrize("text,expected", MESSY_PLANS)
def test_plans_parse_from_messy_text(text, expected):
    assert [(s["point"], s["words"]) for s in parse_plan(text)] == expected


def test_plans_with_no_steps_or_too_many_are_rejected(inputs, tmp_path):
    many = "\n".join(f"Paragraph {k} - Main Point: x - Word Count: 10 words" for k in range(1, 52))
    plans = {"topic 0": "I cannot plan this.", "topic 1": many}
    answer = lambda c: next((p for t, p in plans.items() if t in c and "break down" in c), None) or default_answer(c)
    server = ChatServer(answer)
    counts = run(config(server, inputs, tmp_path), log=quiet)
    assert counts["failed"] == 2 and counts["done"] == 1
    errors = sorted(json.loads(l)["error"] for l in open(tmp_path / "out.jsonl.cache.jsonl") if '"failed"' in l)
    assert errors == ["plan rejected: 0 parseable steps (1 to 50 needed)", "plan rejected: 51 parseable steps (1 to 50 needed)"]
    server.close()


def test_local_backend_batches_calls_from_several_workers(tmp_path):
    import torch
    from dataset import build_tokenizer, chat_prompt_ids, load_tokenizer
    from generate import generate
    from model import ModelConfig, Transformer
    build_tokenizer(str(tmp_path), ["write about the sea and the ships"])
    tok = load_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    model.save_pretrained(tmp_path)
    client = LocalClient(str(tmp_path), device="cpu")
    prompts = [[{"role": "user", "content": c}] for c in ("write about the sea", "the ships", "write the")]
    answers = [None] * 3
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, client.chat(prompts[i], 12, temperature=0)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = [tok.decode(generate(model, [chat_prompt_ids(tok, p)], 12, tok.stop_ids, temperature=0)[0]) for p in prompts]
    assert answers == alone
