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
Everything (data, checkpoints, per-prompt predictions, scores.json, the plot) goes under --out. A rerun
with the same settings reuses what is finished; other settings need --overwrite or another --out.
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dataset import TOPICS, WORDINGS, add_flags, load_tokenizer, write_builtin
from evaluate import checkpoint_identity, length_score, predict_local, scatter_svg, table
from model import Transformer, write_json
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


def stage(msg, t0=[time.time()]):
    print(f"\n=== [{time.time() - t0[0]:6.0f} s] {msg}", flush=True)


def model_json(path, scale, max_tokens, vocab_size):
    """The small Llama-style model both copies start from (the same seed gives the same initial weights)."""
    cfg = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64 * scale,
           "intermediate_size": 192 * scale, "num_hidden_layers": 2 + (scale > 1) * scale,
           "num_attention_heads": 4 * scale, "num_key_value_heads": 2 * scale, "head_dim": 16,
           "max_position_embeddings": 4 * max_tokens, "tie_word_embeddings": True}
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


def answer(ckpt, rows, out_path, cfg):
    """Predictions of the checkpoint for the rows (finished ones are reused). Each answer may run to 4.7
    tokens per asked word (past 4x the asked length S_l is 0 whatever it writes), then is cut."""
    dtype = torch.float32 if cfg.device == "cpu" else torch.bfloat16
    model = Transformer.from_pretrained(ckpt, dtype, cfg.device).eval()
    return predict_local(model, load_tokenizer(ckpt), rows, out_path, [int(4.7 * r["length"]) + 64 for r in rows],
                         temperature=cfg.temperature, top_p=1.0, batch_size=cfg.slots, seed=cfg.seed,
                         compile=cfg.device.startswith("cuda"), model_id=checkpoint_identity(ckpt), log=lambda s: None)


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


def prepare_out(cfg):
    """A rerun with the same settings resumes; other settings in the same --out need --overwrite."""
    path = os.path.join(cfg.out, "demo_config.json")
    mine = {k: v for k, v in asdict(cfg).items() if k != "overwrite"}
    if os.path.isfile(path) and not cfg.overwrite:
        saved = json.load(open(path))
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if changed:
            sys.exit(f"error: {cfg.out} holds a demo run with other settings ({'; '.join(changed)}); "
                     "--overwrite replaces it, or choose another --out")
    elif os.path.isdir(cfg.out) and cfg.overwrite:
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(path, mine)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cfg = DemoConfig(**vars(add_flags(ap, DemoConfig).parse_args()))
    prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    s = cfg.scale
    short_cap, long_cap = cfg.short_cap * s, cfg.long_cap * s
    lengths = [int(n) * s for n in cfg.eval_lengths.split(",")]
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
    config = model_json(os.path.join(cfg.out, "model_config.json"), s, max_tokens, load_tokenizer(tok_dir).vocab_size)

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

    # DPO as in the paper, small: pairs from (b)'s own samples, the best and the worst by S_l, on instructions
    # whose lengths the evaluation never asks (so the scored prompts built no pair)
    pair_lengths = [n * s for n in range(300, cfg.long_cap, 200) if n * s not in lengths]
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


if __name__ == "__main__":
    main()
