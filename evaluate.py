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
import json
import math
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agentwrite import APIError, AuthError, ChatClient, JsonlLog
from dataset import DataError, count_words, read_jsonl
from model import write_json

DIMENSIONS = ["Relevance", "Accuracy", "Coherence", "Clarity", "Breadth and Depth", "Reading Experience"]
BUCKETS = [(0, 500), (500, 2000), (2000, 4000), (4000, 20000)]

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

First explain your judgement briefly, then give the scores as JSON on the last lines, exactly in this form:
{"Relevance": 4, "Accuracy": 4, "Coherence": 4, "Clarity": 4, "Breadth and Depth": 4, "Reading Experience": 4}"""


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


def parse_judge(text: str) -> dict | None:
    """The six scores from a judge's answer: JSON in or out of code fences, with text around it, keys in
    any case, values like 4, "4" or "4/5". None when a dimension is missing or out of 1..5."""
    candidates = re.findall(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.S) + re.findall(r"\{[^{}]*\}", text)
    for candidate in reversed(candidates):  # the last block is the verdict; earlier ones may be examples
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            try:
                obj = json.loads(candidate.replace("'", '"'))
            except json.JSONDecodeError:
                continue
        if not isinstance(obj, dict):
            continue
        by_key = {re.sub(r"[^a-z]", "", str(k).lower()): v for k, v in obj.items()}
        scores = {}
        for dim in DIMENSIONS:
            value = by_key.get(re.sub(r"[^a-z]", "", dim.lower()))
            m = re.match(r"^\s*([1-5](?:\.\d+)?)\s*(?:/\s*5)?\s*$", str(value)) if value is not None else None
            if not m:
                break
            scores[dim] = float(m.group(1))
        else:
            return scores
    return None


def quality_score(scores: list[dict]) -> float:
    """S_q: each dimension's mean m maps to (m - 1) * 25; the mean of the six."""
    if not scores:
        return float("nan")
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


def summary(preds: list[dict], judged: dict | None = None) -> dict:
    """S_l (and S_q, S when judged) over the predictions, with the count."""
    out = {"n": len(preds), "S_l": sum(length_score(p["length"], p["response_length"]) for p in preds) / max(1, len(preds))}
    if judged is not None:
        scores = [judged[p["index"]] for p in preds if p["index"] in judged]
        out["S_q"], out["judged"] = quality_score(scores), len(scores)
        out["S"] = (out["S_l"] + out["S_q"]) / 2
    return out


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells[1:]])


# -----------------------------------------------------------------------------
# predict

def predict_local(model, tok, rows, out_path, max_new_tokens=32768, temperature=0.5, top_p=0.8, batch_size=8,
                  seed=0, log=print):
    """Answer every benchmark row with our model, `batch_size` prompts at a time; rows already in
    out_path are skipped, each finished batch is appended whole."""
    from dataset import chat_prompt_ids
    from generate import generate
    out = JsonlLog(out_path)
    done = {p["index"] for p in out.read()}
    todo = [(i, r) for i, r in enumerate(rows) if i not in done]
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        prompts = [chat_prompt_ids(tok, [{"role": "user", "content": r["prompt"]}]) for _, r in batch]
        answers = generate(model, prompts, max_new_tokens, tok.stop_ids, temperature, top_p=top_p, seed=seed + b)
        for (i, r), ids in zip(batch, answers):
            text = tok.decode(ids)
            out.append({"index": i, **r, "response": text, "response_length": count_words(text)})
        log(f"predict: {len(done) + b + len(batch)}/{len(rows)}")
    return sorted(out.read(), key=lambda p: p["index"])


def predict_api(client, rows, out_path, max_new_tokens, temperature, workers, log=print):
    out = JsonlLog(out_path)
    done = {p["index"] for p in out.read()}

    def one(i, r):
        try:
            text = client.chat([{"role": "user", "content": r["prompt"]}], max_new_tokens, temperature)
        except AuthError:
            raise
        except APIError as e:
            log(f"predict: row {i} failed: {e}")
            return
        out.append({"index": i, **r, "response": text, "response_length": count_words(text)})
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(one, i, r) for i, r in enumerate(rows) if i not in done]:
            f.result()
    return sorted(out.read(), key=lambda p: p["index"])


# -----------------------------------------------------------------------------
# quality

def judge_one(client, instruction, response, prompt_template=JUDGE_PROMPT, attempts=3) -> dict:
    """The six scores of one response; an unreadable verdict is asked again, up to `attempts` times."""
    prompt = prompt_template.replace("{instruction}", instruction).replace("{response}", response)
    error = "no parseable scores"
    for _ in range(attempts):
        try:
            scores = parse_judge(client.chat([{"role": "user", "content": prompt}], 2048, 0.0))
        except AuthError:
            raise
        except APIError as e:
            scores, error = None, str(e)
        if scores:
            return scores
    raise APIError(error)


def judge_all(client, preds, judged_path, prompt_template=JUDGE_PROMPT, workers=8, attempts=3, log=print) -> dict:
    """index -> six scores, for every prediction the judge scored. Each verdict is appended to
    judged_path as it arrives (resumable); an unreadable verdict is asked again, then recorded as failed."""
    out = JsonlLog(judged_path)
    judged = {r["index"]: r["scores"] for r in out.read() if "scores" in r}
    lock = threading.Lock()

    def one(p):
        try:
            scores = judge_one(client, p["prompt"], p["response"], prompt_template, attempts)
        except AuthError:
            raise
        except APIError as e:
            out.append({"index": p["index"], "failed": str(e)})
            log(f"quality: prediction {p['index']} not judged: {e}")
            return
        out.append({"index": p["index"], "scores": scores})
        with lock:
            judged[p["index"]] = scores
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(one, p) for p in preds if p["index"] not in judged]:
            f.result()
    return judged


# -----------------------------------------------------------------------------
# report

def breakdown(preds, judged=None) -> dict:
    """Overall, per required-length bucket, per type and per language."""
    out = {"overall": summary(preds, judged), "length": {}, "type": {}, "language": {}}
    for lo, hi in BUCKETS:
        group = [p for p in preds if lo <= p["length"] < hi]
        if group:
            out["length"][f"[{lo},{hi})"] = summary(group, judged)
    for key, fn in (("type", lambda p: p.get("type", "?")), ("language", lambda p: language(p["prompt"]))):
        for name in sorted({fn(p) for p in preds}):
            out[key][name] = summary([p for p in preds if fn(p) == name], judged)
    return out


def ruler(preds) -> dict:
    """LongWrite-Ruler: mean produced length per requested length, per language."""
    out = {}
    for lang in sorted({language(p["prompt"]) for p in preds}):
        out[lang] = {}
        for n in sorted({p["length"] for p in preds}):
            group = [p["response_length"] for p in preds if p["length"] == n and language(p["prompt"]) == lang]
            if group:
                out[lang][n] = {"mean_length": sum(group) / len(group), "max_length": max(group), "n": len(group)}
    return out


def scatter_svg(series: dict, path: str, size=520, pad=60):
    """Required vs produced length on log-log axes, one colour per prediction file, y = x dashed."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    values = [v for pts in series.values() for x, y in pts for v in (x, y) if v > 0]
    lo, hi = math.floor(math.log10(min(values or [10]))), math.ceil(math.log10(max(values or [10])))
    hi = max(hi, lo + 1)
    scale = lambda v: pad + (math.log10(max(v, 10 ** lo)) - lo) / (hi - lo) * (size - 2 * pad)
    px, py = scale, lambda v: size - scale(v)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{size - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{size - pad}" stroke="black"/>',
           f'<line x1="{px(10 ** lo)}" y1="{py(10 ** lo)}" x2="{px(10 ** hi)}" y2="{py(10 ** hi)}" stroke="grey" '
           f'stroke-dasharray="5,4"/>']
    for e in range(lo, hi + 1):
        svg.append(f'<text x="{px(10 ** e)}" y="{size - pad + 18}" text-anchor="middle">{10 ** e:g}</text>')
        svg.append(f'<text x="{pad - 8}" y="{py(10 ** e) + 4}" text-anchor="end">{10 ** e:g}</text>')
    svg.append(f'<text x="{size / 2}" y="{size - 15}" text-anchor="middle">required length (words)</text>')
    svg.append(f'<text x="15" y="{size / 2}" text-anchor="middle" transform="rotate(-90 15 {size / 2})">'
               f'output length (words)</text>')
    for k, (name, pts) in enumerate(series.items()):
        c = colors[k % len(colors)]
        svg += [f'<circle cx="{px(x):.1f}" cy="{py(max(y, 10 ** lo)):.1f}" r="3.5" fill="{c}" fill-opacity="0.6"/>'
                for x, y in pts]
        svg.append(f'<circle cx="{pad + 15}" cy="{pad + 10 + 18 * k}" r="5" fill="{c}"/>'
                   f'<text x="{pad + 26}" y="{pad + 14 + 18 * k}">{name}</text>')
    svg.append("</svg>")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(svg))
    os.replace(path + ".tmp", path)


def report(pred_paths: list[str], judged_paths: list[str] | None = None, plot: str = "", log=print) -> dict:
    """One table in the paper's layout per file (S, S_l, S_q overall and per length bucket), by type and
    language, a side-by-side table for several files, and the scatter plot."""
    results = {}
    for k, path in enumerate(pred_paths):
        preds = read_rows(path, ("index", "prompt", "length", "response_length"))
        jp = (judged_paths or [None] * len(pred_paths))[k] or path + ".judged.jsonl"
        judged = {r["index"]: r["scores"] for r in JsonlLog(jp).read() if "scores" in r} if os.path.exists(jp) else None
        results[path] = {"breakdown": breakdown(preds, judged), "points": [(p["length"], p["response_length"]) for p in preds]}
    metrics = ["S", "S_l", "S_q"] if any("S_q" in r["breakdown"]["overall"] for r in results.values()) else ["S_l"]
    cols = ["overall"] + [f"[{lo},{hi})" for lo, hi in BUCKETS]
    header = ["predictions"] + [f"{m} {c}" for c in cols for m in metrics]
    rows = []
    for path, r in results.items():
        b = r["breakdown"]
        cells = [b["overall"]] + [b["length"].get(c, {}) for c in cols[1:]]
        rows.append([os.path.basename(path)] + [cell.get(m, float("nan")) for cell in cells for m in metrics])
    log(table(rows, header))
    for path, r in results.items():
        for key in ("type", "language"):
            group = r["breakdown"][key]
            log(f"\n{os.path.basename(path)} by {key}")
            log(table([[name] + [g.get(m, float("nan")) for m in metrics] + [g["n"]] for name, g in group.items()],
                      [key] + metrics + ["n"]))
    if plot:
        scatter_svg({os.path.basename(p): r["points"] for p, r in results.items()}, plot)
        log(f"scatter plot: {plot}")
    first = results[pred_paths[0]]["breakdown"]["overall"]
    return {**{m: first[m] for m in ("S_l", "S_q", "S") if m in first},
            "files": {p: r["breakdown"] for p, r in results.items()}}


# -----------------------------------------------------------------------------

@dataclass
class EvalConfig:
    command: str = "report"
    files: tuple = ()
    checkpoint: str = ""
    api_base: str = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    output: str = ""            # predict: the prediction file (default: pred.jsonl beside --out)
    judged: str = ""            # quality: the verdict file (default: PRED.judged.jsonl)
    judge_prompt: str = ""      # a file with {instruction} and {response} markers
    out: str = ""               # scores as JSON
    plot: str = ""              # report: scatter plot (.svg)
    max_new_tokens: int = 32768
    temperature: float = 0.5
    top_p: float = 0.8
    batch_size: int = 8
    workers: int = 8
    max_retries: int = 5
    timeout: float = 600.0
    seed: int = 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["predict", "length", "quality", "ruler", "report"])
    ap.add_argument("files", nargs="+")
    for name, value in vars(EvalConfig()).items():
        if name not in ("command", "files"):
            ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = EvalConfig(**vars(ap.parse_args()))
    client = lambda model: ChatClient(cfg.api_base, model, os.environ.get(cfg.api_key_env, ""), cfg.timeout,
                                      cfg.max_retries)
    try:
        if cfg.command == "predict":
            rows = read_rows(cfg.files[0])
            output = cfg.output or os.path.basename(os.path.splitext(cfg.files[0])[0]) + ".pred.jsonl"
            if cfg.checkpoint:
                import torch
                from dataset import load_tokenizer
                from model import Transformer
                device = "cuda" if torch.cuda.is_available() else "cpu"
                model = Transformer.from_pretrained(cfg.checkpoint, torch.bfloat16 if device == "cuda" else torch.float32,
                                                    device).eval()
                preds = predict_local(model, load_tokenizer(cfg.checkpoint), rows, output, cfg.max_new_tokens,
                                      cfg.temperature, cfg.top_p, cfg.batch_size, cfg.seed)
            elif cfg.model:
                preds = predict_api(client(cfg.model), rows, output, cfg.max_new_tokens, cfg.temperature, cfg.workers)
            else:
                ap.error("predict needs --checkpoint DIR or --api-base URL --model NAME")
            result = summary(preds)
            print(f"{len(preds)} predictions -> {output}; S_l {result['S_l']:.1f}")
        elif cfg.command == "length":
            preds = read_rows(cfg.files[0], ("index", "prompt", "length", "response_length"))
            result = breakdown(preds)["overall"]
            print(table([[os.path.basename(cfg.files[0]), result["S_l"], result["n"]]], ["predictions", "S_l", "n"]))
        elif cfg.command == "quality":
            if not cfg.model:
                ap.error("quality needs the judge: --api-base URL --model NAME")
            preds = read_rows(cfg.files[0], ("index", "prompt", "length", "response", "response_length"))
            template = open(cfg.judge_prompt, encoding="utf-8").read() if cfg.judge_prompt else JUDGE_PROMPT
            judged = judge_all(client(cfg.model), preds, cfg.judged or cfg.files[0] + ".judged.jsonl", template,
                               cfg.workers)
            result = summary(preds, judged)
            print(table([[os.path.basename(cfg.files[0]), result["S"], result["S_l"], result["S_q"], result["judged"]]],
                        ["predictions", "S", "S_l", "S_q", "judged"]))
        elif cfg.command == "ruler":
            preds = read_rows(cfg.files[0], ("index", "prompt", "length", "response_length"))
            result = {"S_l": summary(preds)["S_l"], "ruler": ruler(preds)}
            rows = [[lang, n, r["mean_length"], r["max_length"], r["n"]] for lang, g in result["ruler"].items()
                    for n, r in g.items()]
            print(table(rows, ["language", "required", "mean output", "max output", "n"]))
        else:
            judged = [cfg.judged] if cfg.judged else None
            result = report(list(cfg.files), judged, cfg.plot)
    except (FileNotFoundError, ValueError, APIError) as e:
        sys.exit(f"error: {e}")
    if cfg.out:
        write_json(cfg.out, result)


if __name__ == "__main__":
    main()
