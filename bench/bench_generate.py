"""Decoding speed, random weights: batch-1 (ours with a static cache and CUDA graph, next to transformers'
generate), and many prompts of LongBench-Write's spread of lengths, static batches vs continuous batching.

Usage (H100):  python bench/bench_generate.py                      # Llama-3.1-8B shape, bf16
       (CPU):  python bench/bench_generate.py --shape tiny --device cpu --dtype float32 --new-tokens 64
               python bench/bench_generate.py --checkpoint runs/smollm2 --device cpu --dtype float32 --prompt-len 200 \
                   --new-tokens 256 --contexts --hf-new-tokens 256 --prompts 0 --rounds 5  # a checkpoint folder's shape
Prints one table: tokens/s after a 1,000-token prompt, at 16k / 32k tokens of context, and the aggregate
tokens/s and wall time of the many-prompt case (the same prompts, order and slots for both ways).
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import generate, generate_many  # noqa: E402
from model import DTYPES, ModelConfig, Transformer, check_device, read_config  # noqa: E402

SHAPES = {
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                        max_position_embeddings=131072, rope_scaling={
                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}),
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=65536),
}


def random_model(cfg: ModelConfig, dtype, device) -> Transformer:
    """Seeded random weights made on the device (an 8B model never passes through host memory)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype).to_empty(device=device)
    model.init_weights()
    return model.eval()


def decode_rate(stamps, skip):
    """Tokens/s between the skip-th and the last token's timestamp."""
    return (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


def ours_rate(model, prompt_len, new_tokens, compile, skip=16):
    """Decode tokens/s inside one generate call: the clock starts after `skip` tokens, so neither the
    prefill nor the CUDA-graph capture (redone when a call allocates a new cache) is counted."""
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    generate(model, [prompt], min(new_tokens, 4 * skip), compile=compile, temperature=0)  # warm-up: compile
    stamps = []
    generate(model, [prompt], new_tokens, compile=compile, temperature=0,
             on_tokens=lambda toks: stamps.append(time.perf_counter()))  # after the step's host sync
    return decode_rate(stamps, skip)


class Clock:
    """A transformers streamer that only timestamps each token it is handed (after a host sync)."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        value.cpu()
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def hf_rate(cfg: ModelConfig, dtype, device, prompt_len, new_tokens, static, skip=16):
    """transformers' decode tokens/s, timed like ours: inside one call, from the 16th new token on (by then
    the static cache's compile and CUDA-graph capture are done)."""
    import transformers
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device(device):  # random weights made in place, not on the host first
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if static:
        kw.update(cache_implementation="static", compile_config=None)
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    clock = Clock()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kw)
    del model
    return decode_rate(clock.stamps[1:], skip)  # the first put is the prompt


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                     "longbench-write", "longbench_write.jsonl")


def answer_lengths(n, longest, seed=0, path=BENCH):
    """n answer lengths in tokens with LongBench-Write's spread: its required lengths x 1.3 tokens per word,
    scaled down together so that the longest is `longest` tokens (a cap would flatten the spread), in a
    seeded shuffled order (a model's answer lengths are not known in advance). Without the benchmark file,
    log-uniform 100..10,000 words stands in for it. Returns (lengths, where they came from)."""
    rng = random.Random(seed)
    if os.path.isfile(path):
        words, source = [json.loads(line)["length"] for line in open(path) if line.strip()], "LongBench-Write"
    else:
        words, source = [int(10 ** rng.uniform(2, 4)) for _ in range(120)], "log-uniform 100-10,000 words"
    words = [rng.choice(words) for _ in range(n)]
    scale = min(1.0, longest / (1.3 * max(words)))
    return [max(1, round(1.3 * w * scale)) for w in words], source


def many_prompts(model, lengths, slots, prompt_len, compile):
    """(static seconds, continuous seconds): the prompts decoded by static batches of `slots` (each runs
    until its longest answer ends, what evaluate.py predict did) and by continuous batching with `slots` rows.
    Each is timed on its second pass: every cache shape it meets (one per static batch's length, one row
    length for continuous batching) is compiled and captured as a CUDA graph in the first, untimed one."""
    prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist() for _ in lengths]
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)

    def static():
        for i in range(0, len(prompts), slots):
            generate(model, prompts[i:i + slots], max(lengths[i:i + slots]), compile=compile)

    def continuous():
        for _ in generate_many(model, prompts, lengths, slots=slots, compile=compile):
            pass
    times = []
    for run in (static, continuous):
        run()
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return tuple(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b", choices=SHAPES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=4000)
    ap.add_argument("--contexts", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--context-new-tokens", type=int, default=256)
    ap.add_argument("--hf-new-tokens", type=int, default=512, help="transformers is slow: fewer tokens")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' rates")
    ap.add_argument("--rounds", type=int, default=1, help="batch-1 rows: ours then transformers, this many times "
                                                          "in turn; the median of each is shown (a shared CPU's "
                                                          "slow minutes then fall on both sides)")
    ap.add_argument("--prompts", type=int, default=64, help="many-prompt case: prompts (0: skip it)")
    ap.add_argument("--slots", type=int, default=32, help="many-prompt case: rows decoded at once")
    ap.add_argument("--max-answer", type=int, default=4096, help="many-prompt case: the longest answer, tokens")
    ap.add_argument("--many-prompt-len", type=int, default=128)
    ap.add_argument("--checkpoint", default="", help="use this checkpoint folder's shape instead of --shape "
                                                     "(speed does not depend on the weights' values)")
    args = ap.parse_args()
    try:  # the GPU default on a machine without one: one line, not CUDA's assertion
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least 1")
    for flag in ("new_tokens", "context_new_tokens", "hf_new_tokens"):  # the first 16 tokens are not timed
        if 0 < getattr(args, flag) <= 17:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: more than 17 (the first 16 tokens are not timed)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    compile = device.type == "cuda"
    cfg = ModelConfig.from_hf(read_config(args.checkpoint)) if args.checkpoint else ModelConfig(**SHAPES[args.shape])
    if args.checkpoint:
        args.shape = os.path.basename(os.path.normpath(args.checkpoint))
    longest = max([args.prompt_len + args.new_tokens, args.many_prompt_len + args.max_answer * bool(args.prompts)]
                  + args.contexts)
    if longest > cfg.max_position_embeddings:  # found only after the cases before it had run
        ap.error(f"{longest} tokens (prompt + new tokens, or --contexts) past the {args.shape} shape's context of "
                 f"{cfg.max_position_embeddings}; --contexts takes others (none: `--contexts` alone)")
    lengths, source = answer_lengths(args.prompts, args.max_answer) if args.prompts else ([], "")
    # the table's rows print as they are measured: a CPU run of a real model's shape takes minutes a row
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"decoding, {args.shape} shape, {args.dtype}, {name}, torch {torch.__version__}; many-prompt answer "
          f"lengths: {source or 'not run'}, scaled to at most {args.max_answer} tokens"
          + (f"; batch-1 rows: median of {args.rounds} rounds, ours and transformers in turn" if args.rounds > 1 else ""))
    print(f"| {'implementation':<30} | {'prompt+new tokens':>20} | {'tokens/s':>9} | {'wall s':>7} |")
    print(f"| {'-' * 30} | {'-' * 20} | {'-' * 9} | {'-' * 7} |", flush=True)

    def show(impl, what, rate, wall=None):
        print(f"| {impl:<30} | {what:>20} | {rate:>9.1f} | {'' if wall is None else f'{wall:.1f}':>7} |", flush=True)
    model = random_model(cfg, dtype, device)
    ours, hf = [], []
    for _ in range(args.rounds):
        ours.append(ours_rate(model, args.prompt_len, args.new_tokens, compile))
        if not args.no_hf and args.rounds > 1:
            hf.append(hf_rate(cfg, dtype, device, args.prompt_len, args.hf_new_tokens, static=False))
    show("ours", f"{args.prompt_len}+{args.new_tokens}", statistics.median(ours))
    for ctx in args.contexts:
        rate = ours_rate(model, ctx - args.context_new_tokens, args.context_new_tokens, compile)
        show("ours", f"{ctx - args.context_new_tokens}+{args.context_new_tokens}", rate)
    if args.prompts:
        static, cont = many_prompts(model, lengths, args.slots, args.many_prompt_len, compile)
        what = f"{args.prompts} x {args.many_prompt_len}+~{sum(lengths) // len(lengths)}"
        show(f"ours, static batches of {args.slots}", what, sum(lengths) / static, static)
        show(f"ours, continuous, {args.slots} slots", what, sum(lengths) / cont, cont)
    if not args.no_hf:
        del model
        n = args.hf_new_tokens
        rate = statistics.median(hf) if hf else hf_rate(cfg, dtype, device, args.prompt_len, n, static=False)
        show("transformers dynamic cache", f"{args.prompt_len}+{n}", rate)
        if compile:
            show("transformers static+compile", f"{args.prompt_len}+{n}",
                 hf_rate(cfg, dtype, device, args.prompt_len, n, static=True))


if __name__ == "__main__":
    main()
