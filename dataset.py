"""Data for LongWriter SFT and DPO: tokenizers, chat templates, assistant-only labels, packing, a built-in corpus.

Usage:
    tok = load_tokenizer("ckpt_dir")                         # tokenizer.json or tokenizer.model
    ids, labels = encode_chat(tok, record["messages"])       # labels -100 outside assistant turns
    python dataset.py --data sft.jsonl --tokenizer DIR --max-tokens 32768   # tokenize, pack, cache, report
"""
import json
import os
import re

import sentencepiece
import tokenizers


def count_words(text: str) -> int:
    """LongBench-Write's length: every Chinese character counts one, every English word one."""
    return len(re.findall(r"[\u4e00-\u9fff]", text)) + len(re.findall(r"\b[a-zA-Z]+\b", text))


# -----------------------------------------------------------------------------
# chat templates: each returns the conversation as (text, is_target) pieces; the text may hold special
# tokens. A conversation that does not end with an assistant turn gets the generation prompt, so the
# prompt a model sees at inference is byte for byte the one it was trained on.

def llama3_chat(messages, bos, eos):
    parts = [("<|begin_of_text|>", False)]
    for m in messages:
        parts.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        parts.append((m["content"] + "<|eot_id|>", m["role"] == "assistant"))
    if messages[-1]["role"] != "assistant":
        parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return parts


def inst_chat(messages, bos, eos):
    """[INST]...[/INST], the form LongWriter-llama3.1-8b was trained with; a system turn goes in <<SYS>>."""
    parts, system = [(bos, False)], ""
    for m in messages:
        if m["role"] == "system":
            system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
        elif m["role"] == "user":
            parts.append((f"[INST]{system}{m['content']}[/INST]", False))
            system = ""
        else:
            parts.append((m["content"] + eos, True))
    return parts


def glm4_chat(messages, bos, eos):
    parts = [("[gMASK]<sop>", False)]
    for m in messages:
        if m["role"] == "assistant":
            parts += [("<|assistant|>", False), ("\n" + m["content"] + "<|endoftext|>", True)]
        else:
            parts.append((f"<|{m['role']}|>\n{m['content']}", False))
    if messages[-1]["role"] != "assistant":
        parts.append(("<|assistant|>", False))
    return parts


def chatml_chat(messages, bos, eos):
    """Qwen2's ChatML; the newline after <|im_end|> is not a target (the model stops at <|im_end|>)."""
    parts = []
    for m in messages:
        parts.append((f"<|im_start|>{m['role']}\n", False))
        parts.append((m["content"] + "<|im_end|>", m["role"] == "assistant"))
        parts.append(("\n", False))
    if messages[-1]["role"] != "assistant":
        parts.append(("<|im_start|>assistant\n", False))
    return parts


def plain_chat(messages, bos, eos):
    """The built-in word-level tokenizer's template: <s><user> ... <assistant> ... </s>."""
    parts = [("<s>", False)]
    for m in messages:
        if m["role"] == "assistant":
            parts += [("<assistant>", False), (" " + m["content"] + "</s>", True)]
        else:
            parts.append((f"<{m['role']}> {m['content']} ", False))
    if messages[-1]["role"] != "assistant":
        parts.append(("<assistant>", False))
    return parts


TEMPLATES = {"llama3": llama3_chat, "inst": inst_chat, "glm4": glm4_chat, "chatml": chatml_chat, "plain": plain_chat}
END_OF_TURN = {"llama3": "<|eot_id|>", "glm4": "<|endoftext|>", "chatml": "<|im_end|>", "plain": "</s>"}


# -----------------------------------------------------------------------------
# tokenizers

def read_json(file):
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def token_str(value):
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """One interface over tokenizer.json (`tokenizers`) and tokenizer.model (`sentencepiece`).

    encode() never adds special tokens by itself; special-token strings in the text (as the chat
    templates write them) become their ids.
    """

    def __init__(self, path, template=None):
        self.path = path
        json_file, sp_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        self.hf = self.sp = None
        if os.path.isfile(json_file):
            self.hf = tokenizers.Tokenizer.from_file(json_file)
            self.specials = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items()}
        elif os.path.isfile(sp_file):
            self.sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
            self.specials = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                             if self.sp.is_control(i) or self.sp.is_unknown(i)}
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
        config = read_json(os.path.join(path, "tokenizer_config.json"))
        for i, t in (config.get("added_tokens_decoder") or {}).items():
            self.specials.setdefault(t["content"], int(i))
        self.vocab_size = self.hf.get_vocab_size() if self.hf else self.sp.get_piece_size()
        self.bos = token_str(config.get("bos_token")) or ("<s>" if "<s>" in self.specials else "")
        self.eos = token_str(config.get("eos_token")) or ("</s>" if "</s>" in self.specials else "")
        self.template = template or detect_template(config.get("chat_template") or "", self.specials)
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown chat template {self.template!r}; choose from {', '.join(TEMPLATES)}")
        by_length = sorted(self.specials, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        # generation stops at any eos id of generation_config.json, the eos token or the end-of-turn token
        gen = read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        stops = set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        for s in (self.eos, END_OF_TURN.get(self.template)):
            if s in self.specials:
                stops.add(self.specials[s])
        self.stop_ids = sorted(stops)
        self.pad_id = self.specials.get(token_str(config.get("pad_token")) or "<pad>", 0)

    def encode(self, text: str) -> list[int]:
        pieces = self.split_re.split(text) if self.split_re else [text]
        ids = []
        for piece in pieces:
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids += self.hf.encode(piece, add_special_tokens=False).ids if self.hf else self.sp.encode(piece)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once; the tokenizers library spreads plain text over all cores."""
        if self.hf is None or self.split_re is None:
            return [self.encode(t) for t in texts]
        pieces = [self.split_re.split(t) for t in texts]
        plain = [p for ps in pieces for p in ps if p and p not in self.specials]
        encoded = iter(self.hf.encode_batch(plain, add_special_tokens=False))
        out = []
        for ps in pieces:
            ids = []
            for p in ps:
                if p in self.specials:
                    ids.append(self.specials[p])
                elif p:
                    ids += next(encoded).ids
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True) if self.hf else self.sp.decode(ids)


def detect_template(chat_template: str, specials: dict) -> str:
    """The template named by tokenizer_config.json's chat_template, else by the special tokens present."""
    marks = [("[INST]", "inst"), ("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"),
             ("[gMASK]", "glm4"), ("<assistant>", "plain")]
    for mark, name in marks:
        if mark in chat_template:
            return name
    for mark, name in marks:
        if mark in specials:
            return name
    raise ValueError("cannot tell the chat template from the tokenizer files; name one with --template "
                     f"({', '.join(TEMPLATES)})")


def load_tokenizer(path, template=None) -> Tokenizer:
    return Tokenizer(path, template)


def encode_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels: labels equal the ids on assistant tokens and their end-of-turn token, else -100."""
    ids, labels = [], []
    for text, is_target in TEMPLATES[tok.template](messages, tok.bos, tok.eos):
        piece = tok.encode(text)
        ids += piece
        labels += piece if is_target else [-100] * len(piece)
    return ids, labels


def chat_prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The prompt for generating the next assistant turn (the same pieces training used)."""
    if messages[-1]["role"] == "assistant":
        raise ValueError("the conversation already ends with an assistant turn")
    return encode_chat(tok, messages)[0]
