"""quantbench's llama.cpp speed against llama.cpp's own llama-bench, on the same GGUF files and threads.

For each GGUF (a quantized checkpoint folder of a run, or a .gguf file), alternately for --rounds
rounds: quantbench's pp512/tg128 (engines.llamacpp.standard_bench: a 512-token prompt at once, 128
tokens one by one from an empty cache, each in a context of its own tokens, 5 repetitions after a
warm-up) and `llama-bench -p 512 -n 128 -r 5 -t THREADS -fa 1` (flash attention, as the engine runs),
built from the source of the installed llama-cpp-python release (gguf_files.tool). Where the
bindings have a GPU backend, both offload every layer (-ngl 99), as a quantbench run on the GPU does.

Every repetition of every round is a sample (llama-bench's `samples_ts`). Each round gives one ratio
(quantbench's median over llama-bench's, the two sides run back to back, in turn first, a second's
pause between them so that neither meets the other's spinning threads), and the check is the median
of the rounds' ratios with its 95% bootstrap interval: on a shared machine whose speed drifts, the
drift cancels within a round, and "within 5%" means the interval lies inside 0.95-1.05. The ratio of
all samples' medians and of the fastest ones is printed beside it.

    python benchmarks/llama_cpp_cross_check.py ~/.cache/quantbench/quantized/smollm2-135m/gguf-q4_k_m-*
"""
import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import llama_cpp

from quantbench import gguf_files
from quantbench.engines import llamacpp

TESTS = ("pp512", "tg128")


def ours(path, threads, gpu_layers):
    bench = llamacpp.standard_bench(llamacpp.gguf_model(path, gpu_layers=gpu_layers, threads=threads))  # closes its contexts
    return {test: bench[test]["tok_s_samples"] for test in TESTS}


def theirs(path, threads, gpu_layers):
    out = subprocess.run([str(gguf_files.tool("llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-r", "5",
                          "-t", str(threads), "-ngl", str(99 if gpu_layers < 0 else gpu_layers), "-fa", "1" if llamacpp.FLASH_ATTENTION else "0", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return {("pp512" if r["n_prompt"] else "tg128"): r["samples_ts"] for r in json.loads(out)}


def interval(ratios, draws=10_000):
    """The 95% bootstrap interval of the median of `ratios` (resampling the rounds)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="+", help="a .gguf file or a folder holding model.gguf")
    p.add_argument("--threads", type=int, default=llamacpp.default_threads())
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--gpu-layers", type=int, default=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
                   help="layers offloaded to the GPU (-1: all; the default where the bindings have a GPU backend)")
    args = p.parse_args()
    print(f"llama-cpp-python {gguf_files.version()}, {args.threads} threads, {args.gpu_layers} GPU layers, "
          f"{llama_cpp.llama_print_system_info().decode().strip()}")
    print("| GGUF | test | quantbench median tok/s of each round | llama-bench median tok/s of each round | "
          "median of the rounds' ratios [95% interval] | within 5% | ratio of all medians | ratio of fastest |")
    print("|---|---|---|---|---|---|---|---|")
    for given in map(Path, args.gguf):
        path = given / "model.gguf" if given.is_dir() else given
        q, l = [], []
        for i in range(args.rounds):
            for measure, into in ((ours, q), (theirs, l)) if i % 2 == 0 else ((theirs, l), (ours, q)):
                time.sleep(1)
                into.append(measure(path, args.threads, args.gpu_layers))
        for test in TESTS:
            a, b = [x[test] for x in q], [x[test] for x in l]
            ratios = [statistics.median(x) / statistics.median(y) for x, y in zip(a, b)]
            lo, hi = interval(ratios)
            every_a, every_b = [v for r in a for v in r], [v for r in b for v in r]
            print(f"| {given.name} | {test} | {', '.join(f'{statistics.median(r):.1f}' for r in a)} | "
                  f"{', '.join(f'{statistics.median(r):.1f}' for r in b)} | "
                  f"{statistics.median(ratios):.3f} [{lo:.3f}, {hi:.3f}] | {'yes' if 0.95 <= lo and hi <= 1.05 else 'no'} | "
                  f"{statistics.median(every_a) / statistics.median(every_b):.3f} | {max(every_a) / max(every_b):.3f} |")


if __name__ == "__main__":
    main()
