"""Does the sweep's step clock agree with a plain wall clock? The decode rate two ways, same model.

The sweep (engine.time_decode) stamps every token as it is produced (a CUDA event on the stream) and
reports batch / median step. The reference is the protocol it replaced, timed with the host's clock
around whole calls, the GPU synchronized: batch x (N - 1) / (t(N tokens) - t(1 token)). Both run on
the same warmed model, alternating, `--rounds` times per batch size; the script prints each round
and the ratio of the medians. Eager `generate` with the sweep's attention kernels (engine.EAGER_ATTENTION),
or the compiled loop (`--mode compiled`: engine.greedy_static with engine.compile_step).

    python benchmarks/decode_clock_check.py --arch smollm2-135m --batch-sizes 1,8,32
    python benchmarks/decode_clock_check.py --arch llama-3.2-1b --mode compiled --batch-sizes 1
"""
import argparse
import statistics
import time

import torch

from quantbench import cost, models
from quantbench.engines import transformers as engine
from quantbench.methods import METHODS


def wall_rate(run, batch, new_tokens, device):
    """The replaced protocol's rate: batch x (N - 1) / (t(N) - t(1)), host clock, GPU synchronized."""
    seconds = {}
    for n in (new_tokens, 1):
        engine.sync(device)
        t0 = time.perf_counter()
        run(n)
        engine.sync(device)
        seconds[n] = time.perf_counter() - t0
    return batch * (new_tokens - 1) / (seconds[new_tokens] - seconds[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="smollm2-135m")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = METHODS["fp16"]["load"](str(models.prepare_arch(args.arch, models.cache_folder())), device=device)
    stream = torch.arange(30000) % 250 + 3  # synthetic prompt tokens: speed does not depend on them
    step = engine.compile_step(model, device) if args.mode == "compiled" else None
    print(f"arch:{args.arch} float16, {args.mode}, {device}, {args.new_tokens} new tokens from 32-token prompts")
    print("| batch | round | step clock tok/s (median step) | step clock tok/s (mean step) | wall clock tok/s (t(N) - t(1)) |")
    print("|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        ids = cost.prompt_batch(stream, b, 32).to(model.device)
        cache = engine.static_cache(model, 32 + args.new_tokens) if args.mode == "compiled" else None

        def run(n, marks=None):
            engine.decode(model, ids, n, pad_token_id=0, mode=args.mode, step=step, cache=cache, marks=marks)
        medians, walls = [], []
        with torch.no_grad(), engine.only_attention(engine.EAGER_ATTENTION if args.mode == "eager" else None):
            run(args.new_tokens)  # warm-up: compilation, graphs, allocations
            run(1)
            for r in range(args.rounds):
                marks = []
                run(args.new_tokens, marks)
                steps = engine.seconds_between(marks)
                medians.append(b / statistics.median(steps))
                walls.append(wall_rate(run, b, args.new_tokens, device))
                print(f"| {b} | {r + 1} | {medians[-1]:.1f} | {b / statistics.fmean(steps):.1f} | {walls[-1]:.1f} |")
        print(f"| {b} | median | {statistics.median(medians):.1f} | | {statistics.median(walls):.1f} "
              f"(step clock / wall clock = {statistics.median(medians) / statistics.median(walls):.3f}) |")


if __name__ == "__main__":
    main()
