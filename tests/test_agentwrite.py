"""agentwrite.py against a scripted chat-completions server on 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from agentwrite import PLAN_PROMPT, WRITE_PROMPT, AgentConfig, APIError, LocalClient, fill, parse_plan, run
from chat_server import ChatServer, instruction_of, step_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-SECRET-4242"


def is_plan(content):
    return step_of(content) == "plan"


def default_answer(content):
    """Plans of three 30-word paragraphs; paragraph K is 'pK' and 29 more words, ending a sentence."""
    if is_plan(content):
        return "Here is the plan:\n\n" + "\n\n".join(
            f"Paragraph {k} - Main Point: part {k} of it - Word Count: 30 words" for k in (1, 2, 3))
    return f"{step_of(content)} " + "word " * 28 + "word."


def call_key(call):
    return (instruction_of(call["content"]), step_of(call["content"]))


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
    third = next(c for c in server.calls if step_of(c["content"]) == "p3")
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


def test_models_that_take_max_completion_tokens_only_get_it_after_one_refusal(inputs, tmp_path):
    """OpenAI's o-series and gpt-5 models answer a "max_tokens" with HTTP 400: every item failed."""
    error = {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                  "'max_completion_tokens' instead.", "type": "invalid_request_error",
                       "param": "max_tokens", "code": "unsupported_parameter"}}
    server = ChatServer(default_answer, lambda call: (400, json.dumps(error), {}, 0) if "max_tokens" in call["body"] else None)
    counts = run(config(server, inputs, tmp_path, workers=1, max_retries=0), log=quiet)
    assert counts["done"] == 3 and counts["failed"] == 0
    bodies = [c["body"] for c in server.calls]
    assert len(bodies) == 12 + 1 and "max_tokens" in bodies[0]  # refused once, then asked under the new name
    assert all(b["max_completion_tokens"] > 0 and "max_tokens" not in b for b in bodies[1:])
    server.close()


def test_a_plan_cut_at_its_token_limit_is_asked_again_not_written_short(inputs, tmp_path):
    """A cut plan parses: its first steps, without the last ones, made an answer short of the asked length."""
    asked = []
    def cut(call):
        c = call["content"]
        if is_plan(c):
            asked.append(instruction_of(c))
        if is_plan(c) and ("topic 0" in c and asked.count(instruction_of(c)) == 1 or "topic 1" in c):  # once; always
            reply = {"choices": [{"message": {"content": default_answer(c).rsplit("\n\n", 1)[0]}, "finish_reason": "length"}]}
            return 200, json.dumps(reply), {}, 0
    server = ChatServer(default_answer, cut)
    counts = run(config(server, inputs, tmp_path, workers=1, plan_attempts=2), log=quiet)
    assert counts["done"] == 2 and counts["failed"] == 1
    assert all(len(json.loads(l)["plan"]) == 3 for l in open(tmp_path / "out.jsonl"))
    cache = [json.loads(l) for l in open(tmp_path / "out.jsonl.cache.jsonl")]
    assert [r["error"] for r in cache if r["kind"] == "failed"] == [
        "plan rejected 2 times; the last one: cut at --plan-tokens 2048 after 2 parseable steps (the plans are kept "
        "in the cache file)"]
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
        if "topic 2" in c and is_plan(c):
            return 200, json.dumps({"choices": [{"message": {"content": "  "}, "finish_reason": "stop"}]}), {}, 0
    server = ChatServer(default_answer, refuse)
    counts = run(config(server, inputs, tmp_path), log=quiet)
    assert counts["done"] == 1 and counts["failed"] == 2
    cache = [json.loads(l) for l in open(tmp_path / "out.jsonl.cache.jsonl")]
    assert not any("I can't" in json.dumps(r) for r in cache if r["kind"] == "paragraph")
    errors = sorted(r["error"] for r in cache if r["kind"] == "failed")
    assert errors == ["empty answer", "refused by the content filter"]
    server.close()


def test_reasoning_blocks_of_thinking_models_are_neither_planned_from_nor_written_into_the_answers(inputs, tmp_path):
    """Qwen3 / DeepSeek-R1 served without a reasoning parser put their thinking in the content."""
    draft = "Paragraph 1 - Main Point: a draft - Word Count: 500 words"  # a plan-shaped line in the thinking only
    def think(call):
        c, answer = call["content"], default_answer(call["content"])
        if "topic 2" in c and step_of(c) == "p2":  # thinking ran past max_tokens: no answer at all
            content, finish = "<think>\nI need thirty words. First " + "hmm " * 50, "length"
        elif step_of(c) == "p3":  # the template opened the block: only its end is in the content
            content, finish = "So the third part, thirty words.\n</think>\n\n" + answer, "stop"
        else:
            content, finish = f"<think>\nLet me think. {draft}\n</think>\n\n" + answer, "stop"
        return 200, json.dumps({"choices": [{"message": {"content": content}, "finish_reason": finish}]}), {}, 0
    server = ChatServer(default_answer, think)
    counts = run(config(server, inputs, tmp_path, paragraph_attempts=1), log=quiet)
    assert counts["done"] == 2 and counts["failed"] == 1
    for r in map(json.loads, open(tmp_path / "out.jsonl")):
        assert r["plan"] == [{"point": f"part {k} of it", "words": 30} for k in (1, 2, 3)]
        assert [p.split()[0] for p in r["messages"][1]["content"].split("\n\n")] == ["p1", "p2", "p3"]
        assert "think" not in json.dumps(r) and r["paragraph_words"] == [29, 29, 29]
    cache = [json.loads(l) for l in open(tmp_path / "out.jsonl.cache.jsonl")]
    assert [r["error"] for r in cache if r["kind"] == "failed"] == [
        "empty answer after the model's reasoning (finish_reason: length)"]
    server.close()


def test_answers_far_shorter_than_planned_are_dropped_and_counted(inputs, tmp_path):
    short = lambda c: default_answer(c) if is_plan(c) else "too short"
    server = ChatServer(short)
    counts = run(config(server, inputs, tmp_path, min_ratio=0.5, section_min=0), log=quiet)  # each paragraph kept
    assert counts["dropped"] == 3 and counts["done"] == 0
    assert not (tmp_path / "out.jsonl").exists()
    server.close()


def test_a_killed_run_reruns_only_unfinished_calls_and_writes_no_duplicate(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": f"Write 90 words on topic {i}"}) + "\n" for i in range(4)))
    slow = lambda call: None if is_plan(call["content"]) else (  # paragraphs take 0.15 s each
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
    finished = {(r["key"], "plan" if r["kind"] == "plan" else f"p{r['i'] + 1}") for r in before
                if r["kind"] in ("plan", "paragraph")}
    assert 0 < len(finished) < 4 * 4  # killed in the middle
    first_run_calls = len(server.calls)
    assert subprocess.run(args, cwd=ROOT, capture_output=True).returncode == 0
    second = [call_key(c) for c in server.calls[first_run_calls:]]
    records = [json.loads(l) for l in open(tmp_path / "o.jsonl")]
    id_of = {r["messages"][0]["content"]: r["key"] for r in records}
    assert not any((id_of[instr], kind) in finished for instr, kind in second)  # nothing finished was redone
    assert len(records) == 4 and len({r["key"] for r in records}) == 4 and set(id_of) == {f"Write 90 words on topic {i}" for i in range(4)}
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


# Plans shaped the way GPT-4o, Claude, Qwen and GLM write them when asked for a plan.
REAL_PLANS = [
    ("the requested format", "Paragraph 1 - Main Point: Introduce the history of the Silk Road and why it still matters - Word Count: 400 words\n\n"
     "Paragraph 2 - Main Point: Trade goods and the cities that grew rich on them - Word Count: 600 words",
     [("Introduce the history of the Silk Road and why it still matters", 400), ("Trade goods and the cities that grew rich on them", 600)]),
    ("GPT-4o: a title with the total, an intro line and a Total line",
     "# Essay Plan: The Future of Urban Transport (5000 words)\n\nHere is a detailed breakdown of the essay:\n\n"
     "Paragraph 1 - Main Point: Why cities are rethinking transport - Word Count: 1000 words\n"
     "Paragraph 2 - Main Point: Electric buses and trams - Word Count: 1500 words\n"
     "Paragraph 3 - Main Point: Cycling infrastructure - Word Count: 1500 words\n"
     "Paragraph 4 - Main Point: What a 2050 city could look like - Word Count: 1000 words\n\nTotal: 5000 words",
     [("Why cities are rethinking transport", 1000), ("Electric buses and trams", 1500), ("Cycling infrastructure", 1500),
      ("What a 2050 city could look like", 1000)]),
    ("GPT-4o markdown blocks, the count on its own line",
     "### Paragraph 1\n- **Main Point**: The origins of jazz in New Orleans\n- **Word Count**: 400\n\n"
     "### Paragraph 2\n- **Main Point**: The swing era and big bands\n- **Word Count**: 600 words\n",
     [("The origins of jazz in New Orleans", 400), ("The swing era and big bands", 600)]),
    ("bold labels inside the line",
     "**Paragraph 1 - Main Point:** Describe the village at dawn **- Word Count:** 300 words\n"
     "**Paragraph 2 - Main Point:** The stranger arrives **- Word Count:** 700 words",
     [("Describe the village at dawn", 300), ("The stranger arrives", 700)]),
    ("Claude: numbered, bold titles, ranges",
     "Here's how I'd structure the 1,400-word story:\n\n1. **Opening** (300-400 words): Mara finds the letter in the attic.\n"
     "2. **Rising action** (500-600 words): She travels to the coast to find the sender.\n"
     "3. **Resolution** (400 words): The sender turns out to be her grandmother.",
     [("Opening: Mara finds the letter in the attic", 350), ("Rising action: She travels to the coast to find the sender", 550),
      ("Resolution: The sender turns out to be her grandmother", 400)]),
    ("Claude: no numbering, approximate counts",
     "**Introduction** (approximately 500 words) — the problem of sleep debt in teenagers\n\n"
     "**The science** (approximately 800 words) — circadian rhythms and school start times\n\n"
     "**What schools can do** (approximately 700 words) — later starts, fewer early exams",
     [("Introduction — the problem of sleep debt in teenagers", 500),
      ("The science — circadian rhythms and school start times", 800),
      ("What schools can do — later starts, fewer early exams", 700)]),
    ("Qwen: Chinese labels", "段落1 - 主要观点：介绍故宫的建造背景 - 字数要求：800字\n段落2 - 主要观点：故宫的建筑布局 - 字数要求：1200字",
     [("介绍故宫的建造背景", 800), ("故宫的建筑布局", 1200)]),
    ("GLM: Chinese numerals and 约", "第一段：介绍长城的历史背景（约500字）\n第二段：长城的修建过程（约800字）\n第三段：长城的文化意义（约700字）",
     [("介绍长城的历史背景", 500), ("长城的修建过程", 800), ("长城的文化意义", 700)]),
    ("a markdown table", "| Paragraph | Main Point | Word Count |\n|---|---|---|\n| 1 | How bees find flowers | 400 |\n"
     "| 2 | The waggle dance | 600 words |\n| 3 | Threats to bee colonies | 500 |",
     [("How bees find flowers", 400), ("The waggle dance", 600), ("Threats to bee colonies", 500)]),
    ("a Chinese table", "| 段落 | 主要内容 | 字数 |\n| --- | --- | --- |\n| 第一段 | 背景介绍 | 500字 |\n| 第二段 | 发展现状 | 1000字 |",
     [("背景介绍", 500), ("发展现状", 1000)]),
    ("a label with a range", "Paragraph 1 - Main Point: Early life - Word Count: 300-400 words\n"
     "Paragraph 2 - Main Point: Career - Word Count: 800 to 1,000 words",
     [("Early life", 350), ("Career", 900)]),
    ("numbered, parenthesised approximately",
     "1. Discuss the causes of the French Revolution (approximately 600 words)\n"
     "2. Describe the Reign of Terror (approximately 900 words)",
     [("Discuss the causes of the French Revolution", 600), ("Describe the Reign of Terror", 900)]),
    ("count in the heading, point on the line below",
     "**Paragraph 1 (800 words)**\n  - Main Point: Why the printing press changed Europe\n"
     "**Paragraph 2 (1200 words)**\n  - Main Point: Luther, pamphlets and the Reformation",
     [("Why the printing press changed Europe", 800), ("Luther, pamphlets and the Reformation", 1200)]),
    ("Chinese, title with total and a 总计 line",
     "写作计划（共3000字）：\n1. 开篇：描写春节前的家乡 —— 800字\n2. 年夜饭和守岁 —— 1200字\n3. 离家时的感受 —— 1000字\n总计：3000字",
     [("开篇：描写春节前的家乡", 800), ("年夜饭和守岁", 1200), ("离家时的感受", 1000)]),
    ("heading with a short name, labelled lines below it",
     "## Paragraph 1: Introduction\nMain Point: Present the debate over nuclear power\nWord Count: 300\n\n"
     "## Paragraph 2: The case for\nMain Point: Low emissions and reliable supply\nWord Count: 700",
     [("Introduction: Present the debate over nuclear power", 300), ("The case for: Low emissions and reliable supply", 700)]),
    ("unnumbered lines, labels on their own lines",
     "Introduction: set the scene in the harbour\nWord Count: 300\n\nThe storm: the night the boats were lost\nWord Count: 900",
     [("Introduction: set the scene in the harbour", 300), ("The storm: the night the boats were lost", 900)]),
    ("a title line with the total, unnumbered paragraphs",
     "A Guide to Sourdough (2000 words)\nStarter basics - 500 words\nMixing and folding - 700 words\nBaking and cooling - 800 words",
     [("Starter basics", 500), ("Mixing and folding", 700), ("Baking and cooling", 800)]),
    ("Step style with pipes", "Step 1: Explain what inflation is | Word count: 500\nStep 2: Historical episodes of hyperinflation | Word count: 700",
     [("Explain what inflation is", 500), ("Historical episodes of hyperinflation", 700)]),
    ("a refusal", "I'm sorry, but I can't help with planning that.", []),
]


@pytest.mark.parametrize("what,text,expected", REAL_PLANS, ids=[p[0] for p in REAL_PLANS])
def test_plans_parse_the_way_real_models_write_them(what, text, expected):
    assert [(s["point"], s["words"]) for s in parse_plan(text)] == expected


# fragments characteristic of the official AgentWrite prompts' wording (their facts may carry over)
OFFICIAL_FRAGMENTS = ["break down", "subtask", "writing assistant", "integrate the original", "too finely", "open-ended"]


def test_the_prompts_are_our_own_words_and_keep_the_methods_facts():
    for fragment in OFFICIAL_FRAGMENTS:
        assert fragment not in (PLAN_PROMPT + WRITE_PROMPT).lower()
    assert "200 and 1,000 words" in PLAN_PROMPT and "one line per paragraph" in PLAN_PROMPT
    assert "Main Point:" in PLAN_PROMPT and "Word Count:" in PLAN_PROMPT
    assert "subtitle" in WRITE_PROMPT and "repeat nothing" in WRITE_PROMPT and "last paragraph" in WRITE_PROMPT
    assert "no heading" not in WRITE_PROMPT  # the method allows a short subtitle


def test_markers_inside_user_text_are_not_substituted(inputs, tmp_path):
    assert fill("A {text} B {step}", text="x {step} y", step="S") == "A x {step} y B S"
    inputs.write_text(json.dumps({"prompt": "Explain what {text} and {plan} mean in a template, 90 words"}) + "\n")
    server = ChatServer(default_answer)
    assert run(config(server, inputs, tmp_path), log=quiet)["done"] == 1
    writes = [c["content"] for c in server.calls if not is_plan(c["content"])]
    assert all(instruction_of(c) == "Explain what {text} and {plan} mean in a template, 90 words" for c in writes)
    assert writes[2].count("p1 word") == 1  # the text so far went in once, where the template asked for it
    server.close()


def test_a_prompt_file_without_the_markers_is_refused(inputs, tmp_path):
    bad = tmp_path / "write.txt"
    bad.write_text("Write the next paragraph of {instruction} following {plan}.")
    with pytest.raises(ValueError, match=r"write.txt: no \{text\} marker"):
        run(config(ChatServer(default_answer), inputs, tmp_path, write_prompt=str(bad)), log=quiet)


def test_the_raw_plan_and_the_users_own_id_are_kept(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write 90 words on topic 0", "id": "user-7"}) + "\n"
                      + json.dumps({"prompt": "Write 90 words on topic 1"}) + "\n")
    server = ChatServer(default_answer)
    run(config(server, inputs, tmp_path), log=quiet)
    records = {r["messages"][0]["content"]: r for r in map(json.loads, open(tmp_path / "out.jsonl"))}
    assert records["Write 90 words on topic 0"]["id"] == "user-7"
    assert records["Write 90 words on topic 1"]["id"] == records["Write 90 words on topic 1"]["key"]
    raw = default_answer("Request:\nx\n\n")
    assert all(r["plan_text"] == raw for r in records.values())
    cached = [json.loads(l) for l in open(tmp_path / "out.jsonl.cache.jsonl")]
    assert [r["text"] for r in cached if r["kind"] == "plan"] == [raw, raw]
    server.close()


def test_resume_is_keyed_by_the_prompt_not_the_line(tmp_path):
    inputs = tmp_path / "in.jsonl"
    prompts = [f"Write 90 words on topic {i}" for i in range(4)] + ["Write 90 words on topic 0"]  # one repeat
    inputs.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    server = ChatServer(default_answer)
    cfg = config(server, inputs, tmp_path)
    assert run(cfg, log=quiet)["done"] == 5  # the repeated prompt is answered twice, as asked
    calls = len(server.calls)
    inputs.write_text(json.dumps({"prompt": "Write 90 words on a new topic"}) + "\n" + inputs.read_text())
    counts = run(cfg, log=quiet)
    assert counts["done"] == 1 and counts["skipped"] == 5
    assert {instruction_of(c["content"]) for c in server.calls[calls:]} == {"Write 90 words on a new topic"}
    records = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
    assert len(records) == 6 and len({r["key"] for r in records}) == 6
    server.close()


def test_plans_with_no_steps_or_too_many_are_rejected(inputs, tmp_path):
    many = "\n".join(f"Paragraph {k} - Main Point: x - Word Count: 10 words" for k in range(1, 52))
    plans = {"topic 0": "I cannot plan this.", "topic 1": many}
    answer = lambda c: next((p for t, p in plans.items() if t in c and is_plan(c)), None) or default_answer(c)
    server = ChatServer(answer)
    counts = run(config(server, inputs, tmp_path), log=quiet)
    assert counts["failed"] == 2 and counts["done"] == 1
    cache = [json.loads(l) for l in open(tmp_path / "out.jsonl.cache.jsonl")]
    errors = sorted(r["error"] for r in cache if r["kind"] == "failed")
    kept = "(the plans are kept in the cache file)"
    assert errors == [f"plan rejected 3 times; the last one: 0 parseable steps (1 to 50 needed) {kept}; a writer that writes "
                      "no plan at all may be too small to plan: --plan skeleton lays one out",  # prose, as SmolLM2-135M's
                      f"plan rejected 3 times; the last one: 51 parseable steps (1 to 50 needed) {kept}"]
    rejected = [r for r in cache if r["kind"] == "plan_rejected"]  # each attempt kept: its text and its reason
    assert len(rejected) == 6 and sorted({r["text"] for r in rejected}) == sorted(plans.values())
    assert len(server.calls) == 3 + 3 + 4  # three plans for each failed item, one plan and three paragraphs
    server.close()


def tiny_checkpoint(tmp_path):
    import torch
    from dataset import build_tokenizer, load_tokenizer
    from model import ModelConfig, Transformer
    build_tokenizer(str(tmp_path), ["write about the sea and the ships"])
    tok = load_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    model.save_pretrained(tmp_path)
    return tok, model


def test_a_local_call_joins_the_running_batch_instead_of_waiting_for_it(tmp_path):
    tiny_checkpoint(tmp_path)
    client = LocalClient(str(tmp_path), device="cpu", max_batch=2, row_len=4096)
    client.tok.stop_ids = []  # an untrained model may stop at once: here every answer runs to its limit
    ended = []
    long_call = threading.Thread(target=lambda: ended.append(("long", client.chat(
        [{"role": "user", "content": "write about the sea"}], 3000, temperature=1.0))))
    long_call.start()
    time.sleep(0.5)  # the long answer is being decoded
    ended.append(("short", client.chat([{"role": "user", "content": "the ships"}], 5, temperature=1.0)))
    long_call.join()
    assert [name for name, _ in ended] == ["short", "long"] and len(ended[1][1].split()) > 2000  # (special tokens decode to nothing)
    with pytest.raises(APIError, match="more than the model's context of 4096 tokens"):
        client.chat([{"role": "user", "content": "the sea"}], 5000)


def test_the_local_writer_decodes_on_as_many_threads_as_its_maker_set(tmp_path, monkeypatch):
    """torch.set_num_threads holds for the thread that calls it: MKL's matmuls in a new thread use every core again.
    demo.py --real writes with one thread while the base model answers on the other in a process of its own; the
    serving thread took both cores, and the two stages fought over them."""
    import torch
    tiny_checkpoint(tmp_path)
    before, calls, real = torch.get_num_threads(), [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append((threading.current_thread().name, n)), real(n)))
    try:
        real(1)
        client = LocalClient(str(tmp_path), device="cpu", max_batch=2, row_len=256)
        client.chat([{"role": "user", "content": "the sea"}], 3)
        client.close()
    finally:
        real(before)
    assert (client.thread.name, 1) in calls


def test_the_local_writer_decodes_eagerly_on_cuda_too(tmp_path, monkeypatch):
    """Its serving thread is not the main thread: on torch 2.11 (the GPU machine's) a compiled CUDA graph run there
    fails an assertion in inductor's thread-local graph state once the main thread has compiled (pytorch#123177),
    which failed every AgentWrite call of demo.py --real --device cuda. The model is loaded on the CPU here."""
    import generate
    import model as model_module
    _, model = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(model_module.Transformer, "from_pretrained", classmethod(lambda cls, *a, **k: model.eval()))
    seen, real = [], generate.continuous
    monkeypatch.setattr(generate, "continuous", lambda *a, **k: (seen.append(k.get("compile", False)), real(*a, **k))[1])
    client = LocalClient(str(tmp_path), device="cuda", max_batch=2, row_len=256)
    client.chat([{"role": "user", "content": "the sea"}], 3)
    client.close()
    assert seen and not any(seen)


def test_local_backend_batches_calls_from_several_workers(tmp_path):
    from dataset import chat_prompt_ids
    from generate import generate
    tok, model = tiny_checkpoint(tmp_path)
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


def test_prose_is_not_a_plan_and_an_equal_sum_middle_paragraph_is_kept():
    assert parse_plan("Aiming for a 600-word blog post that walks through the history of tea.") == []
    plan = "1. Opening scene (300-400 words)\n2. The long middle (800-1000 words)\n3. The ending (500-600 words)"
    assert [s["words"] for s in parse_plan(plan)] == [350, 900, 550]  # 900 = 350 + 550, still a paragraph
    assert [s["words"] for s in parse_plan(plan.replace("1. ", "").replace("2. ", "").replace("3. ", "")
                                           .replace(" (", " - ").replace(")", ""))] == [350, 900, 550]


@pytest.mark.parametrize("text,cut,expected", [
    ("The tide rose. The boats waited for", True, "The tide rose."),
    ("The tide rose. The boats waited for the storm to pass before they set out again at", False, "The tide rose."),
    ("The tide rose. “Go now,” she said.", True, "The tide rose. “Go now,” she said."),
    ("潮水涨了。船在等待", True, "潮水涨了。"),
    ("## Harbour life\n- nets\n- boats", False, "## Harbour life\n- nets\n- boats"),  # a list is not cut
    ("no sentence ends here at all and it goes on", True, ""),
])
def test_paragraphs_that_stop_mid_sentence_are_cut_back_to_the_last_full_sentence(text, cut, expected):
    from agentwrite import trim_to_sentence
    assert trim_to_sentence(text, cut) == expected


def test_answers_far_longer_than_planned_are_dropped_and_items_are_named_by_id(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write 90 words on topic 0", "id": "tea-essay"}) + "\n")
    server = ChatServer(lambda c: default_answer(c) if is_plan(c) else "word " * 80 + "end.")  # 3 x 81 against 90
    lines = []
    counts = run(config(server, inputs, tmp_path), log=lines.append)
    assert counts["dropped"] == 1 and counts["done"] == 0
    assert any(l.startswith("tea-essay: dropped, 243 words against 90 planned (270%") for l in lines)
    assert any(l.startswith("tea-essay: planning") for l in lines) and any("tea-essay: paragraph 3 of 3" in l for l in lines)
    server.close()


def test_a_cut_paragraph_is_trimmed_and_recorded(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write 90 words on topic 0"}) + "\n")

    def behave(call):
        if step_of(call["content"]) != "p2":
            return None
        reply = {"choices": [{"message": {"content": "p2 " + "word " * 20 + "stop. And then the" + " more" * 10},
                              "finish_reason": "length"}]}
        return 200, json.dumps(reply), {}, 0
    server = ChatServer(default_answer, behave)
    run(config(server, inputs, tmp_path, min_ratio=0.1), log=quiet)
    record = json.loads(open(tmp_path / "out.jsonl").read())
    assert record["trimmed_paragraphs"] == [1] and record["paragraph_words"][1] == 21
    assert record["messages"][1]["content"].split("\n\n")[1].endswith("stop.")
    server.close()


# -----------------------------------------------------------------------------
# skeleton plans, for writers too small to plan

@pytest.mark.parametrize("source,expected", [
    ({"prompt": "Write a 2,000-word essay on tides."}, 2000),
    ({"prompt": "A Hong Kong Travel Guide, approximately 3000 words"}, 3000),
    ({"prompt": "写一篇1000字的中国旅游指南"}, 1000),
    ({"prompt": "Write 300 words, then 5000 words more."}, 5000),  # the largest count
    ({"prompt": "Write about tides.", "length": 800}, 800),  # the benchmark's field wins
    ({"prompt": "Write about tides for 3 readers."}, 0),
])
def test_the_asked_length_is_read_from_the_field_or_the_prompt(source, expected):
    from agentwrite import asked_words
    assert asked_words(source) == expected


def test_skeleton_plans_lay_out_sections_of_the_asked_length_by_the_kind_of_piece():
    from agentwrite import skeleton_plan
    story = skeleton_plan("Write a story about a lighthouse keeper.", 1000, 350)
    assert [s["words"] for s in story] == [334, 333, 333]
    assert [s["point"] for s in story] == ["the opening, which sets the scene", "the setting and the main character",
                                           "the ending, where the story is resolved"]
    essay = skeleton_plan("Write a report on tides.", 2000, 350)
    assert len(essay) == 6 and sum(s["words"] for s in essay) == 2000
    assert essay[0]["point"].startswith("an introduction") and essay[-1]["point"].startswith("a conclusion")
    assert len({s["point"] for s in essay}) == 6  # no section repeats another's point
    long = skeleton_plan("Write an essay on tides.", 5000, 350)
    assert len(long) == 14 and len({s["point"] for s in long}) == 14 and "(part 2)" in long[-2]["point"]
    assert skeleton_plan("Write 200 words on tides.", 200, 350) == [{"point": "the whole piece", "words": 200}]


class SectionWriter:
    """A local-style client that answers each section request with the words it asks for, as sentences."""

    def __init__(self):
        self.calls = []

    def complete(self, messages, max_tokens, temperature=0.7):
        import re
        content = messages[-1]["content"]
        self.calls.append(content)
        n = int(re.search(r"in about (\d+) words", content).group(1))
        return " ".join(["Tides rise and fall twice a day."] * (n // 7)), "stop"

    def chat(self, messages, max_tokens, temperature=0.7):
        return self.complete(messages, max_tokens, temperature)[0]


def test_a_skeleton_run_makes_no_planning_call_and_one_short_request_per_section(tmp_path):
    from agentwrite import SECTION_PROMPT, skeleton_plan
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides.", "id": "tides"}) + "\n"
                      + json.dumps({"prompt": "Write an essay on waves.", "id": "no-length"}) + "\n")
    writer, lines = SectionWriter(), []
    counts = run(AgentConfig(input=str(inputs), output=str(tmp_path / "out.jsonl"), plan="skeleton", workers=1),
                 client=writer, log=lines.append)
    assert counts["done"] == 1 and counts["failed"] == 1
    plan = skeleton_plan("Write a 1,050-word essay on tides.", 1050, 350)
    assert writer.calls == [fill(SECTION_PROMPT, instruction="Write a 1,050-word essay on tides.", point=s["point"],
                                 words=str(s["words"])) for s in plan]  # no plan call; the short prompt, as written
    record = json.loads(open(tmp_path / "out.jsonl").read())
    assert record["id"] == "tides" and record["plan"] == plan and record["paragraph_words"] == [350, 350, 350]
    assert any(l.startswith('no-length: failed: --plan skeleton needs the asked length') for l in lines)
    assert not any("planning" in l for l in lines)  # the log does not claim a planning call it never made
    # a skeleton's own --write-prompt needs the instruction and the section's point, not the plan or the text
    bad = tmp_path / "bad.txt"
    bad.write_text("Write about {instruction}.")
    with pytest.raises(ValueError, match=r"bad.txt: no \{point\} marker"):
        run(AgentConfig(input=str(inputs), output=str(tmp_path / "o2.jsonl"), plan="skeleton", write_prompt=str(bad)),
            client=writer, log=quiet)


class RamblingWriter:
    """A small model's way with a section: it never stops, writing (1.35 tokens a word) until max_tokens."""

    def complete(self, messages, max_tokens, temperature=0.7):
        words = int(max_tokens / 1.35)
        return " ".join(["The tide comes in again and the boats rise."] * (words // 9)) + " And then the", "length"

    def chat(self, messages, max_tokens, temperature=0.7):
        return self.complete(messages, max_tokens, temperature)[0]


def test_section_limit_cuts_a_rambling_section_at_its_last_sentence_so_the_answer_is_kept(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides.", "id": "tides"}) + "\n")
    loose = run(AgentConfig(input=str(inputs), output=str(tmp_path / "loose.jsonl"), plan="skeleton", workers=1),
                client=RamblingWriter(), log=quiet)
    assert loose["dropped"] == 1  # 3 x 350 + 200 tokens: ~925 words a section, 2.6x the plan
    counts = run(AgentConfig(input=str(inputs), output=str(tmp_path / "out.jsonl"), plan="skeleton", workers=1,
                             section_limit=1.5), client=RamblingWriter(), log=quiet)
    record = json.loads(open(tmp_path / "out.jsonl").read())
    assert counts["done"] == 1 and record["trimmed_paragraphs"] == [0, 1, 2]  # every cut is recorded
    assert all(450 <= w <= 525 for w in record["paragraph_words"])  # <= 1.5 x 350, ending on a full sentence
    assert record["messages"][1]["content"].endswith("rise.")
    with pytest.raises(ValueError, match="--section-limit -1"):
        run(AgentConfig(input=str(inputs), output=str(tmp_path / "o.jsonl"), plan="skeleton", section_limit=-1),
            client=RamblingWriter(), log=quiet)


class DenseWriter(RamblingWriter):
    """Real text takes fewer tokens a word than 1.35 (SmolLM2-135M: 504 words in 607 tokens): 1.1 here."""

    def complete(self, messages, max_tokens, temperature=0.7):
        return super().complete(messages, int(max_tokens * 1.35 / 1.1), temperature)


def test_section_limit_counts_words_not_tokens(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    counts = run(AgentConfig(input=str(inputs), output=str(tmp_path / "out.jsonl"), plan="skeleton", workers=1,
                             section_limit=1.5), client=DenseWriter(), log=quiet)
    assert counts["done"] == 1  # at 1.35 tokens a word each section ran to ~1.8x its words and the answer was dropped
    record = json.loads(open(tmp_path / "out.jsonl").read())
    assert record["trimmed_paragraphs"] == [0, 1, 2] and all(500 <= w <= 525 for w in record["paragraph_words"])
    assert all(p.endswith("rise.") for p in record["messages"][1]["content"].split("\n\n"))
    assert record["writer"]["section_limit_in"] == "words"  # a cache cut by tokens alone is refused, not reused


class CountingWriter(RamblingWriter):
    def __init__(self):
        self.calls = 0

    def complete(self, messages, max_tokens, temperature=0.7):
        self.calls += 1
        return super().complete(messages, max_tokens, temperature)


def test_an_endpoint_writer_is_sent_top_p_and_the_local_decoding_flags_are_refused(inputs, tmp_path):
    """--top-p was recorded as the writer's setting (0.8) but an endpoint was never sent it, and --repetition-penalty,
    --system and the like were recorded too, then ignored: the cache claimed settings the text was not made with."""
    server = ChatServer(default_answer)
    assert run(config(server, inputs, tmp_path), log=quiet)["done"] == 3
    assert {c["body"].get("top_p") for c in server.calls} == {0.8}
    calls = len(server.calls)
    assert run(config(server, inputs, tmp_path, output=str(tmp_path / "b.jsonl"), top_p=1.0), log=quiet)["done"] == 3
    assert all("top_p" not in c["body"] for c in server.calls[calls:])  # 1: the server's own default
    for kw, flags in (({"repetition_penalty": 1.1}, "--repetition-penalty"),
                      ({"system": "Be brief.", "device": "cpu"}, "--system, --device")):
        with pytest.raises(ValueError, match=f"{flags}: only with --checkpoint"):
            run(config(server, inputs, tmp_path, output=str(tmp_path / "c.jsonl"), **kw), log=quiet)
    assert not (tmp_path / "c.jsonl").exists()
    server.close()


def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_afresh(tmp_path):
    inputs, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    cfg = lambda **kw: AgentConfig(**{"input": str(inputs), "output": str(out), "plan": "skeleton", "workers": 1,
                                      "section_limit": 1.5, **kw})
    assert run(cfg(), client=SectionWriter(), log=quiet)["done"] == 1
    assert json.loads(out.read_text())["writer"]["temperature"] == 0.7
    writer = SectionWriter()
    with pytest.raises(ValueError, match=r"out.jsonl.cache.jsonl: written with other settings \(temperature: 0.7 there, "
                                         r"0.9 now\); .*--overwrite"):
        run(cfg(temperature=0.9), client=writer, log=quiet)
    with pytest.raises(ValueError, match=r"section_limit: 1.5 there, 2.0 now"):
        run(cfg(section_limit=2.0), client=writer, log=quiet)
    assert writer.calls == [] and len(out.read_text().splitlines()) == 1  # nothing called, nothing lost
    os.remove(str(out) + ".cache.jsonl")  # the records themselves say who wrote them
    with pytest.raises(ValueError, match=r"out.jsonl: written with other settings \(temperature"):
        run(cfg(temperature=0.9), client=writer, log=quiet)
    counts = run(cfg(temperature=0.9, overwrite=True), client=writer, log=quiet)
    assert counts["done"] == 1 and counts["skipped"] == 0 and len(writer.calls) == 3
    assert [json.loads(l)["writer"]["temperature"] for l in out.read_text().splitlines()] == [0.9]


def test_a_cache_from_before_settings_were_recorded_is_reused_and_said_so(tmp_path):
    inputs, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    cfg = AgentConfig(input=str(inputs), output=str(out), plan="skeleton", workers=1)
    assert run(cfg, client=SectionWriter(), log=quiet)["done"] == 1
    cache = out.with_name("out.jsonl.cache.jsonl")
    cache.write_text("".join(l + "\n" for l in cache.read_text().splitlines() if '"settings"' not in l))
    out.write_text(json.dumps({k: v for k, v in json.loads(out.read_text()).items() if k != "writer"}) + "\n")
    writer, lines = SectionWriter(), []
    assert run(cfg, client=writer, log=lines.append)["skipped"] == 1 and writer.calls == []
    assert any("no settings recorded (written before they were)" in l for l in lines)
    assert sum('"settings"' in l for l in cache.read_text().splitlines()) == 1  # recorded from now on


def test_settings_recorded_before_top_p_and_headings_existed_resume_and_top_p_is_checked(tmp_path):
    inputs, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    cfg = lambda **kw: AgentConfig(**{"input": str(inputs), "output": str(out), "plan": "skeleton", "workers": 1, **kw})
    assert run(cfg(), client=SectionWriter(), log=quiet)["done"] == 1
    for path in (out, out.with_name("out.jsonl.cache.jsonl")):  # as an older agentwrite wrote them
        path.write_text(path.read_text().replace(', "top_p": 0.8, "headings": false', ""))
    assert '"top_p"' not in out.read_text()
    writer = SectionWriter()
    assert run(cfg(), client=writer, log=quiet)["skipped"] == 1 and writer.calls == []  # the same defaults: reused
    with pytest.raises(ValueError, match=r"top_p: 0.8 there, 0.9 now"):  # what it was written with, not None
        run(cfg(top_p=0.9), client=writer, log=quiet)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"--top-p {bad:g}: a probability mass in \(0, 1\]"):
            run(cfg(top_p=bad, output=str(tmp_path / "new.jsonl")), client=writer, log=quiet)


def test_an_output_that_is_the_input_or_not_agentwrites_is_refused_and_left_as_it_is(tmp_path):
    inputs, other = tmp_path / "in.jsonl", tmp_path / "other.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    other.write_text(inputs.read_text())
    cfg = lambda out, **kw: AgentConfig(input=str(inputs), output=str(out), plan="skeleton", **kw)
    for overwrite in (False, True):  # with --overwrite the input file was deleted before being written over
        with pytest.raises(ValueError, match="--output .*in.jsonl: the --input file"):
            run(cfg(inputs, overwrite=overwrite), client=SectionWriter(), log=quiet)
    with pytest.raises(ValueError, match=r"other.jsonl:1: not written by AgentWrite \(no \"key\"\)"):  # was a KeyError
        run(cfg(other), client=SectionWriter(), log=quiet)
    assert inputs.read_text() == other.read_text()\
        == json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n"


def test_a_dropped_answer_is_judged_again_from_the_cache_under_another_max_ratio(tmp_path):
    inputs, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    writer = CountingWriter()
    cfg = lambda **kw: AgentConfig(input=str(inputs), output=str(out), plan="skeleton", workers=1, **kw)
    assert run(cfg(), client=writer, log=quiet)["dropped"] == 1 and writer.calls == 3  # 2.6x its plan
    assert run(cfg(), client=writer, log=quiet)["dropped"] == 1 and writer.calls == 3  # the same verdict, no call
    assert run(cfg(max_ratio=3.0), client=writer, log=quiet)["done"] == 1 and writer.calls == 3
    assert json.loads(out.read_text())["words"] > 2 * 1050


def test_an_endpoints_password_or_query_is_never_recorded(tmp_path):
    from agentwrite import writer_settings
    cfg = AgentConfig(api_base="https://user:sk-SECRET@api.example.com:8443/v1?key=sk-SECRET2", model="m")
    settings = writer_settings(cfg)
    assert settings["api_base"] == "https://api.example.com:8443/v1" and "SECRET" not in json.dumps(settings)


def test_a_finished_local_rerun_loads_no_model_and_a_closed_client_exits_cleanly(tmp_path, monkeypatch):
    import agentwrite
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tiny_checkpoint(ckpt)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    cfg = AgentConfig(input=str(inputs), output=str(tmp_path / "out.jsonl"), plan="skeleton", checkpoint=str(ckpt))
    assert run(cfg, client=SectionWriter(), log=quiet)["done"] == 1
    assert json.loads((tmp_path / "out.jsonl").read_text())["writer"]["model"] == "ckpt"
    with pytest.raises(ValueError, match=r"written with other settings \(template: None there, 'inst' now"):
        run(AgentConfig(**{**vars(cfg), "template": "inst"}), client=SectionWriter(), log=quiet)  # other prompts
    assert run(AgentConfig(**{**vars(cfg), "template": "plain"}), client=SectionWriter(), log=quiet)["skipped"] == 1
    monkeypatch.setattr(agentwrite, "LocalClient", lambda *a, **k: pytest.fail("a model was loaded for nothing"))
    assert run(cfg, log=quiet)["skipped"] == 1
    # closing frees the model and its cache (16 rows x 8192 tokens of SmolLM2: 6 GB, held through SFT before)
    import gc
    import weakref
    client = LocalClient(str(ckpt), device="cpu", max_batch=2, row_len=256)
    client.chat([{"role": "user", "content": "the sea"}], 3)
    model = weakref.ref(client.model)
    client.close()
    del client
    gc.collect()
    assert model() is None
    # a process exiting while the serving thread sets up its cache aborts (rc 134) on the real model; close() first
    code = f"from agentwrite import LocalClient; LocalClient({str(ckpt)!r}, device='cpu', max_batch=4).close()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_local_writer_gets_one_cache_row_per_call_in_flight_not_per_worker(tmp_path, monkeypatch):
    """Each row is a whole context of cache: --workers 64 for 2 items held 24 GB of SmolLM2 cache and was killed.
    A skeleton's sections are asked at once (a row each); sections that see the text so far, one item at a time."""
    import agentwrite
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tiny_checkpoint(ckpt)
    rows = []

    class Recorder(SectionWriter):
        def __init__(self, checkpoint, max_batch, **kw):
            super().__init__()
            rows.append(max_batch)

        def close(self):
            pass

    monkeypatch.setattr(agentwrite, "LocalClient", Recorder)
    inputs = tmp_path / "in.jsonl"
    prompts = lambda n: "".join(json.dumps({"prompt": f"Write a 700-word essay on tides, part {k}."}) + "\n"
                                for k in range(n))
    inputs.write_text(prompts(2))
    cfg = lambda workers, out="out.jsonl", **kw: AgentConfig(input=str(inputs), output=str(tmp_path / out),
                                                           plan="skeleton", checkpoint=str(ckpt), workers=workers, **kw)
    assert run(cfg(64), log=quiet)["done"] == 2 and rows == [4]  # 2 items of 2 sections
    inputs.write_text(prompts(7))  # 5 more to write: as many rows as workers
    assert run(cfg(3), log=quiet)["done"] == 5 and rows == [4, 3]
    seen = tmp_path / "seen.txt"
    seen.write_text("{instruction} So far: {text} Now {point}, in about {words} words.")
    assert run(cfg(64, "seen.jsonl", write_prompt=str(seen)), log=quiet)["done"] == 7 and rows == [4, 3, 7]


class WaitingWriter(SectionWriter):
    """Answers no section until `n` are asked at once, then the last section first."""

    def __init__(self, n, timeout=10):
        super().__init__()
        self.together = threading.Barrier(n, timeout=timeout)

    def complete(self, messages, max_tokens, temperature=0.7):
        text, finish = super().complete(messages, max_tokens, temperature)
        k = self.together.wait()  # raises BrokenBarrierError when the sections are asked one after another
        time.sleep(0.1 * k)  # the barrier's indices run n-1 .. 0: the first to arrive ends last
        return f"Section {messages[-1]['content'][-40:]!r}. " + text, finish


def test_a_skeletons_sections_are_asked_at_once_and_the_answer_keeps_their_order(tmp_path):
    """A skeleton's section prompt does not see the text so far, so the sections need not wait for each other:
    SmolLM2-135M's 9-section answers left about a third of AgentWrite's 16 rows empty, written one by one."""
    from agentwrite import SECTION_PROMPT, skeleton_plan
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides."}) + "\n")
    writer = WaitingWriter(3)
    counts = run(AgentConfig(input=str(inputs), output=str(tmp_path / "out.jsonl"), plan="skeleton", workers=3),
                 client=writer, log=quiet)
    assert counts["done"] == 1
    prompts = [fill(SECTION_PROMPT, instruction="Write a 1,050-word essay on tides.", point=s["point"], words=str(s["words"]))
               for s in skeleton_plan("Write a 1,050-word essay on tides.", 1050, 350)]
    answer = json.loads(open(tmp_path / "out.jsonl").read())["messages"][1]["content"]
    starts = [answer.index(f"Section {p[-40:]!r}") for p in prompts]
    assert starts == sorted(starts) and sorted(writer.calls) == sorted(prompts)  # plan order, whatever ended first

    # killed or failed halfway, a rerun asks only the sections missing, wherever they fall
    class Failing(WaitingWriter):
        def complete(self, messages, max_tokens, temperature=0.7):
            if "its background and history" in messages[-1]["content"]:  # the middle one of three, once all are asked
                self.together.wait()
                raise APIError("HTTP 400 from the endpoint")
            return super().complete(messages, max_tokens, temperature)

    first, second = Failing(3), SectionWriter()
    cfg = AgentConfig(input=str(inputs), output=str(tmp_path / "gap.jsonl"), plan="skeleton", workers=3)
    assert run(cfg, client=first, log=quiet)["failed"] == 1 and len(first.calls) == 2  # sections 1 and 3 cached
    assert run(cfg, client=second, log=quiet)["done"] == 1 and second.calls == [prompts[1]]
    words = json.loads(open(tmp_path / "gap.jsonl").read())["paragraph_words"]
    assert words[1] == 350 and words[0] > 350 and words[2] > 350  # the first run's sections (their "Section" prefix) kept
    # sections that see the text so far are asked one by one, each after the last (3 at once would never come)
    seen = tmp_path / "seen.txt"
    seen.write_text("{instruction} So far: {text} Now {point}, in about {words} words.")
    with pytest.raises(threading.BrokenBarrierError):
        run(AgentConfig(input=str(inputs), output=str(tmp_path / "seen.jsonl"), plan="skeleton", workers=3,
                        write_prompt=str(seen)), client=WaitingWriter(3, timeout=1), log=quiet)


def test_a_local_writer_whose_cache_cannot_fit_is_refused_before_its_thread_starts(tmp_path, monkeypatch):
    import generate
    _, model = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(generate, "free_memory", lambda: 10**6)  # 1 MB: 3 rows of the whole context do not fit
    n = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"KV cache of 3 rows x {n} tokens needs .* GiB, more than .* available"):
        LocalClient(str(tmp_path), device="cpu", max_batch=3)


class StumblingWriter(SectionWriter):
    """Its first answer to each section has no complete sentence (a small model's heading or broken-off list)."""

    def complete(self, messages, max_tokens, temperature=0.7):
        text, finish = super().complete(messages, max_tokens, temperature)
        tries = sum(c == self.calls[-1] for c in self.calls)
        return (("## Tides and the moon\n- the pull of the moon on the sea and the way it", "length") if tries <= self.bad
                else (text, finish))


def test_a_paragraph_with_no_complete_sentence_is_asked_again_before_the_item_fails(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides.", "id": "tides"}) + "\n")
    cfg = lambda out, **kw: AgentConfig(input=str(inputs), output=str(tmp_path / out), plan="skeleton", workers=1, **kw)
    writer, lines = StumblingWriter(), []
    writer.bad = 2  # two broken answers per section, then a good one
    counts = run(cfg("out.jsonl"), client=writer, log=lines.append)
    assert counts["done"] == 1 and len(writer.calls) == 3 * 3
    assert json.loads((tmp_path / "out.jsonl").read_text())["paragraph_words"] == [350, 350, 350]
    assert sum("has no complete sentence (attempt" in l for l in lines) == 6
    writer = StumblingWriter()
    writer.bad = 3
    counts = run(cfg("o2.jsonl"), client=writer, log=lines.append)
    assert counts["failed"] == 1 and len(writer.calls) == 3
    assert any("tides: failed: paragraph 1 has no complete sentence, 3 times" in l for l in lines)
    with pytest.raises(ValueError, match="--paragraph-attempts 0"):
        run(cfg("o3.jsonl", paragraph_attempts=0), client=writer, log=quiet)
    # flags under which every item would fail or be dropped, after writing it: refused before any call
    for flags, message in ((dict(plan_attempts=0), "--plan-attempts 0: at least 1"),
                           (dict(min_ratio=2.0, max_ratio=1.0), "--min-ratio 2 and --max-ratio 1: 0 <= min < max")):
        calls = len(writer.calls)
        with pytest.raises(ValueError, match=message):
            run(cfg("o4.jsonl", **flags), client=writer, log=quiet)
        assert len(writer.calls) == calls


class ChattyWriter(SectionWriter):
    """SmolLM2-135M's habits with a section request: its first answer talks to the requester instead of writing,
    and the second puts a title of its own on top of the section."""

    def complete(self, messages, max_tokens, temperature=0.7):
        text, finish = super().complete(messages, max_tokens, temperature)
        tries = sum(c == self.calls[-1] for c in self.calls)
        if tries == 1:
            return "I'm ready to help! What's your task? Please provide the piece you'd like me to assist with.", "stop"
        return f"<<Tides: Part {len(self.calls)}>>\n\nTitle: Tides\n\n{text}", finish


def test_chatter_is_asked_again_and_headings_replace_the_writers_own_titles(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides.", "id": "tides"}) + "\n")
    cfg = lambda out, **kw: AgentConfig(input=str(inputs), output=str(tmp_path / out), plan="skeleton", workers=1, **kw)
    writer, lines = ChattyWriter(), []
    assert run(cfg("plain.jsonl"), client=writer, log=lines.append)["done"] == 1 and len(writer.calls) == 6
    assert sum("talks to the requester instead of writing the piece (attempt 1 of 3)" in l for l in lines) == 3
    plain = json.loads((tmp_path / "plain.jsonl").read_text())["messages"][1]["content"]
    assert "ready to help" not in plain and plain.startswith("<<Tides: Part 2>>")  # without --headings: as written
    writer = ChattyWriter()
    assert run(cfg("headed.jsonl", headings=True), client=writer, log=quiet)["done"] == 1
    record = json.loads((tmp_path / "headed.jsonl").read_text())
    parts = record["messages"][1]["content"].split("\n\n")
    assert parts[0::2] == ["## Part 1 of 3", "## Part 2 of 3", "## Part 3 of 3"]  # each section under its place
    assert all(p.startswith("Tides rise and fall") for p in parts[1::2])  # the writer's own titles are gone
    assert record["paragraph_words"] == [350, 350, 350] and record["writer"]["headings"] is True
    with pytest.raises(ValueError, match=r"headings: True there, False now"):  # records of both kinds never mix
        run(cfg("headed.jsonl"), client=writer, log=quiet)


def test_heading_points_put_each_sections_point_in_its_heading(tmp_path):
    """--heading-points: the skeleton's plan is written into the answer as it goes ("## Part 2 of 3: its background and
    history"); under plain "Part k of K" headings the fine-tuned 135M model's parts restated its first."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides.", "id": "tides"}) + "\n")
    cfg = lambda out, **kw: AgentConfig(input=str(inputs), output=str(tmp_path / out), plan="skeleton", workers=1, **kw)
    assert run(cfg("points.jsonl", headings=True, heading_points=True), client=SectionWriter(), log=quiet)["done"] == 1
    record = json.loads((tmp_path / "points.jsonl").read_text())
    parts = record["messages"][1]["content"].split("\n\n")
    assert parts[0::2] == ["## Part 1 of 3: an introduction to the subject and why it matters",
                           "## Part 2 of 3: its background and history",
                           "## Part 3 of 3: a conclusion that draws the piece together"]
    assert [p["point"] for p in record["plan"]] == [h.split(": ", 1)[1] for h in parts[0::2]]
    assert record["writer"]["heading_points"] is True and record["paragraph_words"] == [350, 350, 350]
    with pytest.raises(ValueError, match=r"heading_points: True there, False now"):  # records of both kinds never mix
        run(cfg("points.jsonl", headings=True), client=SectionWriter(), log=quiet)
    with pytest.raises(ValueError, match=r"--heading-points puts each section's point in its heading: it needs --headings"):
        run(cfg("none.jsonl", heading_points=True), client=SectionWriter(), log=quiet)
    assert not (tmp_path / "none.jsonl").exists()


SECTIONS = json.load(open(os.path.join(ROOT, "tests", "data", "smollm2_sections.json")))


class LoopingWriter(SectionWriter):
    """Real SmolLM2-135M sections: the one about the background restates itself from ~word 130 on the first time it
    is asked (tests/data/smollm2_sections.json), every other answer is the one that does not loop."""

    def complete(self, messages, max_tokens, temperature=0.7):
        self.calls.append(messages[-1]["content"])
        first = sum("background" in c for c in self.calls) == 1 and "background" in self.calls[-1]
        return SECTIONS["looping" if first else "clean"], "stop"


def test_cut_loops_keeps_a_section_up_to_where_it_starts_to_restate_itself(tmp_path):
    """--cut-loops: 4 of 22 AgentWrite answers of the demo's twenty-fifth run held a section that loops (the same
    paragraph in other words, past any n-gram ban), SFT data that teaches the loop. The part before the loop is kept;
    when it is under --section-min, the section is asked again."""
    from dataset import count_words, loop_start
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write an essay on bridges in about 1050 words.", "id": "bridges"}) + "\n")
    cfg = lambda out, **kw: AgentConfig(input=str(inputs), output=str(tmp_path / out), plan="skeleton", workers=1, **kw)
    looping = SECTIONS["looping"]
    assert loop_start(looping) == 132 < count_words(looping) == 487 and loop_start(SECTIONS["clean"]) == 493

    def paragraphs(out):
        cache = [json.loads(l) for l in open(tmp_path / (out + ".cache.jsonl"))]
        return {r["i"]: r for r in cache if r["kind"] == "paragraph"}

    writer, lines = LoopingWriter(), []
    assert run(cfg("cut.jsonl", cut_loops=True), client=writer, log=lines.append)["done"] == 1
    second = paragraphs("cut.jsonl")[1]
    assert second["looped"] is True and second["trimmed"] is True and len(writer.calls) == 3  # kept, not asked again
    assert looping.startswith(second["text"]) and 87 < count_words(second["text"]) <= 132  # up to its last full sentence
    assert loop_start(second["text"]) == count_words(second["text"]) and second["text"].endswith(".")
    assert any("paragraph 2 of 3" in l and "where it starts to loop" in l for l in lines)
    assert not paragraphs("cut.jsonl")[0].get("looped") and paragraphs("cut.jsonl")[0]["text"] == SECTIONS["clean"]
    record = json.loads((tmp_path / "cut.jsonl").read_text())
    assert record["writer"]["cut_loops"] is True and record["trimmed_paragraphs"] == [1]

    writer, lines = LoopingWriter(), []  # what comes before the loop is under --section-min: asked again
    assert run(cfg("again.jsonl", cut_loops=True, section_min=0.5), client=writer, log=lines.append)["done"] == 1
    assert paragraphs("again.jsonl")[1]["text"] == SECTIONS["clean"] and len(writer.calls) == 4
    assert any("before it starts to loop, under 0.5x its 350 (--section-min) (attempt 1 of 3)" in l for l in lines)

    writer = LoopingWriter()  # off (the default): the loop stays, as before
    assert run(cfg("whole.jsonl"), client=writer, log=quiet)["done"] == 1
    assert paragraphs("whole.jsonl")[1]["text"] == looping and "looped" not in paragraphs("whole.jsonl")[1]
    with pytest.raises(ValueError, match=r"cut_loops: False there, True now"):  # records of both kinds never mix
        run(cfg("whole.jsonl", cut_loops=True), client=LoopingWriter(), log=quiet)


class TitleWriter(SectionWriter):
    """SmolLM2-135M's other habit (two of its 24 AgentWrite answers in the real-model demo): a section that is
    only a title ("Title: Volcanoes: The Unyielding Power of Nature") or a list of headings, here the first `bad`
    times each section is asked."""
    bad = 1

    def complete(self, messages, max_tokens, temperature=0.7):
        text, finish = super().complete(messages, max_tokens, temperature)
        tries = sum(c == self.calls[-1] for c in self.calls)
        return ("Title: Tides: The Pull of the Moon", "stop") if tries <= self.bad else (text, finish)


def test_a_section_far_shorter_than_asked_is_asked_again(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 1,050-word essay on tides.", "id": "tides"}) + "\n")
    cfg = lambda out, **kw: AgentConfig(input=str(inputs), output=str(tmp_path / out), plan="skeleton", workers=1,
                                        headings=True, **kw)
    writer, lines = TitleWriter(), []
    assert run(cfg("out.jsonl"), client=writer, log=lines.append)["done"] == 1 and len(writer.calls) == 6
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["paragraph_words"] == [350, 350, 350] and "Title:" not in record["messages"][1]["content"]
    assert sum("has 7 words, under 0.25x its 350 (--section-min) (attempt 1 of 3)" in l for l in lines) == 3
    writer, lines = TitleWriter(), []
    writer.bad = 3  # never more than a title: the item fails, as with no complete sentence
    assert run(cfg("o2.jsonl"), client=writer, log=lines.append)["failed"] == 1
    assert any("paragraph 1 has 7 words, under 0.25x its 350 (--section-min), 3 times" in l for l in lines)
    writer = TitleWriter()  # --section-min 0 keeps the title as the section, as before the rule
    assert run(cfg("o3.jsonl", section_min=0.0, min_ratio=0.0), client=writer, log=quiet)["done"] == 1
    assert len(writer.calls) == 3
    assert json.loads((tmp_path / "o3.jsonl").read_text())["paragraph_words"] == [7, 7, 7]
    with pytest.raises(ValueError, match=r"section_min: 0.0 there, 0.25 now"):  # its cache is not reused under the rule
        run(cfg("o3.jsonl", min_ratio=0.0), client=writer, log=quiet)
    with pytest.raises(ValueError, match=r"--section-min 1.5: from 0 to under 1.5 \(--section-limit\)"):
        run(cfg("o4.jsonl", section_min=1.5, section_limit=1.5), client=writer, log=quiet)


@pytest.mark.parametrize("text,chatter", [
    ("I'm ready to assist you with your project. Here's your request:", True),
    ("Sure, here is paragraph 2: the tides.", True),
    ("To write a compelling report on honeybees, you must cover their role.", True),
    ("Thank you for asking! Tides are", True),
    ("I walked down to the harbour. It was late.", False),
    ("Thanks to the wind, the ship sailed home.", False),
    ("Here is the harbour where it all began.", False),
])
def test_chatter_is_told_from_prose_that_starts_alike(text, chatter):
    from agentwrite import CHATTER_RE
    assert bool(CHATTER_RE.match(text)) is chatter
