"""Runs a marengo bundle with onnxruntime on CPU, the independent reference engine of the tests.

The bundle's graph contract (ARCHITECTURE.md) is driven exactly as a decoder with a KV cache
drives it: an empty past (past_sequence_length 0) plus the whole prompt, then one token per step
with each step's `present.*` fed back as the next step's `past_key_values.*`. Batch size is 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass
class Generation:
    """Result of a greedy run: logits of every prompt position and the generated token ids."""

    prompt_logits: np.ndarray  # [prompt_len, vocab] float32
    greedy: list[int]
    # [len(greedy), vocab] float32: row i is the distribution greedy token i was taken from
    # (row 0 is the last prompt row, the others come from single-token steps over the cache).
    greedy_logits: np.ndarray


class BundleSession:
    """An onnxruntime session over `BUNDLE/model.onnx` (external data in `model.weights`)."""

    def __init__(self, bundle: Path, threads: int = 0) -> None:
        model = bundle / "model.onnx"
        if not model.is_file():
            raise FileNotFoundError(f"{model}: not a bundle (model.onnx missing)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.past_inputs: list[tuple[str, list]] = []
        for node in self.session.get_inputs():
            if _PAST.match(node.name):
                self.past_inputs.append((node.name, node.shape))
        if not self.past_inputs:
            raise ValueError(f"{model}: graph has no past_key_values.* inputs")
        self.output_names = [node.name for node in self.session.get_outputs()]

    def empty_past(self) -> dict[str, np.ndarray]:
        """Zero-length KV cache: [1, kv_heads, 0, head_dim] per past input."""
        past = {}
        for name, shape in self.past_inputs:
            kv_heads, head_dim = shape[1], shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise ValueError(f"input {name}: kv_heads and head_dim must be static, got {shape}")
            past[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        return past

    def forward(
        self, ids: list[int], start: int, past: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Runs `ids` at positions start.. after `past`; returns logits [len, vocab] and the new past."""
        feeds = dict(past)
        feeds["input_ids"] = np.asarray([ids], dtype=np.int64)
        feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None, :]
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        present = {
            name: outputs[name.replace("past_key_values.", "present.")]
            for name, _ in self.past_inputs
        }
        return outputs["logits"][0], present

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len, vocab] of every position of `ids`, in one pass from an empty cache."""
        logits, _ = self.forward(ids, 0, self.empty_past())
        return logits

    def generate(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """Greedy decoding with the KV cache carried between steps, as a real decoder does it."""
        if not prompt:
            raise ValueError("empty prompt")
        prompt_logits, past = self.forward(prompt, 0, self.empty_past())
        rows = [prompt_logits[-1]]
        greedy: list[int] = []
        while len(greedy) < max_new_tokens:
            token = int(np.argmax(rows[-1]))
            greedy.append(token)
            if len(greedy) == max_new_tokens:
                break
            step_logits, past = self.forward([token], len(prompt) + len(greedy) - 1, past)
            rows.append(step_logits[-1])
        return Generation(
            prompt_logits=prompt_logits,
            greedy=greedy,
            greedy_logits=np.stack(rows[: len(greedy)]),
        )


def parse_ids(text: str) -> list[int]:
    """`1,2,3` → [1, 2, 3], for the command-line scripts."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from error
