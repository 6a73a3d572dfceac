"""DPO step vs SFT step on the same tokens: one pair of two answers per row, cached reference.

Usage (H100):  python bench/bench_dpo.py                     # Llama-3.2-1B shape, 2 x 8k-token answers
       (CPU):  python bench/bench_dpo.py --shape tiny --device cpu --answer-tokens 512
Prints one table: tokens/s and peak memory of a DPO step (cached reference) next to an SFT step on
the identical packed row, without and with activation checkpointing; the goal is DPO <= ~1.5x SFT's time.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_train import SHAPES, timed  # noqa: E402
from model import ModelConfig, check_device  # noqa: E402
from train_dpo import DPOConfig, dpo_step  # noqa: E402
from train_sft import build_model, sft_loss  # noqa: E402


def pair_row(answer_tokens, prompt_tokens, vocab):
    """A row holding chosen and rejected, each a prompt (no loss) and an answer (loss)."""
    rng = np.random.default_rng(0)
    n = prompt_tokens + answer_tokens
    ids = rng.integers(0, vocab, 2 * n)
    targets = np.roll(ids, -1)
    for d in range(2):
        targets[d * n:d * n + prompt_tokens - 1] = -100
        targets[(d + 1) * n - 1] = -100
    return {"ids": ids, "targets": targets, "position_ids": np.concatenate([np.arange(n)] * 2),
            "cu_seqlens": np.array([0, n, 2 * n]), "doc_targets": np.array([answer_tokens] * 2),
            "n_targets": 2 * answer_tokens, "first_doc": 0}


def dpo_and_sft_steps(model, opt, row, device) -> list[tuple]:
    """(label, tokens/s, seconds, peak GiB or "-" / "OOM") of an SFT step and a DPO step (cached reference) on
    the same row, without and with activation checkpointing."""
    cfg = DPOConfig(device=str(device), micro_rows=1, beta=0.1)
    ref = np.zeros(2)  # cached reference log-probs: the values do not change the cost
    results = []
    for ckpt in (False, True):
        model.checkpointing = ckpt
        for name in ("SFT", "DPO (cached reference)"):
            label = name + (", ckpt" if ckpt else "")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            loss_fn = sft_loss if name == "SFT" else (lambda *a: dpo_step(*a, ref_logps=ref))

            def step():
                loss_fn(cfg, model, [row], 0, 1, device)
                opt.step()
                opt.zero_grad(set_to_none=True)
            try:
                dt = timed(step, device)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                results.append((label, None, None, "OOM"))
                continue
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
            results.append((label, len(row["ids"]) / dt, dt, mem))
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.2-1b", choices=SHAPES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--answer-tokens", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    args = ap.parse_args()
    try:  # the GPU default on a machine without one: one line, not CUDA's assertion
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    mcfg = ModelConfig(**SHAPES[args.shape])
    row = pair_row(args.answer_tokens, args.prompt_tokens, mcfg.vocab_size)
    model = build_model(mcfg, None, 0, 1, device, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    results = dpo_and_sft_steps(model, opt, row, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.shape} shape, one pair of 2 x {args.answer_tokens}-token answers per step, {name}")
    print(f"| {'step':<30} | {'tokens/s':>9} | {'x SFT time':>10} | {'peak GiB':>8} |")
    print(f"| {'-' * 30} | {'-' * 9} | {'-' * 10} | {'-' * 8} |")
    for i, (step_name, tps, dt, mem) in enumerate(results):
        sft_dt = results[i - i % 2][2]  # the SFT step of the same checkpointing setting
        ratio = f"{dt / sft_dt:.2f}" if dt and sft_dt else "-"
        print(f"| {step_name:<30} | {f'{tps:,.0f}' if tps else 'OOM':>9} | {ratio:>10} | {mem:>8} |")


if __name__ == "__main__":
    main()
