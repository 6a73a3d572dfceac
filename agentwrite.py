"""AgentWrite: plan a long piece (one line per paragraph: main point + word count), then write it
paragraph by paragraph, each call seeing the instruction, the plan and the text so far.

Usage:
    export OPENAI_API_KEY=...      # never printed or written anywhere
    python agentwrite.py --input instructions.jsonl --output longwriter.jsonl --api-base URL --model NAME
    python agentwrite.py --input instructions.jsonl --output longwriter.jsonl --checkpoint DIR   # local model

Input lines hold at least "prompt". Output lines are SFT records {"messages": [user, assistant]} with the
plan and per-paragraph word counts as metadata. Every finished plan and paragraph is appended to
OUTPUT.cache.jsonl as it arrives: rerun the same command after a crash and only unfinished calls are made.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import requests

from dataset import DataError, count_words, read_jsonl

PLAN_PROMPT = """I need you to help me break down the following long-form writing instruction into multiple \
subtasks. Each subtask will guide the writing of one paragraph in the essay, and should include the main \
points and word count requirements for that paragraph.

The writing instruction is as follows:

{instruction}

Please break it down in the following format, with each subtask taking up one line:

Paragraph 1 - Main Point: [Describe the main point of the paragraph, in detail] - Word Count: [Word \
count requirement, e.g., 400 words]

Paragraph 2 - Main Point: [...] - Word Count: [...]

...

Make sure that each subtask is clear and specific, and that all subtasks together cover the whole \
instruction. Do not output any other content."""

WRITE_PROMPT = """You are an excellent writing assistant. I will give you an original writing instruction \
and my planned writing steps. I will also provide you with the text I have already written. Please help me \
continue writing the next paragraph based on the writing instruction, writing steps, and the already \
written text.

Writing instruction:
{instruction}

Writing steps:
{plan}

Already written text:
{text}

Please integrate the original writing instruction, writing steps, and the already written text, and now \
continue writing {step} for me. Output only the paragraph itself: no heading for the step, no word count, \
nothing before or after it."""

MAX_STEPS = 50


# -----------------------------------------------------------------------------
# plans

COUNT_RE = re.compile(r"(?:word\s*count|字数)\s*[:：]?\s*(?:about\s*|约)?(\d[\d,]*)|(\d[\d,]*)\s*(?:words?\b|字)", re.I)
NUMBERING_RE = re.compile(r"^\s*(?:[-*#>]+\s*)?(?:\*\*)?(?:paragraph|para\.?|step|part|section)?\s*"
                          r"(?:第\s*\d+\s*[段步部]分?|\d+)?\s*(?:\*\*)?\s*[.):：、-]*\s*", re.I)
POINT_RE = re.compile(r"^(?:main\s*point|主要内容|要点)\s*[:：]\s*", re.I)


def parse_plan(text: str) -> list[dict]:
    """Plan lines -> [{"point": str, "words": int}]. A line counts when it names a word count
    ("400 words", "Word Count: 400", "400字"); numbering, bold marks and blank lines are ignored."""
    steps = []
    for line in text.splitlines():
        matches = list(COUNT_RE.finditer(line))
        if not matches:
            continue
        m = matches[-1]
        words = int((m.group(1) or m.group(2)).replace(",", ""))
        point = line[:m.start()]
        point = re.sub(r"(?:word\s*count|字数)\s*[:：]?\s*(?:about\s*|约)?$", "", point.strip(), flags=re.I)
        point = NUMBERING_RE.sub("", point, count=1).strip(" -–—:：,，*[]()（）")
        point = POINT_RE.sub("", point).strip(" -–—:：,，*[]")
        if words > 0 and point:
            steps.append({"point": point, "words": words})
    return steps


def plan_text(steps: list[dict]) -> str:
    return "\n".join(f"Paragraph {i} - Main Point: {s['point']} - Word Count: {s['words']} words"
                     for i, s in enumerate(steps, 1))


def fill(template: str, **values) -> str:
    """Replace {name} markers by value (str.replace, so braces in user text are safe)."""
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template


# -----------------------------------------------------------------------------
# backends: an OpenAI-compatible endpoint, or our own model in-process

class APIError(Exception):
    """A call that retrying will not fix, or that failed after every retry."""


class AuthError(APIError):
    """401/403: every call would fail the same way, so the whole run stops."""


class ChatClient:
    """POST /v1/chat/completions with retries: timeouts, connection errors, 429 (Retry-After honoured),
    5xx and malformed bodies back off exponentially with jitter; other 4xx stop at once."""

    def __init__(self, api_base, model, api_key, timeout=600.0, max_retries=5, backoff=1.0):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.session = requests.Session()

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def chat(self, messages, max_tokens, temperature=0.7) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt * random.uniform(0.5, 1.0)
            try:
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
                        if not isinstance(text, str) or not text.strip():
                            raise APIError("empty answer")
                        return text
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
    """Our own checkpoint in-process. Calls from many worker threads are gathered into one batch."""

    def __init__(self, checkpoint, device=None, max_batch=8, template=None):
        import torch
        from dataset import load_tokenizer
        from model import Transformer
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.tok = load_tokenizer(checkpoint, template)
        self.model = Transformer.from_pretrained(checkpoint, dtype, device).eval()
        self.max_batch, self.requests = max_batch, queue.Queue()
        threading.Thread(target=self.serve, daemon=True).start()

    def chat(self, messages, max_tokens, temperature=0.7) -> str:
        done = Future()
        self.requests.put((messages, max_tokens, temperature, done))
        text = done.result()
        if not text.strip():
            raise APIError("empty answer")
        return text

    def serve(self):
        from dataset import chat_prompt_ids
        from generate import generate
        while True:
            batch = [self.requests.get()]
            time.sleep(0.05)  # let the other workers' calls arrive
            while len(batch) < self.max_batch and not self.requests.empty():
                batch.append(self.requests.get())
            try:
                prompts = [chat_prompt_ids(self.tok, m) for m, _, _, _ in batch]
                outs = generate(self.model, prompts, max(b[1] for b in batch), self.tok.stop_ids,
                                temperature=batch[0][2], top_p=0.8, seed=random.randrange(2**31))
                for (_, max_tokens, _, done), out in zip(batch, outs):
                    done.set_result(self.tok.decode(out[:max_tokens]))
            except Exception as e:  # noqa: BLE001 - hand the error to the waiting callers
                for *_, done in batch:
                    done.set_exception(e)


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
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def item_id(index: int, prompt: str) -> str:
    return f"{index}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


def parse_instruction(obj) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise DataError('needs a non-empty "prompt" string')
    return obj


def read_instructions(path) -> list[tuple[str, dict]]:
    """(item id, record) per input line; the id is stable across reruns of the same file."""
    records, _ = read_jsonl(path, parse_instruction)
    return [(item_id(i, obj["prompt"]), obj) for i, obj in enumerate(records)]


# -----------------------------------------------------------------------------
# one instruction: plan, then each paragraph in order

def write_item(client, iid, source, cache: JsonlLog, done: dict, cfg) -> dict:
    """Run the calls this item still needs; returns its output record. `done` holds its cached results."""
    instruction = source["prompt"]
    if "plan" not in done:
        text = client.chat([{"role": "user", "content": fill(cfg.plan_template, instruction=instruction)}],
                           max_tokens=2048, temperature=cfg.temperature)
        steps = parse_plan(text)
        if not steps or len(steps) > MAX_STEPS:
            raise APIError(f"plan rejected: {len(steps)} parseable steps (1 to {MAX_STEPS} needed)")
        done["plan"] = steps
        cache.append({"id": iid, "kind": "plan", "steps": steps})
    steps, paragraphs = done["plan"], done.setdefault("paragraphs", {})
    for i, step in enumerate(steps):
        if i in paragraphs:
            continue
        written = "\n\n".join(paragraphs[j] for j in range(i))
        prompt = fill(cfg.write_template, instruction=instruction, plan=plan_text(steps), text=written,
                      step=f"paragraph {i + 1}: {step['point']} - Word Count: {step['words']} words")
        text = client.chat([{"role": "user", "content": prompt}], max_tokens=3 * step["words"] + 200,
                           temperature=cfg.temperature).strip()
        paragraphs[i] = text
        cache.append({"id": iid, "kind": "paragraph", "i": i, "text": text})
    answer = "\n\n".join(paragraphs[i] for i in range(len(steps)))
    return {"id": iid, "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
            "plan": steps, "paragraph_words": [count_words(paragraphs[i]) for i in range(len(steps))],
            "words": count_words(answer), "planned_words": sum(s["words"] for s in steps)}


@dataclass
class AgentConfig:
    input: str = ""
    output: str = "longwriter.jsonl"
    api_base: str = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable holding the key, never the key
    checkpoint: str = ""                 # write with our own model in-process instead of an endpoint
    plan_prompt: str = ""                # file replacing PLAN_PROMPT ({instruction} marker)
    write_prompt: str = ""               # file replacing WRITE_PROMPT ({instruction} {plan} {text} {step})
    workers: int = 8
    max_retries: int = 5
    timeout: float = 600.0
    backoff: float = 1.0
    temperature: float = 0.7
    min_ratio: float = 0.5               # drop answers shorter than this x the planned words
    plan_template: str = PLAN_PROMPT
    write_template: str = WRITE_PROMPT


def run(cfg: AgentConfig, client=None, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Process every instruction not yet in the output; returns the summary counts."""
    for name in ("plan_prompt", "write_prompt"):
        path = getattr(cfg, name)
        if path:
            with open(path, encoding="utf-8") as f:
                setattr(cfg, name.replace("prompt", "template"), f.read())
    if "{instruction}" not in cfg.plan_template:
        raise ValueError(f"{cfg.plan_prompt}: the plan prompt needs an {{instruction}} marker")
    items = read_instructions(cfg.input)
    if client is None:
        if cfg.checkpoint:
            client = LocalClient(cfg.checkpoint)
        else:
            client = ChatClient(cfg.api_base, cfg.model, os.environ.get(cfg.api_key_env, ""), cfg.timeout,
                                cfg.max_retries, cfg.backoff)
    output, cache = JsonlLog(cfg.output), JsonlLog(cfg.output + ".cache.jsonl")
    finished = {r["id"] for r in output.read()} | {r["id"] for r in cache.read() if r["kind"] == "dropped"}
    state = {}
    for r in cache.read():
        s = state.setdefault(r["id"], {})
        if r["kind"] == "plan":
            s["plan"] = r["steps"]
        elif r["kind"] == "paragraph":
            s.setdefault("paragraphs", {})[r["i"]] = r["text"]
    todo = [(iid, src) for iid, src in items if iid not in finished]
    counts = {"done": 0, "failed": 0, "dropped": 0, "skipped": len(items) - len(todo), "words": 0}
    lock, t0 = threading.Lock(), time.time()

    def one(iid, src):
        try:
            rec = write_item(client, iid, src, cache, state.setdefault(iid, {}), cfg)
        except AuthError:
            raise
        except APIError as e:
            cache.append({"id": iid, "kind": "failed", "error": str(e)})
            outcome, msg = "failed", f"{iid}: failed: {e}"
        else:
            if rec["words"] < cfg.min_ratio * rec["planned_words"]:
                cache.append({"id": iid, "kind": "dropped", "words": rec["words"], "planned": rec["planned_words"]})
                outcome, msg = "dropped", f"{iid}: dropped, {rec['words']} of {rec['planned_words']} planned words"
            else:
                output.append({**{k: v for k, v in src.items() if k != "prompt"}, **rec})
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

    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        futures = [pool.submit(one, iid, src) for iid, src in todo]
        try:
            for f in futures:
                f.result()
        except AuthError:
            pool.shutdown(cancel_futures=True)
            raise
    log(f"summary: {counts['done']} written, {counts['failed']} failed, {counts['dropped']} dropped below "
        f"{cfg.min_ratio:.0%} of the planned length, {counts['skipped']} already done; {counts['words']:,} words "
        f"-> {cfg.output}")
    return counts


def main():
    cfg = AgentConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(cfg).items():
        if name.endswith("_template"):
            continue
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = AgentConfig(**vars(ap.parse_args()))
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
