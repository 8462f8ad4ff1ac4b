"""quantbench's llama.cpp speed against llama.cpp's own llama-bench, on the same GGUF files and threads.

For each GGUF (a quantized checkpoint folder of a run, or a .gguf file), alternately for --rounds
rounds: quantbench's pp512/tg128 (engines.llamacpp.standard_bench: a 512-token prompt at once, 128
tokens one by one from an empty cache, mean of 5 after a warm-up) and `llama-bench -p 512 -n 128
-r 5 -t THREADS -fa 1` (flash attention, as the engine runs), built from the source of the installed
llama-cpp-python release (gguf_files.tool). Where the bindings have a GPU backend, both offload every
layer (-ngl 99), as a quantbench run on the GPU does. Prints each round's tokens/s and the ratio of
the medians.

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


def ours(path, threads, gpu_layers):
    model = llamacpp.gguf_model(path, gpu_layers=gpu_layers, threads=threads)
    try:
        return llamacpp.standard_bench(model)
    finally:
        model["llm"].close()


def theirs(path, threads, gpu_layers):
    out = subprocess.run([str(gguf_files.tool("llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-r", "5",
                          "-t", str(threads), "-ngl", str(99 if gpu_layers < 0 else gpu_layers), "-fa", "1" if llamacpp.FLASH_ATTENTION else "0", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="+", help="a .gguf file or a folder holding model.gguf")
    p.add_argument("--threads", type=int, default=llamacpp.default_threads())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu-layers", type=int, default=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
                   help="layers offloaded to the GPU (-1: all; the default where the bindings have a GPU backend)")
    args = p.parse_args()
    print(f"llama-cpp-python {gguf_files.version()}, {args.threads} threads, {args.gpu_layers} GPU layers, "
          f"{llama_cpp.llama_print_system_info().decode().strip()}")
    print("| GGUF | test | quantbench tok/s (rounds) | llama-bench tok/s (rounds) | median ratio |")
    print("|---|---|---|---|---|")
    for given in map(Path, args.gguf):
        path = given / "model.gguf" if given.is_dir() else given
        q, l = [], []
        for _ in range(args.rounds):
            q.append(ours(path, args.threads, args.gpu_layers))
            l.append(theirs(path, args.threads, args.gpu_layers))
        for test in ("pp512", "tg128"):
            a, b = [x[test]["tok_s"] for x in q], [x[test] for x in l]
            print(f"| {given.name} | {test} | {', '.join(f'{v:.1f}' for v in a)} | {', '.join(f'{v:.1f}' for v in b)} | "
                  f"{statistics.median(a) / statistics.median(b):.3f} |")


if __name__ == "__main__":
    main()
