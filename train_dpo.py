"""DPO on long-writing preference pairs, against a frozen reference; and the tool that builds the pairs.

Usage:
    python train_dpo.py                                            # tiny CPU run on pairs from the built-in corpus
    python train_dpo.py --model SFT_DIR --data pairs.jsonl --out runs/dpo [--live-reference] [--nll-weight 0.1]
    python train_dpo.py --build-pairs instructions.jsonl --model SFT_DIR --pairs-out pairs.jsonl [--samples 4]
        [--api-base URL --sampler-model NAME]   sample through an endpoint instead of SFT_DIR in-process
        [--judge-model NAME]                    also score quality with an LLM judge at --api-base
        [--top-p P --repetition-penalty R --no-repeat-ngram N]  in-process decoding, as the model is evaluated
        [--overwrite]                           start PAIRS_OUT afresh (samples made otherwise are refused, not reused)

Loss per pair, log-probs summed over the response tokens only (y_w chosen, y_l rejected):
    -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
averaged over the pairs of the global batch, plus nll_weight x the chosen answers' token-mean NLL.
Chosen and rejected of a pair sit side by side in one packed row and run in one forward. The
reference log-probs are computed once before training (out/reference_logps-KEY.npy), so only one model is
in memory; --live-reference keeps a frozen copy and computes them every step instead (same loss).
Training reuses train_sft's loop, sharding, checkpoints and logs.
"""
import gc
import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from agentwrite import (APIError, AuthError, ChatClient, JsonlLog, checkpoint_identity, endpoint_identity,
                        parse_instruction, settings_diff, stop_odds_record)
from dataset import (DataError, builtin_corpus, chat_prompt_ids, count_words, file_digest, load_tokenizer, read_jsonl,
                     tokenizer_files, write_builtin)
from evaluate import JUDGE_PROMPT, judge_one, length_score, quality_score
from generate import finish_reason, fit_new_tokens, generate_many
from model import Transformer, checkpoint_files, compute_dtype
from train_sft import (TrainConfig, autocast_for, build_model, log0, parse_args, prepare, remove_if_unused, row_logps,
                       run_training)


@dataclass
class DPOConfig(TrainConfig):
    out: str = "runs/dpo"
    lr: float = 1e-6            # common DPO settings, not taken from the LongWriter paper
    epochs: int = 1
    beta: float = 0.1
    nll_weight: float = 0.0     # weight of the chosen answers' NLL added to the DPO loss
    live_reference: bool = False
    # pair building (--build-pairs)
    build_pairs: str = ""       # instructions JSONL ("prompt", and "length" or a number of words in the prompt)
    pairs_out: str = "pairs.jsonl"
    overwrite: bool = False     # training: start afresh in an --out holding another run; --build-pairs: PAIRS_OUT too
    samples: int = 4            # answers sampled per instruction
    max_new_tokens: int = 0     # per sample; 0 fills the model's context (an endpoint: its own limit)
    temperature: float = 0.8
    top_p: float = 1.0          # nucleus sampling (1.0: off; an endpoint sampler is then sent none)
    repetition_penalty: float = 1.0  # --model only: > 1 penalizes each answer's last 64 tokens (1.1 for small models)
    no_repeat_ngram: int = 0    # --model only: >= 2, no answer repeats one of its own n-grams
    api_base: str = os.environ.get("OPENAI_BASE_URL", "")
    api_key_env: str = "OPENAI_API_KEY"
    sampler_model: str = ""     # sample through the endpoint with this model instead of --model in-process
    judge_model: str = ""       # score quality too, with this judge at the endpoint
    min_margin: float = 5.0     # keep a pair only when chosen outscores rejected by this much (0-100 scale)
    system: str = ""            # system turn for sampling; empty: the chat template's default (if any)
    workers: int = 4            # endpoint calls at once, or rows decoded at once with --model in-process


BUILTIN = dict(model="tiny", max_tokens=2048, epochs=3, batch_rows=4, lr=3e-4, beta=0.5, warmup=0.05,
               weight_decay=0.0, out="runs/dpo-builtin")


# -----------------------------------------------------------------------------
# loss

def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per pair: (loss, reward of chosen, reward of rejected); reward = beta * (log pi - log ref)."""
    reward_chosen, reward_rejected = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected), reward_chosen, reward_rejected


def sequence_logps(model, rows, device) -> torch.Tensor:
    """log p(response | prompt) of every document of the rows (run as one packed row): (n_docs,)."""
    logp = row_logps(model, rows, device)  # per token, 0 off target
    lengths = np.concatenate([np.diff(r["cu_seqlens"]) for r in rows])
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.from_numpy(lengths).to(device))
    return torch.zeros(len(lengths), device=device, dtype=logp.dtype).index_add(0, doc, logp)


def reference_key(cfg, tokenizer) -> str:
    """What the reference log-probs depend on: the data, the tokenizer, the starting weights (a checkpoint's
    files, or a from-scratch config and its seed) and the packing settings."""
    if os.path.isdir(cfg.model):
        weights = file_digest(os.path.join(cfg.model, "config.json"), *checkpoint_files(cfg.model))
    else:
        weights = [file_digest(cfg.model) if os.path.isfile(cfg.model) else cfg.model, cfg.seed]
    parts = [file_digest(cfg.data, *tokenizer_files(tokenizer)), tokenizer.template, weights, cfg.max_tokens,
             cfg.packing, cfg.truncate, cfg.skip_bad]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def reference_logps(cfg, model, tokenizer, packed, rank, world, device) -> np.ndarray:
    """Every document's log-prob under the initial model, computed once (rows split over ranks) and kept in
    out/reference_logps-KEY.npy, KEY naming what it depends on: a resumed run reads it back, a run on other
    data or weights computes its own."""
    n_docs = int(packed.row_docs[-1])
    path = os.path.join(cfg.out, f"reference_logps-{reference_key(cfg, tokenizer)}.npy")
    if os.path.exists(path):
        ref = np.load(path)
        if len(ref) == n_docs:
            log0(f"reference log-probs read from {path}")
            return ref
    out = torch.zeros(n_docs, dtype=torch.float64, device=device)
    model.eval()
    n_rows = len(packed)
    for r in range(rank, -(-n_rows // world) * world, world):
        # a sharded forward needs every rank: past the last row a rank repeats it and drops the result
        row = packed.row(min(r, n_rows - 1))
        with autocast_for(cfg, device, world):
            lp = sequence_logps(model, [row], device)
        if r < n_rows:
            out[row["first_doc"]:row["first_doc"] + len(lp)] = lp.double()
    model.train()
    if hasattr(model, "reshard"):  # FSDP2 leaves the root's parameters gathered after a no-grad forward
        model.reshard()
    if world > 1:
        dist.all_reduce(out)
    ref = out.cpu().numpy()
    if rank == 0:
        np.save(path + ".tmp.npy", ref)
        os.replace(path + ".tmp.npy", path)
    log0(f"reference log-probs of {n_docs} answers cached in {path}")
    return ref


def dpo_step(cfg, model, rows, rank, world, device, ref_logps=None, ref_model=None):
    """Forward and backward of this rank's share of a global batch of pairs; returns (loss, metrics)."""
    n_pairs = sum((len(r["cu_seqlens"]) - 1) // 2 for r in rows)
    n_chosen_tokens = max(1, sum(int(r["doc_targets"][0::2].sum()) for r in rows))
    mine = rows[rank::world]
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, reward c, reward r, correct, nll
    for m in range(0, len(mine), cfg.micro_rows):
        micro = mine[m:m + cfg.micro_rows]
        with autocast_for(cfg, device, world):
            logp = sequence_logps(model, micro, device).float()
            if ref_model is not None:
                with torch.no_grad():
                    ref = sequence_logps(ref_model, micro, device).float()
            else:
                ref = torch.from_numpy(np.concatenate([ref_logps[r["first_doc"]:r["first_doc"] + len(r["cu_seqlens"]) - 1]
                                                       for r in micro])).to(device, torch.float32)
        losses, rc, rr = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], cfg.beta)
        nll = -logp[0::2].sum() / n_chosen_tokens
        loss = losses.sum() / n_pairs + cfg.nll_weight * nll
        (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already global
        totals += torch.stack([t.detach().double() for t in (loss, rc.sum(), rr.sum(), (rc > rr).sum(), nll)])
    if world > 1:
        dist.all_reduce(totals)
    loss, rc, rr, correct, nll = totals.tolist()
    return loss, {"reward_chosen": rc / n_pairs, "reward_rejected": rr / n_pairs, "margin": (rc - rr) / n_pairs,
                  "accuracy": correct / n_pairs, "nll_chosen": nll}


# -----------------------------------------------------------------------------
# pairs: the default's synthetic ones, and the tool that samples and scores real ones

def builtin_dpo_data(out_dir, seed, dry=False, count=300):
    """Pairs from the built-in corpus: chosen is the answer of the asked length, rejected the same answer
    cut after half its sections (the too-short answer LongWriter sets out to fix)."""
    data = os.path.join(out_dir, "pairs.jsonl")
    if dry:
        return data, out_dir
    write_builtin(out_dir, count=count, min_words=200, max_words=600, seed=seed)
    with open(data + ".tmp", "w") as f:
        for r in builtin_corpus(count, 200, 600, seed):
            prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            sections = answer.split("\n\n")
            short = "\n\n".join(sections[:max(1, len(sections) // 2)])
            f.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": short}) + "\n")
    os.replace(data + ".tmp", data)
    return data, out_dir


def parse_pair_instruction(obj) -> dict:
    """An instruction with its required length: the "length" field, or a word count in the prompt."""
    obj = parse_instruction(obj)
    if isinstance(obj.get("length"), (int, float)) and obj["length"] > 0:
        return {**obj, "length": int(obj["length"])}
    m = re.search(r"(\d[\d,]*)\s*(?:-?\s*words?\b|字)", obj["prompt"], re.I)
    if not m:
        raise DataError('no "length" field and no word count in the prompt')
    return {**obj, "length": int(m.group(1).replace(",", ""))}


def pick_pair(required: int, answers: list[str], quality: list[float] | None = None, cut: list[bool] | None = None,
              min_margin: float = 0.0):
    """(chosen, rejected, scores): the best answer by S_l (or (S_l + S_q) / 2 with quality) among those that
    ended by themselves (an answer cut at the token limit is never chosen: DPO would teach its cut-off text
    followed by the end-of-turn token), and the worst of the others. None when fewer than two answers, when
    every answer was cut, or when the best beats the worst by less than min_margin (no clear preference)."""
    if len(answers) < 2:
        return None
    cut = cut or [False] * len(answers)
    scores = [length_score(required, count_words(a)) for a in answers]
    if quality is not None:
        scores = [(s + q) / 2 for s, q in zip(scores, quality)]
    whole = [k for k in range(len(answers)) if not cut[k]]
    if not whole:
        return None
    best = max(whole, key=lambda k: scores[k])
    worst = min((k for k in range(len(answers)) if k != best), key=lambda k: scores[k])
    if scores[best] - scores[worst] < max(min_margin, 1e-9):
        return None
    return answers[best], answers[worst], (scores[best], scores[worst])


def sample_local(cfg: DPOConfig, todo: list[tuple], cache: JsonlLog, have: dict, generation: dict, log=print):
    """Sample (index, k, prompt) requests with cfg.model in-process by continuous batching over cfg.workers rows:
    the K samples of an instruction are K rows. Requests go in a fixed order and the sampling is seeded, so
    the same instructions give the same samples run after run; each is cached as it ends, with its
    finish_reason. max_new_tokens 0 fills the model's context."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(cfg.tokenizer or cfg.model, cfg.template or None)
    model = Transformer.from_pretrained(cfg.model, compute_dtype("", device), device).eval()
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": prompt}], cfg.system) for _, _, prompt in todo]
    limits = [fit_new_tokens(model, len(p), cfg.max_new_tokens, what=f"instruction {i}")
              for p, (i, _, _) in zip(prompts, todo)]
    for n, (j, ids) in enumerate(generate_many(model, prompts, limits, tok.stop_ids, cfg.workers,
                                               cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, compile=device == "cuda",
                                               repetition_penalty=cfg.repetition_penalty,
                                               no_repeat_ngram=cfg.no_repeat_ngram), 1):
        index, k, prompt = todo[j]
        have.setdefault(index, {})[k] = (tok.decode(ids), finish_reason(ids, limits[j]))
        cache.append({"index": index, "kind": "sample", "k": k, "prompt": prompt, "text": have[index][k][0],
                      "finish_reason": have[index][k][1], "generation": generation})
        log(f"pairs: {n}/{len(todo)} samples")


def sampling_settings(cfg: DPOConfig, local: bool) -> dict:
    """What decides a sample's text. Cached samples are reused only under the same ones: pairs from another
    checkpoint's answers (a rerun after a new SFT) would otherwise train DPO on them unseen."""
    if not local:
        if (cfg.repetition_penalty, cfg.no_repeat_ngram) != (1.0, 0):
            raise ValueError("--repetition-penalty and --no-repeat-ngram apply to in-process sampling with --model; "
                             "an endpoint decodes with its own settings")
        who = endpoint_identity(cfg.api_base, cfg.sampler_model) if cfg.sampler_model else {"sampler": "given by the caller"}
        return {**who, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "system": cfg.system,
                **({"top_p": cfg.top_p} if cfg.top_p < 1 else {})}  # only when sent: older caches stay valid
    forced = cfg.template and load_tokenizer(cfg.tokenizer or cfg.model, cfg.template).forced  # other prompts
    return {**checkpoint_identity(cfg.model), **({"template": cfg.template} if forced else {}),
            "temperature": cfg.temperature, "top_p": cfg.top_p,
            "repetition_penalty": cfg.repetition_penalty, "no_repeat_ngram": cfg.no_repeat_ngram,
            "max_new_tokens": cfg.max_new_tokens, "system": cfg.system, "seed": cfg.seed,
            **stop_odds_record(cfg.repetition_penalty, cfg.no_repeat_ngram)}


def check_cache(path: str, records: list[dict], want: dict, judge: str, prompts: list[str]):
    """Refuse a cache written under other settings or for other instructions, naming the first difference."""
    for line, r in enumerate(records, 1):
        i = r.get("index")
        if r.get("kind") == "sample" and not (isinstance(i, int) and 0 <= i < len(prompts) and r.get("prompt") == prompts[i]):
            raise ValueError(f"{path}: line {line} answers another instruction than instruction {i} now (the "
                             "instructions file changed); write to another --pairs-out, or --overwrite to start it afresh")
        verdict = r.get("kind") == "verdict"
        have, need = ({"judge": r.get("judge")}, {"judge": judge}) if verdict else (r.get("generation") or {}, want)
        if have != need:
            raise ValueError(f"{path}: line {line} was made by other settings ({settings_diff(have, need)}); "
                             "rerun with the same ones, write to another --pairs-out, or --overwrite to start it afresh")


def build_pairs(cfg: DPOConfig, sampler=None, judge=None, log=print) -> dict:
    """Sample cfg.samples answers per instruction, score them, write DPO JSONL (in instruction order). Every
    sample and verdict is appended to PAIRS_OUT.samples.jsonl as it arrives, so a rerun redoes only what is
    missing. Sampling runs in-process with --model (continuous batching) unless a sampler (an endpoint,
    --sampler-model) is given; then --workers calls run at once."""
    if cfg.samples < 2:  # sampled all the same, then "no clear preference" for every instruction
        raise ValueError(f"--samples {cfg.samples}: a pair needs at least 2 answers to an instruction")
    if cfg.temperature <= 0:  # greedy: K copies of one answer, every instruction "without a clear preference"
        raise ValueError(f"--temperature {cfg.temperature:g}: the samples of an instruction would all be the same answer; "
                         "a pair needs them to differ (0.8 by default)")
    records, _ = read_jsonl(cfg.build_pairs, parse_pair_instruction)
    if os.path.realpath(cfg.pairs_out) == os.path.realpath(cfg.build_pairs):
        raise ValueError(f"--pairs-out {cfg.pairs_out}: the --build-pairs file, which writing there would destroy: "
                         "write to another file")
    key = os.environ.get(cfg.api_key_env, "")
    if sampler is None and cfg.sampler_model:
        sampler = ChatClient(cfg.api_base, cfg.sampler_model, key, top_p=cfg.top_p)
    if judge is None and cfg.judge_model:
        judge = ChatClient(cfg.api_base, cfg.judge_model, key)
    local = sampler is None
    generation = sampling_settings(cfg, local)
    out, cache = JsonlLog(cfg.pairs_out), JsonlLog(cfg.pairs_out + ".samples.jsonl")
    if cfg.overwrite:
        for path in (out.path, cache.path):
            if os.path.exists(path):
                os.remove(path)
    cached = cache.read()
    check_cache(cache.path, cached, generation, cfg.judge_model, [r["prompt"] for r in records])
    finished = {r["index"] for r in out.read()} | {r["index"] for r in cached if r.get("kind") == "no_pair"}
    samples, verdicts = {}, {}
    for r in cached:
        if r.get("kind") == "sample":
            samples.setdefault(r["index"], {})[r["k"]] = (r["text"], r.get("finish_reason", "stop"))
        elif r.get("kind") == "verdict":
            verdicts.setdefault(r["index"], {})[r["k"]] = r["scores"]
    items = [(i, r["prompt"], r["length"]) for i, r in enumerate(records) if i not in finished]
    todo = [(i, k, prompt) for i, prompt, _ in items for k in range(cfg.samples) if k not in samples.get(i, {})]
    failed = {}  # index -> error

    def turns(prompt):  # --system is recorded with the samples, so it is sent, and trained on with the pair
        return ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": prompt}]

    def call(index, k, prompt, what):
        try:
            if what == "sample":
                text, finish = sampler.complete(turns(prompt), cfg.max_new_tokens, cfg.temperature)
                samples.setdefault(index, {})[k] = (text, finish)
                cache.append({"index": index, "kind": "sample", "k": k, "prompt": prompt, "text": text,
                              "finish_reason": finish, "generation": generation})
            else:
                scores = judge_one(judge, prompt, samples[index][k][0], JUDGE_PROMPT)
                verdicts.setdefault(index, {})[k] = scores
                cache.append({"index": index, "kind": "verdict", "k": k, "scores": scores, "judge": cfg.judge_model})
        except AuthError:
            raise
        except APIError as e:
            failed[index] = str(e)

    if todo and local:
        sample_local(cfg, todo, cache, samples, generation, log)
    elif todo:
        with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
            for f in [pool.submit(call, i, k, prompt, "sample") for i, k, prompt in todo]:
                f.result()
    if judge is not None:
        unjudged = [(i, k, prompt) for i, prompt, _ in items if i not in failed for k in range(cfg.samples)
                    if k not in verdicts.get(i, {})]
        with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
            for f in [pool.submit(call, i, k, prompt, "verdict") for i, k, prompt in unjudged]:
                f.result()
    counts = {"pairs": 0, "no_pair": 0, "failed": 0, "earlier": len(finished)}  # earlier: done by a previous run
    for index, prompt, required in items:
        if index in failed:
            log(f"{cfg.build_pairs}: instruction {index}: {failed[index]}")
            counts["failed"] += 1
            continue
        kept = [k for k in range(cfg.samples) if samples[index][k][0].strip()]  # an empty sample is no answer
        answers = [samples[index][k][0] for k in kept]
        cut = [samples[index][k][1] == "length" for k in kept]
        quality = [quality_score([verdicts[index][k]]) for k in kept] if judge is not None else None
        pair = pick_pair(required, answers, quality, cut, cfg.min_margin)
        if pair is None:
            cache.append({"index": index, "kind": "no_pair", "generation": generation})
        else:
            chosen, rejected, (sc, sr) = pair
            out.append({"index": index, "prompt": turns(prompt) if cfg.system else prompt, "length": required, "chosen": chosen, "rejected": rejected,
                        "chosen_score": sc, "rejected_score": sr})
        counts["pairs" if pair else "no_pair"] += 1
    log(f"pairs: {counts['pairs']} written, {counts['no_pair']} without a clear preference (every answer cut at the "
        f"token limit, or a margin under {cfg.min_margin}), {counts['failed']} failed")
    return counts


# -----------------------------------------------------------------------------

def train(cfg: DPOConfig) -> list[dict]:
    """Run DPO; returns the per-step log records (also written to out/log.jsonl)."""
    rank, world, device, tokenizer, packed, model = prepare(cfg, "dpo", builtin_dpo_data)
    ref_logps = ref_model = None
    if cfg.live_reference:
        ref_model = build_model(model.config, cfg.model if os.path.isdir(cfg.model) else None, cfg.seed, world, device,
                                compute_dtype(cfg.dtype, device))
        ref_model.eval().requires_grad_(False)
    else:
        ref_logps = reference_logps(cfg, model, tokenizer, packed, rank, world, device)
    step = lambda *args: dpo_step(*args, ref_logps=ref_logps, ref_model=ref_model)
    log0(f"DPO, beta {cfg.beta}, nll weight {cfg.nll_weight}, {'live' if ref_model else 'cached'} reference")
    return run_training(cfg, model, tokenizer, packed, step, rank, world, device)


def main():
    cfg = parse_args(config_class=DPOConfig, builtin=BUILTIN)
    existed = os.path.exists(cfg.out)
    try:
        if cfg.build_pairs:
            counts = build_pairs(cfg)
            print(f"{counts['pairs']} pairs -> {cfg.pairs_out} ({counts['no_pair']} instructions without a "
                  f"preference, {counts['failed']} failed" + (f"; {counts['earlier']} instructions done by an earlier "
                  "run, kept as they are" if counts["earlier"] else "") + ")")
            # a pipeline (build, then train) stops here, not at "data file not found" or on fewer pairs than asked for
            if counts["failed"]:
                sys.exit(f"error: {counts['failed']} instructions failed (the errors are above); the same command "
                         "again retries only them")
            if not os.path.isfile(cfg.pairs_out) or os.path.getsize(cfg.pairs_out) == 0:
                sys.exit(f"error: no pair was written to {cfg.pairs_out}: nothing to train DPO on (more --samples, "
                         "a lower --min-margin, or a larger --max-new-tokens if the answers were cut)")
        else:
            train(cfg)
    except (FileNotFoundError, ValueError, FloatingPointError, APIError) as e:
        if not cfg.build_pairs:
            remove_if_unused(cfg.out, existed)
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            gc.collect()  # as train_sft.main: process-group references freed before the group, not at exit
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
