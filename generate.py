"""Generate long answers with a preallocated KV cache: prefill the prompts, then decode one token at a time.

Usage:
    python generate.py --checkpoint DIR --prompt "Write a 10000-word guide to ..." [--max-new-tokens 32768]

Streams the answer to stdout and ends with one summary line (tokens, words, tokens/s).
"""
import argparse
import ctypes
import ctypes.util
import sys
import time
from dataclasses import dataclass

import torch

from dataset import chat_prompt_ids, count_words, load_tokenizer
from model import KVCache, Transformer, check_device, compute_dtype


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of probs (B, n), drawn by inverse CDF: the first index whose cumulative
    probability passes a uniform draw. Exact (cumulated in float64), B random numbers instead of B x n,
    and no host sync; zero-probability entries are never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def sample(logits: torch.Tensor, temperature=1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token per row of logits (B, V). temperature 0 is greedy; a tensor (B,) gives each row its own.

    top_k keeps the k most likely tokens; top_p then keeps the smallest set, most likely first, whose
    probability reaches top_p (after top_k, renormalized, as transformers orders them). That set is looked
    for among the 256 most likely tokens first, and the search widens only for a batch where some row's
    256 best hold less than top_p: sorting the whole vocabulary cost more than the model's own step at 16
    rows on a CPU.
    """
    if isinstance(temperature, torch.Tensor):  # per row: greedy where <= 0, sampled elsewhere
        sampled = sample(logits / temperature.clamp_min(1e-6)[:, None], 1.0, top_k, top_p)
        return torch.where(temperature > 0, sampled, logits.argmax(-1))
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if top_k <= 0 and top_p >= 1.0:
        return draw(logits.softmax(-1))
    k = min(top_k, V) if top_k > 0 else min(256, V)
    log_total = logits.logsumexp(-1, keepdim=True)
    while True:
        best, ids = logits.topk(k, dim=-1)  # (B, k), most likely first
        p = (best - log_total).exp()  # their probabilities over the whole vocabulary
        if top_k > 0 or top_p >= 1.0 or k == V or bool((p.sum(-1) >= top_p).all()):
            break
        k = min(V, 8 * k)  # some row's nucleus reaches past the k best: look further
    if top_p < 1.0:
        if top_k > 0:
            p = p / p.sum(-1, keepdim=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)
    return ids.gather(-1, draw(p)[:, None])[:, 0]


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
        q, k = prompt_slots[:, None], prompt_slots[None]  # no query sees past slot P - 1: attention reads P keys
        mask = ((k <= q) & ((k >= start[:, None, None]) | (k == q)))[:, None]  # (B, 1, P, P)
    position_ids = (prompt_slots[None] - start[:, None]).clamp_min(0)
    return model(ids, position_ids=position_ids, cache_pos=prompt_slots, mask=mask, last_only=True)[:, -1], start, slots


def penalize(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al., 2019) over each row's recent tokens recent (B, N), then -1
    where a row has fewer: a token seen there has its logit divided by `penalty` when positive and
    multiplied by it when negative. As in llama.cpp only the last N tokens count (transformers counts the
    whole text, which in a 10,000-word answer penalizes every common word). Small models need it: without,
    SmolLM2-135M repeats one sentence after a few hundred words."""
    real = recent >= 0  # the padding comes after a row's tokens: it repeats the first one, penalized alike
    cols = torch.where(real, recent, recent[:, :1].clamp_min(0))
    old = logits.gather(1, cols)  # only the recent tokens' logits change: a full-vocabulary pass is a copy
    new = torch.where(real[:, :1], torch.where(old > 0, old / penalty, old * penalty), old)
    return logits.scatter(1, cols, new)


def no_repeat(out: list[int], seen: dict, n: int) -> set:
    """The tokens that would complete an n-gram the answer `out` already holds (so loops of n tokens or
    more cannot start again); `seen` maps each (n-1)-gram of out to the tokens that followed it and is
    brought up to date with out's last token. A 3,500-word answer of SmolLM2-135M was one paragraph looping
    for 2,000 words, longer than any penalty window: banning repeated 10-grams stops such loops."""
    if n < 2:
        return set()
    if len(out) >= n:
        seen.setdefault(tuple(out[-n:-1]), set()).add(out[-1])
    return seen.get(tuple(out[-(n - 1):]), set()) if len(out) >= n - 1 else set()


def forbid(logits: torch.Tensor, banned: list) -> torch.Tensor:
    """logits (of any float dtype: bf16 ones on CUDA) with -inf at row b's banned tokens banned[b]."""
    rows = [b for b, toks in enumerate(banned) for _ in toks]
    if not rows:
        return logits
    cols = [t for toks in banned for t in toks]
    return logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                            torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def keep_stop_odds(raw: torch.Tensor, ruled: torch.Tensor, stops: torch.Tensor, temperature) -> torch.Tensor:
    """ruled (B, V): the logits raw after the repetition penalty and the n-gram ban, with the stop tokens (stops:
    a bool mask, (V,) or (B, V)) moved so that sampled at `temperature` (a float, or one per row) they keep the
    probability raw gave them. Why: both rules take probability from the words they hit and hand it to every
    other token, the stop token among them, which is never in the answer and so never penalized. Step after
    step that ends answers early: along held-out 2,000-4,000-word answers SmolLM2-135M's expected stops were
    2.6x its own under a penalty of 1.1 over 64 tokens. The rules choose among words; the model says when to stop."""
    t = temperature.clamp_min(1e-4)[:, None] if isinstance(temperature, torch.Tensor) else max(temperature, 1e-4)
    raw, ruled = raw.float(), ruled.float()
    words = lambda x: (x / t).masked_fill_(stops, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.where(stops, raw + t * (words(ruled) - words(raw)), ruled)  # words' mass at t: ruled / raw


def apply_rules(logits, histories, banned, penalty: float, window: int, stops, temperature) -> torch.Tensor:
    """logits after the repetition penalty over each row's history (see penalize) and the n-gram ban (banned:
    each row's banned tokens, or None when off; see forbid), the stop tokens keeping the model's odds."""
    raw = logits
    if penalty != 1.0:
        logits = penalize(logits, recent_tokens(histories, window, logits.device), penalty)
    if banned is not None:
        logits = forbid(logits, banned)
    return logits if logits is raw else keep_stop_odds(raw, logits, stops, temperature)


def recent_tokens(histories: list[list[int]], window: int, device) -> torch.Tensor:
    """(B, window) tensor of each history's last `window` tokens, -1 where it is shorter."""
    out = torch.full((len(histories), window), -1, dtype=torch.long)
    for b, h in enumerate(histories):
        if h and window:
            tail = h[-window:]
            out[b, :len(tail)] = torch.tensor(tail)
    return out.to(device)


def libc():
    """The C library when it is glibc's allocator we can tune (mallopt, malloc_trim), else None."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory():
    """Have glibc keep every freed block for reuse: none is mapped on its own (M_MMAP_MAX 0) and the heap never
    shrinks (M_TRIM_THRESHOLD at its maximum), so the process keeps its peak until release_freed_memory. Why: memory
    given back is paid again on its next touch. In a fresh process the rules and the sampler's temporaries over 16
    rows of a 49k vocabulary page-faulted in every decode step (20 ms instead of 12 a step); and on a VM that hands
    freed memory back to its host within seconds (free page reporting), the ~2 GB an SFT step freed and asked for
    again cost up to 20 s of page faults a step: 66 SFT steps of SmolLM2 took 367 s with blocks of 32 MB and more
    mapped afresh each step, 223 s with this and the LM head's loss in chunks (peak RSS 6.7 -> 5.7 GB;
    BENCHMARKS.md). Process-wide, called by CPU decoding and CPU training; without glibc nothing changes."""
    if lib := libc():
        lib.mallopt(-4, 0)  # M_MMAP_MAX: no block gets a mapping of its own; all come from the heap
        lib.mallopt(-1, -1)  # M_TRIM_THRESHOLD: -1 is SIZE_MAX as glibc's size_t: the heap's top is never trimmed


def release_freed_memory():
    """Hand the heap's free memory back to the OS (glibc's malloc_trim) once a loop that kept it (keep_freed_memory)
    has ended, so the process's next stage starts from what is in use, not from this loop's peak, and a KV cache's
    memory check (check_cache_memory) sees what is free."""
    if lib := libc():
        lib.malloc_trim(0)


def filled(n: int, block: int = 256) -> int:
    """Cache slots an eager decode step reads when n are in use: n rounded up to a whole block."""
    return -(-n // block) * block


_compiled = {}


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), temperature=0.0,
             top_k=0, top_p=1.0, seed=0, compile=False, on_tokens=None, repetition_penalty=1.0,
             repetition_window=64, no_repeat_ngram=0) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). Prompts of different lengths are left-padded.
    repetition_penalty > 1 penalizes the tokens among each row's last repetition_window (see penalize);
    no_repeat_ngram = n >= 2 never lets an answer repeat one of its own n-grams (see no_repeat); under either,
    the stop tokens keep the model's own probability (see keep_stop_odds).

    on_tokens(list of B ints) is called after every step, e.g. to stream text.
    compile (CUDA): the decode step runs as a CUDA graph (torch.compile mode="reduce-overhead").
    """
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + max_new_tokens
    for i, p in enumerate(prompts):  # left padding puts every prompt at P tokens
        check_request(model, [0] * P, max_new_tokens, S, f"prompt {i}" if B > 1 else "prompt")
    check_cache_memory(model, B, S)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(seed)
    logits, start, slots = prefill(model, prompts, S)

    step = decode_step
    if compile and device.type == "cuda":
        step = _compiled.setdefault("step", torch.compile(decode_step, mode="reduce-overhead", fullgraph=True))
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out = [[] for _ in range(B)]
    done = [False] * B
    seen = [{} for _ in range(B)]
    stop_mask = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    stop_mask[[t for t in set(stop_ids) if 0 <= t < len(stop_mask)]] = True
    for i in range(max_new_tokens):
        logits = apply_rules(logits, [p[-repetition_window:] + o[-repetition_window:] for p, o in zip(prompts, out)],
                             [no_repeat(o, s, no_repeat_ngram) for o, s in zip(out, seen)] if no_repeat_ngram else None,
                             repetition_penalty, repetition_window, stop_mask, temperature)
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
        # eager: attention reads only the filled part of the cache (rounded up to 256 slots); the compiled
        # step keeps one shape, the whole cache, so that one CUDA graph serves every step
        keys = slots if step is not decode_step else slots[:min(S, filled(P + i + 1))]
        logits = step(model, tok[:, None], slots[P + i:P + i + 1].clone(), start, keys)
    for layer in model.layers:  # free the cache
        layer.self_attn.cache = None
    if device.type == "cpu":
        release_freed_memory()
    return out


# -----------------------------------------------------------------------------
# continuous batching: `slots` rows decode side by side; a row whose answer ends takes the next prompt at
# once, so one long answer never keeps finished rows idle (as a static batch does).

def decode_rows(model, tokens, pos, slots):
    """One token per row (B, 1), row b's written at its own slot pos[b] (B,) and seeing slots 0..pos[b]
    of its row; attention reads the first len(slots) slots of the cache only. Positions are tensors, never
    Python ints, so with fixed shapes one CUDA graph serves every step."""
    mask = (slots[None] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return model(tokens, position_ids=pos[:, None], cache_pos=pos[:, None], mask=mask)[:, -1]


def prefill_row(model, caches, row: int, prompt: list[int]) -> torch.Tensor:
    """Run one prompt alone (B = 1) with each layer's cache swapped for a view of row `row`, so its keys
    and values land in that row while the other rows keep theirs. Returns its last logits (V,)."""
    device = model.embed_tokens.weight.device
    for layer, cache in zip(model.layers, caches):
        layer.self_attn.cache = cache.row(row)
    try:
        pos = torch.arange(len(prompt), device=device)
        return model(torch.tensor([prompt], device=device), position_ids=pos[None], cache_pos=pos, last_only=True)[0, -1]
    finally:
        for layer, cache in zip(model.layers, caches):
            layer.self_attn.cache = cache


def context_of(model, context: int = 0) -> int:
    """The longest prompt + answer the model takes: max_position_embeddings, or the original length x factor
    when RoPE scaling extends it further (dynamic NTK or YaRN configs keep the original length there);
    a smaller `context` the user gives (--context) wins."""
    cfg = model.config
    n, s = cfg.max_position_embeddings, cfg.rope_scaling or {}
    if s.get("factor"):
        n = max(n, int((s.get("original_max_position_embeddings") or n) * s["factor"]))
    return min(n, context) if context > 0 else n


def fit_new_tokens(model, prompt_len: int, max_new_tokens: int, context: int = 0, what="prompt") -> int:
    """max_new_tokens for a prompt of prompt_len tokens: 0 means "up to the context window"; a number that
    does not fit the window is refused, naming both numbers (never silently cut)."""
    ctx = context_of(model, context)
    room = ctx - prompt_len
    if room < 1:
        raise ValueError(f"{what}: {prompt_len} prompt tokens fill the model's context of {ctx} tokens")
    if max_new_tokens <= 0:
        return room
    if max_new_tokens > room:
        raise ValueError(f"{what}: {prompt_len} prompt tokens + max_new_tokens {max_new_tokens} = "
                         f"{prompt_len + max_new_tokens} tokens, more than the model's context of {ctx} tokens "
                         f"(max_position_embeddings or --context); ask for at most {room} new tokens")
    return max_new_tokens


def finish_reason(tokens: list[int], max_new_tokens: int) -> str:
    """Why an answer ended: "length" when it used all max_new_tokens (no stop token came, so the text is cut),
    else "stop". Exact, since decoding ends at the first stop token and leaves it out."""
    return "length" if len(tokens) >= max_new_tokens else "stop"


def check_request(model, prompt, max_new_tokens, row_len, what="prompt"):
    """Refuse, before any decoding, what cannot fit a cache row, the model's context or its window."""
    need = len(prompt) + max_new_tokens
    if not prompt or max_new_tokens < 1:
        raise ValueError(f"{what}: needs at least one prompt token and max_new_tokens >= 1")
    fit_new_tokens(model, len(prompt), max_new_tokens, what=what)
    if need > row_len:
        raise ValueError(f"{what}: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} = {need} tokens, "
                         f"longer than a cache row ({row_len})")
    window = model.config.sliding_window
    if window and need > window:
        raise ValueError(f"{what}: {need} tokens is longer than the model's sliding_window ({window}), "
                         "which this implementation does not apply")


def free_memory() -> int:
    """Bytes of memory available now (Linux's MemAvailable), or 0 where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def check_cache_memory(model, rows: int, row_len: int):
    """On a CPU, refuse a KV cache larger than the memory available now. Why: the cache is zeros, which a CPU
    hands out page by page as they are first written, so an oversized one is not refused when it is made; the
    process is killed later, once the rows fill (64 rows of 8,192 tokens of SmolLM2 in float32: 24 GB, killed
    after minutes on a 23 GB machine). CUDA allocates at once and raises its own out-of-memory error."""
    p, cfg = model.embed_tokens.weight, model.config
    need = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * row_len * cfg.head_dim * p.element_size()
    free = free_memory() if p.device.type == "cpu" else 0
    if free and need > free:
        raise ValueError(f"a KV cache of {rows} rows x {row_len} tokens needs {need / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB of memory available: decode fewer rows at once (--slots, "
                         "--batch-size or --workers, as the script names them) or shorter answers")


@torch.no_grad()
def continuous(model, next_request, slots: int, row_len: int, top_k=0, top_p=1.0, seed=0, compile=False,
               repetition_penalty=1.0, repetition_window=64, no_repeat_ngram=0):
    """The continuous-batching loop. next_request(block) returns the next request
    (key, prompt ids, max_new_tokens, stop ids, temperature), or None: with block=False when none is waiting
    now, with block=True when none will come (the loop then ends once every row is done). Yields
    (key, new tokens without the stop token) as each answer ends. Same requests, seed and slots: same
    answers. Each step: sample every row (one host sync), hand out finished answers, prefill waiting
    prompts into free rows, one decode step: of fixed shape (slots, 1) when compiled, of the rows in use when
    eager. repetition_penalty > 1 penalizes each row's last repetition_window tokens (see penalize);
    no_repeat_ngram = n >= 2 never lets an answer repeat one of its own n-grams (see no_repeat); the stop
    tokens keep the model's probability under both (see keep_stop_odds)."""
    device = model.embed_tokens.weight.device
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(seed)
    model.setup_cache(slots, row_len)
    caches = [layer.self_attn.cache for layer in model.layers]
    cache_slots = torch.arange(row_len, device=device)
    step = decode_rows
    if compile and device.type == "cuda":
        step = _compiled.setdefault("rows", torch.compile(decode_rows, mode="reduce-overhead", fullgraph=True))
    rows = [None] * slots  # per row: [key, prompt length, max_new, stop ids, tokens so far] or None when free
    temps, host_temps = torch.zeros(slots, device=device), [0.0] * slots
    vocab = model.config.vocab_size
    logits = torch.zeros(0, vocab, device=device)  # the last step's logits, of the rows it decoded
    stop_mask = torch.zeros(slots, vocab, dtype=torch.bool, device=device)  # each row's stop tokens
    exhausted = drained = False
    try:
        while True:
            fresh = {}  # row -> prefill logits of a prompt admitted this step
            for r in range(slots):
                while rows[r] is None and not exhausted:
                    req = next_request(not any(rows) and not fresh)  # block only when there is nothing to decode
                    drained = req is None  # the last look found no request waiting
                    if req is None:
                        exhausted = not any(rows) and not fresh
                        break
                    key, prompt, max_new, stops, temperature = req
                    check_request(model, prompt, max_new, row_len, f"request {key}")
                    rows[r] = [key, len(prompt), max_new, set(stops), [], prompt[-repetition_window:], {}]
                    stop_mask[r] = False
                    stop_mask[r, [t for t in rows[r][3] if 0 <= t < vocab]] = True
                    fresh[r] = prefill_row(model, caches, r, prompt)
                    temps[r] = host_temps[r] = temperature
            if not any(rows):
                return
            # eager: the rules and the sampling see the rows up to the last one in use (over 16 rows of a 49k
            # vocabulary they cost 12-20 ms a step on a 2-core CPU, a lone long answer's own step ~45 ms)
            live = slots if compile else max(r for r in range(slots) if rows[r] is not None) + 1
            if fresh or logits.shape[0] < live:
                logits = torch.cat([logits[:live], logits.new_zeros(max(0, live - logits.shape[0]), vocab)])
                for r, l in fresh.items():
                    logits[r] = l
            shown = rows[:live]  # the rows the rules and the sampler see
            used = {host_temps[r] for r in range(live) if rows[r] is not None}  # one number: no per-row passes
            temp = temps[:live] if len(used) > 1 and max(used) > 0 else max(max(used), 0.0)
            logits = apply_rules(logits[:live], [row[5] + row[4][-repetition_window:] if row else [] for row in shown],
                                 [no_repeat(row[4], row[6], no_repeat_ngram) if row else () for row in shown]
                                 if no_repeat_ngram else None, repetition_penalty, repetition_window, stop_mask[:live],
                                 temp)
            toks = sample(logits, temp, top_k, top_p)
            pos = []
            for r, t in enumerate(toks.tolist()):  # the one host sync per step
                row = rows[r]
                if row is None:
                    pos.append(0)
                    continue
                key, n_prompt, max_new, stops, out = row[:5]
                if t not in stops:
                    out.append(t)
                if t in stops or len(out) == max_new:
                    rows[r] = None
                    yield key, out
                pos.append(n_prompt + len(out) - 1 if rows[r] is not None else 0)
            if any(rows):
                if compile:  # whole rows, one shape: one CUDA graph for every step
                    logits = step(model, toks[:, None], torch.tensor(pos, device=device), cache_slots)
                    continue
                # eager: once no request is waiting, the rows in use move to the front (a row's filled cache is
                # copied into a freed row below it); only the rows up to the last one in use are decoded, reading
                # only the filled part of the cache: finished rows cost nothing, short answers do not pay for
                # the longest one
                free = [r for r in range(slots) if rows[r] is None] if drained else []
                last = max(r for r in range(slots) if rows[r] is not None)
                while free and free[0] < last:
                    dst = free.pop(0)
                    for cache in caches:
                        cache.k[dst, :, :pos[last]] = cache.k[last, :, :pos[last]]
                        cache.v[dst, :, :pos[last]] = cache.v[last, :, :pos[last]]
                    toks[dst], temps[dst], host_temps[dst] = toks[last], temps[last], host_temps[last]
                    rows[dst], rows[last], pos[dst], pos[last] = rows[last], None, pos[last], 0
                    last = max(r for r in range(slots) if rows[r] is not None)
                n = last + 1
                keys = min(row_len, filled(max(pos) + 1))
                for layer, cache in zip(model.layers, caches):
                    layer.self_attn.cache = KVCache(cache.k[:n], cache.v[:n])
                try:
                    out = step(model, toks[:n, None], torch.tensor(pos[:n], device=device), cache_slots[:keys])
                finally:
                    for layer, cache in zip(model.layers, caches):
                        layer.self_attn.cache = cache
                logits = out
    finally:
        for layer in model.layers:  # free the cache
            layer.self_attn.cache = None
        if device.type == "cpu":
            release_freed_memory()


def generate_many(model, prompts: list[list[int]], max_new_tokens, stop_ids=(), slots=8, temperature=0.0, top_k=0,
                  top_p=1.0, seed=0, compile=False, repetition_penalty=1.0, repetition_window=64, no_repeat_ngram=0):
    """Continuous batching over a list of prompts: yields (index, new tokens) in the order answers end.
    max_new_tokens and stop_ids are one value for all or one per prompt. Every prompt is checked against the
    row length and the window before decoding starts."""
    if slots < 1:  # no row to decode in: every prompt would go unanswered without a word
        raise ValueError(f"{slots} slots: at least 1 row must decode at a time")
    n = len(prompts)
    max_new = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    per_prompt_stops = len(stop_ids) > 0 and isinstance(stop_ids[0], (list, tuple, set))
    stops = list(stop_ids) if per_prompt_stops else [stop_ids] * n
    if len(max_new) != n or len(stops) != n:
        raise ValueError("max_new_tokens and stop_ids need one value, or one per prompt")
    row_len = max(len(p) + m for p, m in zip(prompts, max_new))
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        check_request(model, p, m, row_len, f"prompt {i}")
    check_cache_memory(model, min(slots, n), row_len)
    waiting = iter([(i, prompts[i], max_new[i], stops[i], temperature) for i in range(n)])
    yield from continuous(model, lambda block: next(waiting, None), min(slots, n), row_len, top_k, top_p, seed,
                          compile, repetition_penalty, repetition_window, no_repeat_ngram)


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
    checkpoint: str = ""      # Hugging Face checkpoint folder (config.json, safetensors, tokenizer files)
    prompt: str = "Write a 10000-word guide to the history of the printing press."
    system: str = ""          # system turn; empty: the chat template's default (if it has one)
    max_new_tokens: int = 0   # 0: up to the model's context; more than fits is refused
    context: int = 0          # > 0: a smaller context than the model's max_position_embeddings
    temperature: float = 0.5
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0  # > 1 penalizes the last 64 tokens (1.1 for small models)
    no_repeat_ngram: int = 0  # >= 2: the answer never repeats one of its own n-grams (10 stops small models' loops)
    seed: int = 0
    template: str = ""        # chat template name; empty: detect from the tokenizer files
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = ""           # empty: bfloat16 on CUDA, float32 on CPU
    compile: bool = torch.cuda.is_available()  # CUDA: the decode step as one CUDA graph


def main():
    from dataset import add_flags
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cfg = GenerateConfig(**vars(add_flags(ap, GenerateConfig).parse_args()))
    if not cfg.checkpoint:
        ap.error("--checkpoint DIR is required")
    try:
        check_device(cfg.device)
        dtype = compute_dtype(cfg.dtype, cfg.device)
        tokenizer = load_tokenizer(cfg.checkpoint, cfg.template or None)
        model = Transformer.from_pretrained(cfg.checkpoint, dtype, cfg.device).eval()
        prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": cfg.prompt}], cfg.system)
        max_new = fit_new_tokens(model, len(prompt), cfg.max_new_tokens, cfg.context)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if cfg.max_new_tokens <= 0:
        print(f"max_new_tokens: {max_new} (the model's context {context_of(model, cfg.context)} - "
              f"{len(prompt)} prompt tokens)", file=sys.stderr)
    streamer = Streamer(tokenizer, tokenizer.stop_ids)
    t0 = time.perf_counter()
    out = generate(model, [prompt], max_new, tokenizer.stop_ids, cfg.temperature, cfg.top_k, cfg.top_p,
                   cfg.seed, cfg.compile, on_tokens=streamer, repetition_penalty=cfg.repetition_penalty,
                   no_repeat_ngram=cfg.no_repeat_ngram)[0]
    dt = time.perf_counter() - t0
    text = tokenizer.decode(out)
    ended = "a stop token" if finish_reason(out, max_new) == "stop" else f"the max_new_tokens limit ({max_new}): cut"
    print(f"\n--- {len(out)} tokens, {count_words(text)} words, {len(out) / dt:.1f} tokens/s "
          f"({dt:.1f} s, prompt {len(prompt)} tokens); ended at {ended}", file=sys.stderr)


if __name__ == "__main__":
    main()
