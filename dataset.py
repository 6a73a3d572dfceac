"""Data for LongWriter SFT and DPO: tokenizers, chat templates, assistant-only labels, packing, a built-in corpus.

Usage:
    tok = load_tokenizer("ckpt_dir")                         # tokenizer.json or tokenizer.model
    ids, labels = encode_chat(tok, record["messages"])       # labels -100 outside assistant turns
    python dataset.py --data sft.jsonl --tokenizer DIR --max-tokens 32768   # tokenize, pack, cache, report
"""
import bisect
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import sentencepiece
import tokenizers


TOKENS_PER_WORD = 1.35  # English text in the BPE tokenizers we use: for token limits derived from asked words


WORD_RE = re.compile(r"[\u4e00-\u9fff]|\b[a-zA-Z]+\b")  # what LongBench-Write counts: a Chinese character or an English word


def count_words(text: str) -> int:
    """LongBench-Write's length: every Chinese character counts one, every English word one."""
    return len(WORD_RE.findall(text))


def loop_start(text: str, n: int = 4, window: int = 200, limit: float = 0.3) -> int:
    """Words (count_words' unit) before a text starts to loop: the start of its first stretch of `window` words in
    which more than `limit` of the word n-grams were written before in it; all its words when there is none. Why: a
    no-repeat rule stops verbatim loops of 10 tokens, not paraphrased ones ("This report contains lots of different
    pieces ..." again and again, each time ending otherwise), which a check for repeated sentences does not see, and
    past a few hundred words SmolLM2-135M's long answers are such loops (demo.py counts words up to here; agentwrite
    --cut-loops cuts a section here). In one run's AgentWrite answers (900-3,700 words) the most repetitive 200-word
    stretch held 4-29% repeated 4-grams (3 of 23 more); in each of the ten answers of the base and the fine-tuned
    model that ran past 2,900 words, 54-76% (BENCHMARKS.md)."""
    words = [w.lower() for w in WORD_RE.findall(text)]
    seen, repeated, count = set(), [], 0
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        repeated.append(gram in seen)
        seen.add(gram)
        count += repeated[i] - (repeated[i - window] if i >= window else 0)  # repeats among the last `window`
        if i + 1 >= window and count > limit * window:
            return i + 1 - window
    return len(words)


# -----------------------------------------------------------------------------
# chat templates: each returns the conversation as (text, is_target) pieces; the text may hold special
# tokens. A conversation that does not end with an assistant turn gets the generation prompt, so the
# prompt a model sees at inference is byte for byte the one it was trained on.

def llama3_chat(messages, bos, eos):
    """Every turn trimmed, as Llama 3's own templates do (`| trim`); a system turn that starts with the
    3.1/3.2 date header (see default_system) keeps the header whole and trims the text after it."""
    parts = [("<|begin_of_text|>", False)]
    for m in messages:
        text = m["content"].strip()
        if m["role"] == "system" and m["content"].startswith("Cutting Knowledge Date:"):
            header, _, rest = m["content"].partition("\n\n")
            text = header + "\n\n" + rest.strip()
        parts.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        parts.append((text + "<|eot_id|>", m["role"] == "assistant"))
    if messages[-1]["role"] != "assistant":
        parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return parts


def inst_chat(messages, bos, eos):
    """The form LongWriter-llama3.1-8b was trained with, each piece tokenized alone as in the official
    pre-tokenization: <BOS> <<SYS>>\n{system}\n<</SYS>>\n\n [INST]{user}[/INST] {assistant} <EOS>.
    (The official code puts one EOS after the last turn only; we end every assistant turn with one.)"""
    parts = [(bos, False)]
    for m in messages:
        if m["role"] == "system":
            parts.append((f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n", False))
        elif m["role"] == "user":
            parts.append((f"[INST]{m['content']}[/INST]", False))
        else:
            parts += [(m["content"], True), (eos, True)]
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

# The same templates as jinja, for a checkpoint trained in a format its own files do not describe (--template, or
# no chat template at all): its export carries the format it learned, so transformers' apply_chat_template and
# vLLM prompt it as training did. {bos} and {eos} are filled in with the tokenizer's. (llama3 trims every turn;
# the Python form keeps a system turn's date header whole, which differs only for a header with nothing after it.)
JINJA = {
    "llama3": r"""{{- '<|begin_of_text|>' }}
{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}
""",
    "inst": r"""{{- {bos} }}
{%- for m in messages %}
{%- if m['role'] == 'system' %}{{- '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}
{%- elif m['role'] == 'user' %}{{- '[INST]' + m['content'] + '[/INST]' }}
{%- else %}{{- m['content'] + {eos} }}{%- endif %}
{%- endfor -%}
""",
    "glm4": r"""{{- '[gMASK]<sop>' }}
{%- for m in messages %}
{%- if m['role'] == 'assistant' %}{{- '<|assistant|>\n' + m['content'] + '<|endoftext|>' }}
{%- else %}{{- '<|' + m['role'] + '|>\n' + m['content'] }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif -%}
""",
    "chatml": r"""{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif -%}
""",
    "plain": r"""{{- '<s>' }}
{%- for m in messages %}
{%- if m['role'] == 'assistant' %}{{- '<assistant> ' + m['content'] + '</s>' }}
{%- else %}{{- '<' + m['role'] + '> ' + m['content'] + ' ' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<assistant>' }}{%- endif -%}
""",
}


def default_system(template: str, chat_template: str) -> str:
    """The system turn a checkpoint's own (jinja) chat template adds when a conversation has none, so that
    our prompts equal transformers' apply_chat_template: ChatML templates that write a literal
    "<|im_start|>system ...<|im_end|>" (SmolLM2, Qwen2.5), and Llama 3.1/3.2's "Cutting Knowledge Date"
    header (today's date where the template asks for strftime_now, as transformers fills it in; that
    header is written before any system text, see with_system). Empty when the template adds nothing."""
    if template == "chatml":
        for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template, re.S):
            if not re.search(r"[{}'\"+]", m.group(1)):  # a literal, not jinja that prints the user's system turn
                return m.group(1).replace("\\n", "\n")
    if template == "llama3" and "Cutting Knowledge Date" in chat_template:
        date = time.strftime("%d %b %Y") if "strftime_now" in chat_template else "26 Jul 2024"
        return f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    return ""


def with_system(messages: list[dict], tok) -> list[dict]:
    """The conversation as the model's template renders it: the template's default system turn added when
    the conversation has none. Llama 3's date header goes in front of whatever system text there is."""
    default = tok.default_system
    if not default:
        return messages
    if messages[0]["role"] == "system":
        if tok.template != "llama3":
            return messages
        return [{"role": "system", "content": default + messages[0]["content"]}] + messages[1:]
    return [{"role": "system", "content": default}] + messages


# -----------------------------------------------------------------------------
# tokenizers

def read_json(file):
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8-sig") as f:
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
        if str(path).endswith(".gguf") and os.path.isfile(path):  # the real model ships as one
            raise FileNotFoundError(f"{path}: a GGUF file, not a checkpoint folder; make one with "
                                    f"`python convert_gguf.py {path} OUT_DIR` and give OUT_DIR")
        json_file, sp_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        self.hf = self.sp = None
        if os.path.isfile(json_file):
            try:
                self.hf = tokenizers.Tokenizer.from_file(json_file)
            except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
                raise ValueError(f"{json_file}: not a tokenizers file ({e})") from None
            self.specials = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items()}
        elif os.path.isfile(sp_file):
            try:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
            except RuntimeError:
                with open(sp_file, "rb") as f:  # Meta's own Llama 3 download: "base64-token rank" lines
                    tiktoken = re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\s*", f.readline(200))
                raise ValueError(f"{sp_file}: not a sentencepiece model" + (
                    " but a tiktoken file (Meta's original Llama 3 format); use the Hugging Face folder's "
                    "tokenizer.json" if tiktoken else "")) from None
            self.specials = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                             if self.sp.is_control(i) or self.sp.is_unknown(i)}
        else:
            latest = os.path.join(path, "latest")  # a training run's --out, not one of its checkpoints
            meant = (f" (a training run: its last checkpoint is {os.path.join(path, open(latest).read().strip())})"
                     if os.path.isfile(latest) else "")
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model here{meant}; name the folder that "
                                    "holds them with --tokenizer")
        config = read_json(os.path.join(path, "tokenizer_config.json"))
        for i, t in (config.get("added_tokens_decoder") or {}).items():
            self.specials.setdefault(t["content"], int(i))
        self.vocab_size = self.hf.get_vocab_size() if self.hf else self.sp.get_piece_size()
        self.bos = token_str(config.get("bos_token")) or ("<s>" if "<s>" in self.specials else "")
        self.eos = token_str(config.get("eos_token")) or ("</s>" if "</s>" in self.specials else "")
        self.chat_template = read_chat_template(path, config)
        found = None
        try:
            found = detect_template(self.chat_template, self.specials)
        except ValueError as e:
            if template is None:
                raise ValueError(f"{path}: {e}") from None
        self.template = template or found
        self.forced = self.template != found  # named against the files (--template): prompts differ, records say so
        # False when the files hold no chat template or one of another format: exports then write ours (JINJA)
        self.own_template = bool(self.chat_template) and template_in(self.chat_template) == self.template
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown chat template {self.template!r}; choose from {', '.join(TEMPLATES)}")
        end = END_OF_TURN.get(self.template, self.eos)  # what an answer ends with: the stop the model learns
        if end not in self.specials:  # written as plain text, a trained model would never stop
            raise ValueError(f"chat template {self.template!r} ends a turn with {end or 'an eos token'!r}, which is not a "
                             f"special token of {path}'s tokenizer (--template names another model's format?)")
        self.default_system = default_system(self.template, self.chat_template)
        by_length = sorted(self.specials, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        # where the tokenizers library knows every special token, it splits at them itself, as transformers does:
        # split here, each piece would be encoded as if it began the text, and a SentencePiece-style tokenizer
        # (Metaspace, prepend_scheme "first": Llama 2, Mistral) would put a "▁" after every [INST] that
        # transformers does not
        self.hf_splits = self.hf is not None and set(self.specials) <= {
            t.content for t in self.hf.get_added_tokens_decoder().values()}
        # generation stops at any eos id of generation_config.json, the eos token or the end-of-turn token
        gen = read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        stops = set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        for s in (self.eos, END_OF_TURN.get(self.template)):
            if s in self.specials:
                stops.add(self.specials[s])
        self.stop_ids = sorted(stops)
        self.pad_id = self.specials.get(token_str(config.get("pad_token")) or "<pad>", 0)

    def encode(self, text: str) -> list[int]:
        if self.hf_splits:
            return self.hf.encode(text, add_special_tokens=False).ids
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
        if self.hf_splits:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
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
        """The text of the ids; an answer cut inside a multi-byte character loses that broken tail (U+FFFD)."""
        text = self.hf.decode(ids, skip_special_tokens=True) if self.hf else self.sp.decode(ids)
        return text.rstrip("\ufffd")


def read_chat_template(path, config: dict) -> str:
    """The jinja chat template wherever transformers keeps it: chat_template.jinja (what current versions
    save), chat_template.json, or the "chat_template" field of tokenizer_config.json."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = read_json(os.path.join(path, "chat_template.json")).get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    return template or ""


MARKS = [("[INST]", "inst"), ("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("[gMASK]", "glm4"),
         ("<assistant>", "plain")]
FOREIGN_INST = re.compile(r"\[INST\] |\s\[/INST\]|\[SYSTEM_PROMPT\]")  # Mistral's and Llama 2's [INST] forms


def template_in(chat_template: str):
    """Which of our templates a jinja chat template writes, by the first mark found in it; None if none.
    Mistral's and Llama 2's [INST] templates are not our `inst` (LongWriter's form)."""
    if FOREIGN_INST.search(chat_template):
        return None
    return next((name for mark, name in MARKS if mark in chat_template), None)


def detect_template(chat_template: str, specials: dict) -> str:
    """The template named by tokenizer_config.json's chat_template, else by the special tokens present.
    Mistral's and Llama 2's [INST] templates are refused, not taken for LongWriter's."""
    if FOREIGN_INST.search(chat_template):
        raise ValueError("its chat template is Mistral's or Llama 2's [INST] format (a space around the user's text, or "
                         "[SYSTEM_PROMPT]), which this project does not write; --template inst trains the model in "
                         "LongWriter's form instead ([INST]{user}[/INST]{answer}<EOS>, <<SYS>> system), and its "
                         "exports then carry that form")
    if name := template_in(chat_template):
        return name
    for mark, name in MARKS:
        if mark in specials:
            return name
    raise ValueError("cannot tell the chat template from the tokenizer files; name one with --template "
                     f"({', '.join(TEMPLATES)})")


def load_tokenizer(path, template=None) -> Tokenizer:
    return Tokenizer(path, template)


def encode_chats(tok: Tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per conversation: labels equal the ids on assistant tokens and their end-of-turn
    token, -100 elsewhere. All pieces of all conversations go through one batch encode."""
    rendered = [TEMPLATES[tok.template](with_system(m, tok), tok.bos, tok.eos) for m in conversations]
    encoded = iter(tok.encode_batch([text for parts in rendered for text, _ in parts]))
    out = []
    for parts in rendered:
        ids, labels = [], []
        for _, is_target in parts:
            piece = next(encoded)
            ids += piece
            labels += piece if is_target else [-100] * len(piece)
        out.append((ids, labels))
    return out


def encode_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    return encode_chats(tok, [messages])[0]


def chat_prompt_ids(tok: Tokenizer, messages: list[dict], system: str = "") -> list[int]:
    """The prompt for generating the next assistant turn (the same pieces training used); `system`
    (--system) replaces the conversation's system turn (and the template's default one)."""
    if messages[-1]["role"] == "assistant":
        raise ValueError("the conversation already ends with an assistant turn")
    if system:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    return encode_chat(tok, messages)[0]


# -----------------------------------------------------------------------------
# readers: a bad line names its file and line; with skip_bad it is counted and left out instead

class DataError(ValueError):
    pass


SKIP_HINT = " (use --skip-bad to skip such lines)"


def check_messages(messages, name="") -> list[dict]:
    """A list of {"role", "content"} turns, checked -> the same turns with only those two keys."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'"{name or "messages"}" must be a non-empty list')
    where = f'"{name}" ' if name else ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}message {i} has no role")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}message {i} has unknown role {m['role']!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}message {i} ({m['role']}) has no content string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}message {i} is an empty assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_sft(obj) -> list[dict]:
    """A LongWriter-6k record {"messages": [...]}, {"prompt", "response"}, or ShareGPT's {"conversations": [{"from":
    "human"|"gpt"|"system", "value"}]} -> messages."""
    if not isinstance(obj, dict):
        raise DataError("a record must be a JSON object")
    if "messages" not in obj:
        if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            obj = {"messages": [{"role": "user", "content": obj["prompt"]},
                                {"role": "assistant", "content": obj["response"]}]}
        elif isinstance(obj.get("conversations"), list):
            roles = {"human": "user", "gpt": "assistant", "system": "system"}
            obj = {"messages": [{"role": roles.get(m.get("from"), m.get("from")), "content": m.get("value")}
                                if isinstance(m, dict) else m for m in obj["conversations"]]}
        else:
            raise DataError('needs "messages", "conversations" (ShareGPT), or "prompt" and "response" strings')
    messages = check_messages(obj["messages"])
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn")
    return messages


def parse_dpo(obj) -> tuple[list[dict], str, str]:
    """{"prompt", "chosen", "rejected"} -> (prompt messages, chosen answer, rejected answer). Each field is a
    string or a list of messages, as preference datasets come: TRL's conversational form, "chosen"/"rejected"
    as [user, assistant] beside a "prompt" string (UltraFeedback), or whole conversations and no "prompt"
    (TRL's implicit prompt), whose turns before the answer are the prompt. Those turns must then be the prompt's."""
    if not isinstance(obj, dict):
        raise DataError("a record must be a JSON object")
    sides = {}
    for key in ("chosen", "rejected"):
        value = obj.get(key)
        if isinstance(value, list):
            turns = check_messages(value, key)
            if turns[-1]["role"] != "assistant":
                raise DataError(f'"{key}" must end with the assistant\'s answer')
            sides[key] = turns[:-1], turns[-1]["content"]
        elif isinstance(value, str) and value.strip():
            sides[key] = [], value
        else:
            raise DataError(f'"{key}" must be a non-empty string or a list of messages ending with the answer')
    prompt = obj.get("prompt", sides["chosen"][0] or None)  # no "prompt": the turns before the chosen answer
    if isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        prompt = check_messages(prompt, "prompt")
    else:
        raise DataError('"prompt" must be a non-empty string or a list of messages')
    if prompt[-1]["role"] != "user":
        raise DataError('the prompt must end with a user turn')
    for key, (turns, _) in sides.items():
        if turns and turns != prompt:
            raise DataError(f'the turns of "{key}" before its answer are not the prompt\'s')
    return prompt, sides["chosen"][1], sides["rejected"][1]


ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\ufeff"))  # zero-width space, non-joiner, joiner, BOM


def strip_zero_width(conversations: list[list[dict]]) -> int:
    """Remove zero-width characters from assistant turns in place, as the official pre-tokenization does
    (they are invisible in the text but cost tokens); returns how many turns had some."""
    changed = 0
    for messages in conversations:
        for m in messages:
            if m["role"] == "assistant" and (clean := m["content"].translate(ZERO_WIDTH)) != m["content"]:
                m["content"], changed = clean, changed + 1
    return changed


def read_jsonl(path, parse, skip_bad=False, hint=""):
    """Parsed records of a JSONL file and the number of bad lines skipped. parse(obj) raises DataError
    for a bad record; the error then names the file and line (plus `hint`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    records, bad = [], 0
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first line
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(parse(json.loads(line)))
            except (json.JSONDecodeError, DataError) as e:
                if not skip_bad:
                    what = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                    raise DataError(f"{path}:{lineno}: {what}{hint}") from None
                bad += 1
    return records, bad


# -----------------------------------------------------------------------------
# packing: whole conversations into rows of at most max_tokens

def best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest item first, each into the fullest bin it still fits (O(n log n))."""
    bins, free = [], []  # free: sorted (remaining capacity, bin index)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = bisect.bisect_left(free, (sizes[i], -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - sizes[i], len(bins) - 1))
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (room - sizes[i], b))
    return bins


def shift_labels(labels: list[int]) -> list[int]:
    """Targets for next-token prediction inside one conversation: position t predicts label t + 1."""
    return labels[1:] + [-100]


def pack(units: list[list[tuple[list[int], list[int]]]], max_tokens: int, mode="pack", truncate=False):
    """Place units (a unit = conversations that must share a row: one for SFT, chosen + rejected for DPO).

    mode "pack": best-fit decreasing; "sorted": one unit per row, rows sorted by length.
    A unit longer than a row is skipped and counted, or cut to max_tokens with truncate=True; a cut
    conversation whose prompt filled the row has nothing left to learn and is dropped.
    Returns the rows (see `Packed`), the number of over-long units (skipped or truncated) and the
    number of those dropped for having no target left.
    """
    kept, over, no_target = [], 0, 0
    for unit in units:
        if sum(len(ids) for ids, _ in unit) > max_tokens:
            over += 1
            if not truncate or len(unit) > 1:  # a DPO pair is never cut
                continue
            unit = [(unit[0][0][:max_tokens], unit[0][1][:max_tokens])]
            if all(t == -100 for t in shift_labels(unit[0][1])):
                no_target += 1
                continue
        kept.append(unit)
    sizes = [sum(len(ids) for ids, _ in u) for u in kept]
    if mode == "pack":
        rows = best_fit_decreasing(sizes, max_tokens)
    elif mode == "sorted":
        rows = [[i] for i in sorted(range(len(kept)), key=lambda i: sizes[i])]
    else:
        raise ValueError(f"unknown packing mode {mode!r} (pack or sorted)")
    ids, targets, doc_lens, row_docs = [], [], [], [0]
    for row in rows:
        for i in row:
            for conv_ids, conv_labels in kept[i]:
                ids.append(np.asarray(conv_ids, dtype=np.int32))
                targets.append(np.asarray(shift_labels(conv_labels), dtype=np.int32))
                doc_lens.append(len(conv_ids))
        row_docs.append(len(doc_lens))
    empty = [np.zeros(0, dtype=np.int32)]
    arrays = {"ids": np.concatenate(ids or empty), "targets": np.concatenate(targets or empty),
              "doc_offsets": np.concatenate([[0], np.cumsum(doc_lens, dtype=np.int64)]),
              "row_docs": np.array(row_docs, dtype=np.int64)}
    return Packed(arrays, max_tokens), over, no_target


class Packed:
    """Packed rows as four flat arrays (memory-mapped when read from the cache):

    ids, targets (N,)  every conversation's tokens and shifted targets (-100: no loss), row after row
    doc_offsets        (n_docs + 1,) where each conversation starts in ids
    row_docs           (n_rows + 1,) which conversations each row holds
    """

    def __init__(self, arrays, max_tokens):
        self.ids, self.targets = arrays["ids"], arrays["targets"]
        self.doc_offsets, self.row_docs = arrays["doc_offsets"], arrays["row_docs"]
        self.max_tokens = int(max_tokens)

    def __len__(self):
        return len(self.row_docs) - 1

    def row(self, r: int) -> dict:
        """One row: ids, targets, position_ids (restarting at 0 per conversation), cu_seqlens, the number
        of target tokens of each conversation (doc_targets) and of the row (n_targets), and the index of
        its first conversation among all (first_doc)."""
        d0, d1 = self.row_docs[r], self.row_docs[r + 1]
        offsets = self.doc_offsets[d0:d1 + 1]
        a, b = offsets[0], offsets[-1]
        cu = (offsets - a).astype(np.int64)
        targets = np.asarray(self.targets[a:b], dtype=np.int64)
        position_ids = np.arange(b - a) - np.repeat(cu[:-1], np.diff(cu))
        doc_targets = np.add.reduceat(targets != -100, cu[:-1]) if b > a else np.zeros(0, dtype=np.int64)
        return {"ids": np.asarray(self.ids[a:b], dtype=np.int64), "targets": targets, "position_ids": position_ids,
                "cu_seqlens": cu, "doc_targets": doc_targets.astype(np.int64), "n_targets": int(doc_targets.sum()),
                "first_doc": int(d0)}

    def efficiency(self) -> float:
        """Real tokens / row capacity."""
        return len(self.ids) / max(1, len(self) * self.max_tokens)

    def save(self, path):
        """Write every array into a fresh folder, then rename it into place: never a half-written cache."""
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name in ("ids", "targets", "doc_offsets", "row_docs"):
            np.save(os.path.join(tmp, name + ".npy"), getattr(self, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"max_tokens": self.max_tokens}, f)
        os.rename(tmp, path)

    @classmethod
    def load(cls, path):
        arrays = {n: np.load(os.path.join(path, n + ".npy"), mmap_mode="r")
                  for n in ("ids", "targets", "doc_offsets", "row_docs")}
        return cls(arrays, read_json(os.path.join(path, "meta.json"))["max_tokens"])


def file_digest(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_files(tok: Tokenizer) -> list[str]:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "generation_config.json")
    return [os.path.join(tok.path, n) for n in names if os.path.isfile(os.path.join(tok.path, n))]


def save_tokenizer(tok: Tokenizer, out_dir):
    """Copy the tokenizer files into a checkpoint folder. When training used a format the files do not
    describe (tok.own_template False), the folder gets that format's jinja instead of theirs, so our scripts,
    transformers and vLLM all prompt the trained model in the format it learned."""
    for f in tokenizer_files(tok):
        name = os.path.basename(f)
        if tok.own_template or name not in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            shutil.copy(f, out_dir)
        elif name == "tokenizer_config.json":
            config = {k: v for k, v in read_json(f).items() if k != "chat_template"}
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as out:
                json.dump(config, out, indent=2, ensure_ascii=False)
    if not tok.own_template:
        jinja = JINJA[tok.template].replace("{bos}", json.dumps(tok.bos)).replace("{eos}", json.dumps(tok.eos))
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as out:
            out.write(jinja)


def load_packed(data, tok: Tokenizer, max_tokens=32768, mode="pack", truncate=False, skip_bad=False,
                kind="sft", cache_dir=None, log=print) -> Packed:
    """Tokenize and pack a JSONL file once; later calls with the same file, tokenizer and settings read
    the memory-mapped cache. kind "sft": one unit per conversation; "dpo": chosen and rejected together."""
    if kind not in ("sft", "dpo"):  # anything else was read as DPO pairs
        raise ValueError(f"--kind must be sft or dpo, not {kind!r}")
    if not os.path.isfile(data):
        raise FileNotFoundError(f"{data}: data file not found")
    settings = json.dumps([kind, max_tokens, mode, truncate, skip_bad, tok.template, tok.default_system, 3])  # 3: version
    key = file_digest(data, *tokenizer_files(tok))[:16] + "-" + hashlib.sha256(settings.encode()).hexdigest()[:8]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(data)), ".cache")
    path = os.path.join(cache_dir, f"{os.path.basename(data)}-{key}")
    if os.path.isdir(path):
        log(f"{data}: packed cache {path}")
        return Packed.load(path)
    if kind == "sft":
        conversations, bad = read_jsonl(data, parse_sft, skip_bad, SKIP_HINT)
    else:
        pairs, bad = read_jsonl(data, parse_dpo, skip_bad, SKIP_HINT)
        conversations = [p + [{"role": "assistant", "content": a}] for p, c, r in pairs for a in (c, r)]
    zero_width = strip_zero_width(conversations)
    encoded = encode_chats(tok, conversations)
    units = [[c] for c in encoded] if kind == "sft" else [encoded[i:i + 2] for i in range(0, len(encoded), 2)]
    packed, over, no_target = pack(units, max_tokens, mode, truncate)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        packed.save(path)
    except OSError as e:  # data in a read-only folder: train from memory, and pack again the next time
        log(f"{data}: packed cache not written ({e.strerror}: {e.filename}); the rows stay in memory")
    log(f"{data}: {len(units)} records ({bad} bad lines skipped), {over} longer than {max_tokens} tokens "
        f"{f'truncated ({no_target} of them dropped: the prompt filled the row)' if truncate else 'skipped'}; zero-width characters removed from {zero_width} answers; "
        f"{len(packed)} rows, {len(packed.ids)} tokens, {rows_text(packed, mode)}")
    return packed


def rows_text(packed: Packed, mode: str) -> str:
    """How full the rows are. Rows are never padded, so in "sorted" mode (one conversation a row) the unused capacity
    costs nothing and a "packing efficiency" of, say, 9% would only mislead: say how long the rows are instead."""
    if mode == "pack":
        return f"packing efficiency {packed.efficiency():.1%}"
    sizes = np.diff(packed.doc_offsets[packed.row_docs]) if len(packed) else np.zeros(1, dtype=np.int64)
    return f"one conversation a row (no padding), {sizes.min()}-{sizes.max()} tokens, mean {sizes.mean():.0f}"



# -----------------------------------------------------------------------------
# built-in corpus: long-writing SFT data shaped like AgentWrite output, cheap enough for a 2-core CPU.
# An instruction asks for N words (N a multiple of 100, one token); the answer is N/100 sections of about
# 100 words, each headed "## R left" with R the words still to write once the section is done (N-100,
# N-200, ..., 0: the plan's word budget counting down), then </s>. Every heading's number is the last
# number before it minus 100 (the prompt's N for the first), and the answer ends after "## 0 left": a
# rule a tiny model can learn, but only for the numbers it has seen. Its output length is then limited
# by what it saw in training, the effect LongWriter is about.

TOPICS = [
    ("the ocean", "whale reef tide current shell coral", "deep blue cold calm", "drifts hides feeds rises"),
    ("old castles", "tower wall gate knight stone moat", "tall grey silent ancient", "guards stands falls holds"),
    ("city gardens", "rose bench path fountain leaf bee", "green quiet bright small", "grows blooms waits shades"),
    ("mountain trails", "peak ridge pine hiker snow valley", "steep high wild narrow", "climbs winds crosses rests"),
    ("the night sky", "star moon comet planet cloud orbit", "dark distant pale vast", "shines turns moves glows"),
    ("river towns", "bridge boat mill market dock ferry", "busy slow wet crowded", "carries flows trades docks"),
    ("desert life", "dune cactus lizard oasis camel sand", "dry hot golden empty", "survives shifts burns endures"),
    ("kitchen craft", "bread oven spice knife pot recipe", "warm fresh sharp simple", "bakes mixes cuts serves"),
    ("winter forests", "fox owl branch frost trunk trail", "white frozen still hidden", "sleeps hunts cracks shelters"),
    ("island harbors", "ship sail anchor gull lighthouse net", "salty windy bright sturdy", "sails waits guides returns"),
]
WORDINGS = ["write a {n} word essay about {t} .", "please write {n} words on {t} .",
            "i need an article of {n} words about {t} ."]
SENTENCES = ["the {a} {n} {v} near the {n2} .", "every {n} {v} and the {a} {n2} {v2} .",
             "in this part the {n} {v} with a {a} {n2} .", "a {a} {n} {v} while the {n2} {v2} slowly ."]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"]


def builtin_answer(n_words: int, topic, rng) -> str:
    _, nouns, adjs, verbs = (t.split() if i else t for i, t in enumerate(topic))
    sections = []
    for i in range(max(1, n_words // 100)):
        body, words = [], 1  # "left" in the heading counts one word
        while words < 100:
            s = rng.choice(SENTENCES).format(a=rng.choice(adjs), n=rng.choice(nouns), n2=rng.choice(nouns),
                                             v=rng.choice(verbs), v2=rng.choice(verbs))
            body.append(s)
            words += count_words(s)
        sections.append(f"## {n_words - 100 * (i + 1)} left\n" + " ".join(body))
    return "\n\n".join(sections)


def builtin_corpus(count: int, min_words=100, max_words=1600, seed=0) -> list[dict]:
    """`count` SFT records asking for (and answering with) N words, N uniform over multiples of 100."""
    import random
    rng = random.Random(seed)
    lengths = range(max(100, min_words // 100 * 100), max_words + 1, 100)
    records = []
    for _ in range(count):
        n, topic = rng.choice(lengths), rng.choice(TOPICS)
        prompt = rng.choice(WORDINGS).format(n=n, t=topic[0])
        records.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": builtin_answer(n, topic, rng)}]})
    return records


def build_tokenizer(path, texts, max_number=10000):
    """Train a word-level tokenizer on the texts (plus every length N up to max_number, so requests
    beyond the training lengths are still one token) and write it as a checkpoint's tokenizer files."""
    os.makedirs(path, exist_ok=True)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins words with spaces
    numbers = " ".join(str(n) for n in range(0, max_number + 1, 100))
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(list(texts) + [numbers], trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": "plain"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": SPECIALS.index("<s>"), "eos_token_id": SPECIALS.index("</s>")}, f)


def write_builtin(out_dir, count=2000, min_words=100, max_words=1600, seed=0, tokenizer_dir=None, max_number=10000):
    """The built-in corpus as out_dir/train.jsonl, and its tokenizer (in tokenizer_dir, default out_dir)
    knowing every length N up to max_number."""
    os.makedirs(out_dir, exist_ok=True)
    records = builtin_corpus(count, min_words, max_words, seed)
    data = os.path.join(out_dir, "train.jsonl")
    with open(data + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(data + ".tmp", data)
    tok_dir = tokenizer_dir or out_dir
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        texts = [m["content"] for r in records for m in r["messages"]]
        # every word the generator can write, so that a small corpus still gives a complete vocabulary
        texts += [w.format(n=100, t=t[0]) for w in WORDINGS for t in TOPICS] + [" ".join(t[1:]) for t in TOPICS]
        texts += [s.replace("{", "").replace("}", "") for s in SENTENCES]
        build_tokenizer(tok_dir, texts, max_number)
    return data, tok_dir


# -----------------------------------------------------------------------------

@dataclass
class DataConfig:
    data: str = ""            # SFT (or DPO with --kind dpo) JSONL; empty: write the built-in corpus first
    tokenizer: str = ""       # folder with tokenizer.json or tokenizer.model
    template: str = ""        # chat template; empty: detect from the tokenizer files
    kind: str = "sft"         # sft | dpo
    max_tokens: int = 32768   # row length (LongWriter packs 32k tokens)
    mode: str = "pack"        # pack (best-fit decreasing) | sorted (one conversation per row)
    truncate: bool = False    # cut over-long conversations instead of skipping them
    skip_bad: bool = False    # skip and count malformed lines instead of stopping
    cache_dir: str = ""
    builtin_out: str = "runs/builtin"  # where the built-in corpus goes when --data is empty
    count: int = 2000
    min_words: int = 100
    max_words: int = 1600
    seed: int = 0


def add_flags(ap, config_class, skip=(), defaults=None, suppress=False):
    """One --flag per field of a config dataclass, its help the comment beside the field in the source, with
    the default shown. A True boolean gets --no-NAME as well. suppress: leave unset flags out of the
    parsed namespace (so a caller can tell what was given)."""
    import argparse
    import inspect
    comments = {}
    for klass in reversed(config_class.__mro__[:-1]):  # a subclass's comment wins
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.M))
    for name, value in {**vars(config_class()), **(defaults or {})}.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        shown = "" if value in ("", ()) else f" (default: {value})"
        kw = {"default": argparse.SUPPRESS if suppress else value,
              "help": (comments.get(name, "") + shown).strip().replace("%", "%%") or None}
        if isinstance(value, bool):
            kw["action"] = argparse.BooleanOptionalAction if value else "store_true"
        else:
            kw["type"] = type(value)
        ap.add_argument(flag, **kw)
    return ap


def main():
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="Tokenize and pack SFT/DPO data (cached), or write the built-in corpus.")
    cfg = DataConfig(**vars(add_flags(ap, DataConfig).parse_args()))
    try:
        if not cfg.data:
            cfg.data, tok_dir = write_builtin(cfg.builtin_out, cfg.count, cfg.min_words, cfg.max_words, cfg.seed)
            cfg.tokenizer = cfg.tokenizer or tok_dir
            print(f"built-in corpus: {cfg.count} records of {cfg.min_words}-{cfg.max_words} words -> {cfg.data}")
        if not cfg.tokenizer:
            ap.error("--tokenizer DIR is required with --data")
        tok = load_tokenizer(cfg.tokenizer, cfg.template or None)
        load_packed(cfg.data, tok, cfg.max_tokens, cfg.mode, cfg.truncate, cfg.skip_bad, cfg.kind, cfg.cache_dir or None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
