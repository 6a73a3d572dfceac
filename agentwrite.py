"""AgentWrite: plan a long piece (one line per paragraph: main point + word count), then write it
paragraph by paragraph, each call seeing the instruction, the plan and the text so far.

Usage:
    export OPENAI_API_KEY=...      # never printed or written anywhere
    python agentwrite.py --input instructions.jsonl --output longwriter.jsonl --api-base URL --model NAME
    python agentwrite.py --input instructions.jsonl --output longwriter.jsonl --checkpoint DIR   # local model

Input lines hold at least "prompt" (other fields, an "id" included, are copied to the output). Output
lines are SFT records {"messages": [user, assistant]} with the parsed plan, the plan as the model wrote it
("plan_text") and per-paragraph word counts as metadata. Every finished plan and paragraph is appended to
OUTPUT.cache.jsonl as it arrives, keyed by the prompt's text (not its line): rerun the same command after a
crash, or after editing the input file, and only unfinished calls are made. The writer and its settings are
recorded (in the cache, and as each record's "writer"): a rerun with others is refused rather than mixed in.
"""
import argparse
import hashlib
import json
import os
import queue
import random
import re
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import requests

from dataset import (TOKENS_PER_WORD, WORD_RE, DataError, add_flags, chat_prompt_ids, count_words, file_digest,
                     load_tokenizer, loop_start, read_jsonl)

PLAN_PROMPT = """Plan the piece of writing requested below so that it can be drafted one paragraph at a time.

Request:
{instruction}

Answer with the plan only: one line per paragraph, in reading order, each line in this form:
Paragraph N - Main Point: [what the paragraph covers, specific enough to draft it from this line alone] - \
Word Count: [number] words

Give each paragraph between 200 and 1,000 words and do not cut the piece into many small pieces: a few \
substantial paragraphs read better than a long list of thin ones. The paragraphs together must cover \
everything the request asks for, and their word counts must add up to the length it asks for."""

WRITE_PROMPT = """We are writing a long piece together, one paragraph per turn, following a plan.

Request:
{instruction}

Plan:
{plan}

Text written so far:
{text}

Now write {step}. Carry on from where the text so far stops, in the same voice, and stay close to the word \
count the plan gives. The paragraph may begin with a short subtitle if the piece suits one. Reply with the \
new paragraph alone: repeat nothing already written, and add no notes or word counts. Keep summaries, \
conclusions and appeals to the reader for the plan's last paragraph."""

SECTION_PROMPT = """Here is a writing request: {instruction}

Write the part of the piece that covers {point}, in about {words} words."""

MAX_STEPS = 50


# -----------------------------------------------------------------------------
# plans, as models really write them: "Paragraph 1 - Main Point: ... - Word Count: 400 words", markdown
# blocks with the count on its own line, numbered lists with "(300-400 words)", Chinese "第一段 ... 800字",
# tables; with titles, intros and "Total: 5000 words" lines around them that are not paragraphs.

NUM = r"\d{1,3}(?:,\d{3})+|\d+"
RANGE = rf"({NUM})(?:\s*(?:-|–|—|~|～|to|至|到)\s*({NUM}))?"
APPROX = r"(?:approximately|approx\.?|about|around|roughly|circa|~|约|大约)?"
LABEL = r"(?:word\s*count|words?|length|字数(?:要求)?|篇幅)"
LABELLED_RE = re.compile(rf"{LABEL}\s*\**\s*[:：]\s*\**\s*{APPROX}\s*{RANGE}(?:\s*(?:words?\b|字))?(?:\s*左右)?", re.I)
COUNT_RE = re.compile(rf"{APPROX}\s*{RANGE}\s*-?\s*(?:words?\b|字)(?:\s*左右)?", re.I)
CN_NUM = "一二三四五六七八九十百"
HEADER_RE = re.compile(rf"^(?:(?:paragraph|para\.?|section|part|step|段落|部分)\s*(?:\d+|[{CN_NUM}]+)"
                       rf"|第\s*(?:\d+|[{CN_NUM}]+)\s*(?:段|部分|节|章|步)|\d+\s*(?:[.)、:：]|\s[-–—]\s)|\(\d+\))", re.I)
POINT_LABEL_RE = re.compile(r"(?:main\s*points?|key\s*points?|points?|focus|content|主要观点|主要内容|要点|内容)"
                            r"\s*\**\s*[:：]", re.I)
TOTAL_RE = re.compile(r"\b(?:total|in all|altogether|overall)\b|总计|合计|共计|总字数|全文", re.I)


def find_count(line: str):
    """(words, span, labelled) of the word count in a line, or None. A range counts as its midpoint."""
    m = LABELLED_RE.search(line)
    labelled = m is not None
    if not m:
        matches = list(COUNT_RE.finditer(line))
        if not matches:
            return None
        m = matches[-1]
    lo = int(m.group(1).replace(",", ""))
    hi = int(m.group(2).replace(",", "")) if m.group(2) else lo
    return (lo + hi) // 2, m.span(), labelled


def clean_point(text: str) -> str:
    """The paragraph's main point, without numbering, labels, markdown or empty brackets."""
    text = re.sub(r"\*\*|__|`", "", text).strip()
    text = re.sub(r"^[#>*•\-\s]+", "", text)
    text = HEADER_RE.sub("", text, count=1)
    text = POINT_LABEL_RE.sub("", text)
    text = re.sub(r"\(\s*\)|（\s*）|\[\s*\]|【\s*】", "", text)
    text = re.sub(r"\s+([:：,，;；.])", r"\1", re.sub(r"\s+", " ", text))  # what removing the count left
    return text.strip(" \t-–—:：,，;；|*.。()（）[]【】")


def plan_table(lines: list[str]) -> list[dict] | None:
    """Steps of a markdown table whose header names a word-count column; None when there is none."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.strip().startswith("|")]
    rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r if c)]
    for h, header in enumerate(rows):
        count_col = next((i for i, c in enumerate(header) if re.search(LABEL, c, re.I) and not re.search(r"\d", c)), None)
        if count_col is None:
            continue
        point_col = next((i for i, c in enumerate(header) if POINT_LABEL_RE.search(c + ":") and i != count_col),
                         max(range(len(header)), key=lambda i: (i != count_col and i != 0, i)))
        steps = []
        for r in rows[h + 1:]:
            if len(r) != len(header):
                continue
            m = re.search(RANGE, r[count_col])
            point = clean_point(r[point_col])
            if m and point:
                lo, hi = int(m.group(1).replace(",", "")), int((m.group(2) or m.group(1)).replace(",", ""))
                steps.append({"point": point, "words": (lo + hi) // 2})
        return steps
    return None


def set_off(line: str, span) -> bool:
    """A count written as a plan writes it: at the end of the line or after "(", a dash, ":" or "|"
    ("Starter basics - 500 words"), not inside a sentence ("Aiming for a 600-word blog post")."""
    before, after = line[:span[0]].rstrip(" *"), line[span[1]:].strip(" *)）.。")
    return not after or before.endswith(tuple("(（-–—:：|,，[【"))


def parse_plan(text: str) -> list[dict]:
    """Plan text -> [{"point": str, "words": int}], one per paragraph.

    Numbered lines ("Paragraph 2", "3.", "第三段", "段落3") each open a paragraph, and the lines under
    one (a "Main Point:" line, a "Word Count: 400" line) belong to it; text before the first is a
    title or an intro. Without numbering, each line with a labelled count ("Word Count: N") is a
    paragraph when some are labelled (a label-only line takes the text line above it as its point);
    else each line whose count is set off as a plan writes it ("- 500 words", "(500 words)"), and
    then two such lines at least: one line of prose with a number in it is not a plan. A range
    ("300-400 words") counts as its midpoint. "Total" lines are not paragraphs; nor, by its form, an
    unnumbered first or last line whose count is the sum of all the others (a title's "(2000 words)").
    """
    lines = [l for l in text.splitlines() if l.strip() and not TOTAL_RE.search(l)]
    table = plan_table(lines)
    if table is not None:
        return table
    bare = [re.sub(r"\*\*|__", "", l).strip().lstrip("#>*•- \t") for l in lines]
    blocks = []  # [point texts, count or None]
    if any(HEADER_RE.match(b) for b in bare):
        for b in bare:
            if HEADER_RE.match(b):
                blocks.append([[], None])
            elif not blocks:
                continue  # a title or an intro
            elif blocks[-1][0] and blocks[-1][1] and not POINT_LABEL_RE.search(b):
                continue  # the paragraph is complete: a closing remark, not part of it
            count = find_count(b)
            if count and blocks[-1][1] is None:
                blocks[-1][1] = count[0]
                b = b[:count[1][0]] + b[count[1][1]:]
            elif count:
                continue
            if clean_point(b):
                blocks[-1][0].append(clean_point(b))
        return [{"point": ": ".join(p[:2]), "words": w} for p, w in blocks if p and w]
    counts = [find_count(b) for b in bare]
    labelled_only = any(c and c[2] for c in counts)
    above = ""
    for b, c in zip(bare, counts):
        if c is None or (labelled_only and not c[2]) or (not labelled_only and not set_off(b, c[1])):
            above = clean_point(b)
            continue
        point = clean_point(b[:c[1][0]] + b[c[1][1]:]) or above
        blocks.append([[point] if point else [], c[0]])
        above = ""
    steps = [{"point": ": ".join(p[:2]), "words": w} for p, w in blocks if p and w]
    if len(steps) > 2:
        total = sum(s["words"] for s in steps)
        steps = [s for k, s in enumerate(steps) if not (k in (0, len(steps) - 1) and 2 * s["words"] == total)]
    return steps if labelled_only or len(steps) >= 2 else []


def plan_text(steps: list[dict]) -> str:
    return "\n".join(f"Paragraph {i} - Main Point: {s['point']} - Word Count: {s['words']} words"
                     for i, s in enumerate(steps, 1))


def fill(template: str, **values) -> str:
    """Replace the template's {name} markers in one pass, so that markers inside the values (user text
    that happens to contain "{text}") are left as written."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], template)


# -----------------------------------------------------------------------------
# skeleton plans, for writers too small to plan: asked for a plan (or a list of section titles),
# SmolLM2-135M writes an essay. The code lays out the sections, their points and word counts from the
# asked length and the kind of piece, and a short prompt (SECTION_PROMPT) asks for each section in a call of
# its own; it shows no text written before, so an item's calls go out at once (write_item's `calls`).

ASKED_RE = re.compile(rf"({NUM})\s*-?\s*(?:words?\b|字)", re.I)
STORY_RE = re.compile(r"\b(?:stor(?:y|ies)|tale|novel|fiction|fable|narrative)\b|小说|故事", re.I)
STORY_PARTS = ["the setting and the main character", "the trouble that starts the story", "a first attempt that fails",
               "a discovery that changes things", "the hardest moment", "the turning point", "what the change costs"]
ESSAY_PARTS = ["its background and history", "how it works", "the main examples", "the benefits it brings",
               "the problems and debates around it", "its effect on people's lives", "what the future may hold"]


def asked_words(source: dict) -> int:
    """The length an instruction asks for: its "length" field, else the largest "N words" / "N-word" /
    "N字" in its prompt; 0 when it names none."""
    if isinstance(source.get("length"), (int, float)) and source["length"] > 0:
        return int(source["length"])
    return max((int(m.group(1).replace(",", "")) for m in ASKED_RE.finditer(source["prompt"])), default=0)


def skeleton_plan(instruction: str, words: int, section_words: int) -> list[dict]:
    """round(words / section_words) sections (at least one) whose counts add up to `words`: an opening, the
    middle parts of a story or of an essay (by the instruction's wording), and an ending."""
    n = max(1, round(words / section_words))
    story = bool(STORY_RE.search(instruction))
    middle = STORY_PARTS if story else ESSAY_PARTS
    points = [middle[k % len(middle)] + (f" (part {k // len(middle) + 1})" if k >= len(middle) else "")
              for k in range(max(0, n - 2))]
    opening = "the opening, which sets the scene" if story else "an introduction to the subject and why it matters"
    ending = "the ending, where the story is resolved" if story else "a conclusion that draws the piece together"
    points = ([opening] + points + [ending])[:n] if n > 1 else ["the whole piece"]
    return [{"point": p, "words": words // n + (1 if i < words % n else 0)} for i, p in enumerate(points)]


# -----------------------------------------------------------------------------
# backends: an OpenAI-compatible endpoint, or our own model in-process

class APIError(Exception):
    """A call that retrying will not fix, or that failed after every retry."""


class AuthError(APIError):
    """401/403: every call would fail the same way, so the whole run stops."""


def drop_reasoning(text: str) -> tuple[str, bool]:
    """(the answer, whether a reasoning block was removed). Reasoning models served without a reasoning parser
    (vLLM, ollama, LM Studio) put their thinking in the content: "<think>...</think>answer", or, when the chat
    template opens the block itself, "...</think>answer". Kept, it would be counted as the answer's words,
    trained on, and read for a judge's scores. An unclosed block is all reasoning: no answer."""
    head = text.lstrip()
    if head.startswith("<think>"):
        end = head.find("</think>")
        return ("" if end < 0 else head[end + len("</think>"):].lstrip()), True
    if "</think>" in text and "<think>" not in text:
        return text.split("</think>", 1)[1].lstrip(), True
    return text, False


class ChatClient:
    """POST /v1/chat/completions with retries: timeouts, connection errors, 429 (Retry-After honoured),
    5xx and malformed bodies back off exponentially with jitter; other 4xx stop at once."""

    def __init__(self, api_base, model, api_key, timeout=600.0, max_retries=5, backoff=1.0, top_p=None):
        if not api_base.startswith(("http://", "https://")):  # empty: every call failed on "Invalid URL"
            raise ValueError(f"--api-base {api_base!r}: the URL of an OpenAI-compatible endpoint (http://host:port/v1) "
                             f"is needed to call {model!r}")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff = max_retries, backoff
        # None or 1 sends none: the server's default, and models that refuse the parameter still answer
        self.top_p = top_p if top_p is not None and top_p < 1 else None
        self.session = requests.Session()
        self.cap = "max_tokens"  # newer OpenAI models (o-series, gpt-5) take it as "max_completion_tokens" only

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def chat(self, messages, max_tokens, temperature=0.7) -> str:
        return self.complete(messages, max_tokens, temperature)[0]

    def complete(self, messages, max_tokens, temperature=0.7) -> tuple[str, str]:
        """(text, finish_reason): "length" when the answer was cut at max_tokens (0: the server's own limit)."""
        body = {"model": self.model, "messages": messages, "temperature": temperature}
        if max_tokens > 0:
            body[self.cap] = max_tokens
        if self.top_p is not None:
            body["top_p"] = self.top_p
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt * random.uniform(0.5, 1.0)
            try:
                r = self.session.post(self.url, json=body, headers=headers, timeout=self.timeout)
                if r.status_code == 400 and "max_tokens" in body and "max_completion_tokens" in r.text:
                    self.cap = "max_completion_tokens"  # the same cap under its new name, from now on
                    body["max_completion_tokens"] = body.pop("max_tokens")
                    r = self.session.post(self.url, json=body, headers=headers, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                problem = f"{type(e).__name__} calling {self.url}"
            else:
                if r.status_code == 200:
                    try:
                        choice = r.json()["choices"][0]
                        text, finish = choice["message"]["content"], choice.get("finish_reason")
                    except (ValueError, KeyError, IndexError, TypeError):
                        problem = "malformed response body"
                    else:
                        if finish == "content_filter":
                            raise APIError("refused by the content filter")
                        text, thought = drop_reasoning(text if isinstance(text, str) else "")  # null: no answer
                        thought = thought or bool(choice["message"].get("reasoning_content")
                                                  or choice["message"].get("reasoning"))  # a server's parser split it
                        if not text.strip():
                            raise APIError("empty answer" + (f" after the model's reasoning (finish_reason: {finish})"
                                                             if thought else ""))
                        return text, "length" if finish == "length" else "stop"
                elif r.status_code == 429 or r.status_code >= 500:
                    problem = f"HTTP {r.status_code}"
                    retry_after = r.headers.get("Retry-After", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        wait = float(retry_after)
                else:
                    message = self.redact(f"HTTP {r.status_code} from {self.url}: {r.text[:500]}")
                    if r.status_code in (401, 403):
                        raise AuthError(message + " (check the API key and --api-key-env)")
                    raise APIError(message)
            if attempt < self.max_retries:
                time.sleep(wait)
        raise APIError(self.redact(f"gave up after {self.max_retries} retries: {problem}"))


class LocalClient:
    """Our own checkpoint in-process, serving calls from many worker threads by continuous batching: a call
    takes a free row of the running batch at once and is answered as soon as its own answer ends. Only the
    rows in use are decoded, so one waiting call costs one row, up to max_batch rows at once. Eagerly on CUDA
    too, never as a CUDA graph: torch before 2.13 (the GPU machine has 2.11) fails an assertion when a compiled
    CUDA graph runs in a Python thread other than the one that set up inductor's graph state (pytorch#123177),
    and the serving thread is such a thread whenever the main one decoded compiled first (demo.py --real)."""

    def __init__(self, checkpoint, device=None, max_batch=8, template=None, system="", context=0, row_len=32768,
                 seed=0, repetition_penalty=1.0, no_repeat_ngram=0, dtype="", top_p=0.8):
        import torch
        from generate import check_cache_memory, context_of
        from model import Transformer, compute_dtype
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(checkpoint, template)
        self.model = Transformer.from_pretrained(checkpoint, compute_dtype(dtype, device), device).eval()
        self.system = system
        self.max_batch, self.seed, self.requests = max_batch, seed, queue.Queue()
        self.repetition_penalty, self.no_repeat_ngram, self.top_p = repetition_penalty, no_repeat_ngram, top_p
        # a cache row: the model's context (or --context), at most row_len tokens (the cache holds max_batch rows)
        self.row_len = min(row_len, context_of(self.model, context))
        check_cache_memory(self.model, max_batch, self.row_len)  # here, before the serving thread
        self.threads = torch.get_num_threads()  # the serving thread's own are the default, not this setting
        self.closed, self.thread = False, threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def close(self):
        """Stop serving once the calls in flight are answered. Exiting while the thread still sets up its
        cache aborts the process ("terminate called without an active exception"), so callers close first."""
        self.requests.put(None)
        self.thread.join()

    def chat(self, messages, max_tokens, temperature=0.7) -> str:
        return self.complete(messages, max_tokens, temperature)[0]

    def complete(self, messages, max_tokens, temperature=0.7) -> tuple[str, str]:
        """(text, finish_reason); a prompt + max_tokens past the context is an APIError, named, before decoding."""
        from generate import check_request, finish_reason
        prompt = chat_prompt_ids(self.tok, messages, self.system)
        try:
            check_request(self.model, prompt, max_tokens, self.row_len)
        except ValueError as e:
            raise APIError(str(e)) from None
        done = Future()
        self.requests.put((done, prompt, max_tokens, self.tok.stop_ids, temperature))
        ids = done.result()
        text = self.tok.decode(ids)
        if not text.strip():
            raise APIError("empty answer")
        return text, finish_reason(ids, max_tokens)

    def serve(self):
        import torch
        from generate import continuous
        torch.set_num_threads(self.threads)  # MKL's threads are set per thread: a new one would use every core
        pending = set()

        def next_request(block):
            if self.closed:
                return None
            try:
                req = self.requests.get(block=block)
            except queue.Empty:
                return None
            if req is None:  # close()
                self.closed = True
                return None
            pending.add(req[0])
            return req

        while not self.closed:  # a failure fails the calls in flight, then serving goes on
            try:
                for done, ids in continuous(self.model, next_request, self.max_batch, self.row_len, top_p=self.top_p,
                                            seed=self.seed,
                                            repetition_penalty=self.repetition_penalty,
                                            no_repeat_ngram=self.no_repeat_ngram):
                    pending.discard(done)
                    done.set_result(ids)
            except Exception as e:  # noqa: BLE001 - hand the error to the waiting callers
                for done in pending:
                    done.set_exception(e)
                pending.clear()


# -----------------------------------------------------------------------------
# append-only JSONL files that a kill cannot corrupt

class JsonlLog:
    """Appends whole lines under a lock (flush + fsync per line). On open, a torn last line left by a
    killed run is cut off, so later lines never glue onto it."""

    def __init__(self, path):
        self.path, self.lock = path, threading.Lock()
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def append(self, record: dict):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)  # not there: --output a/b.jsonl
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def checkpoint_identity(path) -> dict:
    """What a prediction file or an AgentWrite output records of the checkpoint that wrote it: its folder name
    and a digest of its config and weights (a moved folder is the same model; other weights under the same name are not)."""
    from model import checkpoint_files
    weights = file_digest(os.path.join(path, "config.json"), *checkpoint_files(path))[:16]
    return {"model": os.path.basename(os.path.normpath(path)), "weights": weights}


def endpoint_identity(api_base: str, model: str) -> dict:
    """What a cache records of an endpoint: its URL without any user:password@ or ?query, where a key could hide."""
    url = urllib.parse.urlsplit(api_base)
    return {"api_base": f"{url.scheme}://{url.hostname or ''}{':%d' % url.port if url.port else ''}{url.path}",
            "model": model}


def writer_settings(cfg) -> dict:
    """What decides the text of a call. Cached plans and paragraphs are reused only under the same settings:
    another writer's paragraphs, or ones asked at another length, would be stitched into new answers unseen."""
    writer = checkpoint_identity(cfg.checkpoint) if cfg.checkpoint else endpoint_identity(cfg.api_base, cfg.model)
    if cfg.checkpoint and cfg.template:  # another chat format than the files name: other prompts (Tokenizer.forced)
        if load_tokenizer(cfg.checkpoint, cfg.template).forced:
            writer = {**writer, "template": cfg.template}
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]
    return {**writer, "plan": cfg.plan, "section_words": cfg.section_words, "section_limit": cfg.section_limit,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "headings": cfg.headings, "section_min": cfg.section_min,
            "heading_points": cfg.heading_points, "cut_loops": cfg.cut_loops,
            "repetition_penalty": cfg.repetition_penalty,
            "no_repeat_ngram": cfg.no_repeat_ngram, "plan_tokens": cfg.plan_tokens, "system": cfg.system,
            "context": cfg.context, "plan_prompt": digest(cfg.plan_template), "write_prompt": digest(cfg.write_template),
            **stop_odds_record(cfg.repetition_penalty, cfg.no_repeat_ngram),
            **({"section_limit_in": "words"} if cfg.section_limit > 0 else {})}  # before: in tokens only


# settings added after files were first written: what those files were written with (top-p was fixed at 0.8)
SETTINGS_BEFORE = {"top_p": 0.8, "headings": False, "section_min": 0.0, "heading_points": False, "cut_loops": False}


def stop_odds_record(repetition_penalty: float, no_repeat_ngram: int) -> dict:
    """What a cache of local decoding adds under the repetition penalty or the n-gram ban: text decoded under
    either before generate.keep_stop_odds ended early, so a record without this mark is refused, not reused."""
    return {"stop_odds": "kept"} if repetition_penalty != 1.0 or no_repeat_ngram else {}


def settings_diff(have: dict, want: dict, most=3) -> str:
    """The first `most` settings that differ, as "key: old there, new now" (for refusing a cache made otherwise)."""
    keys = [k for k in {**have, **want} if have.get(k) != want.get(k)]
    return "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in keys[:most])


def check_settings(output: "JsonlLog", cache: "JsonlLog", settings: dict, log=print):
    """Refuse to resume files written under other settings, naming the difference; record ours in the cache."""
    recorded = ([(cache.path, r["settings"]) for r in cache.read() if r["kind"] == "settings"]
                + [(output.path, r["writer"]) for r in output.read() if "writer" in r])
    for path, have in recorded:
        have = {**SETTINGS_BEFORE, **have}  # recorded before these were settings: written as these values
        if have != settings:
            raise ValueError(f"{path}: written with other settings ({settings_diff(have, settings)}); rerun with the same "
                             "ones, write to another --output, or --overwrite to start it afresh")
    if not any(path == cache.path for path, _ in recorded):
        if cache.read():
            log(f"{cache.path}: no settings recorded (written before they were); its calls are reused as they are")
        cache.append({"kind": "settings", "settings": settings})


def item_key(prompt: str, occurrence: int) -> str:
    """What an instruction is known by in the output and the cache: its text, not its line, so that
    editing the input file (a line inserted above) never reruns finished work. The k-th repeat of
    the same prompt gets its own key."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return digest if occurrence == 0 else f"{digest}-{occurrence}"


def parse_instruction(obj) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise DataError('needs a non-empty "prompt" string')
    return obj


def read_instructions(path) -> list[tuple[str, dict]]:
    """(item key, record) per input line."""
    records, _ = read_jsonl(path, parse_instruction)
    seen, items = {}, []
    for obj in records:
        k = seen[obj["prompt"]] = seen.get(obj["prompt"], -1) + 1
        items.append((item_key(obj["prompt"], k), obj))
    return items


# -----------------------------------------------------------------------------
# one instruction: plan, then each paragraph in order

SENTENCE_END = re.compile(r"[.!?。！？…](?:[\"'”’)）\]*_]*)$")


# a writer that answers the requester ("I'm ready to help! What's your task?", "Sure, here is paragraph 2:") instead
# of writing the piece: SmolLM2-135M began about one section in six that way, and the text would be trained on
CHATTER_RE = re.compile(r"\W*(?:i(?:'m| am|'d| would|'ll| will) (?:be )?(?:ready|glad|happy|excited|delighted|here to|"
                        r"sorry|unable|love to)\b|(?:sure|certainly|of course|absolutely)\b\s*[,!.]|"
                        r"here(?:'s| is) (?:your|my) |thank(?:s| you)\b\s*(?:for\b|[,!.])|please provide\b|what(?:'s| is) your\b|"
                        r"could you\b|to write (?:a|an|the|this|your)\b)", re.I)
TITLE_RE = re.compile(r"^[ \t]*(?:<<[^\n]*>>|#{1,6} [^\n]*|\*\*[^\n]{1,100}\*\*:?|title:[^\n]*|\"?introduction:?\"?)"
                      r"[ \t]*(?:\n+|$)", re.I)


def untitled(text: str) -> str:
    """The section without the title lines a writer puts on top of it ("<<Title>>", "Title: ...", "# ...",
    "**...**", "Introduction:"): under --headings the code gives every section its own heading."""
    body = text
    for _ in range(2):
        body = TITLE_RE.sub("", body, count=1).lstrip()
    return body or text.strip()


def heading(i: int, n: int, point: str = "") -> str:
    """--headings: "## Part 2 of 6" over the second of six sections. Where a piece stands is then written in
    the text, so a small model fine-tuned on it need not track thousands of words in its head. On SmolLM2-135M
    it gave longer answers than plain sections (BENCHMARKS.md), though the model did not learn to stop exactly
    at the last part. --heading-points adds the section's point ("## Part 2 of 6: how it works"): the plan, written
    as the piece goes, so that each part has its own subject (without, the fine-tuned model's parts restated the first)."""
    return f"## Part {i + 1} of {n}" + (f": {point}" if point else "")


def trim_to_sentence(text: str, cut: bool) -> str:
    """The paragraph without a sentence left unfinished: cut back to the last sentence end when the call hit its
    token limit (cut) or when its last line is prose that stops mid-sentence. A last line that is a heading,
    a list item or a table row is left alone. Empty when no sentence is complete."""
    text = text.rstrip()
    last = text.splitlines()[-1].strip() if text else ""
    prose = len(last.split()) >= 8 and not re.match(r"^(?:[#>|*•\-]|\d+[.)])", last)
    if not text or SENTENCE_END.search(text) or not (cut or prose):
        return text
    # a Latin sentence ends before a space; a Chinese one (。！？) also right before the next character
    ends = list(re.finditer(r"[.!?…][\"'”’)）\]*_]*(?=\s|$)|[。！？][”’」』）)]*", text))
    return text[:ends[-1].end()].rstrip() if ends else ""


def within_words(text: str, most: int) -> str:
    """The text cut back to its last full sentence within `most` words, counted as count_words counts them. The
    token limit alone does not keep a section to its words: SmolLM2-135M wrote 504 words in 607 tokens where
    1.35 tokens a word allowed 450, and the answer was dropped at 166% of its plan."""
    words = list(WORD_RE.finditer(text))
    return text if len(words) <= most else trim_to_sentence(text[:words[most].start()], cut=True)


def write_item(client, key, source, cache: JsonlLog, done: dict, cfg, log=print, calls=None) -> dict:
    """Run the calls this item still needs; returns its output record. `done` holds its cached results. A plan
    that cannot be read is kept in the cache (text and reason) and asked again, up to cfg.plan_attempts times.
    calls: a thread pool to ask all the sections at once, for sections that do not see the text so far."""
    instruction, name = source["prompt"], source.get("id", key)
    attempt = done.get("plan_attempts", 0)
    while "plan" not in done:
        if attempt >= cfg.plan_attempts:
            problem = done.get("plan_problem", "")
            hint = ("; a writer that writes no plan at all may be too small to plan: --plan skeleton lays one out"
                    if re.search(r"\b0 parseable", problem) else "")
            raise APIError(f"plan rejected {attempt} times; the last one: {problem} "
                           f"(the plans are kept in the cache file){hint}")
        attempt += 1
        if cfg.plan == "skeleton":  # laid out by the code: nothing to ask, nothing to reject
            words = asked_words(source)
            if not words:
                raise APIError('--plan skeleton needs the asked length: a "length" field or "N words" in the prompt')
            steps = skeleton_plan(instruction, words, cfg.section_words)
            text, problem = plan_text(steps), ""
        else:
            log(f"{name}: planning (attempt {attempt} of {cfg.plan_attempts})")
            text, finish = client.complete([{"role": "user", "content": fill(cfg.plan_template, instruction=instruction)}],
                                           max_tokens=cfg.plan_tokens, temperature=cfg.temperature)
            steps = parse_plan(text)
            problem = f"{len(steps)} parseable steps (1 to {MAX_STEPS} needed)"
            if finish == "length":  # its last steps (the ending) missing: an answer short of the asked length
                steps, problem = [], f"cut at --plan-tokens {cfg.plan_tokens} after {len(steps)} parseable steps"
        if not steps or len(steps) > MAX_STEPS:
            done["plan_problem"] = problem
            cache.append({"key": key, "kind": "plan_rejected", "reason": problem, "text": text})
            log(f"{name}: plan rejected: {problem}; it began {text.strip()[:80]!r}")
            continue
        done["plan"], done["plan_text"] = steps, text
        cache.append({"key": key, "kind": "plan", "steps": steps, "text": text})
        log(f"{name}: plan of {len(steps)} paragraphs, {sum(s['words'] for s in steps):,} words")
    steps, paragraphs = done["plan"], done.setdefault("paragraphs", {})

    def write_section(i):
        step = steps[i]
        written = "\n\n".join(paragraphs[j] for j in range(i)) if calls is None else ""
        prompt = fill(cfg.write_template, instruction=instruction, plan=plan_text(steps), text=written,
                      step=f"paragraph {i + 1} of {len(steps)} ({step['point']}; {step['words']} words)",
                      point=step["point"], words=str(step["words"]))
        limit = (int(cfg.section_limit * TOKENS_PER_WORD * step["words"]) if cfg.section_limit > 0
                 else 3 * step["words"] + 200)
        for attempt in range(1, cfg.paragraph_attempts + 1):  # a sampled writer gets it right on another try
            text, finish = client.complete([{"role": "user", "content": prompt}], max_tokens=limit,
                                           temperature=cfg.temperature)
            text = text.strip()
            kept = trim_to_sentence(text, finish == "length")
            if cfg.section_limit > 0:
                kept = within_words(kept, int(cfg.section_limit * step["words"]))
            start = loop_start(kept) if cfg.cut_loops else count_words(kept)
            looped = start < count_words(kept)
            if looped:  # a small writer restating itself in other words: keep what came before
                kept = within_words(kept, start)
            words = count_words(untitled(kept) if cfg.headings else kept)  # as the record will hold it
            problem = ("has no complete sentence" if not kept else
                       "talks to the requester instead of writing the piece" if CHATTER_RE.match(kept) else
                       f"has {words} words{' before it starts to loop' if looped else ''}, "
                       f"under {cfg.section_min:g}x its {step['words']} (--section-min)"
                       if words < cfg.section_min * step["words"] else "")
            if not problem:
                break
            log(f"{name}: paragraph {i + 1} {problem} (attempt {attempt} of {cfg.paragraph_attempts}); "
                f"it began {text[:60]!r}")
        else:
            raise APIError(f"paragraph {i + 1} {problem}, {cfg.paragraph_attempts} times")
        paragraphs[i] = kept
        cache.append({"key": key, "kind": "paragraph", "i": i, "text": kept, "finish_reason": finish,
                      "trimmed": kept != text, **({"looped": looped} if cfg.cut_loops else {})})
        if kept != text:
            done.setdefault("trimmed", set()).add(i)
        log(f"{name}: paragraph {i + 1} of {len(steps)}: {count_words(kept)} words (planned {step['words']})"
            + (", cut back to its last full sentence" if kept != text else "")
            + (" where it starts to loop" if looped else ""))

    missing = [i for i in range(len(steps)) if i not in paragraphs]
    if calls is None:
        for i in missing:
            write_section(i)
    else:  # every section in flight at once; a failure is raised once all have ended (the others are cached)
        failed = threading.Event()  # one failed section fails the item: those not yet asked are not asked

        def ask(i):
            if not failed.is_set():
                try:
                    write_section(i)
                except BaseException:
                    failed.set()
                    raise

        futures = [calls.submit(ask, i) for i in missing]
        wait(futures)
        for f in futures:
            f.result()
    sections = [untitled(paragraphs[i]) if cfg.headings else paragraphs[i] for i in range(len(steps))]
    answer = "\n\n".join(f"{heading(i, len(steps), steps[i]['point'] if cfg.heading_points else '')}\n\n{text}"
                         if cfg.headings else text for i, text in enumerate(sections))
    return {"key": key, "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
            "plan": steps, "plan_text": done.get("plan_text", ""),
            "paragraph_words": [count_words(text) for text in sections],
            "trimmed_paragraphs": sorted(done.get("trimmed", ())),
            "words": count_words(answer), "planned_words": sum(s["words"] for s in steps)}


@dataclass
class AgentConfig:
    input: str = ""                      # instructions JSONL: "prompt" (and any other fields, "id" included)
    output: str = "longwriter.jsonl"     # SFT records; OUTPUT.cache.jsonl beside it holds every call
    api_base: str = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable holding the key, never the key
    checkpoint: str = ""                 # write with our own model in-process instead of an endpoint
    plan_prompt: str = ""                # file replacing PLAN_PROMPT ({instruction} marker)
    write_prompt: str = ""               # file replacing WRITE_PROMPT ({instruction} {plan} {text} {step} markers)
    workers: int = 8                     # calls at once (items, or a skeleton's sections, in flight; rows with --checkpoint)
    max_retries: int = 5                 # per call: timeouts, 429 and 5xx are retried with backoff
    timeout: float = 600.0               # seconds per call
    backoff: float = 1.0
    temperature: float = 0.7
    top_p: float = 0.8                   # nucleus sampling (generate.py's default); an endpoint is sent none at 1
    plan: str = "model"                  # model: the writer plans (the paper's way); skeleton: the code lays out
                                         # sections and counts from the asked length (for small local writers)
    section_words: int = 350             # --plan skeleton: about this many words a section
    section_limit: float = 0.0           # > 0: cut a paragraph past this x its words, at its last sentence; 0: 3x + 200 tokens
    headings: bool = False               # each section under "## Part k of K", the writer's own titles dropped
                                         # (a small model trained on the answers sees how far it has come)
    heading_points: bool = False         # with --headings: the section's point after it ("## Part 2 of 6: how it works")
    repetition_penalty: float = 1.0      # --checkpoint: > 1 penalizes the last 64 tokens (1.1 for small models)
    no_repeat_ngram: int = 0             # --checkpoint: >= 2, no call's answer repeats one of its own n-grams
    plan_tokens: int = 2048              # token limit of the planning call
    plan_attempts: int = 3               # plans asked per item before it fails (rejected ones stay in the cache)
    paragraph_attempts: int = 3          # a rejected paragraph (no sentence, chatter, too short) is asked this many times
    section_min: float = 0.25            # a paragraph under this x its words is asked again (a bare title); 0: never
    cut_loops: bool = False              # cut a paragraph where it starts to restate itself (a small writer's loop)
                                         # at its last sentence before (dataset.loop_start); then --section-min
    min_ratio: float = 0.5               # drop answers shorter than this x the planned words
    max_ratio: float = 1.5               # drop answers longer than this x the planned words
    system: str = ""                     # --checkpoint: system turn; empty: the chat template's default (if any)
    template: str = ""                   # --checkpoint: chat template name; empty: detect from the tokenizer files
    context: int = 0                     # --checkpoint: > 0, a smaller context than the model's
    dtype: str = ""                      # --checkpoint: its weights' dtype (default: bfloat16 on CUDA, float32 on CPU)
    device: str = ""                     # --checkpoint: empty: cuda if available, else cpu
    plan_template: str = PLAN_PROMPT
    write_template: str = WRITE_PROMPT   # with --plan skeleton and no --write-prompt: SECTION_PROMPT
    overwrite: bool = False              # start OUTPUT and its cache afresh (needed to change the settings above)


def changed_flags(cfg, names) -> list[str]:
    """The flags among these config fields that were set away from their defaults, spelled as typed."""
    return [f"--{k.replace('_', '-')}" for k in names if getattr(cfg, k) != getattr(type(cfg), k)]


def check_config(cfg: AgentConfig):
    """Refuse settings under which every item would fail or be dropped, before any call; read the prompt files."""
    if cfg.plan not in ("model", "skeleton"):
        raise ValueError(f"--plan must be model or skeleton, not {cfg.plan!r}")
    if cfg.heading_points and not cfg.headings:
        raise ValueError("--heading-points puts each section's point in its heading: it needs --headings")
    if cfg.section_words < 1:
        raise ValueError("--section-words must be positive")
    for flag, value in (("--paragraph-attempts", cfg.paragraph_attempts), ("--plan-attempts", cfg.plan_attempts)):
        if value < 1:  # --plan-attempts 0 failed every item, "plan rejected 0 times"
            raise ValueError(f"{flag} {value}: at least 1")
    if not 0 <= cfg.min_ratio < cfg.max_ratio:  # else every answer is written, then dropped
        raise ValueError(f"--min-ratio {cfg.min_ratio:g} and --max-ratio {cfg.max_ratio:g}: 0 <= min < max")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p {cfg.top_p:g}: a probability mass in (0, 1]")
    if cfg.section_limit < 0:
        raise ValueError(f"--section-limit {cfg.section_limit:g}: 0 (the default limit) or a positive factor")
    if not 0 <= cfg.section_min < (cfg.section_limit or 1):  # else every paragraph is asked again until the item fails
        raise ValueError(f"--section-min {cfg.section_min:g}: from 0 to under {cfg.section_limit or 1:g} (--section-limit)")
    local_only = changed_flags(cfg, ("repetition_penalty", "no_repeat_ngram", "system", "template", "context", "dtype",
                                     "device"))
    if local_only and not cfg.checkpoint:  # accepted and ignored, yet recorded as the writer's settings
        raise ValueError(f"{', '.join(local_only)}: only with --checkpoint; an endpoint's server sets its own")
    if cfg.checkpoint and cfg.device:
        from model import check_device
        check_device(cfg.device)
    if cfg.plan == "skeleton" and not cfg.write_prompt and cfg.write_template == WRITE_PROMPT:
        cfg.write_template = SECTION_PROMPT  # a small writer follows a short, direct request best
    for name in ("plan_prompt", "write_prompt"):
        path = getattr(cfg, name)
        if path:
            with open(path, encoding="utf-8") as f:
                setattr(cfg, name.replace("prompt", "template"), f.read())
    # the paper's write call sees the plan and the text so far; a skeleton's section call may leave them out
    write_markers = ("instruction", "point") if cfg.plan == "skeleton" else ("instruction", "plan", "text", "step")
    for name, template, markers in (("plan", cfg.plan_template, ("instruction",)),
                                    ("write", cfg.write_template, write_markers)):
        if missing := [m for m in markers if "{" + m + "}" not in template and not (m == "point" and "{step}" in template)]:
            raise ValueError(f"{getattr(cfg, name + '_prompt') or name + ' prompt'}: no {{{missing[0]}}} marker "
                             f"(the {name} prompt needs {', '.join('{' + m + '}' for m in markers)})")


def cached_state(cache: JsonlLog) -> dict:
    """key -> the plan and paragraphs the cache holds for that item, so that a rerun redoes no finished call. A
    dropped item is judged again from its cached paragraphs (no call), so another --min/--max-ratio applies."""
    state = {}
    for r in cache.read():
        if r["kind"] == "settings":
            continue
        s = state.setdefault(r["key"], {})
        if r["kind"] == "plan":
            s["plan"], s["plan_text"] = r["steps"], r.get("text", "")
        elif r["kind"] == "paragraph":
            s.setdefault("paragraphs", {})[r["i"]] = r["text"]
            if r.get("trimmed"):
                s.setdefault("trimmed", set()).add(r["i"])
    return state


def run(cfg: AgentConfig, client=None, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Process every instruction not yet in the output; returns the summary counts."""
    check_config(cfg)
    items = read_instructions(cfg.input)
    if os.path.realpath(cfg.output) == os.path.realpath(cfg.input):
        raise ValueError(f"--output {cfg.output}: the --input file, which writing there would destroy: write to "
                         "another file")
    if cfg.overwrite:
        for path in (cfg.output, cfg.output + ".cache.jsonl"):
            if os.path.exists(path):
                os.remove(path)
    output, cache = JsonlLog(cfg.output), JsonlLog(cfg.output + ".cache.jsonl")
    for log_file, field in ((output, "key"), (cache, "kind")):
        line = next((n for n, r in enumerate(log_file.read(), 1) if field not in r), None)
        if line:
            raise ValueError(f"{log_file.path}:{line}: not written by AgentWrite (no \"{field}\"): write to another "
                             "--output, or --overwrite to start it afresh")
    settings = writer_settings(cfg)
    check_settings(output, cache, settings, log)
    finished, state = {r["key"] for r in output.read()}, cached_state(cache)
    todo = [(key, src) for key, src in items if key not in finished]
    own = client is None and todo  # made here, closed here; none when there is nothing to write
    # a skeleton's section that does not see the text so far need not wait for it: all of an item's are asked at once
    at_once = cfg.plan == "skeleton" and "{text}" not in cfg.write_template
    if own and cfg.checkpoint:
        # one row per call that can be in flight, never more: each row is a whole context of cache (8,192 tokens of
        # SmolLM2 in float32: 380 MB), so --workers 64 for 2 items held 24 GB and was killed on a 23 GB machine
        in_flight = (sum(len(skeleton_plan(src["prompt"], asked_words(src), cfg.section_words))
                         - len(state.get(key, {}).get("paragraphs", ())) for key, src in todo) if at_once else len(todo))
        client = LocalClient(cfg.checkpoint, device=cfg.device or None, max_batch=max(1, min(cfg.workers, in_flight)),
                             template=cfg.template or None, system=cfg.system, context=cfg.context,
                             repetition_penalty=cfg.repetition_penalty, no_repeat_ngram=cfg.no_repeat_ngram,
                             dtype=cfg.dtype, top_p=cfg.top_p)
    elif own:
        client = ChatClient(cfg.api_base, cfg.model, os.environ.get(cfg.api_key_env, ""), cfg.timeout,
                            cfg.max_retries, cfg.backoff, top_p=cfg.top_p)
    counts = {"done": 0, "failed": 0, "dropped": 0, "skipped": len(items) - len(todo), "words": 0}
    lock, t0 = threading.Lock(), time.time()

    def one(key, src):
        name = src.get("id", key)  # what the user calls the item
        try:
            rec = write_item(client, key, src, cache, state.setdefault(key, {}), cfg, log, calls if at_once else None)
        except AuthError:
            raise
        except APIError as e:
            cache.append({"key": key, "kind": "failed", "error": str(e)})
            outcome, msg = "failed", f"{name}: failed: {e}"
        else:
            ratio = rec["words"] / max(1, rec["planned_words"])
            if not cfg.min_ratio <= ratio <= cfg.max_ratio:
                cache.append({"key": key, "kind": "dropped", "words": rec["words"], "planned": rec["planned_words"]})
                outcome, msg = "dropped", (f"{name}: dropped, {rec['words']} words against {rec['planned_words']} planned "
                                           f"({ratio:.0%}; kept: {cfg.min_ratio:.0%} to {cfg.max_ratio:.0%})")
            else:  # the input's own fields (its "id" too) are kept; "id" defaults to the key
                output.append({"id": key, **{k: v for k, v in src.items() if k != "prompt"}, **rec, "writer": settings})
                outcome, msg = "done", None
        with lock:
            counts[outcome] += 1
            counts["words"] += rec["words"] if outcome == "done" else 0
            n = counts["done"] + counts["failed"] + counts["dropped"]
            eta = (time.time() - t0) / n * (len(todo) - n)
            if msg:
                log(msg)
            log(f"[{n}/{len(todo)}] done {counts['done']} | failed {counts['failed']} | dropped {counts['dropped']} "
                f"| {counts['words']:,} words | eta {eta / 60:.1f} min")

    try:
        # items in flight, and the calls their sections make when asked at once (at most --workers either way)
        with ThreadPoolExecutor(max(1, cfg.workers)) as pool, ThreadPoolExecutor(max(1, cfg.workers)) as calls:
            futures = [pool.submit(one, key, src) for key, src in todo]
            try:
                for f in futures:
                    f.result()
            except AuthError:
                pool.shutdown(cancel_futures=True)
                calls.shutdown(cancel_futures=True)
                raise
    finally:
        if own and isinstance(client, LocalClient):
            client.close()
    log(f"summary: {counts['done']} written, {counts['failed']} failed, {counts['dropped']} dropped outside "
        f"{cfg.min_ratio:.0%}-{cfg.max_ratio:.0%} of the planned length, {counts['skipped']} already done; "
        f"{counts['words']:,} words -> {cfg.output}")
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cfg = AgentConfig(**vars(add_flags(ap, AgentConfig, skip=("plan_template", "write_template")).parse_args()))
    if not cfg.input:
        ap.error("--input FILE is required")
    try:
        counts = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except APIError as e:
        sys.exit(f"error: {e}")
    sys.exit(0 if counts["done"] or counts["skipped"] or not (counts["failed"] + counts["dropped"]) else 1)


if __name__ == "__main__":
    main()
