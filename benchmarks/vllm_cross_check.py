"""quantbench's vLLM timing against vLLM's own `vllm bench latency`, on the same checkpoint and settings.

quantbench's side is one vLLM opened in this process (engines.vllm.open_llm); vLLM's side is `vllm bench
latency`, a process each, opened with the same positions (--input-len + --output-len) and share of the
GPU, so both fit on the card at once. For each of --rounds rounds and each batch size, the two sides run
back to back, in turn first: each times generations of one new token and of --output-len new tokens
(random prompts of --input-len ids below 10000, EOS ignored, no detokenizing, warm-up then timed
iterations: engines.vllm.time_generate is that protocol in this process), and engines.vllm.read_latency
turns each pair into TTFT and decode tokens/s. Each round gives one ratio per figure (quantbench's over
vLLM's); the check is their median, within 5%, with every round's printed (ratios from one run on one card).
--max-logprobs opens quantbench's side once per value given (an experiment opens it with KLD_TOP_K), and
--max-model-len sets both sides' positions (an experiment's: MAX_MODEL_LEN), to tell which of them moves it.

    python benchmarks/vllm_cross_check.py CHECKPOINT --batch-sizes 1,8 --rounds 3 --dtype float16
    python benchmarks/vllm_cross_check.py CHECKPOINT --batch-sizes 1 --rounds 1 --max-logprobs 1,256 \
        --max-model-len 8192 --gpu-memory-utilization 0.25
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from quantbench.engines import vllm


def theirs(checkpoint, folder, batch_size, args):
    """`vllm bench latency` with one new token and with --output-len: its two results."""
    out = []
    for n in (1, args.output_len):
        path = Path(folder) / f"latency-b{batch_size}-n{n}.json"
        command = vllm.latency_command(checkpoint, path, batch_size=batch_size, input_len=args.input_len, output_len=n,
                                       dtype=args.dtype, warmup=args.warmup, iters=args.iters,
                                       max_model_len=args.max_model_len)
        out.append(vllm.run_bench(command + ["--gpu-memory-utilization", str(args.gpu_memory_utilization)], path))
    return out


def ours(llm, batch_size, args):
    return [vllm.time_generate(llm, batch_size=batch_size, input_len=args.input_len, output_len=n, warmup=args.warmup,
                               iters=args.iters) for n in (1, args.output_len)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    parser.add_argument("--max-logprobs", default="1", help="quantbench's side, one vLLM per value")
    parser.add_argument("--max-model-len", type=int, help="both sides' positions (default input + output length)")
    args = parser.parse_args()
    args.max_model_len = args.max_model_len or args.input_len + args.output_len
    sizes, ks = ([int(x) for x in arg.split(",")] for arg in (args.batch_sizes, args.max_logprobs))
    llms = {}
    for k in ks:
        lm, info = vllm.open_llm(args.checkpoint, dtype=args.dtype, max_model_len=args.max_model_len, k=k,
                                 gpu_memory_utilization=args.gpu_memory_utilization)
        llms[k] = lm.model
    print(f"# {args.checkpoint}: quantization {info['quantization']}, {', '.join(info['quant_methods'])}; "
          f"{args.max_model_len} positions; quantbench's side with max_logprobs {', '.join(map(str, ks))}")
    ratios = {(b, k): {"ttft": [], "decode": []} for b in sizes for k in ks}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for b in sizes:
                got = {}
                for side in ([*ks, "theirs"] if r % 2 == 0 else ["theirs", *ks]):  # in turn first
                    got[side] = theirs(args.checkpoint, folder, b, args) if side == "theirs" else ours(llms[side], b, args)
                ref = vllm.read_latency(*got["theirs"], batch_size=b, output_len=args.output_len)
                for k in ks:
                    mine = vllm.read_latency(*got[k], batch_size=b, output_len=args.output_len)
                    ratios[b, k]["ttft"].append(mine["ttft_ms"] / ref["ttft_ms"])
                    ratios[b, k]["decode"].append(mine["decode_tokens_per_s"] / ref["decode_tokens_per_s"])
                    print(f"round {r + 1}, batch {b}, max_logprobs {k}: TTFT ms {mine['ttft_ms']:.2f} / "
                          f"{ref['ttft_ms']:.2f}, decode tok/s {mine['decode_tokens_per_s']:.1f} / "
                          f"{ref['decode_tokens_per_s']:.1f} (quantbench / vllm bench)", flush=True)
    print("| batch | max_logprobs | TTFT ratio, median [rounds] | decode tok/s ratio, median [rounds] |")
    print("|---|---|---|---|")
    for (b, k), figures in ratios.items():
        cells = [f"{statistics.median(v):.3f} [{', '.join(f'{x:.3f}' for x in v)}]" for v in figures.values()]
        print(f"| {b} | {k} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
