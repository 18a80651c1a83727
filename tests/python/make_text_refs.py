#!/usr/bin/env python3
"""Writes the references of Llama 3's and Qwen2's text side, in tests/fixtures/text/:

- `llama3-tokenization.json`, `qwen2-tokenization.json`: ids of a corpus (digits, code, CJK,
  emoji, mixed whitespace, special tokens) from each model's *original* tokenizer, which its
  HuggingFace tokenizer.json was converted from: Meta's tiktoken BPE file and split pattern
  (PyPI `llama-models`, `llama_models/llama3/tokenizer.model` and `tokenizer.py`) and Qwen's
  (PyPI `dashscope`, `dashscope/resources/qwen.tiktoken` and `tokenizers/qwen_tokenizer.py`,
  which normalizes to NFC first as Qwen2's tokenizer.json does). Special tokens are allowed in
  the text, as the daemon allows them. The same references are first checked against the ids
  HuggingFace's AutoTokenizer gave for llama.cpp's own test texts (the `.gguf.out` files), and
  against transformers' tokenizer converted from the GGUF; disagreements are printed and
  recorded, not hidden.
- `chat.json`: conversations rendered by transformers' `apply_chat_template` with the models'
  own templates (copied byte for byte from llama.cpp's models/templates/, which
  scripts/get_chat_template.py fetched from the Hub: Llama 3.1 and 3.2 Instruct, Qwen2.5
  Instruct; and the Qwen1.5 template carried by ggml-vocab-qwen2.gguf), at a fixed time (the
  Llama 3.2 template prints today's date through `strftime_now`), with the ids of each
  rendering from the original tokenizer.

The vocabulary GGUFs come from .ci/llama-vocab.sh. Run by hand (CI only reads the outputs), in a
venv with transformers, tokenizers, gguf and tiktoken:

    pip download --no-deps llama-models==0.3.0 dashscope==2.0.2 -d /tmp/refwheels
    python tests/python/make_text_refs.py --vocab "$(.ci/llama-vocab.sh)" \
        --llama-models /tmp/refwheels/llama_models-0.3.0-py3-none-any.whl \
        --dashscope /tmp/refwheels/dashscope-2.0.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import importlib.metadata
import json
import re
import sys
import unicodedata
import zipfile
from pathlib import Path
from unittest import mock

import gguf
import tiktoken
import transformers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "text"
SEPARATOR = "\n__ggml_vocab_test__\n"
# Noon UTC: the same date in every time zone within eleven hours of it.
NOW = dt.datetime(2026, 12, 3, 12, 0, 0)

CORPUS = [
    # Digits: Llama 3 keeps runs of up to three, Qwen2 splits every digit.
    "1234567890",
    "Pi is 3.14159265358979, e is 2.71828.",
    "In 2024, 1,000,000 people paid $19.99 (or €17,50) each.",
    "Call +1-800-555-0199 or 0044 20 7946 0958.",
    "Version v1.2.3-rc4 released on 2025-02-07T07:02:44Z.",
    "Numbers in other scripts: ١٢٣ ४५६ ０１２ ²³ ½ ⅷ ①②",
    "x1y22z333 a0b00c000 1234 12345 123456 1234567",
    # Contractions, in both cases.
    "I'm sure you're right, but we'll see what they've done and he'd said it's John's.",
    "DON'T SHOUT: I'M HERE, YOU'RE THERE, WE'LL SEE, THEY'VE GONE, HE'D KNOW.",
    # Unicode case folding: (?i:'s) also takes the long s.
    "it'ſ a long s, IT'ſ",
    # Mixed whitespace.
    "two  spaces, three   spaces, four    spaces",
    "   leading spaces",
    "trailing spaces   ",
    "tab\tseparated\tvalues\t\tdouble tab",
    "line one\nline two\n\nline four\n\n\n",
    "windows\r\nline\r\n\r\nends",
    "mixed \t \n \r\n whitespace \n\t\n",
    "word\u00a0non-breaking\u2003em-space\u3000ideographic\u2028line-separator",
    "\n\n\n\n",
    "\t\t\t",
    # Code.
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'fn main() {\n\tlet v: Vec<u32> = (0..10).collect();\n\tprintln!("{v:?}");\n}\n',
    '{"name": "Llama-3.2-1B", "params": 1235814400, "tied": true, "layers": [1, 2, 3]}',
    '<html><body class="main"><p>Hi &amp; bye</p></body></html>',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }',
    "for f in *.gguf; do\n  sha256sum \"$f\" | cut -d' ' -f1 >> sums.txt  # keep\ndone",
    "a+b=c; x*y/z%w; i++; j--; k <<= 2; m >>= 3; p != q && r || s",
    # CJK and other scripts.
    "北京是中国的首都。东京是日本的首都。",
    "日本語のテキストとカタカナ、ひらがな。",
    "서울은 대한민국의 수도입니다.",
    "混合 text 与 English words，全角标点！",
    "Москва — столица России.",
    "Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    # Composed and decomposed accents: Qwen2 normalizes to NFC, Llama 3 does not normalize.
    "Café naïve résumé façade jalapeño Ångström",
    "Cafe\u0301 nai\u0308ve (combining accents)",
    "\u1112\u1161\u11ab\u1100\u1173\u11af (Hangul jamo)",
    # Emoji.
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 1️⃣",
    "🦙🦙🦙 llama.cpp",
    # Special tokens of both families: each model reads the other's as plain text.
    "<|begin_of_text|>Hello<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|end_of_text|>",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|eot_id|>more text<|im_end|>",
    " <|eot_id|> spaced <|im_end|> ",
    "<|eot_id| <|im_end| |im_start|> <eot_id>",
]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-unicode table, in which GGUF stores byte-level BPE tokens."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    return {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }


def pattern(source: str, name: str) -> str:
    """The split pattern a tokenizer module assigns to `name` as a raw string literal."""
    found = re.search(rf'^\s*{name}\s*=\s*r("""|")(.*?)\1', source, re.M)
    if not found:
        raise SystemExit(f"no {name} in the tokenizer module")
    return found.group(2)


class Reference:
    """An original tokenizer: tiktoken over the model's own BPE file, specials allowed."""

    def __init__(self, name, ranks, pat_str, specials, nfc):
        self.encoding = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials
        )
        self.nfc = nfc

    def encode(self, text: str) -> list[int]:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        return self.encoding.encode(text, allowed_special="all")


def gguf_vocab(path: Path) -> tuple[list[str], list[int]]:
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    return tokens, types


def check_same_vocab(name, ranks, specials, tokens):
    """The original BPE file and the GGUF must hold the same vocabulary, id for id."""
    table = byte_to_unicode()
    for piece, rank in ranks.items():
        if tokens[rank] != "".join(table[b] for b in piece):
            raise SystemExit(f"{name}: rank {rank} differs from the GGUF's token")
    for text, id_ in specials.items():
        if tokens[id_] != text:
            raise SystemExit(f"{name}: special {text!r} is not GGUF token {id_}")


def llama3_reference(wheel: Path, tokens: list[str], types: list[int]) -> Reference:
    ranks = tiktoken_ranks(read_member(wheel, "llama_models/llama3/tokenizer.model"))
    source = read_member(wheel, "llama_models/llama3/tokenizer.py").decode()
    # The special tokens under the names of the vocabulary tested (Llama 3.0's; Llama 3.1 renamed
    # some reserved ones, e.g. 128008 to <|eom_id|>), at the ids Meta's tokenizer gives them.
    specials = {tokens[i]: i for i in range(len(ranks), len(tokens)) if types[i] == 3}
    check_same_vocab("llama3", ranks, specials, tokens)
    return Reference("llama3", ranks, pattern(source, "pat_str"), specials, nfc=False)


def qwen2_reference(wheel: Path, tokens: list[str]) -> Reference:
    ranks = tiktoken_ranks(read_member(wheel, "dashscope/resources/qwen.tiktoken"))
    source = read_member(wheel, "dashscope/tokenizers/qwen_tokenizer.py").decode()
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    check_same_vocab("qwen2", ranks, specials, tokens)
    return Reference("qwen", ranks, pattern(source, "PAT_STR"), specials, nfc=True)


def llama_cpp_cases(vocab: Path, name: str) -> list[tuple[str, list[int]]]:
    texts = (vocab / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = (vocab / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert texts[-1] == "" and lines[-1] == "" and len(texts) == len(lines)
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts[:-1], lines[:-1])]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_cases(path: Path, head: dict, cases: list[dict]) -> None:
    """One case per line: reviewable diffs when the corpus grows."""
    body = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)
    text = json.dumps(head, ensure_ascii=False, indent=1)
    path.write_text(text[:-2] + ',\n "cases": [\n' + body + "\n]}\n", encoding="utf-8")
    print(f"{path}: {len(cases)} cases")


def tokenization(name, family, vocab, reference, reference_name, hf_converted):
    gguf_path = vocab / f"ggml-vocab-{name}.gguf"
    # The reference against real HuggingFace output first: it must agree on llama.cpp's texts.
    for text, ids in llama_cpp_cases(vocab, name):
        ours = reference.encode(text)
        if ours != ids:
            raise SystemExit(f"{family}: reference differs from HF on {text!r}: {ours} vs {ids}")
    cases, disagreements = [], []
    for text in CORPUS:
        ids = reference.encode(text)
        converted = hf_converted.encode(text, add_special_tokens=False)
        if converted != ids:
            disagreements.append(text)
            print(f"{family}: transformers' GGUF conversion differs on {text!r}", file=sys.stderr)
        cases.append({"text": text, "ids": ids})
    head = {
        "gguf": gguf_path.name,
        "gguf_sha256": sha256(gguf_path),
        "reference": reference_name,
        "reference_checked": f"equal to HuggingFace AutoTokenizer's ids in ggml-vocab-{name}.gguf.out "
        "on all of llama.cpp's texts",
        "transformers_gguf_conversion_differs_on": disagreements,
        "generator": generator(),
    }
    write_cases(OUT / f"{family}-tokenization.json", head, cases)


CONVERSATIONS = {
    "system-user-assistant-user": [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? Name the city only, please 🙂"},
    ],
    "user-only": [
        {"role": "user", "content": "  Write a haiku about the sea.\n\n"},
    ],
    "user-assistant-user": [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Now in Chinese: 一、二、三？"},
    ],
}

# template name → (source, bos_token, eos_token as the model's tokenizer_config.json has them,
# family whose tokenizer encodes the rendering)
TEMPLATES = {
    "llama-3.2-instruct.jinja": ("file", "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "llama-3.1-instruct.jinja": ("file", "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "qwen2.5-instruct.jinja": ("file", None, "<|im_end|>", "qwen2"),
    "ggml-vocab-qwen2.gguf": ("gguf", None, "<|endoftext|>", "qwen2"),
}


def chat(vocab: Path, references: dict, hf_converted: dict) -> None:
    class FrozenDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    renderings = []
    for template_name, (source, bos, eos, family) in TEMPLATES.items():
        if source == "file":
            template = (OUT / template_name).read_text(encoding="utf-8")
        else:
            reader = gguf.GGUFReader(str(vocab / template_name))
            template = reader.fields["tokenizer.chat_template"].contents()
        tokenizer = hf_converted[family]
        tokenizer.chat_template = template
        tokenizer.bos_token = bos
        tokenizer.eos_token = eos
        for conversation, messages in CONVERSATIONS.items():
            for add_generation_prompt in (True, False):
                with mock.patch("transformers.utils.chat_template_utils.datetime", FrozenDatetime):
                    text = tokenizer.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=add_generation_prompt
                    )
                renderings.append(
                    {
                        "template": template_name,
                        "bos_token": bos,
                        "eos_token": eos,
                        "conversation": conversation,
                        "add_generation_prompt": add_generation_prompt,
                        "text": text,
                        "ids": references[family].encode(text),
                    }
                )
    fixture = {
        "now": NOW.isoformat(),
        "now_unix": int(NOW.replace(tzinfo=dt.timezone.utc).timestamp()),
        "rendered_by": "transformers apply_chat_template(messages, tokenize=False, "
        "add_generation_prompt=...), strftime_now frozen at `now`",
        "ids_by": "the original tokenizer of the template's family, as in *-tokenization.json",
        "conversations": CONVERSATIONS,
        "renderings": renderings,
        "generator": generator(),
    }
    path = OUT / "chat.json"
    path.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{path}: {len(renderings)} renderings")


def generator() -> dict:
    return {
        "script": "tests/python/make_text_refs.py",
        **{
            package: importlib.metadata.version(package)
            for package in ("transformers", "tokenizers", "tiktoken", "gguf", "jinja2")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, required=True, help="output of .ci/llama-vocab.sh")
    parser.add_argument("--llama-models", type=Path, required=True, help="llama-models wheel")
    parser.add_argument("--dashscope", type=Path, required=True, help="dashscope wheel")
    args = parser.parse_args()

    llama_tokens, llama_types = gguf_vocab(args.vocab / "ggml-vocab-llama-bpe.gguf")
    qwen_tokens, _ = gguf_vocab(args.vocab / "ggml-vocab-qwen2.gguf")
    references = {
        "llama3": llama3_reference(args.llama_models, llama_tokens, llama_types),
        "qwen2": qwen2_reference(args.dashscope, qwen_tokens),
    }
    hf_converted = {
        family: AutoTokenizer.from_pretrained(str(args.vocab), gguf_file=f"ggml-vocab-{name}.gguf")
        for family, name in (("llama3", "llama-bpe"), ("qwen2", "qwen2"))
    }
    tokenization(
        "llama-bpe",
        "llama3",
        args.vocab,
        references["llama3"],
        f"Meta's tiktoken BPE file and pat_str from {args.llama_models.name} "
        "(llama_models/llama3/), tiktoken " + tiktoken.__version__,
        hf_converted["llama3"],
    )
    tokenization(
        "qwen2",
        "qwen2",
        args.vocab,
        references["qwen2"],
        f"Qwen's qwen.tiktoken and PAT_STR from {args.dashscope.name} (NFC first), "
        "tiktoken " + tiktoken.__version__,
        hf_converted["qwen2"],
    )
    chat(args.vocab, references, hf_converted)
    print(f"transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
