"""How often a checkpoint would end long answers early, read off teacher-forced answers it did not train on.

Usage: python bench/stop_odds.py --checkpoint runs/real-s2/base --checkpoint runs/real-s2/sft/step_72
           --data runs/real-48/agentwrite.jsonl [--exclude runs/real-s2/agentwrite.jsonl] [--items 6]
           [--dtypes float32,bfloat16]
Each answer's every step is given the sampler's chance of drawing a stop token (temperature, top-p), from the
model's own logits, from the logits after the repetition penalty (what generate.py sampled before
keep_stop_odds), and after the penalty with the stop odds kept (what it samples now). Prints one table: the
expected number of stops along the answers (a sum of per-step chances) and the mean chance of reaching each
answer's end without one. Why: answers that end early shorten every length the demo measures, and a rule meant
to stop loops must not be the reason. --dtypes: the same in each compute dtype (the demo computes in bfloat16 on
CPUs with AVX512-BF16 or AMX, in float32 on others), since rounding may move the stop token's odds too.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import chat_prompt_ids, count_words, load_tokenizer, parse_sft, read_jsonl  # noqa: E402
from generate import keep_stop_odds, penalize, recent_tokens  # noqa: E402
from model import Transformer  # noqa: E402


def stop_chance(logits, stops, temperature, top_p):
    """Per row: the chance that sampling at temperature and top_p draws a stop token (mask stops, (V,))."""
    p = (logits / temperature).softmax(-1)
    p_stop = p[:, stops].sum(-1)
    above = (p * (p > p[:, stops].max(-1, keepdim=True).values)).sum(-1)  # the mass ranked before the stop tokens
    ranked = p.sort(-1, descending=True).values
    nucleus = (ranked * (ranked.cumsum(-1) - ranked <= top_p)).sum(-1)
    return torch.where(above <= top_p, p_stop / nucleus, torch.zeros_like(p_stop))


def chances(model, tok, prompt, answer, args):
    """(steps, 3): the stop chance at each answer token under: no rule, the penalty, the penalty with stop odds kept."""
    p, a = chat_prompt_ids(tok, prompt), tok.encode_batch([answer])[0]
    with torch.no_grad():
        logits = model(torch.tensor([p + a]))[0, len(p) - 1:-1].float()
    stops = torch.zeros(logits.shape[-1], dtype=torch.bool)
    stops[sorted(tok.stop_ids)] = True
    out = []
    for s in range(0, len(a), 256):
        raw = logits[s:s + 256]
        w = args.window
        recent = recent_tokens([p[-w:] + a[max(0, t - w):t] for t in range(s, s + len(raw))], w, "cpu")  # keeps the last w
        ruled = penalize(raw, recent, args.penalty)
        kept = keep_stop_odds(raw, ruled, stops, args.temperature)
        out.append(torch.stack([stop_chance(x, stops, args.temperature, args.top_p) for x in (raw, ruled, kept)], -1))
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--data", required=True, help="SFT records (agentwrite.py's output) whose answers are read")
    ap.add_argument("--exclude", default="", help="SFT records whose instructions are left out (the training data)")
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--min-words", type=int, default=1500)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--penalty", type=float, default=1.1)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--dtypes", default="float32", help="compute dtypes, comma-separated: float32, bfloat16")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        sys.exit(f"--dtypes {args.dtypes!r}: float32 and/or bfloat16, comma-separated")
    chats, _ = read_jsonl(args.data, parse_sft)  # message lists: user, assistant
    seen = {m[0]["content"] for m in read_jsonl(args.exclude, parse_sft)[0]} if args.exclude else set()
    texts = [(m[:1], m[1]["content"]) for m in chats
             if m[0]["content"] not in seen and count_words(m[1]["content"]) >= args.min_words][:args.items]
    if not texts:
        sys.exit(f"{args.data}: no answer of {args.min_words}+ words outside --exclude")
    words = [count_words(a) for _, a in texts]
    print(f"\n{len(texts)} answers of {args.data} ({min(words)}-{max(words)} words), temperature {args.temperature}, "
          f"top-p {args.top_p}, penalty {args.penalty} over {args.window} tokens; on the CPU")
    print(f"| {'checkpoint, dtype':<36} | {'E[stops]: model':>15} | {'penalty':>8} | {'penalty, kept':>13} | "
          f"{'reach the end: model':>20} | {'penalty':>8} | {'penalty, kept':>13} |")
    print(f"| {'-' * 36} | {'-' * 15}:| {'-' * 8}:| {'-' * 13}:| {'-' * 20}:| {'-' * 8}:| {'-' * 13}:|")
    for ckpt, dtype in [(c, d) for c in args.checkpoint for d in dtypes]:
        model, tok = Transformer.from_pretrained(ckpt, getattr(torch, dtype), "cpu").eval(), load_tokenizer(ckpt)
        per = [chances(model, tok, prompt, answer, args) for prompt, answer in texts]
        stops = sum(c.sum(0) for c in per)
        reach = sum(torch.log1p(-c.clamp_max(1 - 1e-9)).sum(0).exp() for c in per) / len(per)
        print(f"| {f'{ckpt}, {dtype}'[-36:]:<36} | {stops[0]:>15.2f} | {stops[1]:>8.2f} | {stops[2]:>13.2f} | "
              f"{reach[0]:>20.2f} | {reach[1]:>8.2f} | {reach[2]:>13.2f} |")


if __name__ == "__main__":
    main()
