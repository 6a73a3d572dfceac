"""train_sft.py: the length-normalized loss over packed rows, accumulation, resume, 2 ranks, errors."""
import json
import os
import platform
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_sft
from cli import run_cli
from dataset import pack, write_builtin
from model import ModelConfig, Transformer, compute_dtype
from train_sft import TrainConfig, global_counts, lr_at, micro_batch_loss, step_dirs, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    data, tok = write_builtin(str(path), count=80, min_words=100, max_words=400, seed=1)
    return data, tok


def run(corpus, out, **kw):
    data, tok = corpus
    base = dict(model="tiny", data=data, tokenizer=tok, out=str(out), max_tokens=512, batch_rows=4, lr=3e-3,
                weight_decay=0.0, device="cpu", max_steps=4)
    return [r["loss"] for r in train(TrainConfig(**{**base, **kw}))]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8))


def random_conversations(n, seed=0):
    rng = np.random.default_rng(seed)
    convs = []
    for _ in range(n):
        length = int(rng.integers(4, 40))
        ids = rng.integers(0, 50, length).tolist()
        cut = int(rng.integers(1, length - 1))
        convs.append((ids, [-100] * cut + ids[cut:]))
    return convs


def reference_loss(model, convs, reduction):
    """Each conversation alone through the model; token mean or mean of per-conversation means."""
    nll, counts = [], []
    for ids, labels in convs:
        logits = model(torch.tensor([ids]))[0]
        targets = torch.tensor(labels[1:] + [-100])
        lp = torch.log_softmax(logits, -1).gather(1, targets.clamp_min(0)[:, None])[:, 0] * (targets != -100)
        nll.append(-lp.sum())
        counts.append(int((targets != -100).sum()))
    if reduction == "token":
        return sum(nll) / sum(counts)
    return sum(n / c for n, c in zip(nll, counts)) / len(convs)


def packed_loss(model, convs, reduction, max_tokens, micro_rows):
    """The training loss over all rows, as train() computes it: micro-batches summed."""
    packed, _, _ = pack([[c] for c in convs], max_tokens)
    rows = [packed.row(r) for r in range(len(packed))]
    n_tokens, n_convs = global_counts(rows)
    return sum(micro_batch_loss(model, rows[i:i + micro_rows], reduction, n_tokens, n_convs, "cpu")
               for i in range(0, len(rows), micro_rows))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_packed_loss_equals_conversations_run_one_by_one(reduction):
    model, convs = tiny_model(), random_conversations(12)
    ref = reference_loss(model, convs, reduction)
    assert torch.allclose(packed_loss(model, convs, reduction, 64, 1), ref, atol=1e-5)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_loss_and_gradients_do_not_depend_on_rows_or_accumulation(reduction):
    model, convs = tiny_model(), random_conversations(16, seed=1)
    grads = []
    for max_tokens, micro_rows in ((48, 1), (48, 3), (120, 1), (1000, 1)):
        model.zero_grad()
        loss = packed_loss(model, convs, reduction, max_tokens, micro_rows)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, g in grads[1:]:
        assert torch.allclose(loss, grads[0][0], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, grads[0][1]))


def test_the_two_reductions_weigh_long_and_short_answers_differently():
    model = tiny_model()
    convs = random_conversations(2, seed=5)
    long_conv = (list(range(40)), [-100] * 2 + list(range(2, 40)))
    token = packed_loss(model, convs + [long_conv], "token", 200, 1)
    sequence = packed_loss(model, convs + [long_conv], "sequence", 200, 1)
    assert not torch.allclose(token, sequence)


def test_schedule_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0.1


def test_gradient_accumulation_4x1_equals_1x4(corpus, tmp_path):
    a = run(corpus, tmp_path / "a", micro_rows=1)
    b = run(corpus, tmp_path / "b", micro_rows=4)
    assert np.allclose(a, b, rtol=1e-5)
    wa = Transformer.from_pretrained(tmp_path / "a" / "step_4").state_dict()
    wb = Transformer.from_pretrained(tmp_path / "b" / "step_4").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_resumed_run_equals_the_uninterrupted_one(corpus, tmp_path):
    full = run(corpus, tmp_path / "full", max_steps=6, save_every=3, keep=0)
    # the state an interruption after step 4 leaves: checkpoint at 3, log lines up to 4, no step_6
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "step_6")
    (cut / "latest").write_text("step_3\n")
    lines = (cut / "log.jsonl").read_text().splitlines()[:4]
    (cut / "log.jsonl").write_text("\n".join(lines) + "\n")
    resumed = run(corpus, cut, max_steps=6, save_every=3, keep=0, resume=True)
    assert resumed == full[3:]  # bit for bit
    assert [json.loads(l)["step"] for l in (cut / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_frozen_layers_keep_their_weights_and_a_frozen_run_resumes_exactly(corpus, tmp_path):
    straight = run(corpus, tmp_path / "straight", freeze_layers=1)
    first = run(corpus, tmp_path / "cut", freeze_layers=1, stop_at=2)
    assert run(corpus, tmp_path / "cut", freeze_layers=1, resume=True) == straight[2:] and first == straight[:2]
    vocab = Transformer.from_pretrained(tmp_path / "straight" / "step_4").config.vocab_size
    start = train_sft.build_model(train_sft.model_config("tiny", vocab)[0], None, 0, 1, torch.device("cpu"),
                                  torch.float32).state_dict()
    end = Transformer.from_pretrained(tmp_path / "straight" / "step_4").state_dict()
    fixed = [k for k in start if k.startswith(("embed_tokens", "lm_head", "layers.0."))]
    assert len(fixed) > 3 and all(torch.equal(start[k], end[k]) for k in fixed)  # embeddings, tied head, block 0
    assert all(not torch.equal(start[k], end[k]) for k in start if k.startswith("layers.1."))
    with pytest.raises(ValueError, match="--freeze-layers 3: the model has 2 blocks"):
        run(corpus, tmp_path / "bad", freeze_layers=3)
    with pytest.raises(ValueError, match=r"packed rows, fewer than one batch of 1000 \(--batch-rows \d+ or fewer"):
        run(corpus, tmp_path / "bad", batch_rows=1000)
    with pytest.raises(ValueError, match=r"nothing to train on \(no conversation fits --max-tokens 16\)"):
        run(corpus, tmp_path / "bad", max_tokens=16)
    short_context = tmp_path / "short.json"  # rows of 512 tokens; conversations past 128 trained unseen positions
    vocab = train_sft.load_tokenizer(corpus[1]).vocab_size
    short_context.write_text(json.dumps({**train_sft.PRESETS["tiny"], "max_position_embeddings": 128, "vocab_size": vocab}))
    with pytest.raises(ValueError, match=r"a conversation of \d+ tokens is longer than the model's context of 128 .*"
                                         r"--max-tokens 128 leaves such ones out"):
        run(corpus, tmp_path / "bad", model=str(short_context))


def test_dtype_bfloat16_autocasts_on_cpu_too_and_the_default_there_stays_float32(corpus, tmp_path):
    cpu = torch.device("cpu")
    assert compute_dtype(TrainConfig().dtype, cpu) == torch.float32
    assert compute_dtype(TrainConfig().dtype, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype 'bf16': choose one of float32, bfloat16, float16"):
        run(corpus, tmp_path / "bad", dtype="bf16")
    with train_sft.autocast_for(TrainConfig(dtype="bfloat16"), cpu, 1):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fp32, bf16 = run(corpus, tmp_path / "fp32", max_steps=2), run(corpus, tmp_path / "bf16", max_steps=2, dtype="bfloat16")
    assert fp32 != bf16 and np.allclose(fp32, bf16, rtol=0.02)  # computed in bf16, close to float32's losses
    weights = Transformer.from_pretrained(tmp_path / "bf16" / "step_2").state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights (and export) stay float32


def test_a_tiny_model_drives_its_loss_well_down(corpus, tmp_path):
    losses = run(corpus, tmp_path, max_steps=80, lr=5e-3)
    assert losses[0] > 5.0 and losses[-1] < 0.4 * losses[0]  # from ~ln(vocab) to well under half


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = train_sft.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1  # batch_rows 4, micro_rows 1: four calls per step; step 3 starts at call 9
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 9 else loss
    monkeypatch.setattr(train_sft, "micro_batch_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 3: loss is nan.*step_2"):
        run(corpus, tmp_path, max_steps=5, save_every=2)
    assert (tmp_path / "latest").read_text().strip() == "step_2"
    Transformer.from_pretrained(tmp_path / "step_2")  # intact and loadable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_or_corrupt_data_gives_a_clear_error(corpus, tmp_path):
    _, tok = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{broken\n")
    for data, message in ((tmp_path / "missing.jsonl", "missing.jsonl: data file not found"),
                          (bad, "bad.jsonl:2: not valid JSON")):
        out = run_cli("train_sft.py", "--model", "tiny", "--data", data, "--tokenizer", tok, "--out", tmp_path / "out")
        assert out.returncode != 0 and message in out.stderr  # a traceback: raised here


class InfGradient(torch.autograd.Function):
    """The identity whose gradient is infinite: a finite loss that poisons the update."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_an_inf_gradient_stops_before_the_update_and_no_nan_checkpoint_is_saved(corpus, tmp_path, monkeypatch):
    real = train_sft.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return InfGradient.apply(loss) if calls["n"] == 9 else loss  # step 3, loss still finite
    monkeypatch.setattr(train_sft, "micro_batch_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 3: gradient norm is (nan|inf).*step_2"):
        run(corpus, tmp_path, max_steps=5, save_every=2)
    assert step_dirs(str(tmp_path)) == ["step_2"] and (tmp_path / "latest").read_text().strip() == "step_2"
    weights = Transformer.from_pretrained(tmp_path / "step_2").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_fresh_run_refuses_another_runs_checkpoints_unless_told_to_overwrite(corpus, tmp_path):
    run(corpus, tmp_path, max_steps=6, save_every=3)  # another run: step_3 and step_6
    with pytest.raises(ValueError, match="already holds checkpoints .*--overwrite"):
        run(corpus, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"--model .*step_3 lies in .*step_3, which --overwrite would delete"):
        run(corpus, tmp_path, model=str(tmp_path / "step_3"), max_steps=2, overwrite=True)  # it deleted step_3, then failed
    assert step_dirs(str(tmp_path)) == ["step_3", "step_6"]
    run(corpus, tmp_path, max_steps=2, overwrite=True, keep=1)
    assert step_dirs(str(tmp_path)) == ["step_2"] and (tmp_path / "latest").read_text().strip() == "step_2"
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_nothing_to_resume_from_is_an_error(corpus, tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="--resume: .* has no checkpoint to resume from"):
        run(corpus, tmp_path, resume=True)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing truncated


def test_stop_at_keeps_the_schedule_and_resume_refuses_changed_settings(corpus, tmp_path):
    straight = run(corpus, tmp_path / "straight", max_steps=6)
    first = run(corpus, tmp_path / "cut", max_steps=6, stop_at=3)
    assert first == straight[:3] and step_dirs(str(tmp_path / "cut")) == ["step_3"]
    for changed, message in ((dict(max_steps=8), "--max-steps 6 -> 8"), (dict(lr=1e-3), "--lr 0.003 -> 0.001"),
                             (dict(batch_rows=2), "--batch-rows 4 -> 2")):
        with pytest.raises(ValueError, match=message):
            run(corpus, tmp_path / "cut", **{"max_steps": 6, "resume": True, **changed})
    assert run(corpus, tmp_path / "cut", max_steps=6, resume=True, log_every=2) == straight[3:]  # bit for bit


def test_resume_refuses_a_data_file_whose_contents_changed(corpus, tmp_path):
    """Same path, other records (AgentWrite appended some): the resumed batches would be neither run's."""
    data, tok = corpus
    mine = tmp_path / "data.jsonl"
    shutil.copy(data, mine)
    run((str(mine), tok), tmp_path / "run", max_steps=4, stop_at=2)
    original = mine.read_text()
    mine.write_text(original + original.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"other settings \(the contents of .*data.jsonl \(not those it was trained on"):
        run((str(mine), tok), tmp_path / "run", max_steps=4, resume=True)
    mine.write_text(original)
    assert len(run((str(mine), tok), tmp_path / "run", max_steps=4, resume=True)) == 2


def test_a_tokenizer_of_another_model_is_refused_before_training(corpus, tmp_path):
    """Ids past the model's vocabulary were an IndexError deep in the embedding (SmolLM2 with Llama 3's tokenizer)."""
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16).to_hf()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"token id \d+ of the data is past the model's vocabulary of 50: the tokenizer"):
        run(corpus, tmp_path / "run", model=str(tmp_path / "config.json"))


def torchrun(args, tmp_path, name):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port())] + args + ["--out", str(tmp_path / name)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(l)["loss"] for l in (tmp_path / name / "log.jsonl").read_text().splitlines()]


def test_two_ranks_killed_and_resumed_equal_the_straight_run_and_export_loads_in_transformers(corpus, tmp_path):
    data, tok = corpus
    args = ["train_sft.py", "--model", "tiny", "--data", data, "--tokenizer", tok, "--max-tokens", "512",
            "--batch-rows", "4", "--lr", "3e-3", "--device", "cpu", "--max-steps", "4", "--save-every", "2"]
    straight = torchrun(args, tmp_path, "straight")
    torchrun(args + ["--stop-at", "2"], tmp_path, "cut")
    (tmp_path / "cut" / "step_2.tmp").mkdir()  # what a kill during the next save leaves: ignored
    resumed = torchrun(args + ["--resume"], tmp_path, "cut")
    assert len(straight) == 4 and resumed == straight  # bit for bit
    one = [r["loss"] for r in train(TrainConfig(model="tiny", data=data, tokenizer=tok, max_tokens=512, batch_rows=4,
                                                lr=3e-3, device="cpu", max_steps=4, out=str(tmp_path / "one")))]
    assert np.allclose(one, straight, rtol=1e-5)  # two gloo ranks give the losses of one process
    shards = os.listdir(tmp_path / "cut" / "step_4" / "trainer")
    assert sorted(f for f in shards if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    ours = Transformer.from_pretrained(tmp_path / "cut" / "step_4")
    theirs = Transformer.from_pretrained(tmp_path / "straight" / "step_4")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "cut" / "step_4")).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)


def test_a_run_that_fails_before_training_leaves_no_empty_out_folder(tmp_path):
    out = tmp_path / "new-run"
    run = run_cli("train_sft.py", "--model", tmp_path / "nowhere", "--data", tmp_path / "none.jsonl", "--out", out)
    assert run.returncode != 0 and "error:" in run.stderr and not out.exists()


def test_the_export_prompts_in_transformers_as_training_did(corpus, tmp_path):
    """The built-in tokenizer has no chat template of its own: the export writes the one training used."""
    import transformers
    from dataset import Tokenizer, chat_prompt_ids
    run(corpus, tmp_path / "run", max_steps=1)
    export = str(tmp_path / "run" / "step_1")
    messages = [{"role": "user", "content": "write 300 words about the river"}]
    ref = transformers.AutoTokenizer.from_pretrained(export)
    ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == chat_prompt_ids(Tokenizer(export), messages)


STEP_FAULTS = """
import resource, sys, torch
from generate import keep_freed_memory
from train_sft import TrainConfig, train
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
data, tok, out = sys.argv[1:]
keep_freed_memory()  # as a demo's AgentWrite leaves it
torch.ones(512 << 18).sum()  # 512 MB, freed and kept
before = rss()
train(TrainConfig(model="tiny", data=data, tokenizer=tok, out=out, max_tokens=512, batch_rows=4, device="cpu",
                  max_steps=1))
print(before - rss())
for i in range(6):
    if i == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 18).sum()  # 64 MB, freed at once: the size of a long row's logits or MLP activations
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_cpu_training_keeps_freed_memory_during_its_steps_and_gives_it_back_at_the_end(corpus, tmp_path):
    """glibc maps a block of 32 MB or more afresh at each allocation and gives it back at each free: an SFT step of
    SmolLM2 page-faulted ~2 GB in every step, at up to 20 s a step on a VM that hands freed memory to its host. Kept
    after the last step, that memory would stay the process's: a demo's SFT ended holding 14.4 GB."""
    run = subprocess.run([sys.executable, "-c", STEP_FAULTS, *corpus, str(tmp_path / "sft")], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    given_back, faulted = map(int, run.stdout.split()[-2:])
    assert given_back > 256 << 20, given_back  # what was free before SFT went back at its end (~0 if kept)
    assert faulted < 5 * (64 << 20) // 4, faulted  # mapped afresh: 64 MB a time, 320 MB in all
