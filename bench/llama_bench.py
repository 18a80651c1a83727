#!/usr/bin/env python3
"""The subset of llama.cpp's `llama-bench` that marengo-bench uses, over llama-cpp-python (which
builds llama.cpp from source for this CPU but ships no llama-bench program):

    llama_bench.py -m MODEL.gguf -t THREADS -p PROMPT_TOKENS -n GENERATED_TOKENS [-d DEPTH] [-r REPS] -o json

As llama-bench does, it prints a JSON list with one record for the prompt run (`n_prompt`, its
`avg_ts` in tokens/s) and one for the generation run (`n_gen`), inputs are random token ids, and a
warm-up run comes first. Generation starts after `-d` tokens already in the KV cache, so that it
can be compared with a decode at the same position.
"""

import argparse
import json
import random
import time

import llama_cpp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", required=True)
    parser.add_argument("-t", type=int, required=True)
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-d", type=int, default=0)
    parser.add_argument("-r", type=int, default=1)
    parser.add_argument("-o", choices=["json"], default="json")
    args = parser.parse_args()

    llm = llama_cpp.Llama(
        model_path=args.m,
        n_ctx=max(args.p, args.d + args.n) + 16,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.t,
        n_threads_batch=args.t,
        verbose=False,
    )
    rng = random.Random(0x5EED)
    vocab = llm.n_vocab()

    def tokens(count: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(count)]

    def prompt_run() -> float:
        llm.reset()
        prompt = tokens(args.p)
        start = time.perf_counter()
        llm.eval(prompt)
        return args.p / (time.perf_counter() - start)

    def generation_run() -> float:
        llm.reset()
        if args.d:
            llm.eval(tokens(args.d))
        start = time.perf_counter()
        for token in tokens(args.n):
            llm.eval([token])
        return args.n / (time.perf_counter() - start)

    llm.eval(tokens(min(args.p, 16)))  # warm-up: maps the weights, builds the graphs
    prompt = [prompt_run() for _ in range(args.r)]
    generation = [generation_run() for _ in range(args.r)]
    common = {"model_filename": args.m, "n_threads": args.t, "n_depth": args.d}
    print(
        json.dumps(
            [
                {**common, "n_prompt": args.p, "n_gen": 0, "avg_ts": sum(prompt) / len(prompt), "samples_ts": prompt},
                {**common, "n_prompt": 0, "n_gen": args.n, "avg_ts": sum(generation) / len(generation), "samples_ts": generation},
            ]
        )
    )


if __name__ == "__main__":
    main()
