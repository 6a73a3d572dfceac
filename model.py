"""Llama-style decoder (Llama 2/3, Mistral, Qwen2, GLM) that loads and saves Hugging Face checkpoints.

One attention entry point serves three cases:
  packed training rows   model(ids[1, T], position_ids=pos, cu_seqlens=cu)   causal inside each document
  plain causal           model(ids[B, T])
  decoding with a cache  model.setup_cache(B, S); model(ids, position_ids=pos, cache_pos=slots, mask=m)

Usage:
    model = Transformer.from_pretrained("ckpt_dir", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)            # (B, T, vocab)
    model.save_pretrained("out_dir")     # transformers / vLLM load it back
"""
import contextlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

try:  # used when installed (CUDA only); never required
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "glm": "GlmForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


# -----------------------------------------------------------------------------
# config

@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # {"rope_type": "llama3"|"yarn"|..., "factor": ..., ...}
    partial_rotary_factor: float = 1.0    # GLM rotates only the first half of each head
    rope_interleaved: bool = False        # GLM rotates pairs (0,1),(2,3)...; Llama rotates halves
    attention_bias: bool = False          # bias on q, k, v (Qwen2, GLM)
    o_bias: bool = False                  # bias on o_proj (Llama with attention_bias=True)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None     # Mistral v0.1 / Qwen2 option: refused past the window
    hf: dict = field(default_factory=dict)  # the rest of config.json (token ids, ...), written back on save

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Read a transformers config.json dict (old `rope_scaling` or new `rope_parameters` form)."""
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"config.json: missing field {key!r}")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 0.5 if mt == "glm" else 1.0))
        rope_type = rope.pop("type", None) or rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
        rope["rope_type"] = rope_type
        if rope_type in ("yarn", "llama3"):
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        sliding = d.get("sliding_window") if (mt == "mistral" or d.get("use_sliding_window")) else None
        bias_default = mt in ("qwen2", "glm")
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6 if bias_default else 1e-5),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(theta), rope_scaling=None if rope_type == "default" else rope,
            partial_rotary_factor=float(partial), rope_interleaved=mt == "glm",
            attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", bias_default)),
            o_bias=mt == "llama" and bool(d.get("attention_bias", False)),
            mlp_bias=mt == "llama" and bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            hf={k: v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")},
        )

    def to_hf(self) -> dict:
        """The config.json that transformers and vLLM read for this model."""
        d = dict(self.hf)
        d.update(model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]],
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, hidden_act="silu",
                 max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
                 rope_scaling=self.rope_scaling, tie_word_embeddings=self.tie_word_embeddings)
        if self.model_type in ("llama", "glm"):
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "glm":
            d["partial_rotary_factor"] = self.partial_rotary_factor
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


# -----------------------------------------------------------------------------
# rotary position embedding

def rope_frequencies(cfg: ModelConfig, seq_len: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta^(-2i/d) for the rotated dims, rescaled as the config asks.

    Returns (inv_freq of shape (d/2,), attention_factor that multiplies cos and sin).
    seq_len (a 0-d tensor, max position + 1) matters only for `dynamic`, whose base grows past the
    trained length: base * (factor * L / L0 - (factor - 1)) ** (d / (d - 2)).
    """
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "linear":  # positions divided by factor
        return inv_freq / s["factor"], 1.0
    if kind == "dynamic":
        L0 = cfg.max_position_embeddings
        L = torch.clamp(seq_len, min=L0)
        base = cfg.rope_theta * ((s["factor"] * L / L0) - (s["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "llama3":  # keep high frequencies, divide low ones by factor, blend in between
        factor, L0 = s["factor"], s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = L0 / s["low_freq_factor"], L0 / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (L0 / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, out), 1.0
    if kind == "yarn":  # NTK-by-parts: interpolate long wavelengths, extrapolate short ones
        L0 = s["original_max_position_embeddings"]
        factor = s.get("factor") or cfg.max_position_embeddings / L0
        mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attn_factor = s.get("attention_factor")
        if attn_factor is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                attn_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
            else:
                attn_factor = mscale(factor)
        # the dims whose wavelength fits beta_fast..beta_slow times into the trained length
        corr = lambda rot: dim * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        low, high = corr(s.get("beta_fast") or 32), corr(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, attn_factor
    return inv_freq, 1.0


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, T, 1, d/2) for integer positions (B, T), in float32 then cast."""
    inv_freq, scale = rope_frequencies(cfg, position_ids.max() + 1, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
    return (angles.cos() * scale).to(dtype)[:, :, None], (angles.sin() * scale).to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate each pair (x1, x2) of the first 2*(d/2) dims of x (B, T, H, D) by its angle.

    Llama checkpoints pair dim i with i + d/2 (halves); GLM pairs 2i with 2i+1 (interleaved).
    Under autocast x is bf16 while cos/sin follow the float32 residual stream: rotate in x's dtype,
    so that q and k reach the attention kernel in bf16 like v, not promoted to float32.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


# -----------------------------------------------------------------------------
# attention

def attention(q, k, v, doc_bounds=None, mask=None):
    """Causal attention. q: (B, H, T, D); k, v: (B, KVH, S, D) with H a multiple of KVH (GQA).

    doc_bounds: offsets [0, n1, n1+n2, ..., T] of the documents packed in one row (B == 1); each
      document attends causally to itself only (what cu_seqlens says to flash-attn).
    mask: boolean (B, 1, T, S), True where a query may see a key (batched prompts, cached decoding).
    Neither: plain causal, aligned top-left (query i sees keys 0..i, also when S > T).
    """
    if doc_bounds is not None:
        if flash_attn_varlen_func is not None and q.is_cuda:
            cu = torch.tensor(doc_bounds, dtype=torch.int32, device=q.device)
            longest = max(b - a for a, b in zip(doc_bounds[:-1], doc_bounds[1:]))
            out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                         cu, cu, longest, longest, causal=True)  # (T, H, D)
            return out.transpose(0, 1)[None]
        # One fused SDPA call per document: measured faster than one call with a block-diagonal
        # mask on CPU, and (cuDNN backend) than flex or varlen attention on an H100.
        outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                               enable_gqa=True)
                for a, b in zip(doc_bounds[:-1], doc_bounds[1:])]
        return torch.cat(outs, dim=2)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    if T == 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # CPU decoding in bf16: the kernel's own GQA beats the folded form below, 1.14x over the real-model demo's
        # answers (SmolLM2: 3 KV x 3 query heads); in float32 it is 0.64-0.92x and in float16 0.4-0.5x (BENCHMARKS.md)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if T == 1:  # decoding: fold the query heads of each KV head into the query axis, no K/V copies
        out = F.scaled_dot_product_attention(q.view(B, -1, n_rep, D), k, v, attn_mask=mask)
        return out.reshape(B, H, 1, D)  # CUDA kernels may return it in (B, T, H, D) memory order: not a view
    # masked prefill: repeat K/V so that every fused backend (not only the math one) accepts the mask
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_backends(device: torch.device):
    """On CUDA prefer cuDNN attention (fastest per-document kernel measured on an H100)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if device.type != "cuda":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


class KVCache(nn.Module):
    """Preallocated keys and values (B, KVH, S, D), written in place at the given slots."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def empty(cls, batch, max_len, n_kv_heads, head_dim, dtype, device) -> "KVCache":
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def row(self, b: int) -> "KVCache":
        """Row b alone, sharing this cache's memory: a prompt prefilled through it lands in row b."""
        return KVCache(self.k[b:b + 1], self.v[b:b + 1])

    def update(self, slots, k, v):
        """slots (T,): the same slots in every row; (B, 1): one slot per row (rows at their own positions,
        as in continuous batching), new k, v of shape (B, KVH, T, D)."""
        if slots.ndim == 2:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, slots[:, 0]] = k[:, :, 0]  # (B, KVH, D) into row b at slot slots[b]
            self.v[rows, :, slots[:, 0]] = v[:, :, 0]
        else:
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
        return self.k, self.v


# -----------------------------------------------------------------------------
# the model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in float32, scale in the input dtype (as the checkpoints were trained)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear, except for a few rows on the CPU (decoding): there it computes y.T = W @ x.T, which MKL
    ran 1.4-2x faster than x @ W.T for 4 to 128 rows on the CPUs we measured (bench_generate.py), and
    one row as a matrix-vector product (torch.mv): bf16 batch-1 decoding ran ~1.2x faster with it on a
    2-core AVX512-BF16 CPU, the same tokens. Larger inputs, gradients and CUDA take the plain path."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or rows > 128 or torch.is_grad_enabled():
            return super().forward(x)
        y = torch.mv(self.weight, x.reshape(-1)) if rows == 1 else (self.weight @ x.reshape(rows, -1).T).T
        y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q, k and v in one matmul; loading splits the checkpoint's q_proj/k_proj/v_proj into its rows
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, doc_bounds=None, cache_pos=None, mask=None):
        B, T, _ = x.shape
        qk, v = self.qkv_proj(x).split([(self.n_heads + self.n_kv) * self.hd, self.n_kv * self.hd], -1)
        # q's and k's heads rotated in one call: half the small operations of a decode step's RoPE
        qk = apply_rope(qk.view(B, T, self.n_heads + self.n_kv, self.hd), cos, sin, self.cfg.rope_interleaved)
        q, k = qk.split([self.n_heads, self.n_kv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v)  # (B, KVH, S, D): the whole cache
            # only the keys a query can see: the mask's, or without one (a prefill from slot 0) the first T. Handed
            # the whole cache, CPU SDPA took 2.5 s instead of 0.2 s to prefill an 81-token prompt into 8,192 slots
            seen = mask.shape[-1] if mask is not None else T
            if seen < k.shape[2]:
                k, v = k[:, :, :seen], v[:, :, :seen]
        y = attention(q, k, v, doc_bounds, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul (GLM's checkpoint layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc_bounds=None, cache_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_bounds, cache_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
    """log p(target) for every position of h (N, d), 0 where target == -100.

    The LM head and softmax run on `chunk` positions at a time, each chunk recomputed in backward, so a row never
    holds more than one chunk's float32 logits (a 32k-token row of a 128k vocabulary would hold ~16 GiB). A row of
    one chunk or less keeps its logits for backward: there is nothing to recompute. Why chunks even where a row's
    logits would fit: blocks of a size that changes with every row are what a CPU step frees and asks for again.
    66 SFT steps of SmolLM2 (rows of 774-4,314 tokens, 2-core CPU) took 222.7 s at a peak RSS of 5.7 GB in chunks
    of 1,024, against 232.2 s and 9.1 GB with each row's logits kept whole (up to 0.85 GB; BENCHMARKS.md).
    """
    def one(h_c, t_c):
        return -F.cross_entropy((h_c @ weight.T).float(), t_c, ignore_index=-100, reduction="none")
    if torch.is_grad_enabled() and h.shape[0] <= chunk:
        return one(h, targets)  # one chunk: the logits stay for backward, nothing is recomputed
    out = []
    for i in range(0, h.shape[0], chunk):
        h_c, t_c = h[i:i + chunk], targets[i:i + chunk]
        out.append(checkpoint(one, h_c, t_c, use_reentrant=False) if torch.is_grad_enabled() else one(h_c, t_c))
    return torch.cat(out)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.checkpointing = False  # recompute each block in backward (activation checkpointing)
        self.init_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Normal(0, std) matrices, zero biases, unit norms: for training from scratch."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.tie_weights()

    def setup_cache(self, batch: int, max_len: int):
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = KVCache.empty(batch, max_len, self.config.num_key_value_heads,
                                            self.config.head_dim, p.dtype, p.device)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, cache_pos=None, mask=None, targets=None,
                last_only=False):
        """input_ids (B, T) -> logits (B, T, vocab), or with targets (B, T) -> log p(targets) (B, T).

        cu_seqlens (n_docs + 1,) marks documents packed in one row (B == 1); position_ids then restart
        at 0 per document. cache_pos (T,) are the cache slots the new tokens are written to, or (B, 1) one
        slot per row when each row decodes at its own position. last_only: the logits of the last position
        only (B, 1, vocab), all a prefill needs: a 32k-token prompt's (1, T, vocab) logits would be 8 GB in bf16
        for Llama 3's 128k vocabulary, and a fifth of SmolLM2-135M's prefill arithmetic.
        """
        B, T = input_ids.shape
        if position_ids is None:
            if cu_seqlens is not None:
                starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff())
                position_ids = (torch.arange(T, device=input_ids.device) - starts)[None]
            else:
                position_ids = (cache_pos if cache_pos is not None else torch.arange(T, device=input_ids.device))
                position_ids = position_ids[None].expand(B, T)
        window = self.config.sliding_window  # checked eagerly (the compiled decode step is checked by generate)
        if window and not torch.compiler.is_compiling() and int(position_ids.max()) >= window:
            raise ValueError(f"sequence longer than the model's sliding_window ({window}), "
                             "which this implementation does not apply")
        doc_bounds = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError("cu_seqlens needs one packed row: input_ids of shape (1, T)")
            doc_bounds = cu_seqlens.tolist()
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        # the recomputation in backward must pick the same SDPA kernel as the forward did (its saved tensors
        # differ between kernels), and backward runs outside this block: hence the context_fn
        same_kernels = lambda: (sdpa_backends(x.device), sdpa_backends(x.device))
        with sdpa_backends(x.device):
            for layer in self.layers:
                if self.checkpointing and torch.is_grad_enabled():
                    x = checkpoint(layer, x, cos, sin, doc_bounds, cache_pos, mask, use_reentrant=False,
                                   context_fn=same_kernels)
                else:
                    x = layer(x, cos, sin, doc_bounds, cache_pos, mask)
        if targets is not None:
            return token_logprobs(self.norm(x).flatten(0, 1), self.lm_head.weight, targets.flatten()).view(B, T)
        return self.lm_head(self.norm(x[:, -1:] if last_only else x))

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Build on the meta device, allocate once, then copy each tensor straight into place."""
        cfg = ModelConfig.from_hf(read_config(path))
        files = checkpoint_files(path)
        with torch.device("meta"):
            model = cls(cfg)
        model.to(dtype).to_empty(device=device)
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        filled = set()
        for file in files:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):  # recomputed, never loaded
                        continue
                    ours, rows = hf_to_ours(name, cfg)
                    if ours not in params:
                        raise ValueError(f"{file}: unexpected tensor {name!r} for a {cfg.model_type} model")
                    dst = params[ours].data if rows is None else params[ours].data[rows[0]:rows[1]]
                    src = f.get_tensor(name)
                    if src.shape != dst.shape:
                        raise ValueError(f"{file}: {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                    with torch.no_grad():
                        dst.copy_(src)
                    filled.add((ours, rows))
        expected = {hf_to_ours(n, cfg) for n in hf_names(model.state_dict(), cfg)}
        if missing := expected - filled:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0][0]}")
        return model

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        save_hf(self.state_dict(), self.config, path, max_shard_bytes)


def hf_to_ours(name: str, cfg: ModelConfig):
    """Map a checkpoint tensor name to (our parameter name, row range or None).

    model.layers.{i}.self_attn.{q,k,v}_proj.* -> layers.{i}.self_attn.qkv_proj.* rows of q | k | v
    model.layers.{i}.mlp.{gate,up}_proj.*     -> layers.{i}.mlp.gate_up_proj.* rows of gate | up
    model.X                                   -> X (lm_head.weight stays lm_head.weight)
    """
    name = name.removeprefix("model.")
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv),
            "gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}
    for part, r in rows.items():
        if f".{part}." in name:
            fused = "qkv_proj" if part in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
            return name.replace(part, fused), r
    return name, None


def hf_names(our_names, cfg: ModelConfig) -> list[str]:
    """The checkpoint tensor names transformers expects for our parameter names (the inverse of
    hf_to_ours; a tied lm_head is not written)."""
    names = []
    for name in our_names:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hf = name if name.startswith("lm_head") else "model." + name
        if ".qkv_proj." in hf:
            names += [hf.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        elif ".gate_up_proj." in hf and cfg.model_type != "glm":
            names += [hf.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")]
        else:
            names.append(hf)
    return names


DTYPES = ("float32", "bfloat16", "float16")


def check_device(device: str):
    """Refuse, with one line that says why, a --device torch does not know or a CUDA device where there is none
    (torch's own errors differ by script: an AssertionError, or a missing torch._C attribute, as tracebacks)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device torch knows (cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, {why}); "
                         "use --device cpu")


def compute_dtype(name: str, device, flag="--dtype") -> torch.dtype:
    """A --dtype by name; "" is bf16 on CUDA and float32 on CPU, where bf16 is fast only on CPUs with bf16
    instructions (AVX512-BF16, AMX) and slow elsewhere."""
    name = name or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    if name not in DTYPES:
        raise ValueError(f"{flag} {name!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def refuse_gguf(path):
    """A .gguf file given where a checkpoint folder goes (the real model ships as one): say how to get the folder."""
    if str(path).endswith(".gguf") and os.path.isfile(path):
        raise FileNotFoundError(f"{path}: a GGUF file, not a checkpoint folder; make one with "
                                f"`python convert_gguf.py {path} OUT_DIR` and give OUT_DIR")


def read_config(path) -> dict:
    refuse_gguf(path)
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint folder does not exist")
    if not os.path.isfile(file):
        latest = os.path.join(path, "latest")  # a training run's --out: name the checkpoint meant
        run = (f"; it holds a training run, whose last checkpoint is {os.path.join(path, open(latest).read().strip())}"
               if os.path.isfile(latest) else "")
        raise FileNotFoundError(f"{path}: no config.json, so not a Hugging Face checkpoint folder{run}")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def checkpoint_files(path) -> list[str]:
    refuse_gguf(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: weights file {os.path.basename(file)} is missing "
                                    "(only safetensors checkpoints are read)")
    return files


def save_hf(state_dict: dict, cfg: ModelConfig, path, max_shard_bytes: int = 5 * 2**30):
    """Write config.json and safetensors shards under transformers' names (q/k/v, gate/up split again).

    Each file goes to a temporary name first and is renamed into place, so no reader sees half a file.
    """
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for hf in hf_names(state_dict, cfg):
        ours, rows = hf_to_ours(hf, cfg)
        t = state_dict[ours]
        tensors[hf] = (t if rows is None else t[rows[0]:rows[1]]).contiguous()
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for shard, fname in zip(shards, names):
        save_file(shard, os.path.join(path, fname + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, fname + ".tmp"), os.path.join(path, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for shard, f in zip(shards, names) for n in shard}}
        write_json(os.path.join(path, "model.safetensors.index.json"), index)
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(os.path.join(path, "config.json"), hf)


def write_json(file, obj):
    """Atomically (a kill leaves the old file or the new one), into its folder, made if it is not there."""
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    with open(file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(file + ".tmp", file)
