"""What the eager speed sweep costs with cuDNN attention allowed or excluded, point by point.

On Hopper, torch's SDPA tries cuDNN attention first, and cuDNN builds an execution plan for every
new shape; the warm-up of each decode point meets a new shape at every step. This runs
`cost.measure_speed` with the default sweep (prompt lengths 128/512/2048, batch sizes 1/8/32, 64 new
tokens, TTFT from 3 timed runs and decode from --decode-runs, after a warm-up) on a float16 arch:
model with synthetic prompt tokens, with the eager attention kernels of the variant (default:
torch's order; no-cudnn: engine.EAGER_ATTENTION, what the sweep uses), and prints the sweep's wall
time, each point's (`point_s`) and tokens/s. Run each variant in its own process (cuDNN's plans are
cached in the process). What it measured is in docs/benchmarks.md.

    python benchmarks/sweep_attention_cost.py --variant default
    python benchmarks/sweep_attention_cost.py --variant no-cudnn
"""
import argparse
import time

import torch

from quantbench import cost, models
from quantbench.engines import transformers as engine
from quantbench.methods import METHODS


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="smollm2-135m")
    p.add_argument("--variant", choices=["default", "no-cudnn"], default="default")
    p.add_argument("--decode-runs", type=int, default=1)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = METHODS["fp16"]["load"](str(models.prepare_arch(args.arch, models.cache_folder())), device=device)
    stream = torch.arange(30000) % 250 + 3  # synthetic prompt tokens: speed does not depend on them
    start = time.perf_counter()
    r = cost.measure_speed(engine, model, stream, device=device, pad_token_id=0, prompt_lengths=[128, 512, 2048],
                           decode_prompt_tokens=32, new_tokens=64, batch_sizes=[1, 8, 32], repeats=3,
                           decode_runs=args.decode_runs, weight_bytes=engine.weight_bytes(model)["weight_bytes"],
                           attention=engine.EAGER_ATTENTION if args.variant == "no-cudnn" else None)
    print(f"arch:{args.arch}, {device}, {args.variant}: sweep {time.perf_counter() - start:.1f} s")
    for length, v in r["prefill"].items():
        print(f"  prefill {length}: {v.get('point_s')} s, TTFT {v.get('ttft_ms', 0):.1f} ms")
    for b, v in r["decode"]["eager"].items():
        print(f"  decode batch {b}: {v.get('point_s')} s, {v.get('tok_s', 0):.1f} tok/s")


if __name__ == "__main__":
    main()
