"""Greedy generation from a bundle with onnxruntime, printed as one JSON line for Rust tests.

    ort_generate.py --bundle DIR --prompt-ids 1,2,3 --max-new-tokens 20 [--logits-out FILE]

`--logits-out` receives the logits of every prompt position as raw little-endian float32,
row-major [prompt_len, vocab] (the shape is in the JSON as `logits_shape`), so a consumer needs
no numpy format reader.
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
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    args = parser.parse_args()

    prompt = parse_ids(args.prompt_ids)
    generation = BundleSession(args.bundle, args.threads).generate(prompt, args.max_new_tokens)
    logits = generation.prompt_logits.astype("<f4", copy=False)
    if args.logits_out:
        logits.tofile(args.logits_out)
    last = generation.last_logits
    report = {
        "bundle": str(args.bundle),
        "prompt_ids": prompt,
        "greedy": generation.greedy,
        "logits_file": str(args.logits_out) if args.logits_out else None,
        "logits_shape": list(logits.shape),
        "prompt_logits_finite": bool(np.isfinite(logits).all()),
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
