#!/usr/bin/env python3
"""Writes a llama.cpp Q8_0 GGUF of a model shape with random weights: the llama.cpp side of
`bench/side-by-side.sh`, whose FP8 bundle marengo-export makes from this same file, so both engines
read the same weights.

Speed does not depend on the weights' values, only on the shape and the format, so the weights are
random Q8_0 blocks (one f16 scale, 32 int8) and the norms are ones. The tokenizer is copied from
another GGUF (`--vocab`, by default Mistral-7B v0.1's sentencepiece vocabulary in
tests/fixtures/gguf/mistral-spm-vocab.gguf; SmolLM2's shape takes SmolLM2's own GGUF, whose 49152
tokens are a fifth of its weights), so that llama.cpp loads the file as it would a converted model.

    python bench/make_q8_0_gguf.py OUT.gguf [--shape smollm2-135m|tinyllama-1.1b|mistral-7b|small]
        [--vocab GGUF] [--seed N]
"""

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

VOCAB = Path(__file__).resolve().parent.parent / "tests/fixtures/gguf/mistral-spm-vocab.gguf"
SHAPES = {
    # SmolLM2-135M(-Instruct): head_dim 64, the LM head tied to the embedding.
    "smollm2-135m": dict(
        hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, context=8192, vocab=49152,
        rope_base=100000.0, tied=True,
    ),
    # TinyLlama-1.1B: head_dim 64.
    "tinyllama-1.1b": dict(
        hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, context=2048, vocab=32000,
        rope_base=10000.0, tied=False,
    ),
    # Mistral-7B v0.1 / Marengoli_7B_SLERP.
    "mistral-7b": dict(
        hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, context=4096, vocab=32000,
        rope_base=10000.0, tied=False,
    ),
    # Mistral's widths, two layers: for a quick check of the script itself.
    "small": dict(
        hidden=4096, ffn=14336, layers=2, heads=32, kv_heads=8, context=4096, vocab=32000,
        rope_base=10000.0, tied=False,
    ),
}
BLOCK = 32
BLOCK_BYTES = 2 + BLOCK


def q8_0_blocks(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q8_0 rows as bytes `[rows, cols / 32 * 34]`: uniform int8 codes, one scale."""
    assert cols % BLOCK == 0
    blocks = rows * cols // BLOCK
    out = np.frombuffer(rng.bytes(blocks * BLOCK_BYTES), dtype=np.uint8).reshape(blocks, BLOCK_BYTES).copy()
    # Uniform codes in [-128, 127] have a standard deviation of about 74.
    out[:, :2] = np.frombuffer(np.float16(std / 74.0).tobytes(), dtype=np.uint8)
    return out.reshape(rows, cols // BLOCK * BLOCK_BYTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="mistral-7b")
    parser.add_argument("--vocab", type=Path, default=VOCAB, help="GGUF whose tokenizer is copied")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    s = SHAPES[args.shape]
    head_dim = s["hidden"] // s["heads"]
    vocab = GGUFReader(args.vocab)
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].contents())
    if n_vocab != s["vocab"]:
        parser.error(f"{args.shape} has {s['vocab']} tokens, {args.vocab} {n_vocab}")

    w = GGUFWriter(str(args.out), arch="llama")
    w.add_name(f"random {args.shape} Q8_0")
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type)

    # (name, rows, cols) for Q8_0 matrices, (name, length) for f32 norms, in file order.
    hidden, kv = s["hidden"], s["kv_heads"] * head_dim
    tensors: list = [("token_embd.weight", n_vocab, hidden)]
    for i in range(s["layers"]):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", hidden),
            (p + "attn_q.weight", hidden, hidden),
            (p + "attn_k.weight", kv, hidden),
            (p + "attn_v.weight", kv, hidden),
            (p + "attn_output.weight", hidden, hidden),
            (p + "ffn_norm.weight", hidden),
            (p + "ffn_gate.weight", s["ffn"], hidden),
            (p + "ffn_up.weight", s["ffn"], hidden),
            (p + "ffn_down.weight", hidden, s["ffn"]),
        ]
    tensors += [("output_norm.weight", hidden)]
    if not s["tied"]:
        tensors += [("output.weight", n_vocab, hidden)]

    for t in tensors:
        if len(t) == 3:
            name, rows, cols = t
            shape = (rows, cols // BLOCK * BLOCK_BYTES)
            w.add_tensor_info(name, shape, np.dtype(np.uint8), rows * shape[1], GGMLQuantizationType.Q8_0)
        else:
            name, length = t
            w.add_tensor_info(name, (length,), np.dtype(np.float32), length * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    for t in tensors:
        if len(t) == 3:
            name, rows, cols = t
            w.write_tensor_data(q8_0_blocks(rng, rows, cols, std=0.02))
        else:
            w.write_tensor_data(np.ones(t[1], dtype=np.float32))
    w.close()


if __name__ == "__main__":
    main()
