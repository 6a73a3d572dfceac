"""LongWriter's central finding at small scale, end to end with the project's own scripts.

A model's output length is bounded by the longest answers it saw in SFT; adding long answers lifts the
bound. Two copies of the same small model are fine-tuned on the built-in long-writing corpus: (a) on
answers of at most --short-cap words, (b) on the same data plus answers up to --long-cap words, for the
same steps and tokens. Both answer held-out instructions asking for short to several times the short
cap; then (b) gets a short DPO run on pairs built by the pair tool and is scored again.

Usage:
    python demo.py                           # 2-core CPU, no network, about 10 minutes
    python demo.py --device cuda --scale 4   # longer answers, a bigger model, more steps
Everything (data, checkpoints, predictions, scores, plot) goes under --out.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from dataset import write_builtin
from evaluate import breakdown, length_score, predict_local, scatter_svg, table
from model import Transformer, write_json
from train_dpo import DPOConfig, build_pairs
from train_dpo import train as train_dpo
from train_sft import TrainConfig
from train_sft import train as train_sft


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    device: str = "cpu"
    scale: int = 1               # x answer lengths, model width, row length
    short_cap: int = 400         # (a) sees answers of 100..short_cap words
    long_cap: int = 1600         # (b) also sees answers of short_cap+100..long_cap words
    steps: int = 500             # SFT steps, the same for both models
    lr: float = 5e-3
    eval_lengths: str = "100,200,400,800,1600,3200"
    prompts_per_length: int = 4
    temperature: float = 0.7     # greedy decoding loops on this task; sampling does not
    pair_instructions: int = 16
    pair_samples: int = 4
    dpo_steps: int = 20
    seed: int = 0


def stage(msg, t0=[time.time()]):
    print(f"\n=== [{time.time() - t0[0]:6.0f} s] {msg}", flush=True)


def model_json(path, scale, max_tokens, vocab_hint=None):
    """The small Llama-style model both copies start from (the same seed gives the same initial weights)."""
    cfg = {"model_type": "llama", "vocab_size": vocab_hint, "hidden_size": 64 * scale,
           "intermediate_size": 192 * scale, "num_hidden_layers": 2 + (scale > 1) * scale,
           "num_attention_heads": 4 * scale, "num_key_value_heads": 2 * scale, "head_dim": 16,
           "max_position_embeddings": 4 * max_tokens, "tie_word_embeddings": True}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def held_out(lengths, per_length, seed):
    """Instructions in the corpus's wordings, drawn with a seed the training data did not use."""
    import random
    from dataset import TOPICS, WORDINGS
    rng = random.Random(10_000 + seed)
    return [{"prompt": rng.choice(WORDINGS).format(n=n, t=rng.choice(TOPICS)[0]), "type": "builtin", "length": n}
            for n in lengths for _ in range(per_length)]


def evaluate_model(ckpt, rows, out_path, cfg, device):
    """Predict with the checkpoint (one batch), return the predictions; reuses finished predictions."""
    from dataset import load_tokenizer
    model = Transformer.from_pretrained(ckpt, torch.float32 if device == "cpu" else torch.bfloat16, device).eval()
    longest = max(r["length"] for r in rows)
    return predict_local(model, load_tokenizer(ckpt), rows, out_path, max_new_tokens=int(1.6 * longest) + 200,
                         temperature=cfg.temperature, top_p=1.0, batch_size=len(rows), seed=cfg.seed, log=lambda s: None)


def conclusion(cfg, results) -> str:
    """One sentence derived from the measured numbers; says so when the effect does not appear."""
    asked = [n for n in results["a"] if n != "all"]
    longest = {name: max(per[n]["mean"] for n in asked) for name, per in results.items()}
    above = [n for n in asked if n > cfg.short_cap]
    sl_above = {name: sum(per[n]["S_l"] for n in above) / max(1, len(above)) for name, per in results.items()}
    a, b = longest["a"], longest["b"]
    if a <= 1.5 * cfg.short_cap and b >= 1.5 * a:
        text = (f"Fine-tuned on answers of at most {cfg.short_cap} words, (a) never averaged more than {a:.0f} words "
                f"whatever was asked, while (b), whose data also held answers up to {cfg.long_cap} words, reached "
                f"{b:.0f}: the SFT data bounded output length and long answers lifted the bound (S_l on requests "
                f"above {cfg.short_cap} words: {sl_above['a']:.0f} for (a) vs {sl_above['b']:.0f} for (b)).")
    else:
        text = (f"The effect did not appear clearly in this run: the longest mean outputs were {a:.0f} words for (a) "
                f"and {b:.0f} for (b) (S_l above {cfg.short_cap} words: {sl_above['a']:.0f} vs {sl_above['b']:.0f}).")
    if "b+dpo" in results:
        delta = results["b+dpo"]["all"]["S_l"] - results["b"]["all"]["S_l"]
        text += (f" DPO on length-scored pairs {'raised' if delta > 0 else 'did not raise'} (b)'s overall S_l "
                 f"({results['b']['all']['S_l']:.1f} -> {results['b+dpo']['all']['S_l']:.1f}).")
    return text


def main():
    cfg = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(cfg).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = DemoConfig(**vars(ap.parse_args()))
    s = cfg.scale
    short_cap, long_cap = cfg.short_cap * s, cfg.long_cap * s
    lengths = [int(n) * s for n in cfg.eval_lengths.split(",")]
    max_tokens = 2048 * s  # a row holds the longest training answer (~1.15 tokens per word)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "demo_config.json"), asdict(cfg))

    stage(f"1. built-in corpus: (a) answers of 100-{short_cap} words; (b) the same plus {short_cap + 100}-{long_cap}")
    data, tok_dir = os.path.join(cfg.out, "data"), os.path.join(cfg.out, "data", "tokenizer")
    n_short = 6 * cfg.steps  # enough conversations that neither run repeats much
    short, _ = write_builtin(os.path.join(data, "short"), n_short, 100, short_cap, cfg.seed, tok_dir, 4 * max(lengths))
    long_part, _ = write_builtin(os.path.join(data, "long-part"), n_short // 3, short_cap + 100, long_cap, cfg.seed + 1,
                                 tok_dir)
    mixed = os.path.join(data, "short+long.jsonl")
    with open(mixed + ".tmp", "w") as f:
        for path in (short, long_part):
            f.write(open(path).read())
    os.replace(mixed + ".tmp", mixed)
    vocab = json.load(open(os.path.join(tok_dir, "tokenizer.json")))["model"]["vocab"]
    config = model_json(os.path.join(cfg.out, "model_config.json"), s, max_tokens, len(vocab))

    ckpts = {}
    for name, data_file in (("a", short), ("b", mixed)):
        stage(f"2. SFT of copy ({name}) on {os.path.basename(data_file)}: {cfg.steps} steps of 4 x {max_tokens} tokens")
        out = os.path.join(cfg.out, f"sft-{name}")
        train_sft(TrainConfig(model=config, data=data_file, tokenizer=tok_dir, out=out, max_tokens=max_tokens,
                              batch_rows=4, max_steps=cfg.steps, lr=cfg.lr, warmup=0.05, weight_decay=0.0,
                              device=cfg.device, seed=cfg.seed, log_every=max(1, cfg.steps // 10), keep=1,
                              overwrite=True))
        ckpts[name] = os.path.join(out, open(os.path.join(out, "latest")).read().strip())

    rows = held_out(lengths, cfg.prompts_per_length, cfg.seed)
    preds = {}
    for name in ("a", "b"):
        stage(f"3. copy ({name}) answers {len(rows)} held-out instructions asking {lengths[0]}-{lengths[-1]} words")
        preds[name] = evaluate_model(ckpts[name], rows, os.path.join(cfg.out, f"pred-{name}.jsonl"), cfg, cfg.device)

    stage(f"4. pair tool: {cfg.pair_samples} answers from (b) per instruction, best and worst by S_l; then DPO")
    instructions = os.path.join(cfg.out, "pair-instructions.jsonl")
    pair_lengths = [n * s for n in range(200, cfg.long_cap + 1, 200)]
    pair_rows = held_out(pair_lengths, -(-cfg.pair_instructions // len(pair_lengths)), cfg.seed + 7)
    pair_rows = pair_rows[::max(1, len(pair_rows) // cfg.pair_instructions)][:cfg.pair_instructions]
    with open(instructions, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pair_rows)
    pairs = os.path.join(cfg.out, "pairs.jsonl")
    dpo_cfg = DPOConfig(model=ckpts["b"], build_pairs=instructions, pairs_out=pairs, samples=cfg.pair_samples,
                        max_new_tokens=int(1.6 * long_cap) + 200, temperature=1.0, workers=cfg.pair_samples * 2)
    counts = build_pairs(dpo_cfg, log=lambda m: None)
    print(f"{counts['pairs']} pairs ({counts['no_pair']} instructions without a preference)")
    if counts["pairs"] >= 2:
        dpo_out = os.path.join(cfg.out, "dpo")
        train_dpo(DPOConfig(model=ckpts["b"], data=pairs, out=dpo_out, max_tokens=4 * max_tokens,
                            packing="sorted", batch_rows=2, max_steps=cfg.dpo_steps, lr=cfg.lr / 20, beta=0.1, nll_weight=0.1,
                            warmup=0.1, weight_decay=0.0, device=cfg.device, seed=cfg.seed, keep=1,
                            log_every=max(1, cfg.dpo_steps // 5), overwrite=True))
        ckpts["b+dpo"] = os.path.join(dpo_out, open(os.path.join(dpo_out, "latest")).read().strip())
        stage("5. (b) after DPO answers the same held-out instructions")
        preds["b+dpo"] = evaluate_model(ckpts["b+dpo"], rows, os.path.join(cfg.out, "pred-b+dpo.jsonl"), cfg, cfg.device)

    stage("results")
    results = {}
    for name, p in preds.items():
        results[name] = {"all": {"mean": sum(x["response_length"] for x in p) / len(p),
                                 "S_l": sum(length_score(x["length"], x["response_length"]) for x in p) / len(p)}}
        for n in lengths:
            group = [x for x in p if x["length"] == n]
            results[name][n] = {"mean": sum(x["response_length"] for x in group) / len(group),
                                "S_l": sum(length_score(n, x["response_length"]) for x in group) / len(group)}
    names = list(results)
    header = ["asked (words)"] + [f"{h} ({m})" for m in names for h in ("mean words", "S_l")]
    body = [[str(n)] + [results[m][n][k] for m in names for k in ("mean", "S_l")] for n in lengths]
    body.append(["all"] + [results[m]["all"][k] for m in names for k in ("mean", "S_l")])
    print(f"(a): SFT on answers <= {short_cap} words; (b): SFT also on answers up to {long_cap} words; "
          f"{cfg.prompts_per_length} prompts per length\n")
    print(table(body, header))
    plot = os.path.join(cfg.out, "lengths.svg")
    scatter_svg({f"({m})": [(x["length"], x["response_length"]) for x in p] for m, p in preds.items()}, plot)
    sentence = conclusion(DemoConfig(**{**asdict(cfg), "short_cap": short_cap, "long_cap": long_cap}), results)
    print(f"\nscatter plot: {plot}\n\n{sentence}")
    write_json(os.path.join(cfg.out, "scores.json"),
               {"S_l": results["b"]["all"]["S_l"], "models": {m: {str(k): v for k, v in r.items()} for m, r in results.items()},
                "breakdown": {m: breakdown(p) for m, p in preds.items()}, "conclusion": sentence})


if __name__ == "__main__":
    main()
