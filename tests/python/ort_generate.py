"""Greedy generation from a bundle with onnxruntime, printed as one JSON line for Rust tests.

    ort_generate.py --bundle DIR --prompt-ids 1,2,3 --max-new-tokens 20
                    [--logits-out FILE] [--greedy-logits-out FILE]

`--logits-out` receives the logits of every prompt position as raw little-endian float32,
row-major [prompt_len, vocab] (the shape is in the JSON as `logits_shape`), so a consumer needs
no numpy format reader. `--greedy-logits-out` receives, the same way, the [max_new_tokens, vocab]
logits each greedy token was taken from: all but the first come from single-token steps over the
KV cache, so they check the decode path numerically, not only through its argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ort_bundle import BundleSession, parse_ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--logits-out", type=Path, help="raw little-endian f32 prompt logits")
    parser.add_argument(
        "--greedy-logits-out", type=Path, help="raw little-endian f32 logits of each greedy step"
    )
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    args = parser.parse_args()

    prompt = parse_ids(args.prompt_ids)
    generation = BundleSession(args.bundle, args.threads).generate(prompt, args.max_new_tokens)
    logits = generation.prompt_logits.astype("<f4", copy=False)
    if args.logits_out:
        logits.tofile(args.logits_out)
    greedy_logits = generation.greedy_logits.astype("<f4", copy=False)
    if args.greedy_logits_out:
        greedy_logits.tofile(args.greedy_logits_out)
    last = greedy_logits[-1]
    report = {
        "bundle": str(args.bundle),
        "prompt_ids": prompt,
        "greedy": generation.greedy,
        "logits_file": str(args.logits_out) if args.logits_out else None,
        "logits_shape": list(logits.shape),
        "greedy_logits_file": str(args.greedy_logits_out) if args.greedy_logits_out else None,
        "greedy_logits_shape": list(greedy_logits.shape),
        "logits_finite": bool(np.isfinite(logits).all() and np.isfinite(greedy_logits).all()),
        "last_logits_stats": {
            "min": float(last.min()),
            "max": float(last.max()),
            "mean": float(last.mean()),
            "std": float(last.std()),
            "argmax": int(last.argmax()),
        },
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
