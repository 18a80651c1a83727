"""Makes the SLERP merge references under tests/fixtures/merge with mergekit itself.

    python tests/python/make_merge_refs.py --marengo-export target/debug/marengo-export

Needs mergekit (PyPI, 0.1.5 was used) with a CPU torch, plus safetensors and tokenizers. CI does
not run this: the tests compare marengo's merge with what this script committed.

What it makes:
- parent-a, parent-b: tiny bf16 Mistral checkpoints (tiny-mistral.json, 5 layers) from
  `marengo-export synth` with seeds 1 and 2. Three tensors of parent-b are then replaced by blends
  with parent-a's, so that the merge meets every branch of mergekit's SLERP: a nearly colinear
  pair (linear interpolation), a strongly correlated one and an anti-correlated one (the arc).
  parent-a also gets a small word-level tokenizer, which the merge copies.
- CASE/expected.safetensors and CASE/expected-config.json for each CASE/slerp.yml:
  mergekit's merged weights and config.json.
- coefficients.json: for t = 0.37 and every tensor pair of both parent pairs, the f32 norms,
  cos θ and coefficients inside mergekit's slerp(), as bits: the tests check marengo's
  coefficients themselves, not only the bf16 weights they round to.
- chunked/expected.json: the sha256 of every tensor mergekit makes from two synth parents of
  chunked-mistral.json (seeds 1 and 2, bf16), whose embedding and LM head span two of
  mergekit's 2^20-element chunks. The test regenerates those parents with synth.

mergekit runs with one torch thread (--num-threads 1): torch splits a sum of more than 32768
elements across its threads, so mergekit's bits for large tensors depend on the thread count.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "merge"
CASES = ["constant-t", "filter-gradient", "two-slices"]
# t of the coefficient table: not a round number, so that 1 - t and t·θ round.
COEFFICIENT_T = 0.37


def mergekit_coefficients(v0, v1, t):
    """The f32 intermediates of mergekit's slerp() for one tensor pair (its own code, cut
    before the element-wise step): norms, cos θ and the two coefficients."""
    from mergekit.merge_methods import slerp as mk

    dtype = torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    t = torch.tensor([t], dtype=torch.float32).reshape(-1, 1).to(dtype)
    chunk_size = max(1, mk._CHUNK_ELEMENTS // a.shape[0])
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], chunk_size):
        x = a[:, start : start + chunk_size].to(dtype)
        y = b[:, start : start + chunk_size].to(dtype)
        norm_a_parts.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], chunk_size):
        x = a[:, start : start + chunk_size].to(dtype) / norm_a
        y = b[:, start : start + chunk_size].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    # Cross-check the cut-down copy against mergekit's own function.
    merged = mk.slerp(t, v0.unsqueeze(0), v1.unsqueeze(0))[0]
    expected = (coef_a * a.to(dtype) + coef_b * b.to(dtype)).to(v0.dtype).reshape(v0.shape)
    assert torch.equal(merged, expected), "the copy of mergekit's slerp drifted"
    bits = lambda x: f"{x.reshape(()).view(torch.int32).item() & 0xFFFFFFFF:08x}"
    return {
        "norm_a": bits(norm_a), "norm_b": bits(norm_b), "dot": bits(dot),
        "base": bits(coef_a), "other": bits(coef_b), "linear": bool(linear.item()),
    }


def coefficient_table(parent_a, parent_b, t):
    a = load_file(parent_a / "model.safetensors")
    b = load_file(parent_b / "model.safetensors")
    return {name: mergekit_coefficients(a[name], b[name], t) for name in sorted(a)}


def run(*args, **kwargs):
    print("+", " ".join(str(a) for a in args), file=sys.stderr)
    subprocess.run([str(a) for a in args], check=True, **kwargs)


def synth(exe, config, out, seed):
    if out.exists():
        shutil.rmtree(out)
    run(exe, "synth", "--config", config, "--out", out, "--seed", seed, "--dtype", "bf16")


def blend_parent_b(parent_a, parent_b):
    """Replaces three tensors of parent-b by blends with parent-a's (deterministic)."""
    a = load_file(parent_a / "model.safetensors")
    b = load_file(parent_b / "model.safetensors")
    gen = torch.Generator().manual_seed(5)

    def noise(name):
        return (torch.rand(a[name].shape, generator=gen) * 2 - 1) * a[name].float().abs().mean()

    name = "model.layers.1.self_attn.q_proj.weight"  # cos θ ≈ 0.9999: linear
    b[name] = (1.01 * a[name].float() + 0.01 * noise(name)).to(torch.bfloat16)
    name = "model.layers.2.mlp.down_proj.weight"  # cos θ ≈ 0.8
    b[name] = (0.8 * a[name].float() + 0.6 * b[name].float()).to(torch.bfloat16)
    name = "model.layers.3.self_attn.o_proj.weight"  # cos θ ≈ -0.6
    b[name] = (-0.6 * a[name].float() + 0.8 * b[name].float()).to(torch.bfloat16)
    save_file(b, parent_b / "model.safetensors", metadata={"format": "pt"})
    os.chmod(parent_b / "model.safetensors", 0o644)


def tiny_tokenizer(parent):
    """A 128-token word-level tokenizer.json and its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, 128):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(parent / "tokenizer.json"))
    (parent / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512},
            indent=2,
        )
        + "\n"
    )


def mergekit(config, out, copy_tokenizer=True):
    if out.exists():
        shutil.rmtree(out)
    args = ["mergekit-yaml", config.name, out, "--num-threads", "1", "--no-write-model-card"]
    if not copy_tokenizer:
        args.append("--no-copy-tokenizer")
    exe = Path(sys.executable).parent / "mergekit-yaml"
    run(exe, *args[1:], cwd=config.parent)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--marengo-export", required=True, type=Path)
    args = parser.parse_args()
    exe = args.marengo_export.resolve()

    tiny = FIXTURES / "tiny-mistral.json"
    parent_a, parent_b = FIXTURES / "parent-a", FIXTURES / "parent-b"
    synth(exe, tiny, parent_a, 1)
    synth(exe, tiny, parent_b, 2)
    blend_parent_b(parent_a, parent_b)
    tiny_tokenizer(parent_a)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in CASES:
            out = tmp / case
            mergekit(FIXTURES / case / "slerp.yml", out)
            expected = FIXTURES / case / "expected.safetensors"
            shutil.copy(out / "model.safetensors", expected)
            os.chmod(expected, 0o644)
            shutil.copy(out / "config.json", FIXTURES / case / "expected-config.json")

        chunked = tmp / "chunked"
        chunked.mkdir()
        synth(exe, FIXTURES / "chunked-mistral.json", chunked / "parent-a", 1)
        synth(exe, FIXTURES / "chunked-mistral.json", chunked / "parent-b", 2)
        shutil.copy(FIXTURES / "chunked" / "slerp.yml", chunked / "slerp.yml")
        mergekit(chunked / "slerp.yml", chunked / "out", copy_tokenizer=False)
        torch.set_num_threads(1)
        table = {
            "t": COEFFICIENT_T,
            "tiny": coefficient_table(parent_a, parent_b, COEFFICIENT_T),
            "chunked": coefficient_table(chunked / "parent-a", chunked / "parent-b", COEFFICIENT_T),
        }
        (FIXTURES / "coefficients.json").write_text(json.dumps(table, indent=1) + "\n")
        merged = load_file(chunked / "out" / "model.safetensors")
        table = {
            name: {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "sha256": hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest(),
            }
            for name, t in sorted(merged.items())
        }
        (FIXTURES / "chunked" / "expected.json").write_text(json.dumps(table, indent=1) + "\n")

    import mergekit as mk_package
    from importlib.metadata import version

    print(f"made with mergekit {version('mergekit')}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, mergekit at {Path(mk_package.__file__).parent}", file=sys.stderr)


if __name__ == "__main__":
    main()
