"""Supervised fine-tuning on packed long-writing conversations, with LongWriter's length-normalized loss.

Usage:
    python train_sft.py                                           # tiny run on the built-in corpus (CPU, minutes)
    python train_sft.py --model Llama-3.1-8B --data longwriter-6k.jsonl --out runs/sft
    torchrun --nproc_per_node 8 train_sft.py --model ... --data ...   # FSDP2 over 8 GPUs (or nodes)
    python train_sft.py ... --resume                              # continue from the last checkpoint in --out

Loss (--loss-reduction), both over the *global* batch (all rows, accumulation steps and ranks):
  token     sum of -log p over every target token / number of target tokens. The LongWriter paper's
            choice: a 10,000-word answer weighs 100x a 100-word one, as its tokens do.
  sequence  mean over conversations of each conversation's mean -log p (LongAlign's weighting):
            every conversation weighs the same, whatever its length.
Either way the loss does not depend on how conversations happened to be packed into rows.
"""
import argparse
import gc
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from dataset import add_flags, file_digest, load_packed, load_tokenizer, read_json, save_tokenizer, write_builtin
from generate import context_of, keep_freed_memory, release_freed_memory
from model import ModelConfig, Transformer, check_device, compute_dtype, read_config, save_hf, write_json


@dataclass
class TrainConfig:
    model: str = ""             # HF checkpoint folder, a config.json to start from scratch, or a preset ("tiny")
    data: str = ""              # SFT JSONL; empty: the built-in corpus
    tokenizer: str = ""         # folder with the tokenizer; default: --model's folder
    template: str = ""          # chat template; empty: detect from the tokenizer files
    out: str = "runs/sft"
    # data (LongWriter: 32k-token packs, over-long conversations skipped)
    max_tokens: int = 32768
    packing: str = "pack"       # pack | sorted
    truncate: bool = False
    skip_bad: bool = False
    # optimization (LongWriter SFT recipe where known: lr 1e-5, 3% warmup + cosine, wd 0.1,
    # betas (0.9, 0.95), 4 epochs, bf16, global batch of 8 packs)
    loss_reduction: str = "token"  # token | sequence
    epochs: int = 4
    max_steps: int = 0          # > 0: the run's length in optimizer steps (the schedule spans them)
    stop_at: int = 0            # > 0: stop (and save) after this step, schedule unchanged; --resume goes on
    batch_rows: int = 8         # global batch, in packed rows
    micro_rows: int = 1         # rows per forward on one rank; accumulation = batch_rows / (micro_rows * ranks)
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup: float = 0.03        # fraction of the steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = ""             # autocast dtype (weights, optimizer stay float32); empty: bfloat16 on CUDA, float32 on CPU
                                # on CUDA, float32 on CPU; bfloat16 on a CPU with AVX512-BF16 ran 2.1x faster steps
    checkpointing: bool = False  # activation checkpointing: recompute each block in backward
    freeze_layers: int = 0      # > 0: embeddings and the first N blocks stay fixed (0: full fine-tuning, the paper's)
    compile: bool = False       # torch.compile the MLPs (attention's per-document loop stays eager)
    # checkpoints and logs
    save_every: int = 0         # steps; 0: only at the end
    log_every: int = 1          # print every N steps (out/log.jsonl gets every step)
    keep: int = 2               # checkpoints kept (0: all)
    export_dtype: str = "float32"  # dtype of the Hugging Face export in each checkpoint (bfloat16 halves it)
    resume: bool = False        # continue from out/latest (an error when there is none)
    overwrite: bool = False     # start afresh in an --out that holds another run's checkpoints, deleting them
    seed: int = 0
    device: str = ""            # default: cuda if available


# the built-in default: a tiny model from scratch on the built-in corpus, a few minutes on 2 CPU cores
BUILTIN = dict(model="tiny", max_tokens=2048, epochs=2, batch_rows=4, lr=3e-3, warmup=0.05, weight_decay=0.0,
               out="runs/sft-builtin")
PRESETS = {"tiny": dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)}


# -----------------------------------------------------------------------------
# distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them, one process

def setup_distributed(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        check_device(device_arg)
    use_cuda = device_arg.startswith("cuda") if device_arg else torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def log0(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# model: rank 0 reads (or initializes) the full weights, every rank gets its shard

def model_config(name: str, vocab_size: int) -> tuple[ModelConfig, str | None]:
    """(config, checkpoint folder to load or None to start from scratch)."""
    if name in PRESETS:
        return ModelConfig(vocab_size=vocab_size, tie_word_embeddings=True, **PRESETS[name]), None
    if name.endswith(".json"):
        with open(name) as f:
            return ModelConfig.from_hf(json.load(f)), None
    return ModelConfig.from_hf(read_config(name)), name


def build_model(cfg: ModelConfig, weights: str | None, seed: int, world: int, device, compute_dtype,
                checkpointing=False, compile=False, load=True):
    """float32 master weights; with several ranks, FSDP2 shards each block (bf16 compute, fp32 reduce).
    load=False leaves the weights unset, for a resume that reads every rank's shards from the checkpoint."""
    full = None
    if int(os.environ.get("RANK", "0")) == 0 and load:
        if weights:
            full = Transformer.from_pretrained(weights, torch.float32, "cpu").state_dict()
        else:
            torch.manual_seed(seed)
            full = Transformer(cfg).state_dict()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.checkpointing = checkpointing
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.to_empty(device=device)
        if load:
            set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True,
                                                                             broadcast_from_rank0=True))
    else:
        model.to_empty(device=device)
        model.tie_weights()
        if load:
            model.load_state_dict(full)
    if compile:
        for block in model.layers:
            block.mlp.compile()
    return model


# -----------------------------------------------------------------------------
# loss

def token_weights(rows: list[dict], reduction: str, n_tokens: int, n_convs: int) -> np.ndarray:
    """Per-token weight w so that sum(w * -log p) over the global batch is the chosen loss.

    token:    w = 1 / (target tokens in the global batch)
    sequence: w = 1 / (target tokens of the token's conversation * conversations in the global batch)
    """
    out = []
    for row in rows:
        is_target = row["targets"] != -100
        if reduction == "token":
            out.append(is_target / n_tokens)
        else:
            per_doc = np.where(row["doc_targets"] > 0, 1.0 / np.maximum(row["doc_targets"], 1) / n_convs, 0.0)
            out.append(is_target * np.repeat(per_doc, np.diff(row["cu_seqlens"])))
    return np.concatenate(out)


def row_logps(model, rows: list[dict], device) -> torch.Tensor:
    """log p(target) of every token of the rows, run as one packed row (B = 1); 0 off target."""
    ids = torch.from_numpy(np.concatenate([r["ids"] for r in rows])).to(device)
    targets = torch.from_numpy(np.concatenate([r["targets"] for r in rows])).to(device)
    pos = torch.from_numpy(np.concatenate([r["position_ids"] for r in rows])).to(device)
    lengths = np.concatenate([np.diff(r["cu_seqlens"]) for r in rows])
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(device)
    return model(ids[None], position_ids=pos[None], cu_seqlens=cu, targets=targets[None])[0]


def micro_batch_loss(model, rows: list[dict], reduction: str, n_tokens: int, n_convs: int, device):
    """This micro-batch's share of the global loss."""
    w = torch.from_numpy(token_weights(rows, reduction, n_tokens, n_convs)).to(device, torch.float32)
    return -(row_logps(model, rows, device) * w).sum()


def global_counts(rows: list[dict]) -> tuple[int, int]:
    """Target tokens and conversations (with at least one target) of a global batch."""
    return sum(r["n_targets"] for r in rows), sum(int((r["doc_targets"] > 0).sum()) for r in rows)


# -----------------------------------------------------------------------------
# schedule, data order, checkpoints

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then cosine from lr down to min_lr."""
    warm = max(1, math.ceil(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_rows(n_rows: int, step: int, batch: int, seed: int) -> list[int]:
    """Row indices of global batch `step`: a fresh seeded shuffle each epoch, incomplete batches dropped.
    A function of the step alone, so a resumed run sees exactly the batches it would have seen."""
    per_epoch = n_rows // batch
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n_rows)
    return order[b * batch:(b + 1) * batch].tolist()


def all_finite(model) -> bool:
    """True when every weight on every rank is finite: a NaN checkpoint is never written."""
    ok = torch.tensor([all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                           for p in model.parameters())], dtype=torch.int32)
    if dist.is_initialized():
        ok = ok.to(next(model.parameters()).device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def step_dirs(out: str) -> list[str]:
    """The finished checkpoints in out, oldest first."""
    if not os.path.isdir(out):
        return []
    done = [d for d in os.listdir(out) if re.fullmatch(r"step_\d+", d) and os.path.isdir(os.path.join(out, d))]
    return sorted(done, key=lambda d: int(d.split("_")[1]))


def save_checkpoint(model, optimizer, step: int, cfg: TrainConfig, tokenizer):
    """out/step_N/ holds two things:
      - a Hugging Face folder (config.json, safetensors in --export-dtype, tokenizer files) that
        transformers and vLLM load; rank 0 gathers the weights for it, not the optimizer;
      - trainer/: weights and optimizer in float32, each rank writing its own shards
        (torch.distributed.checkpoint), and trainer_state.json (step, config) to resume from.
    Written as step_N.tmp and renamed; then out/latest names it, and older checkpoints beyond --keep
    are removed (only earlier steps: everything in out belongs to this run, see prepare())."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    if not all_finite(model):
        raise FloatingPointError(f"step {step}: non-finite weights; not saved")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    final = os.path.join(cfg.out, f"step_{step}")
    tmp = final + ".tmp"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shards
    with warnings.catch_warnings():  # one process writes the only shard: what DCP's warning is about
        warnings.filterwarnings("ignore", "torch.distributed is .*single process")
        dcp.save({"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state()},
                 checkpoint_id=os.path.join(tmp, "trainer"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank0:
        dtype = compute_dtype(cfg.export_dtype, "cpu", "--export-dtype")
        save_hf({k: v.to(dtype) for k, v in full.items()}, model.config, tmp)
        save_tokenizer(tokenizer, tmp)
        write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "config": asdict(cfg),
                                                             "data_sha": file_digest(cfg.data)[:16]})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        with open(os.path.join(cfg.out, "latest.tmp"), "w") as f:
            f.write(f"step_{step}\n")
        os.replace(os.path.join(cfg.out, "latest.tmp"), os.path.join(cfg.out, "latest"))
        older = [d for d in step_dirs(cfg.out) if int(d.split("_")[1]) < step]
        for old in older[:len(older) - (cfg.keep - 1)] if cfg.keep else []:
            shutil.rmtree(os.path.join(cfg.out, old))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(model, optimizer, path: str) -> int:
    """Restore weights, optimizer and RNG from out/step_N/trainer, each rank reading its own shards;
    returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is .*single process")
        dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])
    return read_json(os.path.join(path, "trainer_state.json"))["step"]


# settings that define what a run computes: a resumed run must have the same ones
RUN_DEFINING = ("model", "data", "tokenizer", "template", "max_tokens", "packing", "truncate", "skip_bad",
                "freeze_layers", "loss_reduction", "epochs", "max_steps", "batch_rows", "lr", "min_lr", "warmup",
                "weight_decay", "beta1", "beta2", "grad_clip", "seed", "beta", "nll_weight", "live_reference")


def check_out_dir(cfg, rank: int):
    """Before anything is built: --resume needs a checkpoint with the same run-defining settings; a fresh
    run refuses an --out with another run's checkpoints unless --overwrite, which deletes them."""
    latest = os.path.join(cfg.out, "latest")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if cfg.resume:
        if not os.path.isfile(latest):
            raise ValueError(f"--resume: {cfg.out} has no checkpoint to resume from (no {latest})")
        path = os.path.join(cfg.out, open(latest).read().strip())
        state = read_json(os.path.join(path, "trainer_state.json"))
        saved = state.get("config", {})
        changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in RUN_DEFINING
                   if k in saved and hasattr(cfg, k) and saved[k] != getattr(cfg, k)]
        if state.get("data_sha") not in (None, file_digest(cfg.data)[:16]):  # e.g. AgentWrite added answers
            changed.append(f"the contents of {cfg.data} (not those it was trained on)")
        if changed:
            raise ValueError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}). They define "
                             "the schedule, the batches or the data, so the result would be neither run; put them "
                             "back (--stop-at stops early without changing the schedule) or start afresh with --overwrite")
        return
    if step_dirs(cfg.out) or os.path.isfile(latest):
        if not cfg.overwrite:
            raise ValueError(f"{cfg.out} already holds checkpoints ({', '.join(step_dirs(cfg.out)) or 'latest'}): "
                             "--resume to continue that run, --overwrite to delete them and start afresh, or another --out")
        for name in ("model", "tokenizer", "data"):  # --overwrite deleted the checkpoint it was to start from
            path = getattr(cfg, name)
            where = os.path.realpath(path or "") + os.sep
            hit = [d for d in step_dirs(cfg.out)
                   if path and where.startswith(os.path.realpath(os.path.join(cfg.out, d)) + os.sep)]
            if hit:
                raise ValueError(f"--{name} {path} lies in {os.path.join(cfg.out, hit[0])}, which --overwrite would "
                                 "delete: train into another --out")
        if dist.is_initialized():
            dist.barrier()  # every rank has looked at --out before rank 0 clears it
        if rank == 0:
            for d in step_dirs(cfg.out):
                shutil.rmtree(os.path.join(cfg.out, d))
            for f in ("latest", "log.jsonl"):
                if os.path.exists(os.path.join(cfg.out, f)):
                    os.remove(os.path.join(cfg.out, f))


def flops_per_token(cfg: ModelConfig, mean_doc_len: float) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention (6 x layers x hidden x doc length)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    attn = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim + cfg.num_attention_heads * cfg.head_dim * d
    params = L * (attn + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size
    return 6 * params + 6 * L * cfg.num_attention_heads * cfg.head_dim * mean_doc_len


# -----------------------------------------------------------------------------

def prepare(cfg, kind="sft", write_default_data=None):
    """What SFT and DPO both start from: processes, packed data (rank 0 tokenizes and caches it first,
    the others read the cache), tokenizer and the model. With no --data, write_default_data(dir, seed)
    writes the built-in data and returns (data file, tokenizer folder)."""
    rank, world, device = setup_distributed(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # a step's temporaries are freed and asked for again: see its docstring
    compute_dtype(cfg.dtype, device)  # bad names fail here, not at the first save after the steps
    compute_dtype(cfg.export_dtype, device, "--export-dtype")
    per_step = cfg.micro_rows * world
    if cfg.batch_rows % per_step:
        raise ValueError(f"--batch-rows {cfg.batch_rows} is not a multiple of --micro-rows x ranks = {per_step}")
    os.makedirs(cfg.out, exist_ok=True)
    if not cfg.data:
        data_dir = os.path.join(cfg.out, "data")
        if rank == 0:
            write_default_data(data_dir, cfg.seed)
        if dist.is_initialized():
            dist.barrier()
        cfg.data, tok_dir = write_default_data(data_dir, cfg.seed, dry=True)
        cfg.tokenizer = cfg.tokenizer or tok_dir
    if not cfg.model:
        raise ValueError("--model is required with --data (a checkpoint folder, a config.json or 'tiny')")
    check_out_dir(cfg, rank)
    if dist.is_initialized():
        dist.barrier()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.template or None)
    packed = None
    for r in range(world):
        if r == rank:
            packed = load_packed(cfg.data, tokenizer, cfg.max_tokens, cfg.packing, cfg.truncate, cfg.skip_bad,
                                 kind=kind, log=log0)
        if dist.is_initialized():
            dist.barrier()
    if not packed:
        raise ValueError(f"{cfg.data}: nothing to train on (no conversation fits --max-tokens {cfg.max_tokens})")
    if len(packed) < cfg.batch_rows:
        raise ValueError(f"{cfg.data}: {len(packed)} packed rows, fewer than one batch of {cfg.batch_rows} "
                         f"(--batch-rows {len(packed)} or fewer, or more data)")
    mcfg, weights = model_config(cfg.model, tokenizer.vocab_size)
    if int(packed.ids.max()) >= mcfg.vocab_size:  # an IndexError deep in the embedding otherwise
        raise ValueError(f"token id {int(packed.ids.max())} of the data is past the model's vocabulary of "
                         f"{mcfg.vocab_size}: the tokenizer ({tokenizer.path}) is not {cfg.model}'s (--tokenizer)")
    model = build_model(mcfg, weights, cfg.seed, world, device, compute_dtype(cfg.dtype, device), cfg.checkpointing,
                        cfg.compile, load=not cfg.resume)
    longest, ctx = int(np.diff(packed.doc_offsets).max()), context_of(model)
    if longest > ctx:  # positions past the context were trained on without a word
        raise ValueError(f"{cfg.data}: a conversation of {longest} tokens is longer than the model's context of {ctx} "
                         f"(max_position_embeddings, or its rope_scaling); --max-tokens {ctx} leaves such ones out")
    freeze(model, cfg.freeze_layers)
    return rank, world, device, tokenizer, packed, model


def freeze(model, n_layers: int):
    """Fix the embeddings (a tied LM head with them) and the first n_layers blocks: backward stops above them
    and AdamW keeps no state for them. Training the top 10 of SmolLM2-135M's 30 blocks ran a step 1.7x faster
    on a 2-core CPU than training all of them."""
    if not 0 <= n_layers <= len(model.layers):
        raise ValueError(f"--freeze-layers {n_layers}: the model has {len(model.layers)} blocks")
    if n_layers:
        model.embed_tokens.requires_grad_(False)
        for block in model.layers[:n_layers]:
            block.requires_grad_(False)


def autocast_for(cfg, device, world):
    """Autocast to the compute dtype on one device; FSDP2's mixed precision casts by itself on several."""
    dtype = compute_dtype(cfg.dtype, device)
    return torch.autocast(device.type, dtype=dtype, enabled=world == 1 and dtype != torch.float32)


def sft_loss(cfg, model, rows, rank, world, device):
    """Forward and backward of this rank's share of a global batch; returns (global loss, no metrics)."""
    n_tokens, n_convs = global_counts(rows)
    mine = rows[rank::world]
    loss_sum = torch.zeros((), device=device)
    for m in range(0, len(mine), cfg.micro_rows):
        with autocast_for(cfg, device, world):
            loss = micro_batch_loss(model, mine[m:m + cfg.micro_rows], cfg.loss_reduction, n_tokens, n_convs, device)
        (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already global
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item(), {}


def run_training(cfg, model, tokenizer, packed, step_loss, rank, world, device) -> list[dict]:
    """The optimizer loop SFT and DPO share: AdamW, warmup + cosine, clipping, resume, NaN guard,
    checkpoints, one log line per step. step_loss(cfg, model, rows, rank, world, device) runs forward
    and backward of one global batch and returns (loss, extra metrics)."""
    steps_per_epoch = len(packed) // cfg.batch_rows
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    on_cuda = device.type == "cuda"
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=on_cuda)
    start, last_good = 0, None
    if cfg.resume:  # prepare() checked that there is a checkpoint with this run's settings
        last_good = os.path.join(cfg.out, open(os.path.join(cfg.out, "latest")).read().strip())
        start = load_checkpoint(model, optimizer, last_good)
        log0(f"resumed from {last_good} at step {start}")
    end = min(total, cfg.stop_at) if cfg.stop_at else total
    log_path = os.path.join(cfg.out, "log.jsonl")
    if rank == 0 and os.path.exists(log_path):  # keep the lines of the steps that the checkpoint holds
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)
    mcfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in trained)
    frozen = f" ({n_trained / 1e6:.2f}M trained)" if n_trained < n_params else ""
    log0(f"{mcfg.model_type} model, {n_params / 1e6:.2f}M parameters{frozen} on {world} x {device.type}; {len(packed)} rows, "
         f"{steps_per_epoch} steps/epoch, {total} steps")
    peak_flops = 989e12 * world  # H100 SXM dense bf16
    records, t_start = [], time.perf_counter()
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = [packed.row(i) for i in batch_rows(len(packed), step, cfg.batch_rows, cfg.seed)]
        loss_value, metrics = step_loss(cfg, model, rows, rank, world, device)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {step + 1}: loss is {loss_value}; stopping. Last good checkpoint: "
                                     f"{last_good or 'none yet'} (untouched)")
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):  # one inf gradient would make every weight NaN
            raise FloatingPointError(f"step {step + 1}: gradient norm is {grad_norm}; stopping before the update. "
                                     f"Last good checkpoint: {last_good or 'none yet'} (untouched)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = sum(len(r["ids"]) for r in rows)
        rec = {"step": step + 1, "epoch": step // steps_per_epoch + 1, "loss": loss_value, **metrics, "lr": lr,
               "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt}
        if on_cuda:
            docs = sum(len(r["cu_seqlens"]) - 1 for r in rows)
            rec["mfu"] = flops_per_token(mcfg, tokens / docs) * tokens / dt / peak_flops
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        records.append(rec)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            eta = (time.perf_counter() - t_start) / (step + 1 - start) * (total - step - 1)
            extra = "".join(f" | {k} {v:.3f}" for k, v in metrics.items())
            extra += f" | mfu {rec['mfu']:.1%} | mem {rec['peak_mem_gib']:.1f} GiB" if on_cuda else ""
            print(f"step {step + 1}/{total} | loss {loss_value:.4f}{extra} | lr {lr:.2e} | grad {grad_norm:.2f} | "
                  f"{rec['tokens_per_s']:,.0f} tok/s | eta {eta / 60:.1f} min", flush=True)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == end:
            save_checkpoint(model, optimizer, step + 1, cfg, tokenizer)
            last_good = os.path.join(cfg.out, f"step_{step + 1}")
    log0(f"{'done' if end == total else f'stopped at --stop-at {end} (--resume continues)'}: {end} of {total} steps; "
         f"checkpoint {last_good}")
    if device.type == "cpu":
        release_freed_memory()  # the steps' kept temporaries (see keep_freed_memory)
    return records


def builtin_sft_data(out_dir, seed, dry=False):
    """The built-in corpus for the default run: 600 answers of 100-800 words."""
    if dry:
        return os.path.join(out_dir, "train.jsonl"), out_dir
    return write_builtin(out_dir, count=600, min_words=100, max_words=800, seed=seed)


def train(cfg: TrainConfig) -> list[dict]:
    """Run SFT; returns the per-step log records (also written to out/log.jsonl)."""
    if cfg.loss_reduction not in ("token", "sequence"):
        raise ValueError(f"--loss-reduction must be token or sequence, not {cfg.loss_reduction!r}")
    rank, world, device, tokenizer, packed, model = prepare(cfg, "sft", builtin_sft_data)
    log0(f"loss: {cfg.loss_reduction} mean over the global batch")
    return run_training(cfg, model, tokenizer, packed, sft_loss, rank, world, device)


def parse_args(argv=None, config_class=TrainConfig, builtin=BUILTIN):
    """Flags map one to one onto the config's fields; with neither --model nor --data, `builtin` fills
    what the command line leaves unset."""
    ap = argparse.ArgumentParser(description=sys.modules[config_class.__module__].__doc__.splitlines()[0])
    given = vars(add_flags(ap, config_class, suppress=True).parse_args(argv))
    defaults = builtin if not given.get("model") and not given.get("data") else {}
    return config_class(**{**defaults, **given})


def remove_if_unused(out: str, existed: bool):
    """After a failed run: an --out folder that this run created and that holds no checkpoint goes again."""
    if not existed and int(os.environ.get("RANK", "0")) == 0 and os.path.isdir(out) and not step_dirs(out):
        shutil.rmtree(out, ignore_errors=True)


def main():
    cfg = parse_args()
    existed = os.path.exists(cfg.out)
    try:
        train(cfg)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        remove_if_unused(cfg.out, existed)
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            # free the sharded model's references to the process group first: left to interpreter exit, a rank
            # aborted there now and then ("terminate called without an active exception")
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
