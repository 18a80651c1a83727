"""How far a quantized bundle's predictions drift from a reference bundle's, with onnxruntime.

    compare_bundles.py --reference F32_BUNDLE --candidate FP8_BUNDLE --prompt-ids 1,2,3
                       [--max-new-tokens 20]

Both bundles decode greedily from the prompt (KV cache carried, as a decoder does). The
distributions are then compared position by position on one shared sequence, the prompt followed
by the reference's greedy tokens (teacher forcing), so that a single early divergence does not
make every later position incomparable. Printed as one JSON line:
`kl_mean`/`kl_max` of KL(softmax(reference) ‖ softmax(candidate)) in nats, `top1_agreement`
(fraction of positions with the same argmax), `positions`, both greedy sequences and
`greedy_common_prefix` (how many leading greedy tokens agree).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ort_bundle import BundleSession, parse_ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, so that small KL values are not rounding noise."""
    wide = logits.astype(np.float64)
    shifted = wide - wide.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_per_position(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(P_reference ‖ P_candidate) for each row of two [positions, vocab] logit arrays."""
    log_p = log_softmax(reference)
    log_q = log_softmax(candidate)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="f32 bundle")
    parser.add_argument("--candidate", type=Path, required=True, help="quantized bundle")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    args = parser.parse_args()

    prompt = parse_ids(args.prompt_ids)
    reference = BundleSession(args.reference, args.threads)
    candidate = BundleSession(args.candidate, args.threads)
    reference_greedy = reference.generate(prompt, args.max_new_tokens).greedy
    candidate_greedy = candidate.generate(prompt, args.max_new_tokens).greedy

    sequence = prompt + reference_greedy[:-1]
    reference_logits = reference.logits(sequence)
    candidate_logits = candidate.logits(sequence)
    kl = kl_per_position(reference_logits, candidate_logits)
    top1 = reference_logits.argmax(axis=-1) == candidate_logits.argmax(axis=-1)

    report = {
        "reference": str(args.reference),
        "candidate": str(args.candidate),
        "prompt_ids": prompt,
        "positions": len(sequence),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(top1.mean()),
        "reference_greedy": reference_greedy,
        "candidate_greedy": candidate_greedy,
        "greedy_common_prefix": common_prefix(reference_greedy, candidate_greedy),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
