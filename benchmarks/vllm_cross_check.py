"""quantbench's vLLM timing against vLLM's own `vllm bench latency`, on the same checkpoint and settings.

For each batch size: `vllm bench latency` (its own process) with one new token and with --output-len
new tokens, then the same two measurements in this process through engines.vllm.time_generate (the
same protocol: random prompts of --input-len ids below 10000, EOS ignored, no detokenizing, warm-up
then timed iterations). engines.vllm.read_latency turns each pair into TTFT and decode tokens/s, and
the check is quantbench's figure over vLLM's, within 5% (ratios from one run on one card).

    python benchmarks/vllm_cross_check.py CHECKPOINT --batch-sizes 1,8,32 --dtype float16
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from quantbench.engines import vllm


def theirs(checkpoint, folder, batch_size, output_len, args):
    out = Path(folder) / f"latency-b{batch_size}-n{output_len}.json"
    command = vllm.latency_command(checkpoint, out, batch_size=batch_size, input_len=args.input_len,
                                   output_len=output_len, dtype=args.dtype, warmup=args.warmup, iters=args.iters)
    subprocess.run(command + ["--gpu-memory-utilization", str(args.gpu_memory_utilization)], check=True)
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:  # vLLM's side first: its processes end before ours loads
        reference = {b: [theirs(args.checkpoint, folder, b, n, args) for n in (1, args.output_len)] for b in sizes}
    lm, info = vllm.open_llm(args.checkpoint, dtype=args.dtype, max_model_len=args.input_len + args.output_len, k=1,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    print(f"# {args.checkpoint}: quantization {info['quantization']}, {', '.join(info['linear_methods'])}")
    print("| batch | TTFT ms quantbench / vllm bench | ratio | decode tok/s quantbench / vllm bench | ratio |")
    print("|---|---|---|---|---|")
    for b in sizes:
        mine = [vllm.time_generate(lm.model, batch_size=b, input_len=args.input_len, output_len=n, warmup=args.warmup,
                                   iters=args.iters) for n in (1, args.output_len)]
        ours, ref = (vllm.read_latency(*pair, batch_size=b, output_len=args.output_len) for pair in (mine, reference[b]))
        print(f"| {b} | {ours['ttft_ms']:.2f} / {ref['ttft_ms']:.2f} | {ours['ttft_ms'] / ref['ttft_ms']:.3f} | "
              f"{ours['decode_tokens_per_s']:.1f} / {ref['decode_tokens_per_s']:.1f} | "
              f"{ours['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.3f} |")


if __name__ == "__main__":
    main()
