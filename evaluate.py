"""LongBench-Write and LongWrite-Ruler: predict, score length (S_l) and quality (S_q), and report.

Usage (the prompt files stay in ../shared/longbench-write/; pass their path):
    python evaluate.py predict BENCH.jsonl --checkpoint DIR --output pred.jsonl     # or --api-base URL --model NAME
    python evaluate.py length pred.jsonl --out scores.json
    python evaluate.py quality pred.jsonl --api-base URL --model JUDGE --out scores.json
    python evaluate.py ruler pred.jsonl --out ruler.json                            # predictions of longwrite_ruler.jsonl
    python evaluate.py report pred.jsonl [other.jsonl ...] --plot lengths.svg --out report.json

Scoring (LongBench-Write): for required length x and produced length y (count_words),
  S_l = 100 * max(0, 1 - (y/x - 1) / 3) if y > x else 100 * max(0, 1 - (x/y - 1) / 2), and 0 for y = 0;
  S_q = the mean over six judged dimensions of (mean score - 1) * 25;  S = (S_l + S_q) / 2.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from xml.sax.saxutils import escape

from agentwrite import (APIError, AuthError, ChatClient, JsonlLog, changed_flags, checkpoint_identity, settings_diff,
                        stop_odds_record)
from dataset import DataError, count_words, read_jsonl
from model import write_json

DIMENSIONS = ["Relevance", "Accuracy", "Coherence", "Clarity", "Breadth and Depth", "Reading Experience"]
BUCKETS = [(0, 500), (500, 2000), (2000, 4000), (4000, math.inf)]  # required length, as in the paper's tables

JUDGE_PROMPT = """You are an expert reviewer of writing. Rate the response below to the user's instruction on six \
dimensions, each from 1 (very poor) to 5 (excellent). Judge the content only: do not reward or penalize \
the response for its length.

- Relevance: does it address the instruction and stay on topic?
- Accuracy: are its facts and claims correct?
- Coherence: is it logically organized, with ideas that follow from one another?
- Clarity: is the language clear and easy to understand?
- Breadth and Depth: does it cover the subject widely and explore it in depth?
- Reading Experience: is it engaging and pleasant to read?

Instruction:
{instruction}

Response:
{response}

First explain your judgement briefly. Then end with one JSON object that holds a whole number from 1 to 5 for each of these keys: "Relevance", "Accuracy", "Coherence", "Clarity", "Breadth and Depth", "Reading Experience"."""


# -----------------------------------------------------------------------------
# scores

def length_score(required: float, produced: float) -> float:
    """S_l of one answer: over-long answers lose 1/3 of the score per extra x, short ones 1/2 per x/y - 1."""
    if produced <= 0 or required <= 0:
        return 0.0
    if produced > required:
        return 100 * max(0.0, 1 - (produced / required - 1) / 3)
    return 100 * max(0.0, 1 - (required / produced - 1) / 2)


def language(prompt: str) -> str:
    return "zh" if re.search(r"[\u4e00-\u9fff]", prompt) else "en"


def six_scores(obj) -> dict | None:
    """The six dimensions of a decoded JSON object (or of an object nested one level inside it)."""
    if not isinstance(obj, dict):
        return None
    by_key = {re.sub(r"[^a-z]", "", str(k).lower()): v for k, v in obj.items()}
    scores = {}
    for dim in DIMENSIONS:
        value = by_key.get(re.sub(r"[^a-z]", "", dim.lower()))
        m = re.match(r"^\s*([1-5](?:\.\d+)?)\s*(?:/\s*5)?\s*$", str(value)) if value is not None else None
        if not m:
            return next(filter(None, (six_scores(v) for v in obj.values() if isinstance(v, dict))), None)
        scores[dim] = float(m.group(1))
    return scores


def parse_judge(text: str) -> dict | None:
    """The six scores from a judge's answer: a JSON object anywhere in it (fenced or not, with braces or raw
    newlines inside its strings, single-quoted), keys in any case, values like 4, "4" or "4/5". Each "{"
    is tried with a real JSON decoder, the last one first: earlier objects may be examples. None when no
    object holds all six dimensions in 1..5."""
    decoder = json.JSONDecoder(strict=False)  # strict=False: control characters inside strings are kept
    for start in reversed([m.start() for m in re.finditer(r"\{", text)]):
        for candidate in (text[start:], text[start:].replace("'", '"')):
            try:
                obj, _ = decoder.raw_decode(candidate)
            except json.JSONDecodeError:
                continue
            if scores := six_scores(obj):
                return scores
    return None


def quality_score(scores: list[dict]) -> float | None:
    """S_q: each dimension's mean m maps to (m - 1) * 25; the mean of the six. None with no verdict (null in
    the JSON written: NaN is not JSON, and other tools refuse the file)."""
    if not scores:
        return None
    return sum((sum(s[d] for s in scores) / len(scores) - 1) * 25 for d in DIMENSIONS) / len(DIMENSIONS)


# -----------------------------------------------------------------------------
# files

def read_rows(path, fields=("prompt", "length")) -> list[dict]:
    """A benchmark or prediction file; a line without one of `fields` is named."""
    def check(row):
        missing = [k for k in fields if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"missing field {missing[0]!r}")
        return row
    return read_jsonl(path, check)[0]


def read_preds(path, need_response=False) -> list[dict]:
    """A prediction file, ours or another tool's: prompt, length and response or response_length. A line
    without "index" gets its position in the file; one without "response_length" gets count_words(response)."""
    position, seen = iter(range(1 << 62)), set()

    def check(row):
        if not isinstance(row, dict):
            raise DataError("a prediction must be a JSON object")
        for k in ("prompt", "length"):
            if k not in row:
                raise DataError(f"missing field {k!r}")
        if not isinstance(row["length"], (int, float)) or row["length"] <= 0:
            raise DataError(f"field 'length' must be a positive number, not {row['length']!r}")
        row = {"index": next(position), **row}
        if row["index"] in seen:  # counted twice in S_l, and given one verdict for both in S_q
            raise DataError(f"a second prediction with index {row['index']} (one per benchmark row; two files joined?)")
        seen.add(row["index"])
        if need_response or "response_length" not in row:
            if not isinstance(row.get("response"), str):
                raise DataError("missing field 'response' (or 'response_length')")
            row["response_length"] = count_words(row["response"])
        return row
    return read_jsonl(path, check)[0]


def summary(preds: list[dict], judged: dict | None = None) -> dict:
    """S_l (and S_q, S when judged) over the predictions, with the count."""
    out = {"n": len(preds), "S_l": sum(length_score(p["length"], p["response_length"]) for p in preds) / max(1, len(preds))}
    if any("finish_reason" in p for p in preds):  # answers cut at the token limit, when the file says
        out["cut"] = sum(p.get("finish_reason") == "length" for p in preds)
    if judged is not None:
        scores = [judged[p["index"]] for p in preds if p["index"] in judged]
        out["S_q"], out["judged"] = quality_score(scores), len(scores)
        out["S"] = None if out["S_q"] is None else (out["S_l"] + out["S_q"]) / 2
    return out


def shown_width(text: str) -> int:
    """Terminal columns: a Chinese character takes two (the Ruler file's types are Chinese), others one."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.1f}" if isinstance(c, float) else "-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(shown_width(r[i]) for r in cells) for i in range(len(header))]
    pad = lambda c, w, i: (" " * (w - shown_width(c)) + c) if i else c + " " * (w - shown_width(c))
    line = lambda r: "| " + " | ".join(pad(c, w, i) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells[1:]])


# -----------------------------------------------------------------------------
# predict

def resume_predictions(out_path, settings: list[dict], rows: list[dict], overwrite=False, log=print) -> set:
    """The indices already answered in out_path by the same model and generation settings, for the same request.
    Every prediction row carries the "generation" that made it and the fields of the row it answers; one made
    otherwise (another checkpoint, temperature, limit, system turn...) or for another request at that index (the
    rows changed: another --eval-min, another --samples) is refused, naming the difference, unless overwrite
    starts the file afresh."""
    if overwrite and os.path.exists(out_path):
        os.remove(out_path)
    done = set()
    hint = "; rerun with the same ones, write to another --output, or --overwrite to start it afresh"
    for p in JsonlLog(out_path).read():
        i = p.get("index")
        if isinstance(i, int) and i >= len(settings):  # the settings of no row here: say why instead
            raise ValueError(f"{out_path}: row {i} is past the {len(settings)} rows asked now (a smaller --limit, or "
                             f"a shorter benchmark file){hint}")
        want = settings[i] if isinstance(i, int) and i >= 0 else None  # past the end: refused just above
        if want is None or p.get("generation") != want:
            diff = settings_diff(p.get("generation") or {}, want or {})
            raise ValueError(f"{out_path}: row {i} was made by other settings ({diff or 'no generation record'}"
                             f"){hint}")
        moved = [k for k, v in rows[i].items() if p.get(k) != v]
        if moved:
            raise ValueError(f"{out_path}: row {i} answers another request than row {i} now (its {', '.join(moved[:3])} "
                             f"differ: {str(p.get(moved[0]))[:60]!r} there, {str(rows[i][moved[0]])[:60]!r} now){hint}")
        done.add(i)
    if done:
        log(f"predict: reusing {len(done)} answers already in {out_path} (same model, settings and requests)")
    return done


def generation_record(model_id: dict, max_new: int, temperature, top_p, seed, system, repetition_penalty=1.0,
                      no_repeat_ngram=0, template="") -> dict:
    record = {**model_id, "max_new_tokens": max_new, "temperature": temperature, "top_p": top_p, "seed": seed,
              "system": system}
    if template:  # a --template other than the checkpoint's own format (see Tokenizer.forced)
        record["template"] = template
    if repetition_penalty != 1.0:  # only when used, so that files written before they existed still resume
        record["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram:
        record["no_repeat_ngram"] = no_repeat_ngram
    return {**record, **stop_odds_record(repetition_penalty, no_repeat_ngram)}


def predict_local(model, tok, rows, out_path, max_new_tokens=0, temperature=0.5, top_p=0.8, batch_size=8,
                  seed=0, compile=False, model_id=None, system="", context=0, overwrite=False, log=print,
                  repetition_penalty=1.0, no_repeat_ngram=0, checked=None):
    """Answer every benchmark row with our model by continuous batching over `batch_size` rows. max_new_tokens:
    one for all or one per row; 0 fills the context (prompt + answer = the model's context, or --context),
    and a limit that does not fit is refused before decoding. Each answer is appended to out_path as soon as
    it ends, with the generation that made it and its finish_reason ("length": cut at the limit), so a killed
    run resumes with only the unfinished prompts and a run with another model never reuses them.
    checked(): called once the limits and the answers already in out_path have passed their checks."""
    from dataset import chat_prompt_ids
    from generate import finish_reason, fit_new_tokens, generate_many
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": r["prompt"]}], system) for r in rows]
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(rows)
    limits = [fit_new_tokens(model, len(p), m, context, f"row {i}") for i, (p, m) in enumerate(zip(prompts, limits))]
    if any(m <= 0 for m in (max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens])):
        log(f"predict: max_new_tokens fills the context: {min(limits)}-{max(limits)} new tokens per row")
    model_id = model_id or {"model": "unnamed"}
    settings = [generation_record(model_id, m, temperature, top_p, seed, system, repetition_penalty, no_repeat_ngram,
                                  tok.template if tok.forced else "") for m in limits]
    done = resume_predictions(out_path, settings, rows, overwrite, log)
    if checked is not None:
        checked()
    out = JsonlLog(out_path)
    todo = [i for i in range(len(rows)) if i not in done]
    answers = generate_many(model, [prompts[i] for i in todo], [limits[i] for i in todo], tok.stop_ids, batch_size,
                            temperature, top_p=top_p, seed=seed, compile=compile,
                            repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram) if todo else []
    for n, (k, ids) in enumerate(answers, 1):
        i = todo[k]
        text = tok.decode(ids)
        out.append({"index": i, **rows[i], "response": text, "response_length": count_words(text),
                    "finish_reason": finish_reason(ids, limits[i]), "generation": settings[i]})
        log(f"predict: {len(done) + n}/{len(rows)}")
    return sorted(out.read(), key=lambda p: p["index"])


def predict_api(client, rows, out_path, max_new_tokens, temperature, workers, model_id=None, overwrite=False,
                log=print, system=""):
    """Answer every row through an endpoint (max_new_tokens 0: the server's own limit), sampling at temperature
    and the client's top_p (the benchmark's own generation used 0.8; before, the endpoint got none and sampled
    from the whole distribution, silently), with `system` as a system turn when given; resumable as predict_local."""
    settings = [generation_record(model_id or {"model": client.model}, max_new_tokens, temperature, client.top_p, None,
                                  system)] * len(rows)
    done = resume_predictions(out_path, settings, rows, overwrite, log)
    out = JsonlLog(out_path)
    turns = [{"role": "system", "content": system}] if system else []

    def one(i, r):
        try:
            text, finish = client.complete(turns + [{"role": "user", "content": r["prompt"]}], max_new_tokens,
                                           temperature)
        except AuthError:
            raise
        except APIError as e:
            log(f"predict: row {i} failed: {e}")
            return
        out.append({"index": i, **r, "response": text, "response_length": count_words(text), "finish_reason": finish,
                    "generation": settings[i]})
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(one, i, r) for i, r in enumerate(rows) if i not in done]:
            f.result()
    return sorted(out.read(), key=lambda p: p["index"])


# -----------------------------------------------------------------------------
# quality

MARKERS = [("{instruction}", "{response}"), ("$INST$", "$RESPONSE$")]  # ours, and the official judge file's


def judge_prompt(template: str, instruction: str, response: str) -> str:
    """The template with the instruction and the response put in, in one pass (so that a response that
    contains a marker is not filled in again). Either marker style works; a template with neither is refused."""
    for inst, resp in MARKERS:
        if inst in template and resp in template:
            pattern = re.escape(inst) + "|" + re.escape(resp)
            return re.sub(pattern, lambda m: instruction if m.group(0) == inst else response, template)
    raise ValueError("the judge prompt needs both {instruction} and {response} markers (or $INST$ and $RESPONSE$)")


def read_judge_prompt(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        template = f.read()
    try:
        judge_prompt(template, "", "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return template


def judge_one(client, instruction, response, prompt_template=JUDGE_PROMPT, attempts=3, temperature=0.5,
              max_tokens=2048) -> dict:
    """The six scores of one response; an unreadable verdict is asked again, up to `attempts` times. The
    judge samples (0.5, as the official evaluation did), so that a retry is not the same answer again. The
    error quotes the start of the last verdict and says when it was cut at max_tokens: "no parseable scores"
    alone left a user guessing whether the judge wrote prose, wrong keys, or JSON that never came."""
    prompt = judge_prompt(prompt_template, instruction, response)
    error = "no parseable scores"
    for _ in range(attempts):
        try:
            text, finish = client.complete([{"role": "user", "content": prompt}], max_tokens, temperature)
            scores = parse_judge(text)
        except AuthError:
            raise
        except APIError as e:
            scores, error = None, str(e)
        else:
            cut = f" was cut at its limit of {max_tokens} tokens and" if finish == "length" else ""
            error = f"no parseable scores; the last verdict{cut} began {text.strip()[:160]!r}"
        if scores:
            return scores
    raise APIError(error)


def answer_sha(p) -> str | None:
    """What a verdict is of: the prompt and response it scored (None for a row without its response)."""
    return hashlib.sha256(json.dumps([p["prompt"], p["response"]]).encode()).hexdigest()[:16] if "response" in p else None


def read_verdicts(path, preds, judge=None, log=print) -> dict | None:
    """index -> scores from a verdict file, only of these predictions' answers (and of this judge, when given):
    keyed by index alone, a file judged before `predict --overwrite` or by another judge lent its scores to
    other answers. The last matching verdict of an index counts; None when there is no file."""
    if not os.path.exists(path):
        return None
    want, judged, other = {p["index"]: answer_sha(p) for p in preds}, {}, set()
    for r in JsonlLog(path).read():
        if "scores" in r:
            if r.get("answer") == want.get(r["index"]) and (judge is None or r.get("judge") == judge):
                judged[r["index"]] = r["scores"]
            else:
                other.add(r["index"])
    if other - set(judged):
        log(f"{path}: {len(other - set(judged))} verdicts are of other answers or another judge: not counted")
    return judged


def judge_all(client, preds, judged_path, prompt_template=JUDGE_PROMPT, workers=8, attempts=3, temperature=0.5,
              log=print, max_tokens=2048) -> dict:
    """index -> six scores, for every prediction the judge scored. Each verdict is appended to
    judged_path as it arrives with what it is of (resumable); an unreadable verdict is asked again, then
    recorded as failed."""
    out = JsonlLog(judged_path)
    judge = f"{client.model} {hashlib.sha256(prompt_template.encode()).hexdigest()[:8]}"  # model and prompt
    judged = read_verdicts(judged_path, preds, judge, log) or {}
    lock = threading.Lock()

    def one(p):
        try:
            scores = judge_one(client, p["prompt"], p["response"], prompt_template, attempts, temperature, max_tokens)
        except AuthError:
            raise
        except APIError as e:
            out.append({"index": p["index"], "failed": str(e)})
            log(f"quality: prediction {p['index']} not judged: {e}")
            return
        out.append({"index": p["index"], "scores": scores, "answer": answer_sha(p), "judge": judge})
        with lock:
            judged[p["index"]] = scores
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(one, p) for p in preds if p["index"] not in judged]:
            f.result()
    return judged


# -----------------------------------------------------------------------------
# report

def bucket_name(lo, hi) -> str:
    return f"[{lo},{'inf' if hi == math.inf else hi})"


def breakdown(preds, judged=None) -> dict:
    """Overall, per required-length bucket, per type and per language."""
    out = {"overall": summary(preds, judged), "length": {}, "type": {}, "language": {}}
    for lo, hi in BUCKETS:
        group = [p for p in preds if lo <= p["length"] < hi]
        if group:
            out["length"][bucket_name(lo, hi)] = summary(group, judged)
    for key, fn in (("type", lambda p: p.get("type", "?")), ("language", lambda p: language(p["prompt"]))):
        for name in sorted({fn(p) for p in preds}):
            out[key][name] = summary([p for p in preds if fn(p) == name], judged)
    return out


def ruler(preds) -> dict:
    """LongWrite-Ruler: mean and longest produced length, S_l, n (and answers cut at the limit) per requested
    length, per language."""
    out = {}
    for lang in sorted({language(p["prompt"]) for p in preds}):
        out[lang] = {}
        for n in sorted({p["length"] for p in preds}):
            group = [p for p in preds if p["length"] == n and language(p["prompt"]) == lang]
            if group:
                lengths = [p["response_length"] for p in group]
                out[lang][n] = {"mean_length": sum(lengths) / len(lengths), "max_length": max(lengths),
                                **summary(group)}
    return out


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^e between lo and hi."""
    return [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)
            if lo <= m * 10 ** e <= hi]


def scatter_svg(series: dict, path: str, title="Required vs. output length", size=560, pad=70):
    """Required vs produced length on log-log axes fitted to the data (as the paper's plot), one colour per
    prediction file, y = x dashed, gridlines at 1-2-5 ticks; answers with no countable word as crosses under the axis."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    values = [v for pts in series.values() for x, y in pts for v in (x, y) if v > 0] or [10, 1000]
    lo, hi = math.log10(min(values) / 1.25), math.log10(max(values) * 1.25)
    span = size - 2 * pad
    px = lambda v: pad + (math.log10(v) - lo) / (hi - lo) * span
    py = lambda v: size - px(v)
    floor = size - pad + 14  # where empty answers sit: below the x axis, off the log scale
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{size / 2}" y="{pad / 2}" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for t in log_ticks(10 ** lo, 10 ** hi):
        x, y = px(t), py(t)
        svg += [f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{size - pad}" stroke="#e5e5e5"/>',
                f'<line x1="{pad}" y1="{y:.1f}" x2="{size - pad}" y2="{y:.1f}" stroke="#e5e5e5"/>',
                f'<line x1="{x:.1f}" y1="{size - pad}" x2="{x:.1f}" y2="{size - pad + 5}" stroke="black"/>',
                f'<line x1="{pad - 5}" y1="{y:.1f}" x2="{pad}" y2="{y:.1f}" stroke="black"/>',
                f'<text x="{x:.1f}" y="{size - pad + 30}" text-anchor="middle">{t:,.0f}</text>',
                f'<text x="{pad - 8}" y="{y + 4:.1f}" text-anchor="end">{t:,.0f}</text>']
    svg += [f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{size - pad}" stroke="black"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{size - pad}" stroke="black"/>',
            f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="grey" stroke-dasharray="5,4"/>',
            f'<text x="{size / 2}" y="{size - 18}" text-anchor="middle">required length (words)</text>',
            f'<text x="16" y="{size / 2}" text-anchor="middle" transform="rotate(-90 16 {size / 2})">'
            f'output length (words)</text>']
    cross = lambda x, y, c, r=4: (f'<path d="M{x - r:.1f},{y - r:.1f}L{x + r:.1f},{y + r:.1f}M{x - r:.1f},{y + r:.1f}'
                                   f'L{x + r:.1f},{y - r:.1f}" stroke="{c}" stroke-width="1.5"/>')
    dot = lambda x, y, c, r=3.5: f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{c}" fill-opacity="0.6"/>'
    legend = []  # (marker, colour, text)
    for k, (name, pts) in enumerate(series.items()):
        c = colors[k % len(colors)]
        svg += [dot(px(x), py(y), c) if y > 0 else cross(px(x), floor, c) for x, y in pts]
        legend.append((dot, c, name))
    if any(y <= 0 for pts in series.values() for _, y in pts):
        legend.append((cross, "black", "no countable words (0)"))
    for k, (marker, c, text) in enumerate(legend):
        x, y = pad + 15, pad + 12 + 18 * k
        svg.append(f'{marker(x, y, c)}<text x="{x + 11}" y="{y + 4}">{escape(text)}</text>')
    svg.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(svg))
    os.replace(path + ".tmp", path)


def short_names(paths: list[str]) -> list[str]:
    """Each file's shortest path ending that no other file shares: a/pred.jsonl and b/pred.jsonl, not
    pred.jsonl twice; a file whose name is unique keeps just its name."""
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = [os.path.join(*p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def report(pred_paths: list[str], judged_paths: list[str] | None = None, plot: str = "", log=print) -> dict:
    """S, S_l, S_q overall and per required-length bucket (with the count n), one row per file in each, so
    several files sit side by side; then each file by type and language; and the scatter plot."""
    if len(set(map(os.path.abspath, pred_paths))) < len(pred_paths):
        raise ValueError("the same prediction file is named twice")
    results = {}
    for k, path in enumerate(pred_paths):
        preds = read_preds(path)
        jp = (judged_paths or [None] * len(pred_paths))[k] or path + ".judged.jsonl"
        judged = read_verdicts(jp, preds, log=log)
        results[path] = {"breakdown": breakdown(preds, judged), "points": [(p["length"], p["response_length"]) for p in preds],
                         "asked": {(p["prompt"], p["length"]) for p in preds}}
    names = dict(zip(pred_paths, short_names(pred_paths)))
    metrics = ["S", "S_l", "S_q"] if any("S_q" in r["breakdown"]["overall"] for r in results.values()) else ["S_l"]
    rows = []
    for col in ["overall"] + [bucket_name(lo, hi) for lo, hi in BUCKETS]:
        for path, r in results.items():
            cell = r["breakdown"]["overall"] if col == "overall" else r["breakdown"]["length"].get(col)
            if cell:  # cut: answers that hit the token limit ("?" when the file does not say)
                rows.append([col, names[path], cell["n"], cell.get("cut", "?")] + [cell.get(m) for m in metrics])
    log(table(rows, ["required length", "predictions", "n", "cut"] + metrics))
    asked = [r["asked"] for r in results.values()]
    if any(a != asked[0] for a in asked):  # e.g. one file made with predict --limit 20: other prompts, other scores
        sizes = ", ".join(f"{names[p]} {r['breakdown']['overall']['n']}" for p, r in results.items())
        log(f"note: the files answer different requests ({sizes}; {len(set.intersection(*asked))} in all of them): "
            "their rows do not compare the same prompts")
    for path, r in results.items():
        for key in ("type", "language"):
            group = r["breakdown"][key]
            log(f"\n{names[path]} by {key}")
            log(table([[name, g["n"]] + [g.get(m) for m in metrics] for name, g in group.items()],
                      [key, "n"] + metrics))
    if plot:
        scatter_svg({names[p]: r["points"] for p, r in results.items()}, plot)
        log(f"scatter plot: {plot}")
    first = results[pred_paths[0]]["breakdown"]["overall"]
    return {**{m: first[m] for m in ("S_l", "S_q", "S") if m in first},
            "files": {p: r["breakdown"] for p, r in results.items()}}


# -----------------------------------------------------------------------------

@dataclass
class EvalConfig:
    command: str = "report"
    files: tuple = ()
    checkpoint: str = ""        # predict with this checkpoint folder in-process
    api_base: str = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")  # predict/judge endpoint
    model: str = ""             # the model at --api-base: predict with it, or (quality) the judge
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable holding the key, never the key
    output: str = ""            # predict: the prediction file (default: BENCH.MODEL.pred.jsonl in the current folder)
    overwrite: bool = False     # predict: start --output afresh instead of resuming it
    limit: int = 0              # predict: only the first N rows of the benchmark (0: all)
    judged: str = ""            # quality: the verdict file (default: PRED.judged.jsonl)
    judge_prompt: str = ""      # a file with {instruction} and {response} (or $INST$ and $RESPONSE$) markers
    judge_temperature: float = 0.5
    judge_max_tokens: int = 2048  # quality: the verdict's token limit (a judge that reasons first may need more)
    out: str = ""               # scores as JSON
    plot: str = ""              # report: scatter plot (.svg)
    max_new_tokens: int = 0     # predict: 0 fills the model's context (endpoint: the server's limit)
    context: int = 0            # predict: > 0, a smaller context than the model's max_position_embeddings
    system: str = ""            # predict: system turn; empty: the chat template's default (if it has one)
    template: str = ""          # predict: chat template name; empty: detect from the tokenizer files
    temperature: float = 0.5
    top_p: float = 0.8
    repetition_penalty: float = 1.0  # predict with --checkpoint: > 1 penalizes each answer's last 64 tokens
    no_repeat_ngram: int = 0    # predict with --checkpoint: >= 2, no answer repeats one of its own n-grams
    batch_size: int = 8         # predict with --checkpoint: rows decoded at once (continuous batching)
    device: str = ""            # predict with --checkpoint: empty: cuda if available, else cpu
    dtype: str = ""             # predict with --checkpoint: empty: bfloat16 on CUDA, float32 on CPU
    workers: int = 8            # endpoint calls at once
    max_retries: int = 5
    timeout: float = 600.0
    seed: int = 0


def main():
    from dataset import add_flags
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["predict", "length", "quality", "ruler", "report"])
    ap.add_argument("files", nargs="+")
    cfg = EvalConfig(**vars(add_flags(ap, EvalConfig, skip=("command", "files")).parse_args()))
    client = lambda model, top_p=None: ChatClient(cfg.api_base, model, os.environ.get(cfg.api_key_env, ""), cfg.timeout,
                                                  cfg.max_retries, top_p=top_p)
    if len(cfg.files) > 1 and cfg.command != "report":  # the others read the first file and said nothing of the rest
        ap.error(f"{cfg.command} takes one file, not {len(cfg.files)}; `report` compares several")
    for flag, value in (("--batch-size", cfg.batch_size), ("--workers", cfg.workers)):
        if value < 1:  # --batch-size 0 answered no row and blamed "the failures above"
            ap.error(f"{flag} {value}: at least 1")
    if len(cfg.files) > 1 and cfg.judged:  # whose verdicts? (an IndexError for the second file)
        ap.error("--judged names the verdicts of one prediction file; with several, each file's PRED.judged.jsonl is read")
    same = [p for p in (cfg.output, cfg.judged, cfg.out, cfg.plot)
            if p and any(os.path.realpath(p) == os.path.realpath(f) for f in cfg.files)]
    if same:  # e.g. `length pred.jsonl --out pred.jsonl` replaced the predictions with their scores
        sys.exit(f"error: {same[0]} is also an input file, which writing there would destroy: write to another file")
    missing = ""  # rows left without an answer or a verdict (calls that failed): the exit status says so
    try:
        if cfg.command == "predict":
            rows = read_rows(cfg.files[0])[:cfg.limit or None]
            name = os.path.basename(os.path.normpath(cfg.checkpoint)) if cfg.checkpoint else cfg.model.replace("/", "_")
            output = cfg.output or f"{os.path.basename(os.path.splitext(cfg.files[0])[0])}.{name}.pred.jsonl"
            if cfg.checkpoint:
                import torch
                from dataset import load_tokenizer
                from model import Transformer, check_device, compute_dtype
                device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
                check_device(device)
                dtype = compute_dtype(cfg.dtype, device)
                tok = load_tokenizer(cfg.checkpoint, cfg.template or None)
                model = Transformer.from_pretrained(cfg.checkpoint, dtype, device).eval()
                preds = predict_local(model, tok, rows, output, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                      cfg.batch_size, cfg.seed, compile=torch.device(device).type == "cuda",
                                      model_id=checkpoint_identity(cfg.checkpoint), system=cfg.system,
                                      context=cfg.context, overwrite=cfg.overwrite,
                                      repetition_penalty=cfg.repetition_penalty, no_repeat_ngram=cfg.no_repeat_ngram)
            elif cfg.model:
                local_only = changed_flags(cfg, ("repetition_penalty", "no_repeat_ngram", "context", "template", "device",
                                                 "dtype", "seed"))
                if local_only:  # the endpoint's server decides these: accepted and ignored, they misled the record
                    ap.error(f"{', '.join(local_only)}: only with --checkpoint; an endpoint's server sets its own")
                preds = predict_api(client(cfg.model, cfg.top_p), rows, output, cfg.max_new_tokens, cfg.temperature,
                                    cfg.workers, overwrite=cfg.overwrite, system=cfg.system)
            else:
                ap.error("predict needs --checkpoint DIR or --api-base URL --model NAME")
            result = summary(preds)
            print(f"{len(preds)} predictions -> {output}; S_l {result['S_l']:.1f}; "
                  f"{result.get('cut', 0)} cut at the token limit" if preds else f"no prediction -> {output}")
            if len(preds) < len(rows):
                missing = f"{len(rows) - len(preds)} of {len(rows)} rows got no answer"
        elif cfg.command == "length":
            preds = read_preds(cfg.files[0])
            result = breakdown(preds)["overall"]
            print(table([[os.path.basename(cfg.files[0]), result["S_l"], result["n"]]], ["predictions", "S_l", "n"]))
        elif cfg.command == "quality":
            if not cfg.model:
                ap.error("quality needs the judge: --api-base URL --model NAME")
            template = read_judge_prompt(cfg.judge_prompt) if cfg.judge_prompt else JUDGE_PROMPT
            preds = read_preds(cfg.files[0], need_response=True)
            judged = judge_all(client(cfg.model), preds, cfg.judged or cfg.files[0] + ".judged.jsonl", template,
                               cfg.workers, temperature=cfg.judge_temperature,
                               max_tokens=cfg.judge_max_tokens)
            result = summary(preds, judged)
            print(table([[os.path.basename(cfg.files[0]), result["S"], result["S_l"], result["S_q"], result["judged"]]],
                        ["predictions", "S", "S_l", "S_q", "judged"]))
            if result["judged"] < len(preds):
                missing = f"{len(preds) - result['judged']} of {len(preds)} answers got no verdict"
        elif cfg.command == "ruler":
            preds = read_preds(cfg.files[0])
            result = {"S_l": summary(preds)["S_l"], "ruler": ruler(preds)}
            rows = [[lang, n, r["mean_length"], r["max_length"], r["S_l"], r["n"], r.get("cut", "?")]
                    for lang, g in result["ruler"].items() for n, r in g.items()]
            print(table(rows, ["language", "required", "mean output", "max output", "S_l", "n", "cut"]))
        else:
            judged = [cfg.judged] if cfg.judged else None
            result = report(list(cfg.files), judged, cfg.plot)
    except (FileNotFoundError, ValueError, APIError) as e:
        sys.exit(f"error: {e}")
    if cfg.out:
        write_json(cfg.out, result)
    if missing:
        sys.exit(f"error: {missing} (the failures are above); the same command again retries only them")


if __name__ == "__main__":
    main()
