"""Generate long answers with a preallocated KV cache: prefill the prompts, then decode one token at a time.

Usage:
    python generate.py --checkpoint DIR --prompt "Write a 10000-word guide to ..." [--max-new-tokens 32768]

Streams the answer to stdout and ends with one summary line (tokens, words, tokens/s).
"""
import argparse
import sys
import time
from dataclasses import dataclass

import torch

from dataset import chat_prompt_ids, count_words, load_tokenizer
from model import Transformer


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token per row of logits (B, V). temperature 0 is greedy.

    Draws argmax(p / E) with E ~ Exponential(1), an exact sample from p that needs no host sync.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def decode_step(model, tokens, slot, start, slots):
    """One token per row (B, 1) written at cache slot `slot` (1,); row b's prompt begins at start[b]."""
    position_ids = (slot - start)[:, None]
    mask = ((slots <= slot) & (slots[None] >= start[:, None]))[:, None, None, :]  # (B, 1, 1, S)
    return model(tokens, position_ids=position_ids, cache_pos=slot, mask=mask)[:, -1]


def prefill(model, prompts: list[list[int]], cache_len: int):
    """Left-pad the prompts into a fresh cache of cache_len slots; returns (last logits (B, V), start, slots)
    where row b's prompt begins at slot start[b]. What decode_step continues from."""
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    model.setup_cache(B, cache_len)
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([P - len(p) for p in prompts], device=device)
    slots = torch.arange(cache_len, device=device)
    prompt_slots = slots[:P]
    mask = None
    if start.any():  # padded rows: a query sees its own row's real tokens (and itself, so no row is empty)
        q, k = prompt_slots[:, None], slots[None]
        mask = ((k <= q) & ((k >= start[:, None, None]) | (k == q)))[:, None]  # (B, 1, P, S)
    position_ids = (prompt_slots[None] - start[:, None]).clamp_min(0)
    return model(ids, position_ids=position_ids, cache_pos=prompt_slots, mask=mask)[:, -1], start, slots


_compiled = {}


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), temperature=0.0,
             top_k=0, top_p=1.0, seed=0, compile=False, on_tokens=None) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). Prompts of different lengths are left-padded.

    on_tokens(list of B ints) is called after every step, e.g. to stream text.
    compile (CUDA): the decode step runs as a CUDA graph (torch.compile mode="reduce-overhead").
    """
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + max_new_tokens
    window = model.config.sliding_window
    if window and S > window:
        raise ValueError(f"prompt + max_new_tokens = {S} tokens is longer than the model's sliding_window ({window}), "
                         "which this implementation does not apply")
    torch.manual_seed(seed)
    logits, start, slots = prefill(model, prompts, S)

    step = decode_step
    if compile and device.type == "cuda":
        step = _compiled.setdefault("step", torch.compile(decode_step, mode="reduce-overhead", fullgraph=True))
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out = [[] for _ in range(B)]
    done = [False] * B
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p)
        finished = torch.isin(tok, stop)
        toks, fin = tok.tolist(), finished.tolist()  # the one host sync per step
        for b in range(B):
            if not done[b] and not fin[b]:
                out[b].append(toks[b])
            done[b] = done[b] or fin[b]
        if on_tokens is not None:
            on_tokens(toks)
        if all(done) or i == max_new_tokens - 1:
            break
        logits = step(model, tok[:, None], slots[P + i:P + i + 1].clone(), start, slots)
    for layer in model.layers:  # free the cache
        layer.self_attn.cache = None
    return out


class Streamer:
    """Prints the decoded text of row 0 as it grows; decodes only the current line, so cost stays flat."""

    def __init__(self, tokenizer, stop_ids):
        self.tok, self.stop = tokenizer, set(stop_ids)
        self.line, self.printed, self.done = [], 0, False

    def __call__(self, toks):
        if self.done or toks[0] in self.stop:
            self.done = True
            return
        self.line.append(toks[0])
        text = self.tok.decode(self.line)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)
        if text.endswith("\n"):
            self.line, self.printed = [], 0


@dataclass
class GenerateConfig:
    checkpoint: str = ""
    prompt: str = "Write a 10000-word guide to the history of the printing press."
    max_new_tokens: int = 32768
    temperature: float = 0.5
    top_p: float = 0.8
    top_k: int = 0
    seed: int = 0
    template: str = ""  # chat template name; empty: detect from the tokenizer files
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"
    compile: bool = torch.cuda.is_available()


def main():
    cfg = GenerateConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(cfg).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    cfg = GenerateConfig(**vars(ap.parse_args()))
    if not cfg.checkpoint:
        ap.error("--checkpoint DIR is required")
    try:
        tokenizer = load_tokenizer(cfg.checkpoint, cfg.template or None)
        model = Transformer.from_pretrained(cfg.checkpoint, getattr(torch, cfg.dtype), cfg.device).eval()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": cfg.prompt}])
    streamer = Streamer(tokenizer, tokenizer.stop_ids)
    t0 = time.perf_counter()
    out = generate(model, [prompt], cfg.max_new_tokens, tokenizer.stop_ids, cfg.temperature, cfg.top_k, cfg.top_p,
                   cfg.seed, cfg.compile, on_tokens=streamer)[0]
    dt = time.perf_counter() - t0
    text = tokenizer.decode(out)
    print(f"\n--- {len(out)} tokens, {count_words(text)} words, {len(out) / dt:.1f} tokens/s "
          f"({dt:.1f} s, prompt {len(prompt)} tokens)", file=sys.stderr)


if __name__ == "__main__":
    main()
