"""model.py and generate.py against transformers (the reference), on CPU in float32."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import transformers

from cli import run_cli
from dataset import build_tokenizer, load_tokenizer
from generate import (context_of, finish_reason, fit_new_tokens, forbid, generate, generate_many, keep_stop_odds,
                      no_repeat, penalize, sample)
from hf_models import BASE, CASES, make_hf_model, save_hf_model
from model import Linear, ModelConfig, Transformer, attention, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, transformers model) for every supported type and RoPE scaling."""
    out = {}
    for name in CASES:
        path = tmp_path_factory.mktemp(name)
        out[name] = (str(path), save_hf_model(name, path))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers_past_the_original_context(checkpoints, name):
    path, hf = checkpoints[name]
    ours = Transformer.from_pretrained(path).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 90))  # 90 > max_position_embeddings (64) > original (16/32)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs diff {diff}"


def test_old_rope_scaling_form_reads_like_rope_parameters():
    old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    expected = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling) == (500000.0, expected)


def test_unsupported_model_type_is_refused_by_name():
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 10})


def test_packed_row_equals_documents_run_separately(checkpoints):
    model = Transformer.from_pretrained(checkpoints["glm"][0]).eval()
    lengths = [5, 17, 9]
    docs = [torch.randint(0, BASE["vocab_size"], (1, n)) for n in lengths]
    row = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 5, 22, 31])
    targets = torch.randint(0, BASE["vocab_size"], (1, 31))
    with torch.no_grad():
        packed = model(row, cu_seqlens=cu)
        packed_lp = model(row, cu_seqlens=cu, targets=targets)
        for i, doc in enumerate(docs):
            a, b = cu[i].item(), cu[i + 1].item()
            assert torch.allclose(packed[0, a:b], model(doc)[0], atol=1e-5)
            assert torch.allclose(packed_lp[0, a:b], model(doc, targets=targets[:, a:b])[0], atol=1e-5)


@pytest.mark.parametrize("chunk", [8, 64])  # chunked and recomputed; one chunk, kept whole
def test_chunked_logprobs_equal_full_softmax_with_gradients(chunk, monkeypatch):
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (50,))
    t[::7] = -100
    rows, real = [], torch.nn.functional.cross_entropy  # the rows of logits the LM head hands each call
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    lp = token_logprobs(h, w, t, chunk=chunk)
    assert max(rows) == min(chunk, 50)  # never the whole row's logits at once when it is longer than a chunk
    full = torch.log_softmax(h @ w.T, -1).gather(1, t.clamp_min(0)[:, None])[:, 0] * (t != -100)
    assert torch.allclose(lp, full, atol=1e-5)
    g1 = torch.autograd.grad(lp.sum(), (h, w))
    g2 = torch.autograd.grad(full.sum(), (h, w))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_cached_decoding_equals_full_forward_at_every_step(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama3"][0]).eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 30))
    with torch.no_grad():
        full = model(ids)[0]
        model.setup_cache(1, 30)
        slots = torch.arange(30)
        prefill = model(ids[:, :10], cache_pos=slots[:10])[0]
        assert torch.allclose(prefill, full[:10], atol=1e-5)
        for t in range(10, 30):
            mask = (slots <= t)[None, None, None]
            step = model(ids[:, t:t + 1], cache_pos=slots[t:t + 1], mask=mask)[0, -1]
            assert torch.allclose(step, full[t], atol=1e-5), f"step {t}"


@pytest.mark.parametrize("name", ["llama", "qwen2", "glm", "llama-dynamic"])
def test_greedy_generation_equals_transformers_token_for_token(checkpoints, name):
    path, hf = checkpoints[name]
    ours = Transformer.from_pretrained(path).eval()
    prompt = torch.randint(3, BASE["vocab_size"], (1, 12))
    n = min(60, context_of(ours) - 12)  # dynamic RoPE: past the original 64 positions, up to 2 x 64
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    got = generate(ours, [prompt[0].tolist()], max_new_tokens=n, temperature=0)[0]
    assert got == ref


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(checkpoints):
    model = Transformer.from_pretrained(checkpoints["qwen2"][0]).eval()
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (4, 11, 7)]
    batched = generate(model, prompts, max_new_tokens=25, temperature=0)
    alone = [generate(model, [p], max_new_tokens=25, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_generation_stops_at_any_stop_id_and_excludes_it(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompt = torch.randint(3, BASE["vocab_size"], (9,)).tolist()
    free = generate(model, [prompt], max_new_tokens=30, temperature=0)[0]
    stop = free[10]
    first = free.index(stop)
    assert generate(model, [prompt], max_new_tokens=30, temperature=0, stop_ids=[stop, 9999])[0] == free[:first]


def test_sampling_is_reproducible_with_a_seed_and_narrows_to_greedy(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompt = [5, 6, 7, 8]
    a = generate(model, [prompt], 40, temperature=1.0, seed=3)[0]
    b = generate(model, [prompt], 40, temperature=1.0, seed=3)[0]
    c = generate(model, [prompt], 40, temperature=1.0, seed=4)[0]
    greedy = generate(model, [prompt], 40, temperature=0)[0]
    assert a == b and a != c
    assert generate(model, [prompt], 40, temperature=1.0, top_k=1, seed=5)[0] == greedy
    assert generate(model, [prompt], 40, temperature=1.0, top_p=1e-6, seed=5)[0] == greedy


def test_top_p_and_top_k_never_draw_outside_the_kept_set():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)  # p ~ 0.70, 0.26, 0.03, ...
    assert set(sample(logits, 1.0, top_p=0.9).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_k=3).tolist()) == {0, 1, 2}
    freq = (sample(logits, 1.0) == 0).float().mean().item()
    assert abs(freq - torch.softmax(logits[0], -1)[0].item()) < 0.04


def test_top_p_keeps_the_nucleus_of_the_whole_vocabulary_when_it_reaches_past_the_256_best():
    torch.manual_seed(0)
    V = 5000
    flat = -0.002 * torch.arange(V, dtype=torch.float32)  # nearly flat: the 0.9 nucleus is ~2,000 tokens long
    peaked = torch.full((V,), -30.0)
    peaked[7], peaked[3] = 5.0, 4.0
    p = flat.softmax(-1)
    nucleus = int(((p.cumsum(-1) - p) <= 0.9).sum())  # reference: the whole vocabulary sorted
    assert nucleus > 1000
    draws = sample(torch.stack([flat, peaked]).repeat(4000, 1), 1.0, top_p=0.9).view(4000, 2)
    assert draws[:, 0].max() < nucleus and draws[:, 0].max() > nucleus - 30  # all of it, nothing past it
    assert set(draws[:, 1].tolist()) == {7, 3}
    both = sample(torch.stack([flat, peaked]).repeat(2000, 1), 1.0, top_k=1500, top_p=0.9).view(2000, 2)
    assert both[:, 0].max() < 1500 and set(both[:, 1].tolist()) == {7, 3}


def test_save_pretrained_round_trips_through_transformers(checkpoints, tmp_path):
    for name in ("llama-bias-tied", "glm", "qwen2"):
        path, hf = checkpoints[name]
        ours = Transformer.from_pretrained(path).eval()
        out = tmp_path / name
        ours.save_pretrained(out, max_shard_bytes=40_000)  # force several shards + index
        assert (out / "model.safetensors.index.json").exists()
        back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
        again = Transformer.from_pretrained(out).eval()
        ids = torch.randint(0, BASE["vocab_size"], (1, 20))
        with torch.no_grad():
            assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-5
            assert (again(ids) - ours(ids)).abs().max() == 0


def test_a_device_that_is_not_there_is_refused_in_one_line(monkeypatch, tmp_path):
    """The README's GPU commands on a machine without CUDA gave three different tracebacks."""
    from model import check_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda:1: CUDA is not available here \(torch .*\); use --device cpu"):
        check_device("cuda:1")
    with pytest.raises(ValueError, match="--device 'gpu': not a device torch knows"):
        check_device("gpu")
    check_device("cpu")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "write 100 words on tides .", "length": 100}) + "\n")
    for script, args in (("generate.py", ["--checkpoint", tmp_path, "--prompt", "hi"]),
                         ("train_sft.py", ["--out", tmp_path / "run"]), ("demo.py", ["--real", "--out", tmp_path / "d"]),
                         ("evaluate.py", ["predict", tmp_path / "in.jsonl", "--checkpoint", tmp_path, "--output",
                                          tmp_path / "p.jsonl"]),  # evaluate and agentwrite had no --device at all
                         ("agentwrite.py", ["--input", tmp_path / "in.jsonl", "--checkpoint", tmp_path, "--output",
                                            tmp_path / "a.jsonl"])):
        run = run_cli(script, *args, "--device", "gpu")
        assert run.returncode == 1 and run.stderr.strip().splitlines() == ["error: --device 'gpu': not a device torch "
                                                                           "knows (cpu, cuda, cuda:N)"], run.stderr
    assert not any((tmp_path / name).exists() for name in ("run", "d", "p.jsonl", "a.jsonl", "a.jsonl.cache.jsonl"))


def test_a_dtype_name_torch_lacks_is_refused_before_any_work(checkpoints, tmp_path):
    """--dtype bf16 was an AttributeError traceback; train_sft's --export-dtype one came at the first save,
    after the steps before it had run, and lost them."""
    path = tmp_path / "ckpt"
    Transformer.from_pretrained(checkpoints["llama"][0]).save_pretrained(path)
    build_tokenizer(str(path), [" ".join(f"w{i}" for i in range(50))])
    run = run_cli("generate.py", "--checkpoint", path, "--prompt", "hi", "--dtype", "bf16")
    assert run.returncode == 1 and run.stderr.strip() == "error: --dtype 'bf16': choose one of float32, bfloat16, float16"
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "write 100 words on tides .", "length": 100}) + "\n")
    predict = lambda *flags: run_cli("evaluate.py", "predict", tmp_path / "in.jsonl", "--checkpoint", path, "--output",
                                     tmp_path / "p.jsonl", "--max-new-tokens", "3", *flags)
    run = predict("--dtype", "bf16")
    assert run.returncode == 1 and run.stderr.strip() == "error: --dtype 'bf16': choose one of float32, bfloat16, float16"
    assert not (tmp_path / "p.jsonl").exists()
    run = predict("--dtype", "bfloat16", "--device", "cpu")
    assert run.returncode == 0 and len(open(tmp_path / "p.jsonl").readlines()) == 1, run.stderr
    run = run_cli("train_sft.py", "--out", tmp_path / "run", "--export-dtype", "half", "--max-steps", "1")
    assert run.returncode == 1 and run.stderr.strip() == ("error: --export-dtype 'half': choose one of float32, "
                                                          "bfloat16, float16") and not (tmp_path / "run").exists()
    assert run_cli("generate.py", "--checkpoint", path, "--prompt", "hi", "--max-new-tokens", "2").returncode == 0


def test_bad_checkpoint_folders_raise_clear_errors(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    run = tmp_path / "sft"  # a training run's --out given where one of its checkpoints was meant
    (run / "step_9").mkdir(parents=True)
    (run / "latest").write_text("step_9\n")
    for load in (Transformer.from_pretrained, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"a training run.*last checkpoint is .*sft/step_9"):
            load(str(run))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # the real model ships as one; it was "no tokenizer.json here"
    for load in (Transformer.from_pretrained, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"m.gguf: a GGUF file, not a checkpoint folder.*convert_gguf.py"):
            load(str(tmp_path / "m.gguf"))
    (tmp_path / "config.json").write_text(json.dumps(make_hf_model("llama").config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Transformer.from_pretrained(tmp_path)
    # weights of another shape: the tensor is named
    cfg = json.loads(open(os.path.join(checkpoints["llama"][0], "config.json")).read())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(checkpoints["llama"][0], "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.\w+_proj.weight has shape"):
        Transformer.from_pretrained(tmp_path)


def test_generate_cli_streams_an_answer_and_reports_a_summary(checkpoints, tmp_path):
    model = Transformer.from_pretrained(checkpoints["llama"][0])
    model.save_pretrained(tmp_path)
    build_tokenizer(str(tmp_path), [" ".join(f"w{i}" for i in range(50))])  # 156 tokens < vocab 160
    run = run_cli("generate.py", "--checkpoint", tmp_path, "--prompt", "w1 w2 w3", "--max-new-tokens", "40",
                  "--temperature", "0", "--device", "cpu", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    words = run.stdout.split()
    vocab = json.load(open(tmp_path / "tokenizer.json"))["model"]["vocab"]
    assert 0 < len(words) <= 40 and all(w in vocab for w in words)
    assert "tokens/s" in run.stderr and "words" in run.stderr


def test_generate_cli_gives_a_clear_error_for_a_bad_folder(tmp_path):
    run = run_cli("generate.py", "--checkpoint", tmp_path)
    assert run.returncode != 0 and "error:" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("name", ["llama3", "llama-dynamic", "mistral-window", "glm"])
def test_decode_step_compiles_to_one_graph_reused_at_every_step(checkpoints, name):
    """What the CUDA-graph path needs: torch.compile(fullgraph=True) traces the whole decode step (cache
    writes included) once, with no graph break and no recompile as the slot moves, and gives eager's logits."""
    from generate import decode_step, prefill
    model = Transformer.from_pretrained(checkpoints[name.replace("-window", "")][0]).eval()
    if name == "mistral-window":
        model.config.sliding_window = 4096  # a window the sequence stays inside (Mistral-7B-v0.1's)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(decode_step, backend=counting_backend, fullgraph=True)
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (6, 9)]
    P, S = 9, 20
    results = []
    for fn in (decode_step, step):
        with torch.no_grad():
            logits, start, slots = prefill(model, prompts, S)
            tok, out = logits.argmax(-1, keepdim=True), []
            for i in range(S - P):
                logits = fn(model, tok, slots[P + i:P + i + 1].clone(), start, slots)
                tok = logits.argmax(-1, keepdim=True)
                out.append(logits)
        results.append(torch.stack(out))
    assert len(graphs) == 1, f"{len(graphs)} graphs for {S - P} steps"
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_bf16_autocast_gives_attention_bf16_queries_keys_and_values(monkeypatch):
    """Training keeps float32 weights under bf16 autocast: the rotated q and k must not be promoted to float32
    by the float32 cos/sin (the fused GPU kernels take bf16 only, and float32 doubles their memory)."""
    import model as model_module
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model, seen = Transformer(cfg), []

    def spy(q, k, v, *args, **kwargs):
        seen.append({q.dtype, k.dtype, v.dtype})
        return attention(q, k, v, *args, **kwargs)

    attention = model_module.attention
    monkeypatch.setattr(model_module, "attention", spy)
    ids = torch.randint(0, 50, (1, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = model(ids, cu_seqlens=torch.tensor([0, 8, 20]), targets=ids)
    logps.sum().backward()
    assert seen == [{torch.bfloat16}] * 2
    assert logps.dtype == torch.float32 and model.embed_tokens.weight.grad.dtype == torch.float32


def test_cached_decoding_takes_attention_output_in_the_memory_order_cuda_kernels_return(checkpoints, monkeypatch):
    """CUDA's fused SDPA kernels return (B, H, T, D) laid out as (B, T, H, D); decoding reshapes that output and
    must give the same tokens (a .view() raised there on an H200). Here the CPU kernel's output is relaid so."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    model = Transformer.from_pretrained(checkpoints["llama3"][0]).eval()
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (5, 9)]
    got = generate(model, prompts, max_new_tokens=12, temperature=0)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    assert got == generate(model, prompts, max_new_tokens=12, temperature=0)


def test_checkpointed_layers_recompute_attention_under_the_forwards_kernel_choice(monkeypatch):
    """Backward runs outside the forward's sdpa_backends block; a recomputed layer must still be inside one, or
    CUDA picks another kernel whose saved tensors differ (CheckpointError on an H200)."""
    import contextlib
    import model as model_module
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model, inside, seen = Transformer(cfg), [False], []

    @contextlib.contextmanager
    def backends(device):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(model_module, "sdpa_backends", backends)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(inside[0]) or sdpa(*a, **kw))
    model.checkpointing = True
    ids = torch.randint(0, 50, (1, 20))
    model(ids, cu_seqlens=torch.tensor([0, 8, 20]), targets=ids).sum().backward()
    assert seen == [True] * 8  # 2 layers x 2 documents, in the forward and again in the recomputation


def test_positions_past_a_sliding_window_are_refused_not_silently_wrong(checkpoints):
    model = Transformer.from_pretrained(checkpoints["mistral"][0]).eval()
    model.config.sliding_window = 16
    with torch.no_grad():
        model(torch.randint(0, BASE["vocab_size"], (1, 16)))  # inside the window: fine
        with pytest.raises(ValueError, match="sliding_window"):
            model(torch.randint(0, BASE["vocab_size"], (1, 17)))
        with pytest.raises(ValueError, match=r"prompt: 18 tokens is longer than the model.s sliding_window \(16\)"):
            generate(model, [[3, 4, 5]], max_new_tokens=15)


# -----------------------------------------------------------------------------
# continuous batching

def free_runs(model, prompts, n):
    return [generate(model, [p], max_new_tokens=n, temperature=0)[0] for p in prompts]


def test_continuous_greedy_answers_equal_batch_1_generate_token_for_token(checkpoints):
    model = Transformer.from_pretrained(checkpoints["qwen2"][0]).eval()
    torch.manual_seed(1)
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (4, 13, 7, 3, 10, 6, 9)]
    free = free_runs(model, prompts, 30)
    # each prompt stops at its own step: a stop id taken from its own free run (or never, for the last two)
    stops = [[f[k]] for f, k in zip(free[:5], (3, 20, 9, 1, 14))] + [[9999], [9999]]
    limits = [30, 30, 30, 30, 30, 12, 30]
    alone = [generate(model, [p], max_new_tokens=m, stop_ids=s, temperature=0)[0]
             for p, m, s in zip(prompts, limits, stops)]
    assert len({len(a) for a in alone}) >= 5  # answers of many lengths
    order = []
    got = {}
    for i, toks in generate_many(model, prompts, limits, stops, slots=3):
        order.append(i)
        got[i] = toks
    assert [got[i] for i in range(len(prompts))] == alone
    assert order != sorted(order)  # handed out as they end, not in input order


def test_prefill_computes_the_logits_of_the_last_position_only(checkpoints):
    """A prefill keeps the last position's logits, so the output head must see no other: (B, T, vocab)
    logits of a 32k-token prompt are 8 GB in bf16 for Llama 3's vocabulary. Those logits are the full forward's."""
    from generate import prefill, prefill_row
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    heads = []
    model.lm_head.register_forward_hook(lambda mod, args, out: heads.append(tuple(args[0].shape[:-1])))
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (6, 11)]
    with torch.no_grad():
        full = [model(torch.tensor([p]))[0, -1] for p in prompts]
        heads.clear()
        logits, _, _ = prefill(model, prompts, 16)  # left-padded batch
        assert heads == [(2, 1)]
        model.setup_cache(3, 16)
        caches = [layer.self_attn.cache for layer in model.layers]
        row = prefill_row(model, caches, 2, prompts[1])  # one prompt into row 2 of a continuous batch
        assert heads == [(2, 1), (1, 1)]
    assert torch.allclose(logits, torch.stack(full), atol=1e-5)
    assert torch.allclose(row, full[1], atol=1e-5)


def test_a_prefill_into_a_long_cache_attends_over_its_own_tokens_only(checkpoints, monkeypatch):
    """A prompt prefilled into a fresh cache row sees no slot past its own tokens, so attention must not be handed the
    whole cache: on a CPU, an 81-token prompt's prefill into 8,192 slots took 2.5 s instead of 0.2 s (SmolLM2-135M,
    one thread), a third of AgentWrite's time in the real-model demo. The logits stay the full forward's."""
    import model as model_module
    from generate import prefill, prefill_row
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    keys = []
    real = model_module.attention
    monkeypatch.setattr(model_module, "attention", lambda q, k, v, *a: keys.append(k.shape[2]) or real(q, k, v, *a))
    prompt = torch.randint(3, BASE["vocab_size"], (7,)).tolist()
    layers = len(model.layers)
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0, -1]
        keys.clear()
        model.setup_cache(2, 512)
        row = prefill_row(model, [layer.self_attn.cache for layer in model.layers], 1, prompt)
        assert keys == [7] * layers
        keys.clear()
        logits, _, _ = prefill(model, [prompt, prompt], 512)  # an unpadded batch: no mask either
        assert keys == [7] * layers
        keys.clear()
        padded, _, _ = prefill(model, [prompt[3:], prompt], 512)  # left-padded: a mask of its first 7 slots
        assert keys == [7] * layers
    for got in (row, logits[1], padded[1]):
        assert torch.allclose(got, full, atol=1e-5)


def test_freed_rows_are_reused_and_per_prompt_limits_hold(checkpoints, monkeypatch):
    import generate as gen
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(7)]
    limits = [3, 9, 1, 5, 7, 2, 4]
    rows_used = []
    real = gen.prefill_row
    monkeypatch.setattr(gen, "prefill_row", lambda m, c, row, p: rows_used.append(row) or real(m, c, row, p))
    got = dict(generate_many(model, prompts, limits, stop_ids=[9999], slots=2))
    assert sorted(got) == list(range(7)) and [len(got[i]) for i in range(7)] == limits
    assert sorted(rows_used) == [0, 0, 0, 0, 1, 1, 1] or sorted(rows_used) == [0, 0, 0, 1, 1, 1, 1]
    assert got == {i: free_runs(model, [p], m)[0] for i, (p, m) in enumerate(zip(prompts, limits))}


def test_once_nothing_waits_finished_rows_cost_nothing_and_answers_stay_the_same(checkpoints, monkeypatch):
    import generate as gen
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    limits = [3, 25, 6, 12]  # rows 0 and 2 end first; row 3 moves down, then row 1 is alone
    widths = []
    real = gen.decode_rows
    monkeypatch.setattr(gen, "decode_rows", lambda m, t, p, s: widths.append(t.shape[0]) or real(m, t, p, s))
    got = dict(generate_many(model, prompts, limits, stop_ids=[9999], slots=4))
    assert got == {i: free_runs(model, [p], m)[0] for i, (p, m) in enumerate(zip(prompts, limits))}
    assert widths[0] == 4 and widths[-1] == 1 and widths.count(2) == 6  # 2 rows from step 6 to 11, then 1


def test_the_rules_and_sampling_see_only_the_rows_up_to_the_last_in_use(checkpoints, monkeypatch):
    """Over 16 rows of SmolLM2's 49k vocabulary the rules and the sampling cost 15-20 ms a step on a 2-core CPU: a
    lone long answer must not pay them for the rows that finished."""
    import generate as gen
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16], [17, 18]]
    limits = [3, 25, 6, 12, 4]  # the fifth waits for a free row, which is below the last one in use
    widths = []
    real = gen.sample
    monkeypatch.setattr(gen, "sample", lambda logits, *a: widths.append(logits.shape[0]) or real(logits, *a))
    got = dict(generate_many(model, prompts, limits, stop_ids=[9999], slots=4, repetition_penalty=1.3,
                             no_repeat_ngram=3))
    assert widths[0] == 4 and widths[-1] == 1 and widths.count(1) == 13, widths  # row 1 alone for its last 13 tokens
    alone = [generate(model, [p], m, temperature=0, repetition_penalty=1.3, no_repeat_ngram=3)[0]
             for p, m in zip(prompts, limits)]
    assert [got[i] for i in range(5)] == alone
    sampled = dict(generate_many(model, prompts, limits, stop_ids=[9999], slots=4, temperature=1.0, seed=3))
    assert [len(sampled[i]) for i in range(5)] == limits


FAULTS = """
import resource, torch
from generate import generate_many, keep_freed_memory
from model import ModelConfig, Transformer
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
keep_freed_memory()
torch.ones(256 << 18).sum()  # 256 MB, freed and kept, as by a decoding loop before
before = rss()
dict(generate_many(Transformer(cfg).eval(), [[5, 6, 7]], 3, slots=2))  # decoding on the CPU, as a demo does first
print(before - rss())
x = torch.randn(16, 49152)
for i in range(25):
    if i == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (x / 0.7).masked_fill(x > 2, 0).logsumexp(-1)  # a step's temporaries, 3 MB each, freed at once
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_cpu_decoding_reuses_freed_memory_instead_of_page_faulting_every_step_and_gives_it_back_at_the_end():
    """In a fresh process glibc maps a block of a few MB afresh at each allocation and gives it back at each free:
    over 16 rows of a 49k vocabulary every temporary of the rules and the sampler page-faulted in, every step. Once
    the loop has ended what it kept goes back, or the next stage (SFT after AgentWrite) starts from its peak."""
    run = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    given_back, faulted = map(int, run.stdout.split()[-2:])
    assert given_back > 200 << 20, given_back
    assert faulted < 20 * 16 * 49152 * 4, faulted  # the defaults: ~140 MB in 20 steps, every temporary of each


def test_continuous_sampling_is_reproducible_for_the_same_seed_and_slots(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    run = lambda seed: dict(generate_many(model, prompts, 20, slots=2, temperature=1.0, seed=seed))
    assert run(0) == run(0) and run(0) != run(1)
    with pytest.raises(ValueError, match="0 slots: at least 1 row"):  # was: no answer and no word (--batch-size 0)
        dict(generate_many(model, prompts, 20, slots=0))


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_recent_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    recent = torch.tensor([[0, 1, 0, -1], [4, -1, -1, -1]])  # -1: a row with fewer recent tokens
    out = penalize(logits, recent, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 3.0, 0.5, -2.0], [1.0, 1.0, 1.0, 1.0, 0.5]]))


def test_the_repetition_penalty_equals_the_dense_formula_with_repeats_padding_and_empty_rows():
    """Only the recent tokens' logits are rewritten (a scatter): a token seen twice, the -1 padding and a row with
    no recent token must leave every logit as the full-vocabulary formula has it."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(5, 300) * 4).to(dtype)
        recent = torch.randint(0, 300, (5, 64))
        recent[1, 5], recent[1, 40:] = 0, -1  # fewer tokens, token 0 among them
        recent[2, 1:] = recent[2, 0]  # one token, over and over
        recent[3] = -1  # none yet
        recent[4, 10:20] = 0  # token 0, which the padding of other rows might be mistaken for
        seen = torch.zeros(5, 300, dtype=torch.bool)
        for b in range(5):
            seen[b, [t for t in recent[b].tolist() if t >= 0]] = True
        want = torch.where(seen, torch.where(logits > 0, logits / 1.3, logits * 1.3), logits)
        assert torch.equal(penalize(logits, recent, 1.3), want), dtype


def test_rows_of_their_own_temperatures_share_a_batch(checkpoints):
    """A greedy request beside sampled ones stays greedy (the sampler gets one temperature per row), and a batch
    of one temperature samples as it always did."""
    from generate import continuous
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    temps = [0.0, 1.5, 0.0]
    waiting = iter([(i, p, 12, [9999], t) for i, (p, t) in enumerate(zip(prompts, temps))])
    got = dict(continuous(model, lambda block: next(waiting, None), 3, 32, seed=0))
    assert got[0] == free_runs(model, [prompts[0]], 12)[0] and got[2] == free_runs(model, [prompts[2]], 12)[0]
    assert got[1] != free_runs(model, [prompts[1]], 12)[0]
    waiting = iter([(i, p, 12, [9999], 0.0) for i, p in enumerate(prompts)])
    assert dict(continuous(model, lambda block: next(waiting, None), 3, 32)) == {
        i: free_runs(model, [p], 12)[0] for i, p in enumerate(prompts)}


def test_penalized_greedy_answers_agree_between_static_and_continuous_batching_and_repeat_less(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    plain = [generate(model, [p], 40, temperature=0)[0] for p in prompts]
    static = [generate(model, [p], 40, temperature=0, repetition_penalty=1.5, repetition_window=8)[0] for p in prompts]
    got = dict(generate_many(model, prompts, 40, slots=2, repetition_penalty=1.5, repetition_window=8))
    assert [got[i] for i in range(3)] == static != plain
    repeats = lambda runs: sum(len(r) - len(set(zip(r, r[1:]))) for r in runs)  # bigrams seen before
    assert repeats(static) < repeats(plain)


def test_the_rules_leave_the_stop_tokens_probability_where_the_model_put_it():
    torch.manual_seed(0)
    raw = torch.randn(3, 50) + 1.0
    stops = torch.zeros(50, dtype=torch.bool)
    stops[[7, 11]] = True
    recent = torch.randint(12, 50, (3, 20))  # recent words; the stop tokens (7, 11) are never in an answer
    ruled = forbid(penalize(raw, recent, 2.0), [{1, 2}, set(), {3}])
    for t in (0.7, torch.tensor([1.0, 0.5, 0.3])):
        tt = t[:, None] if isinstance(t, torch.Tensor) else t
        kept = keep_stop_odds(raw, ruled, stops, t)
        p_raw, p_ruled, p_kept = ((x / tt).softmax(-1) for x in (raw, ruled, kept))
        assert torch.allclose(p_kept[:, stops].sum(-1), p_raw[:, stops].sum(-1), atol=1e-6)  # the model's stop odds
        assert (p_ruled[:, stops].sum(-1) / p_raw[:, stops].sum(-1) > 1.02).all()  # which the rules raised
        words = lambda p: p[:, ~stops] / p[:, ~stops].sum(-1, keepdim=True)
        assert torch.allclose(words(p_kept), words(p_ruled), atol=1e-6)  # and the words as the rules weigh them
        assert (p_kept[0, [1, 2]] == 0).all() and p_kept[2, 3] == 0  # banned stays banned


def fixed_logits_model(logits: list[float]) -> Transformer:
    """A model whose next-token logits are `logits` whatever the text: every token embeds to one vector and
    the blocks add nothing, so the last hidden state is always that vector, normed."""
    cfg = ModelConfig(vocab_size=len(logits), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.embed_tokens.weight.fill_(1.0)  # normed: a vector of ones, of squared length 16
        model.lm_head.weight.copy_(torch.tensor(logits)[:, None].expand(-1, 16) / 16)
    return model


def test_neither_the_repetition_penalty_nor_the_n_gram_ban_ends_an_answer_the_model_would_go_on_with():
    # token 1 scores 5, the stop token 3 scores 4.9, token 2 scores 4: greedy decoding never stops by the model's
    # own logits. Once token 1 is penalized (2.5) or banned, the stop token would top every word if the rules moved it.
    model = fixed_logits_model([0.0, 5.0, 4.0, 4.9] + [0.0] * 12)
    assert torch.allclose(model(torch.tensor([[5, 6]]))[0, -1, :4], torch.tensor([0.0, 5.0, 4.0, 4.9]), atol=1e-4)
    for rules in (dict(repetition_penalty=2.0), dict(no_repeat_ngram=2)):
        static = generate(model, [[5, 6]], 30, stop_ids=[3], temperature=0, **rules)[0]
        continuous = dict(generate_many(model, [[5, 6], [7]], 30, stop_ids=[3], slots=2, **rules))
        assert len(static) == 30 and static[:2] in ([1, 2], [1, 1]), (rules, static)
        assert continuous[0] == static and len(continuous[1]) == 30


def test_no_repeat_bans_exactly_the_tokens_that_would_repeat_an_n_gram():
    seen, out = {}, []
    banned = []
    for t in [1, 2, 3, 1, 2]:
        out.append(t)
        banned.append(no_repeat(out, seen, 3))
    assert banned == [set(), set(), set(), set(), {3}]  # "1 2" was followed by 3: "1 2 3" may not come again
    assert no_repeat([1, 2, 3], {}, 0) == set()


def test_no_answer_repeats_an_n_gram_and_static_and_continuous_batching_agree(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    plain = [generate(model, [p], 60, temperature=0)[0] for p in prompts]
    static = [generate(model, [p], 60, temperature=0, no_repeat_ngram=4)[0] for p in prompts]
    got = dict(generate_many(model, prompts, 60, slots=2, no_repeat_ngram=4))
    grams = lambda r: [tuple(r[i:i + 4]) for i in range(len(r) - 3)]
    assert any(len(set(grams(r))) < len(grams(r)) for r in plain)  # greedy decoding of a random model loops
    assert all(len(set(grams(r))) == len(grams(r)) for r in static)  # no 4-gram twice
    assert [got[i] for i in range(3)] == static
    bf16 = dict(generate_many(model.to(torch.bfloat16), prompts, 60, slots=2, no_repeat_ngram=4))  # bf16 logits (CUDA's)
    assert all(len(set(grams(r))) == len(grams(r)) for r in bf16.values())


def test_decode_attention_of_rows_at_their_own_lengths_equals_the_textbook_formula():
    """One query per row, each row seeing its own number of keys (continuous batching), 3 query heads per KV head:
    bf16 takes another kernel than float32 and float16 on CPU, and each must group the heads and mask the rows rightly."""
    torch.manual_seed(0)
    B, KVH, n_rep, S, D = 4, 2, 3, 40, 16
    q, k, v = torch.randn(B, KVH * n_rep, 1, D), torch.randn(B, KVH, S, D), torch.randn(B, KVH, S, D)
    seen = torch.tensor([5, 40, 17, 1])  # keys each row may see
    mask = (torch.arange(S)[None] < seen[:, None])[:, None, None, :]  # (B, 1, 1, S)
    kk, vv = k.double().repeat_interleave(n_rep, 1), v.double().repeat_interleave(n_rep, 1)
    scores = (q.double() @ kk.transpose(-1, -2) / D ** 0.5).masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ vv
    for dtype, atol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]:
        got = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask)
        assert got.shape == (B, KVH * n_rep, 1, D) and got.dtype == dtype
        assert torch.allclose(got.double(), want, atol=atol), dtype


def test_the_few_row_cpu_linear_equals_nn_linear():
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=True)
    for dtype, atol in [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)]:
        layer.to(dtype)
        for shape in [(1, 1, 24), (3, 5, 24), (200, 24)]:  # one decode row (torch.mv), a short prefill, >128 rows
            x = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                want = torch.nn.functional.linear(x, layer.weight, layer.bias)
                assert layer(x).shape == want.shape and torch.allclose(layer(x), want, atol=atol)


def test_a_request_that_cannot_fit_is_refused_before_any_decoding(checkpoints):
    model = Transformer.from_pretrained(checkpoints["mistral"][0]).eval()
    model.config.sliding_window = 16
    answers = generate_many(model, [[3, 4], [3, 4, 5]], [5, 15], slots=2)
    with pytest.raises(ValueError, match=r"prompt 1: 18 tokens is longer than the model's sliding_window \(16\)"):
        next(answers)
    assert model.layers[0].self_attn.cache is None  # nothing was allocated or decoded


@pytest.mark.parametrize("name", ["llama3", "glm"])
def test_continuous_decode_step_compiles_to_one_graph_reused_at_every_step(checkpoints, name, monkeypatch):
    import generate as gen
    model = Transformer.from_pretrained(checkpoints[name][0]).eval()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (6, 9, 4, 11)]
    eager = dict(generate_many(model, prompts, [8, 20, 5, 14], slots=2))  # attention over the filled part only
    monkeypatch.setattr(gen, "decode_rows", torch.compile(gen.decode_rows, backend=counting_backend, fullgraph=True))
    compiled = dict(generate_many(model, prompts, [8, 20, 5, 14], slots=2, compile=True))  # whole rows on CPU too
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    assert compiled == eager


# -----------------------------------------------------------------------------
# the context window and why answers end

def test_a_prompt_plus_answer_past_the_context_is_refused_naming_both_numbers(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()  # max_position_embeddings 64
    with pytest.raises(ValueError, match=r"40 prompt tokens \+ max_new_tokens 30 = 70 tokens, more than the model's "
                                         r"context of 64 tokens.*at most 24 new tokens"):
        generate(model, [list(range(3, 43))], max_new_tokens=30)
    with pytest.raises(ValueError, match="context of 64"):
        list(generate_many(model, [[3, 4], list(range(3, 43))], [5, 30]))
    assert fit_new_tokens(model, 40, 0) == 24 and fit_new_tokens(model, 40, 0, context=50) == 10  # 0: fill it
    with pytest.raises(ValueError, match="fill the model's context of 64"):
        fit_new_tokens(model, 64, 0)


def test_a_cpu_cache_larger_than_the_free_memory_is_refused_before_decoding(checkpoints, monkeypatch):
    """A CPU takes the zeros of the cache page by page, so an oversized cache was not refused when made: the
    process was killed minutes later (the demo's --slots 64 on SmolLM2: 24 GB on a 23 GB machine)."""
    import generate as gen
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    cfg = model.config
    row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # bytes per token of a row, float32
    monkeypatch.setattr(gen, "free_memory", lambda: 3 * 20 * row)  # room for 3 rows of 20 tokens
    assert len(dict(gen.generate_many(model, [[3, 4]] * 3, 18, slots=8))) == 3  # 3 rows used of 8: fits
    with pytest.raises(ValueError, match=r"KV cache of 4 rows x 20 tokens needs .* GiB, more than the .* GiB of memory "
                                         r"available: decode fewer rows at once \(--slots"):
        list(gen.generate_many(model, [[3, 4]] * 4, 18, slots=8))
    with pytest.raises(ValueError, match="KV cache of 4 rows x 20 tokens"):
        generate(model, [[3, 4]] * 4, 18)
    monkeypatch.setattr(gen, "free_memory", lambda: 0)  # not known (no /proc/meminfo): nothing is refused
    assert len(dict(gen.generate_many(model, [[3, 4]] * 4, 18, slots=8))) == 4


def test_an_answer_that_used_its_whole_limit_is_marked_cut(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    free = generate(model, [[3, 4, 5]], max_new_tokens=20, temperature=0)[0]
    stopped = generate(model, [[3, 4, 5]], max_new_tokens=20, stop_ids=[free[5]], temperature=0)[0]
    assert finish_reason(free, 20) == "length" and finish_reason(stopped, 20) == "stop" and len(stopped) == 5


def test_one_waiting_request_decodes_one_row_not_every_slot(checkpoints, monkeypatch):
    import generate as gen
    model = Transformer.from_pretrained(checkpoints["llama"][0]).eval()
    rows_seen = []
    step = gen.decode_rows
    monkeypatch.setattr(gen, "decode_rows", lambda m, toks, *a: rows_seen.append(toks.shape[0]) or step(m, toks, *a))
    alone = generate(model, [[3, 4, 5]], max_new_tokens=10, temperature=0)[0]
    assert dict(gen.generate_many(model, [[3, 4, 5]], 10, slots=1))[0] == alone
    rows_seen.clear()
    requests = iter([("only", [3, 4, 5], 10, [], 0.0)])
    out = dict(gen.continuous(model, lambda block: next(requests, None), slots=8, row_len=32))
    assert out["only"] == alone and set(rows_seen) == {1}  # 8 slots, one request: one row decoded per step
