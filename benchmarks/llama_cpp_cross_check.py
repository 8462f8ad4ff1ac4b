"""quantbench's llama.cpp speed against llama.cpp's own llama-bench, on the same GGUF files and threads.

For each GGUF (a quantized checkpoint folder of a run, or a .gguf file), alternately for --rounds
rounds: quantbench's pp512/tg128 (engines.llamacpp.standard_bench: a 512-token prompt at once, 128
tokens one by one from an empty cache, each in a context of its own tokens, 5 repetitions after a
warm-up) and `llama-bench -p 512 -n 128 -r 5 -t THREADS -fa 1` (flash attention, as the engine runs),
built from the source of the installed llama-cpp-python release (gguf_files.tool). Where the
bindings have a GPU backend, both offload every layer (-ngl 99), as a quantbench run on the GPU does.

Every repetition of every round is a sample (llama-bench's `samples_ts`); the ratio is of the medians
of all samples, and of the fastest ones: on a shared machine other work only slows a repetition,
so the fastest is each side's uncontended speed. Alternating the rounds gives both the same spells
of interference.

    python benchmarks/llama_cpp_cross_check.py ~/.cache/quantbench/quantized/smollm2-135m/gguf-q4_k_m-*
"""
import argparse
import json
import statistics
import subprocess
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="+", help="a .gguf file or a folder holding model.gguf")
    p.add_argument("--threads", type=int, default=llamacpp.default_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gpu-layers", type=int, default=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
                   help="layers offloaded to the GPU (-1: all; the default where the bindings have a GPU backend)")
    args = p.parse_args()
    print(f"llama-cpp-python {gguf_files.version()}, {args.threads} threads, {args.gpu_layers} GPU layers, "
          f"{llama_cpp.llama_print_system_info().decode().strip()}")
    print("| GGUF | test | quantbench median tok/s of each round | llama-bench median tok/s of each round | "
          "ratio of medians | ratio of fastest |")
    print("|---|---|---|---|---|---|")
    for given in map(Path, args.gguf):
        path = given / "model.gguf" if given.is_dir() else given
        q, l = [], []
        for _ in range(args.rounds):
            q.append(ours(path, args.threads, args.gpu_layers))
            l.append(theirs(path, args.threads, args.gpu_layers))
        for test in TESTS:
            a, b = [x[test] for x in q], [x[test] for x in l]
            every_a, every_b = [v for r in a for v in r], [v for r in b for v in r]
            print(f"| {given.name} | {test} | {', '.join(f'{statistics.median(r):.1f}' for r in a)} | "
                  f"{', '.join(f'{statistics.median(r):.1f}' for r in b)} | "
                  f"{statistics.median(every_a) / statistics.median(every_b):.3f} | {max(every_a) / max(every_b):.3f} |")


if __name__ == "__main__":
    main()
