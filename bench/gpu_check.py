"""Every CUDA path of the project, checked and measured in one command: what a new GPU box wants first.

Usage:  python bench/gpu_check.py --out gpu_report.md           # on the GPU: ~8 minutes on one H200
        python bench/gpu_check.py --device cpu --out report.md  # tiny shapes on the CPU (CI runs this)
Prints one markdown report (and writes it to --out): correctness items PASS/FAIL with their figure,
then speed and memory next to transformers in the same run (the bench/ scripts' functions, fewer
tokens). A failing item never stops the others; the report ends with "N passed, N failed, N skipped".
Speed goals (H100) are PASS/FAIL only on CUDA with the real shapes; elsewhere their figures are INFO.
"""
import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests")]
import model as model_module  # noqa: E402
from dataset import write_builtin  # noqa: E402
from generate import generate, generate_many  # noqa: E402
from model import ModelConfig, Transformer, attention, sdpa_backends  # noqa: E402


# -----------------------------------------------------------------------------
# correctness: each returns (passed, figure)

def logits_vs_transformers(device, dtype):
    """Our logits against transformers' on every tiny config of tests/ (llama3 scaling, yarn, mistral, qwen2,
    glm, ...). float32: max |diff| <= 1e-4. bfloat16: ours no further from transformers' float32 logits than
    2x transformers' own bfloat16 logits are (+0.02), since both round differently."""
    from hf_models import BASE, CASES, save_hf_model
    worst, failed = 0.0, []
    for name in CASES:
        with tempfile.TemporaryDirectory() as path:
            hf = save_hf_model(name, path).to(device)
            ours = Transformer.from_pretrained(path, dtype, device).eval()
            ids = torch.randint(3, BASE["vocab_size"], (2, 48), device=device)
            with torch.no_grad():
                ref = hf(ids).logits.float()
                got = ours(ids).float()
                if dtype == torch.float32:
                    err, tol = (got - ref).abs().max().item(), 1e-4
                else:
                    hf_low = hf.to(dtype)(ids).logits.float()
                    err, tol = (got - ref).abs().max().item(), 2 * (hf_low - ref).abs().max().item() + 0.02
            worst = max(worst, err)
            if not err <= tol:
                failed.append(f"{name} {err:.2e} > {tol:.2e}")
    return not failed, f"{len(CASES)} configs, max |diff| {worst:.2e}" + (f"; failed: {', '.join(failed)}" if failed else "")


def packed_attention(device, use_flash):
    """A row packing four documents through our attention (cuDNN-first SDPA per document, or flash-attn's
    varlen kernel) against each document alone through the math backend in float32 on the same (rounded)
    inputs: outputs and gradients, as ||ours - ref|| / ||ref||."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if use_flash and (model_module.flash_attn_varlen_func is None or device.type != "cuda"):
        return None, "flash-attn not installed" if model_module.flash_attn_varlen_func is None else "CUDA only"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [300, 200, 100, 57]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    torch.manual_seed(0)
    q = torch.randn(1, 8, bounds[-1], 64, device=device)
    k, v = torch.randn(1, 2, bounds[-1], 64, device=device), torch.randn(1, 2, bounds[-1], 64, device=device)
    g = torch.randn_like(q)
    saved = model_module.flash_attn_varlen_func
    if not use_flash:
        model_module.flash_attn_varlen_func = None  # the SDPA path, even where flash-attn is installed
    try:
        qs, ks, vs = (t.to(dtype).clone().requires_grad_() for t in (q, k, v))
        with sdpa_backends(device):
            out = attention(qs, ks, vs, doc_bounds=bounds)
        out.backward(g.to(dtype))
    finally:
        model_module.flash_attn_varlen_func = saved
    qr, kr, vr = (t.to(dtype).float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.cat([F.scaled_dot_product_attention(qr[:, :, a:b], kr[:, :, a:b], vr[:, :, a:b], is_causal=True,
                                                        enable_gqa=True) for a, b in zip(bounds[:-1], bounds[1:])], 2)
    ref.backward(g.to(dtype).float())
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    diffs = [rel(out, ref)] + [rel(a.grad, b.grad) for a, b in ((qs, qr), (ks, kr), (vs, vr))]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 rounding alone: 2e-3 to 5e-3 on a CPU
    return max(diffs) <= tol, f"out {diffs[0]:.1e}, grad q/k/v {diffs[1]:.1e}/{diffs[2]:.1e}/{diffs[3]:.1e} (tol {tol:.0e})"


def tiny_model(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    return Transformer(cfg).to(device, dtype).eval()


def compiled_decode(device, n):
    """Greedy decoding through the compiled step (a CUDA graph on CUDA) equals eager, token for token, for
    batch-1 generate and for continuous batching."""
    model = tiny_model(device)
    prompts = [torch.randint(0, 512, (m,)).tolist() for m in (17, 5, 33)]
    eager = [generate(model, [p], n, temperature=0)[0] for p in prompts]
    graph = [generate(model, [p], n, temperature=0, compile=True)[0] for p in prompts]
    many = dict(generate_many(model, prompts, n, slots=2, compile=True))
    same = sum(a == b for a, b in zip(eager, graph)) + sum(eager[i] == many[i] for i in range(3))
    how = "CUDA graphs" if device.type == "cuda" else "CPU: eager (CUDA graphs are CUDA-only)"
    return same == 6, f"{same}/6 sequences of {n} tokens equal ({how})"


def local_writer(device, tmp, n=32):
    """AgentWrite's local writer answers calls from three threads on its serving thread, after the main thread
    decoded through a compiled step (as demo.py --real does): greedy answers equal eager generate's, token for
    token. Compiled CUDA graphs in that thread failed on torch 2.11 (pytorch#123177); the writer decodes eagerly."""
    import threading
    from agentwrite import LocalClient
    from dataset import build_tokenizer, chat_prompt_ids, load_tokenizer
    path = os.path.join(tmp, "writer")
    build_tokenizer(path, ["write about the sea and the ships in the harbour at night"])
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    Transformer(cfg).save_pretrained(path)
    model = Transformer.from_pretrained(path, torch.float32, device).eval()
    chats = [[{"role": "user", "content": c}] for c in ("write about the sea", "the ships", "the harbour at night")]
    prompts = [chat_prompt_ids(tok, c) for c in chats]
    dict(generate_many(model, prompts, 8, slots=2, compile=True))  # the main thread compiles first
    alone = [generate(model, [p], n, temperature=0)[0] for p in prompts]
    client = LocalClient(path, device=device.type, max_batch=3, row_len=512, dtype="float32")
    client.tok.stop_ids = []  # an untrained model may stop at once: every answer runs to its n tokens
    answers = [None] * 3
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, client.chat(chats[i], n, temperature=0)))
               for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        client.close()
    same = sum(a == tok.decode(b) for a, b in zip(answers, alone))
    return same == 3, f"{same}/3 answers of {n} tokens from the serving thread equal eager generate"


def sft_resume(device, tmp):
    """4 SFT steps (--loss-reduction token) equal 2 steps, a stop and a resume for 2 more."""
    from train_sft import TrainConfig, train
    data, tok = write_builtin(os.path.join(tmp, "sft-data"), count=80, min_words=100, max_words=400, seed=1)
    base = dict(model="tiny", data=data, tokenizer=tok, max_tokens=512, batch_rows=4, lr=3e-3, weight_decay=0.0,
                device=device.type, max_steps=4, loss_reduction="token", log_every=100)
    straight = [r["loss"] for r in train(TrainConfig(**base, out=os.path.join(tmp, "sft-a")))]
    cut = train(TrainConfig(**base, out=os.path.join(tmp, "sft-b"), stop_at=2))
    cut += train(TrainConfig(**base, out=os.path.join(tmp, "sft-b"), resume=True))
    resumed = [r["loss"] for r in cut]
    diff = max(abs(a - b) for a, b in zip(straight, resumed))
    return len(resumed) == 4 and diff == 0, f"losses {', '.join(f'{x:.4f}' for x in straight)}; max |diff| {diff:.1e}"


def dpo_references(device, tmp):
    """4 DPO steps with the cached reference give the losses of 4 with a live frozen copy."""
    from train_dpo import DPOConfig, builtin_dpo_data, train
    data, tok = builtin_dpo_data(os.path.join(tmp, "dpo-data"), seed=0, count=24)
    # float32: in bf16 the two differ by rounding (the reference's rows are batched differently)
    base = dict(model="tiny", data=data, tokenizer=tok, max_tokens=1024, batch_rows=4, lr=3e-4, beta=0.5,
                weight_decay=0.0, device=device.type, max_steps=4, log_every=100, dtype="float32")
    cached = [r["loss"] for r in train(DPOConfig(**base, out=os.path.join(tmp, "dpo-a")))]
    live = [r["loss"] for r in train(DPOConfig(**base, out=os.path.join(tmp, "dpo-b"), live_reference=True))]
    diff = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cached, live))
    return diff <= 1e-3, f"losses {', '.join(f'{x:.4f}' for x in cached)}; max rel diff {diff:.1e}"


# -----------------------------------------------------------------------------
# speed and memory: each returns (passed or None for INFO, figure)

def decode_speed(device, big):
    from bench_generate import SHAPES, hf_rate, ours_rate, random_model
    cfg = ModelConfig(**SHAPES["llama3.1-8b" if big else "tiny"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(cfg, dtype, device)
    new = 512 if big else 64
    ours = ours_rate(model, 1000 if big else 100, new, compile=device.type == "cuda")
    del model
    hf = hf_rate(cfg, dtype, device, 1000 if big else 100, 128 if big else 48, static=False)
    return (ours >= 150 if big else None), f"ours {ours:.1f} tok/s, transformers {hf:.1f} tok/s (goal >= 150 on an H100)"


def many_prompt_speed(device, big):
    from bench_generate import SHAPES, answer_lengths, many_prompts, random_model
    cfg = ModelConfig(**SHAPES["llama3.1-8b" if big else "tiny"])
    model = random_model(cfg, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    n, slots, longest = (64, 32, 1024) if big else (16, 4, 64)
    lengths, _ = answer_lengths(n, longest)
    static, cont = many_prompts(model, lengths, slots, 128 if big else 16, compile=device.type == "cuda")
    del model
    total = sum(lengths)
    return None, (f"{n} prompts, {slots} slots: static {total / static:,.0f} tok/s ({static:.0f} s), continuous "
                  f"{total / cont:,.0f} tok/s ({cont:.0f} s), {static / cont:.2f}x")


def sft_speed(device, big):
    from bench_train import SHAPES, hf, ours
    from train_sft import build_model, flops_per_token
    cfg = ModelConfig(**SHAPES["llama3.2-1b" if big else "tiny"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bench_train's default
    model = build_model(cfg, None, 0, 1, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    parts, goal = [], None
    for T, ckpt in ((16384, False), (32768, True), (65536, True)) if big else ((256, False), (512, True)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            dt, doc_len = ours(model, opt, device, T, packed=True, checkpointing=ckpt, dtype=dtype)
        except torch.OutOfMemoryError:
            parts.append(f"{T // 1024}k{' ckpt' if ckpt else ''}: OOM")
            continue
        fig = f"{T // 1024 if T >= 1024 else T}{'k' if T >= 1024 else ''}{' ckpt' if ckpt else ''}: {T / dt:,.0f} tok/s"
        if device.type == "cuda":
            fig += (f", MFU {flops_per_token(cfg, doc_len) * T / dt / 989e12:.0%}, "
                    f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        parts.append(fig)
        if big and T == 16384:
            goal = T / dt >= 43000
    del model, opt
    T = 16384 if big else 256
    try:
        parts.append(f"transformers {T}: {T / hf(cfg, device, T, checkpointing=big, dtype=dtype):,.0f} tok/s")
    except torch.OutOfMemoryError:
        parts.append(f"transformers {T}: OOM")
    return goal, "; ".join(parts) + (" (goal >= 43k tok/s at 16k)" if big else "")


def dpo_speed(device, big):
    from bench_dpo import dpo_and_sft_steps, pair_row
    from bench_train import SHAPES
    from train_sft import build_model
    cfg = ModelConfig(**SHAPES["llama3.2-1b" if big else "tiny"])
    model = build_model(cfg, None, 0, 1, device, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    results = dpo_and_sft_steps(model, opt, pair_row(8192 if big else 128, 128, cfg.vocab_size), device)
    del model, opt
    sft, dpo = results[0][2], results[1][2]
    if not (sft and dpo):
        return False, "OOM"
    ratio = dpo / sft
    return (ratio <= 1.5 if big else None), f"DPO step {ratio:.2f}x an SFT step on the same 2 x answers row (goal <= 1.5x)"


# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="", help="also write the report to this file")
    ap.add_argument("--budget", type=float, default=540, help="seconds; speed items left when it is spent are skipped")
    ap.add_argument("--only", default="", help="comma-separated words: run only the items whose name holds one")
    args = ap.parse_args()
    device = torch.device(args.device)
    big = device.type == "cuda"  # the real shapes on a GPU, tiny ones elsewhere
    t_start = time.time()
    rows, names = [], []

    def check(section, name, fn, *fn_args, speed=False):
        names.append(name)
        if args.only and not any(w.strip() in name for w in args.only.split(",")):
            return
        if speed and time.time() - t_start > args.budget:
            rows.append((section, name, "SKIP", f"time budget of {args.budget:.0f} s spent"))
            return
        t0 = time.time()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the scripts' own logs; stdout is the report's
                ok, figure = fn(*fn_args)
            status = "SKIP" if ok is None and not speed else ("INFO" if ok is None else "PASS" if ok else "FAIL")
        except Exception as e:  # noqa: BLE001 - every item reports, whatever fails
            status, figure = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            traceback.print_exc()
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append((section, name, status, f"{figure} [{time.time() - t0:.0f} s]"))
        print(f"{status:4} {name}: {figure}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        check("correctness", "logits = transformers, float32", logits_vs_transformers, device, torch.float32)
        check("correctness", "logits = transformers, bfloat16", logits_vs_transformers, device, torch.bfloat16)
        check("correctness", "packed rows, SDPA (cuDNN first) = math backend", packed_attention, device, False)
        check("correctness", "packed rows, flash-attn = math backend", packed_attention, device, True)
        check("correctness", "compiled greedy decode = eager", compiled_decode, device, 256 if big else 48)
        check("correctness", "AgentWrite's local writer (a serving thread) = eager", local_writer, device, tmp)
        check("correctness", "SFT: 2 steps + stop + resume = 4 steps", sft_resume, device, tmp)
        check("correctness", "DPO: cached reference = live reference", dpo_references, device, tmp)
    shape = "Llama-3.1-8B / Llama-3.2-1B shapes" if big else "tiny shapes"
    check("speed", f"batch-1 decode ({shape})", decode_speed, device, big, speed=True)
    check("speed", f"many prompts: static vs continuous batching ({shape})", many_prompt_speed, device, big, speed=True)
    check("speed", f"SFT step, packed rows ({shape})", sft_speed, device, big, speed=True)
    check("speed", f"DPO step vs SFT step ({shape})", dpo_speed, device, big, speed=True)

    if not rows:
        sys.exit(f"--only {args.only!r}: no item's name holds one of these words; the items: " + "; ".join(names))
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    lines = [f"# GPU self-check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"{hw}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {hf_version}; flash-attn "
             f"{'installed' if model_module.flash_attn_varlen_func is not None else 'not installed'}; "
             f"{time.time() - t_start:.0f} s in all", ""]
    for section in ("correctness", "speed"):
        lines += [f"## {section}", "", "| item | result | figure |", "| --- | --- | --- |"]
        lines += [f"| {name} | {status} | {figure} |" for s, name, status, figure in rows if s == section]
        lines.append("")
    n = {s: sum(r[2] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"summary: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(report + "\n")
        os.replace(args.out + ".tmp", args.out)
    sys.exit(1 if n["FAIL"] else 0)


if __name__ == "__main__":
    main()
