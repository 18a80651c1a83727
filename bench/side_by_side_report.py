#!/usr/bin/env python3
"""Prints one model size's side-by-side table from `bench/side-by-side.sh`'s measurements:
llama-bench's JSON (prompt runs, decode runs) and marengo-bench's JSON report, with the ratios
marengo / llama.cpp (above 1: marengo is faster) and decode's fraction of the read bandwidth
marengo-bench measured, for both engines.

    side_by_side_report.py SHAPE GGUF LLAMA_PROMPT.json LLAMA_DECODE.json MARENGO.json
"""

import json
import sys
from pathlib import Path

from gguf import GGUFReader


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes a decode step reads from the GGUF: every tensor, but one row of the embedding table
    unless it is also the LM head."""
    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            total += int(t.n_bytes) // int(t.shape[-1])
        else:
            total += int(t.n_bytes)
    return total


def main() -> None:
    shape, gguf, llama_prompt, llama_decode, marengo = sys.argv[1:]
    prompts = {r["n_prompt"]: r for r in json.loads(Path(llama_prompt).read_text()) if r["n_prompt"]}
    decodes = {r["n_depth"]: r for r in json.loads(Path(llama_decode).read_text()) if r["n_gen"]}
    ours = json.loads(Path(marengo).read_text())
    bandwidth = ours["read_bandwidth_bytes_per_s"]
    llama_bytes = gguf_bytes_per_token(Path(gguf))

    print(f"\n== {shape}: llama.cpp Q8_0 vs marengo FP8, {ours['threads']} threads")
    print(f"read bandwidth {bandwidth / 1e9:.2f} GB/s; weights read per token: "
          f"llama.cpp {llama_bytes / 1e6:.1f} MB, marengo {ours['weight_bytes_per_token'] / 1e6:.1f} MB")
    print(f"{'figure':<26}{'llama.cpp':>14}{'marengo':>14}{'marengo/llama.cpp':>20}")
    ours_decode = {
        ours["decode_position"]: ours["decode_tokens_per_s"],
        ours["decode_long_position"]: ours["decode_long_tokens_per_s"],
    }
    for depth, run in sorted(decodes.items()):
        theirs, mine = run["avg_ts"], ours_decode.get(depth)
        ratio = f"{mine / theirs:.2f}" if mine else "-"
        print(f"{f'decode @{depth} (tok/s)':<26}{theirs:>14.2f}{mine or float('nan'):>14.2f}{ratio:>20}")
    for run_depth, run in sorted(decodes.items()):
        theirs_fraction = run["avg_ts"] * llama_bytes / bandwidth
        mine = ours_decode.get(run_depth)
        mine_fraction = mine * ours["weight_bytes_per_token"] / bandwidth if mine else float("nan")
        print(f"{f'  of bandwidth @{run_depth}':<26}{theirs_fraction:>14.3f}{mine_fraction:>14.3f}")
    ours_prompts = {p["tokens"]: p["seconds"] for p in ours["prefills"]}
    for tokens, run in sorted(prompts.items()):
        theirs, mine = run["avg_ns"] / 1e9, ours_prompts.get(tokens)
        ratio = f"{theirs / mine:.2f}" if mine else "-"
        print(f"{f'prompt {tokens} tokens (s)':<26}{theirs:>14.3f}{mine or float('nan'):>14.3f}{ratio:>20}")
    print(f"{'marengo load (s)':<26}{'':>14}{ours['load_s']:>14.3f}")


if __name__ == "__main__":
    main()
