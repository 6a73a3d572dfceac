"""Tokenize and pack 6,000 conversations of ~5,000 words (built-in generator) into 32,768-token rows.

Usage: python bench/bench_dataset.py [--count 6000] [--words 5000] [--max-tokens 32768]
Prints one table: seconds and tokens/s for reading + tokenizing and for packing + writing the cache.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--words", type=int, default=5000)
    ap.add_argument("--max-tokens", type=int, default=32768)
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        lo, hi = int(args.words * 0.8) // 100 * 100, int(args.words * 1.2) // 100 * 100
        data, tok_dir = dataset.write_builtin(work, args.count, lo, hi, seed=0)
        t_gen = time.perf_counter() - t0
        tok = dataset.Tokenizer(tok_dir)
        t0 = time.perf_counter()
        records, _ = dataset.read_jsonl(data, dataset.parse_sft)
        encoded = dataset.encode_chats(tok, records)
        t_tok = time.perf_counter() - t0
        n_tokens = sum(len(ids) for ids, _ in encoded)
        t0 = time.perf_counter()
        packed, over, _ = dataset.pack([[c] for c in encoded], args.max_tokens)
        packed.save(os.path.join(work, "packed"))
        t_pack = time.perf_counter() - t0
        words = sum(dataset.count_words(r[-1]["content"]) for r in records[:200]) / min(200, len(records))
    finally:
        shutil.rmtree(work)
    print(f"\n{args.count} conversations, ~{words:.0f} words each, {n_tokens:,} tokens, rows of {args.max_tokens}, "
          f"{os.cpu_count()} cores (corpus generation took {t_gen:.1f} s, not counted)")
    print(f"| {'stage':<26} | {'seconds':>8} | {'tokens/s':>12} |")
    print(f"| {'-' * 26} | {'-' * 8} | {'-' * 12} |")
    for stage, t in (("read + tokenize", t_tok), ("pack + write cache", t_pack), ("total", t_tok + t_pack)):
        print(f"| {stage:<26} | {t:>8.1f} | {n_tokens / t:>12,.0f} |")
    print(f"rows: {len(packed)}, packing efficiency {packed.efficiency():.1%}, over-long: {over}")


if __name__ == "__main__":
    main()
