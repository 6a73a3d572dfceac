"""SFT step speed and peak memory: our train_sft step next to transformers', one packed row per step.

Usage (H100):  python bench/bench_train.py                 # Llama-3.2-1B shape, rows of 16k, 32k, 64k tokens
       (CPU):  python bench/bench_train.py --shape tiny --device cpu --lengths 1024
               python bench/bench_train.py --checkpoint runs/smollm2 --device cpu --lengths 2048 --hf-lengths 2048 [--dtype bfloat16]
--checkpoint DIR takes the shape from that folder's config.json (speed does not depend on the weights' values).
On CUDA ours is bf16 autocast over float32 weights, transformers bf16 weights. On CPU both run in float32, or with
--dtype bfloat16 both under bf16 autocast over float32 weights, as train_sft.py --dtype bfloat16 (and the real-model
demo on a CPU with AVX512-BF16 or AMX) trains.
Ours: float32 master weights, autocast to --dtype, chunked LM head, fused AdamW, with and without activation
checkpointing ("ckpt"), on a single-document row and on a row packing five documents (3/8, 1/4, 3/16,
1/8, 1/16 of it). One model and optimizer serve all of ours.
transformers: SDPA, gradient checkpointing on CUDA only, AdamW, one causal sequence.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, check_device, read_config  # noqa: E402
from train_sft import build_model, flops_per_token, micro_batch_loss  # noqa: E402

SHAPES = {
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                        max_position_embeddings=131072, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=65536, tie_word_embeddings=True),
}


def row_of(lengths, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, sum(lengths))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    return {"ids": ids, "targets": np.roll(ids, -1), "position_ids": pos, "cu_seqlens": cu,
            "doc_targets": np.array(lengths), "n_targets": int(sum(lengths))}


WARMUP, REPS = 2, 5


def timed(step, device, warmup=None, reps=None):
    warmup, reps = WARMUP if warmup is None else warmup, REPS if reps is None else reps
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(model, opt, device, T, packed, checkpointing, dtype):
    fractions = [6, 4, 3, 2, 1] if packed else [16]
    lengths = [T * f // 16 for f in fractions]
    lengths[0] += T - sum(lengths)
    row = row_of(lengths, model.config.vocab_size)
    model.checkpointing = checkpointing
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = micro_batch_loss(model, [row], "token", T, len(lengths), device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    try:
        return timed(step, device), T / np.mean(lengths)
    finally:
        opt.zero_grad(set_to_none=True)  # also after an out-of-memory error, before the next setting


def hf(cfg, device, T, checkpointing, dtype):
    import transformers
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    weights = dtype if device.type == "cuda" else torch.float32  # CPU: autocast over float32 weights, as ours
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cpu" and dtype != torch.float32)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=weights, attn_implementation="sdpa").to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)

    def step():
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.2-1b", choices=SHAPES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536])
    ap.add_argument("--hf-lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--compile", action="store_true", help="torch.compile our MLPs (train_sft.py --compile)")
    ap.add_argument("--checkpoint", default="", help="use this checkpoint folder's shape instead of --shape")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per setting (the median is shown)")
    ap.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                    help="compute dtype of both sides (default: bfloat16 on CUDA, float32 on CPU)")
    args = ap.parse_args()
    try:  # the GPU default on a machine without one: one line, not CUDA's assertion
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    global WARMUP, REPS
    WARMUP, REPS = args.warmup, args.reps
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = ModelConfig.from_hf(read_config(args.checkpoint)) if args.checkpoint else ModelConfig(**SHAPES[args.shape])
    if args.checkpoint:
        args.shape = os.path.basename(os.path.normpath(args.checkpoint))
    # the table's rows print as they are measured: a CPU run of a real model's shape takes minutes a setting
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"SFT step, {args.shape} shape, {str(dtype)[6:]}, {name}, torch {torch.__version__}"
          f"{', MLPs compiled' if args.compile else ''}")
    print(f"| {'implementation':<32} | {'row tokens':>10} | {'tokens/s':>9} | {'MFU':>6} | {'peak GiB':>8} |")
    print(f"| {'-' * 32} | {'-' * 10} | {'-' * 9} | {'-' * 6} | {'-' * 8} |", flush=True)

    def show(impl, T, tps, mfu, mem):
        print(f"| {impl:<32} | {T:>10} | {tps:>9} | {mfu:>6} | {mem:>8} |", flush=True)

    def record(impl, T, fn):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            out = fn()
            dt, doc_len = out if isinstance(out, tuple) else (out, T)
            mem, mfu = "-", "-"  # H100 figures: peak memory and MFU against 989 TFLOP/s dense bf16
            if device.type == "cuda":
                mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
                mfu = f"{flops_per_token(cfg, doc_len) * T / dt / 989e12:.1%}"
            show(impl, T, f"{T / dt:,.0f}", mfu, mem)
        except torch.OutOfMemoryError:
            show(impl, T, "OOM", "-", "-")

    # one model and optimizer for all of ours; activation checkpointing off (faster) and on (fits longer rows)
    model = build_model(cfg, None, 0, 1, device, dtype, compile=args.compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    for T in args.lengths:
        for ckpt in (False, True):
            for packed in (False, True):
                label = f"ours, {'five packed docs' if packed else 'one document'}{', ckpt' if ckpt else ''}"
                record(label, T, lambda: ours(model, opt, device, T, packed, ckpt, dtype))
    del model, opt
    ckpt = device.type == "cuda"  # rows of 16k+ need it on a GPU; on the CPU both sides run without it
    for T in args.hf_lengths:
        record(f"transformers{', ckpt' if ckpt else ''}", T, lambda: hf(cfg, device, T, ckpt, dtype))


if __name__ == "__main__":
    main()
