"""train_dpo.py: the DPO loss by hand, cached vs live reference, packing, a tiny run, pair building."""
import json
import math
import os
import subprocess
import sys

import numpy as np

import pytest
import torch

from dataset import Tokenizer, load_packed, parse_dpo
from model import ModelConfig, Transformer
from chat_server import ChatServer
from train_dpo import DPOConfig, build_pairs, builtin_dpo_data, dpo_loss, pick_pair, sequence_logps, train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    return builtin_dpo_data(str(path), seed=0, count=48)


def run(pairs, out, **kw):
    data, tok = pairs
    base = dict(model="tiny", data=data, tokenizer=tok, out=str(out), max_tokens=1024, batch_rows=4, lr=3e-4,
                beta=0.5, weight_decay=0.0, device="cpu", max_steps=2)
    return train(DPOConfig(**{**base, **kw}))


def test_loss_and_rewards_equal_a_hand_computation():
    pc, pr, rc, rr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -4.0]), \
        torch.tensor([-11.0, -5.0])
    loss, reward_c, reward_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: rewards 0.5*(1) = 0.5 and 0.5*(-1) = -0.5, margin 1; pair 2: 0 and 1, margin -1
    assert torch.allclose(reward_c, torch.tensor([0.5, 0.0])) and torch.allclose(reward_r, torch.tensor([-0.5, 1.0]))
    assert torch.allclose(loss, torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))]))


def test_at_initialization_the_loss_is_log_2(pairs, tmp_path):
    first = run(pairs, tmp_path, max_steps=1)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["accuracy"] == 0 and first["margin"] == pytest.approx(0, abs=1e-6)


def test_cached_and_live_reference_give_the_same_loss_and_gradients(pairs, tmp_path):
    cached = run(pairs, tmp_path / "cached", max_steps=3)
    live = run(pairs, tmp_path / "live", max_steps=3, live_reference=True)
    for a, b in zip(cached, live):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa = Transformer.from_pretrained(tmp_path / "cached" / "step_3").state_dict()
    wb = Transformer.from_pretrained(tmp_path / "live" / "step_3").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_packed_chosen_and_rejected_equal_running_them_separately(pairs):
    data, tok_dir = pairs
    packed = load_packed(data, Tokenizer(tok_dir), max_tokens=1024, kind="dpo", log=lambda s: None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=Tokenizer(tok_dir).vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    row = packed.row(0)
    with torch.no_grad():
        together = sequence_logps(model, [row], "cpu")
        cu = row["cu_seqlens"]
        for d in range(len(cu) - 1):
            a, b = cu[d], cu[d + 1]
            ids, targets = torch.tensor(row["ids"][a:b])[None], torch.tensor(row["targets"][a:b])[None]
            alone = model(ids, targets=targets).sum()
            assert together[d] == pytest.approx(alone.item(), rel=1e-5)


def test_a_tiny_run_learns_a_synthetic_preference(pairs, tmp_path):
    log = run(pairs, tmp_path, max_steps=12)
    assert log[0]["accuracy"] == 0 and log[-1]["accuracy"] == 1.0
    assert log[-1]["margin"] > 1.0 and log[-1]["loss"] < 0.3


class Scripted:
    """A sampler whose answers have known lengths."""

    def __init__(self, lengths):
        self.lengths, self.calls = lengths, 0

    def complete(self, messages, max_tokens, temperature=0.7):
        n = self.lengths[self.calls % len(self.lengths)]
        self.calls += 1
        return " ".join(["word"] * n), "stop"


def test_an_endpoint_sampler_is_sent_the_system_turn_and_top_p_it_is_recorded_with(tmp_path):
    """--system was recorded as a sample's setting but never sent to a --sampler-model endpoint, and --top-p was
    refused there although the endpoint takes it."""
    lengths = iter([100, 300])
    server = ChatServer(lambda c: "word " * next(lengths) + "end.")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 100-word note."}) + "\n")
    cfg = lambda **kw: DPOConfig(**{"build_pairs": str(inputs), "pairs_out": str(tmp_path / "pairs.jsonl"), "samples": 2,
                                    "workers": 1, "api_base": server.url, "sampler_model": "m", **kw})
    build_pairs(cfg(system="Be brief.", top_p=0.9), log=lambda s: None)
    assert [c["body"]["messages"][0] for c in server.calls] == [{"role": "system", "content": "Be brief."}] * 2
    assert [c["body"]["top_p"] for c in server.calls] == [0.9, 0.9]
    cached = [json.loads(l) for l in open(tmp_path / "pairs.jsonl.samples.jsonl")]
    assert {(r["generation"]["system"], r["generation"]["top_p"]) for r in cached if "generation" in r} == {("Be brief.", 0.9)}
    # DPO trains on the prompt the answers were sampled under, system turn included (it took the template's default)
    [pair] = [json.loads(l) for l in open(tmp_path / "pairs.jsonl")]
    assert pair["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a 100-word note."}]
    assert parse_dpo(pair)[0] == pair["prompt"] and pair["chosen"].startswith("word ") and pair["chosen_score"] > 99
    with pytest.raises(ValueError, match="--temperature 0: the samples of an instruction would all be the same"):
        build_pairs(cfg(temperature=0.0, pairs_out=str(tmp_path / "other.jsonl")), log=lambda s: None)
    with pytest.raises(ValueError, match="--repetition-penalty and --no-repeat-ngram apply to in-process sampling"):
        build_pairs(cfg(repetition_penalty=1.1, pairs_out=str(tmp_path / "other.jsonl")), log=lambda s: None)
    server.close()


def test_the_pair_tool_exits_nonzero_when_instructions_failed_or_no_pair_was_written(tmp_path):
    """It printed "0 pairs -> pairs.jsonl" and exited 0 without writing the file, and a failed instruction also
    exited 0: a script that builds pairs, then trains, stopped only at "data file not found"."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 100-word note."}) + "\n" + json.dumps({"prompt": "Fail, 90 words."}) + "\n")
    fail = lambda call: (400, '{"error": "bad request"}', {}, 0) if "Fail" in call["content"] else None
    server = ChatServer(lambda c: "the same answer every time.", fail)
    cli = lambda *extra: subprocess.run([sys.executable, "train_dpo.py", "--build-pairs", str(inputs), "--sampler-model", "m",
                                         "--api-base", server.url, "--pairs-out", str(tmp_path / "pairs.jsonl"),
                                         "--samples", "2", *extra],
                                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    run = cli()
    assert run.returncode == 1 and "error: 1 instructions failed" in run.stderr and "HTTP 400" in run.stdout
    server.behave = lambda call: None  # the failed one answers now, as every other: no pair anywhere
    run = cli()
    assert run.returncode == 1 and "error: no pair was written to" in run.stderr and "nothing to train DPO on" in run.stderr
    assert not (tmp_path / "pairs.jsonl").exists()
    server.close()


def test_pair_building_picks_the_answer_whose_length_is_closest_to_the_request(tmp_path):
    chosen, rejected, (sc, sr) = pick_pair(100, ["w " * 50, "w " * 95, "w " * 300, "w " * 120])
    assert len(chosen.split()) == 95 and len(rejected.split()) == 300  # S_l 94.7 vs 33.3
    assert pick_pair(100, ["w " * 100, "w " * 100]) is None and pick_pair(100, ["w " * 90]) is None
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write a 200-word note."}) + "\n" +
                      json.dumps({"prompt": "Anything", "length": 400}) + "\n")
    cfg = DPOConfig(build_pairs=str(inputs), pairs_out=str(tmp_path / "pairs.jsonl"), samples=3, workers=1)
    sampler = Scripted([100, 190, 600])
    counts = build_pairs(cfg, sampler=sampler, log=lambda s: None)
    out = [json.loads(l) for l in open(tmp_path / "pairs.jsonl")]
    assert counts["pairs"] == 2 and [o["length"] for o in out] == [200, 400]
    assert [len(o["chosen"].split()) for o in out] == [190, 600] and [len(o["rejected"].split()) for o in out] == [600, 100]
    # resumable: a rerun samples nothing more; the pairs file is a DPO file dataset.py reads
    again = build_pairs(cfg, sampler=sampler, log=lambda s: None)
    assert again["pairs"] == 0 and again["earlier"] == 2 and sampler.calls == 6
    from dataset import parse_dpo, read_jsonl
    assert len(read_jsonl(str(tmp_path / "pairs.jsonl"), parse_dpo)[0]) == 2


def test_an_instruction_without_a_length_is_named(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write something."}) + "\n")
    cfg = DPOConfig(build_pairs=str(inputs), pairs_out=str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match=r"in.jsonl:1: no \"length\" field"):
        build_pairs(cfg, sampler=Scripted([1]), log=lambda s: None)
    inputs.write_text(json.dumps({"prompt": "Write something.", "length": 100}) + "\n")
    for overwrite in (False, True):  # with --overwrite it deleted the instructions before writing pairs there
        with pytest.raises(ValueError, match="--pairs-out .*in.jsonl: the --build-pairs file"):
            build_pairs(DPOConfig(build_pairs=str(inputs), pairs_out=str(inputs), overwrite=overwrite),
                        sampler=Scripted([1]), log=lambda s: None)
    assert json.loads(inputs.read_text())["length"] == 100
    with pytest.raises(ValueError, match="--samples 1: a pair needs at least 2 answers"):  # sampled, then no pair
        build_pairs(DPOConfig(build_pairs=str(inputs), pairs_out=str(tmp_path / "p.jsonl"), samples=1),
                    sampler=Scripted([1]), log=lambda s: None)
    assert not (tmp_path / "p.jsonl.samples.jsonl").exists()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_with_an_odd_number_of_rows_match_one_rank_and_save(tmp_path):
    from test_train_sft import free_port
    data, tok = builtin_dpo_data(str(tmp_path / "pairs"), seed=0, count=13)  # sorted: 13 rows, one pair each
    args = ["train_dpo.py", "--model", "tiny", "--data", data, "--tokenizer", tok, "--max-tokens", "1024",
            "--packing", "sorted", "--batch-rows", "4", "--lr", "3e-3", "--beta", "0.5", "--device", "cpu",
            "--max-steps", "3"]
    train(DPOConfig(model="tiny", data=data, tokenizer=tok, max_tokens=1024, packing="sorted", batch_rows=4, lr=3e-3,
                    beta=0.5, device="cpu", max_steps=3, out=str(tmp_path / "one")))  # one process: this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port())] + args + ["--out", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert len(read("one")) == len(read("two")) == 3
    for a, b in zip(read("one"), read("two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa = Transformer.from_pretrained(tmp_path / "one" / "step_3").state_dict()
    wb = Transformer.from_pretrained(tmp_path / "two" / "step_3").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)  # embeddings, norm and lm_head updated too


def test_the_reference_cache_is_keyed_by_data_and_weights(pairs, tmp_path):
    first = run(pairs, tmp_path, max_steps=1, seed=0)
    again = run(pairs, tmp_path, max_steps=1, seed=1, overwrite=True)  # other starting weights, same folder
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and again[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    data, tok = pairs
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(open(data).readlines()[:6]))
    log = run((str(fewer), tok), tmp_path, max_steps=1, seed=1, batch_rows=2, overwrite=True)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    caches = sorted(f for f in os.listdir(tmp_path) if f.startswith("reference_logps-"))
    assert len(caches) == 3 and sorted(len(np.load(tmp_path / f)) for f in caches) == [10, 80, 80]  # 2 per pair that fits a row


def tiny_checkpoint(tmp_path, seed=0, sharp=1.0):
    from dataset import write_builtin
    data, tok_dir = write_builtin(str(tmp_path / "data"), count=4, max_words=200)
    tok = Tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharp)  # sharp > 1: peaked logits, so the untrained model loops like a weak one
    model.save_pretrained(tmp_path / "ckpt")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / "ckpt" / f).write_bytes((tmp_path / "data" / f).read_bytes())
    return str(tmp_path / "ckpt"), tok


def cached_samples(path) -> dict:
    return {(r["index"], r["k"]): r["text"] for r in map(json.loads, open(path)) if r["kind"] == "sample"}


def test_local_pair_sampling_is_the_same_run_after_run(tmp_path):
    ckpt, tok = tiny_checkpoint(tmp_path)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the ocean .", "length": n}) + "\n"
                              for n in (100, 200, 300)))
    samples = []
    for name in ("a", "b"):
        cfg = DPOConfig(model=ckpt, build_pairs=str(inputs), pairs_out=str(tmp_path / f"{name}.jsonl"),
                        samples=3, max_new_tokens=40, temperature=1.0, workers=4, device="cpu")
        counts = build_pairs(cfg, log=lambda s: None)
        assert counts["pairs"] + counts["no_pair"] == 3
        samples.append(cached_samples(tmp_path / f"{name}.jsonl.samples.jsonl"))
    assert len(samples[0]) == 9 and samples[0] == samples[1]
    assert len(set(samples[0].values())) > 1  # sampled, not one answer repeated


def test_pair_samples_decode_as_asked_and_are_never_reused_from_another_model(tmp_path):
    """A small model's pairs must be sampled the way it is evaluated (repetition penalty, n-gram ban), and a rerun
    after a new SFT into the same --pairs-out must not build pairs from the old model's cached answers."""
    ckpt, tok = tiny_checkpoint(tmp_path, sharp=50.0)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": f"write a {n} word essay about the ocean .", "length": n}) + "\n"
                              for n in (100, 200)))

    def repeated_trigrams(text):
        ids = tok.encode(text)
        grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        return len(grams) - len(set(grams))

    base = dict(model=ckpt, build_pairs=str(inputs), samples=2, max_new_tokens=60, temperature=0.5, workers=4, device="cpu")
    plain = DPOConfig(**base, pairs_out=str(tmp_path / "plain.jsonl"))
    banned = DPOConfig(**base, pairs_out=str(tmp_path / "banned.jsonl"), top_p=0.9, no_repeat_ngram=3)
    penalized = DPOConfig(**base, pairs_out=str(tmp_path / "penalized.jsonl"), repetition_penalty=1.3)
    for cfg in (plain, banned, penalized):
        build_pairs(cfg, log=lambda s: None)
    loose, strict, other = (cached_samples(c.pairs_out + ".samples.jsonl") for c in (plain, banned, penalized))
    assert sum(map(repeated_trigrams, loose.values())) > 0  # the untrained model loops when nothing stops it
    assert sum(map(repeated_trigrams, strict.values())) == 0 and other != loose
    record = json.loads(open(banned.pairs_out + ".samples.jsonl").readline())["generation"]
    assert (record["top_p"], record["repetition_penalty"], record["no_repeat_ngram"]) == (0.9, 1.0, 3)

    tiny_checkpoint(tmp_path, seed=1, sharp=50.0)  # new weights in the same folder: another model
    with pytest.raises(ValueError, match=r"banned.jsonl.samples.jsonl: line 1 was made by other settings \(weights"):
        build_pairs(banned, log=lambda s: None)
    tiny_checkpoint(tmp_path, seed=0, sharp=50.0)  # the first weights again: now only the temperature differs
    with pytest.raises(ValueError, match=r"other settings \(temperature: 0.5 there, 0.7 now"):
        build_pairs(DPOConfig(**{**base, "temperature": 0.7}, pairs_out=banned.pairs_out, top_p=0.9, no_repeat_ngram=3),
                    log=lambda s: None)
    with pytest.raises(ValueError, match=r"other settings \(template: None there, 'inst' now"):  # other prompts
        build_pairs(DPOConfig(**base, template="inst", pairs_out=banned.pairs_out, top_p=0.9, no_repeat_ngram=3),
                    log=lambda s: None)
    inputs.write_text(json.dumps({"prompt": "write a 300 word story .", "length": 300}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 answers another instruction than instruction 0 now"):
        build_pairs(banned, log=lambda s: None)
    build_pairs(DPOConfig(**{**vars(banned), "overwrite": True}), log=lambda s: None)  # --overwrite starts afresh
    assert len(cached_samples(banned.pairs_out + ".samples.jsonl")) == 2


def test_an_endpoint_sampler_refuses_in_process_decoding_flags(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write 100 words.", "length": 100}) + "\n")
    cfg = DPOConfig(build_pairs=str(inputs), pairs_out=str(tmp_path / "p.jsonl"), repetition_penalty=1.1)
    with pytest.raises(ValueError, match="apply to in-process sampling with --model"):
        build_pairs(cfg, sampler=Scripted([1]), log=lambda s: None)
    assert not os.path.exists(tmp_path / "p.jsonl.samples.jsonl")


def test_empty_samples_never_enter_a_pair(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Anything", "length": 100}) + "\n" + json.dumps({"prompt": "More", "length": 100}) + "\n")
    cfg = DPOConfig(build_pairs=str(inputs), pairs_out=str(tmp_path / "pairs.jsonl"), samples=3, workers=1)
    build_pairs(cfg, sampler=Scripted([0, 90, 300, 0, 0, 95]), log=lambda s: None)  # "" scores 0 but is no answer
    out = [json.loads(l) for l in open(tmp_path / "pairs.jsonl")]
    assert len(out) == 1 and [len(out[0]["chosen"].split()), len(out[0]["rejected"].split())] == [90, 300]
    from dataset import parse_dpo, read_jsonl
    assert len(read_jsonl(str(tmp_path / "pairs.jsonl"), parse_dpo)[0]) == 1


def test_an_answer_cut_at_the_limit_is_never_chosen_and_small_margins_make_no_pair():
    answers = ["w " * 100, "w " * 60, "w " * 400]  # S_l 100 (but cut), 66.7, 0
    chosen, rejected, _ = pick_pair(100, answers, cut=[True, False, False])
    assert len(chosen.split()) == 60 and len(rejected.split()) == 400
    assert pick_pair(100, answers, cut=[True, True, True]) is None  # nothing finished: no pair
    assert pick_pair(100, ["w " * 100, "w " * 97], min_margin=5.0) is None  # 100 vs 98.5: no clear preference
    assert pick_pair(100, ["w " * 100, "w " * 60], min_margin=5.0) is not None


class CutSampler:
    """The longest (best-scoring) answer comes back cut at the token limit, as a capped model's would."""

    def __init__(self):
        self.calls = 0

    def complete(self, messages, max_tokens, temperature=0.7):
        n = [100, 70, 300][self.calls % 3]
        self.calls += 1
        return " ".join(["word"] * n), "length" if n == 100 else "stop"


def test_the_pair_tool_records_why_samples_ended_and_skips_cut_ones(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Write 100 words.", "length": 100}) + "\n")
    cfg = DPOConfig(build_pairs=str(inputs), pairs_out=str(tmp_path / "pairs.jsonl"), samples=3, workers=1)
    build_pairs(cfg, sampler=CutSampler(), log=lambda s: None)
    pair = json.loads(open(tmp_path / "pairs.jsonl").read())
    assert len(pair["chosen"].split()) == 70 and len(pair["rejected"].split()) == 300
    samples = [json.loads(l) for l in open(tmp_path / "pairs.jsonl.samples.jsonl")]
    assert sorted(s["finish_reason"] for s in samples) == ["length", "stop", "stop"]
