"""Where a decode step's time goes, on the GPU: quantbench's compiled loop against variants of it,
and `generate` at lm-eval's batch with and without lm-eval's stop-sequence check.

Part 1 (compiled decode, float16, random weights with a real model's configuration, batch 1 by
default): for each variant, tokens/s over `--new-tokens` (median of 3 after a warm-up, the GPU
synchronized), and from torch.profiler traces (17 tokens less 1: the prefill subtracted) the GPU
kernel time and the kernels of a decode step, against the time the weights take to read at the measured copy bandwidth.
  plain            the model compiled (reduce-overhead: CUDA graphs) without tuning: quantbench's
                   first compiled loop
  quantbench       engine.greedy_static with engine.compile_step, what `--decode-mode compiled` runs:
                   the same with inductor's coordinate-descent tuning (gpt-fast's setting) and,
                   on Hopper, programmatic dependent launch (engine.compiled_settings)
  autotune         mode max-autotune (matmul templates benchmarked at compile time), tuned
  eager-attention  quantbench's step with transformers' eager attention (matmul and softmax, which
                   inductor compiles with the rest) in place of SDPA (a cuDNN kernel on Hopper)
  fused-mlp        quantbench's step on the model with each layer's gate and up projections in one
                   concatenated weight (one matrix-vector product instead of two, as
                   serving engines do); its greedy tokens are compared with the unfused model's
  freezing         quantbench's step compiled with inductor's freezing (weights as constants: its
                   passes may concatenate the products that share an input, q/k/v and gate/up)
  no-pdl           quantbench's step without programmatic dependent launch (Hopper: each Triton
                   kernel may start while the one before it finishes)
  combo            quantbench's step with inductor's combo kernels (independent kernels, such as
                   the products of q, k and v from one input, launched as one)
  a+b              parts joined: eager-attention+no-pdl is both changes at once
Each variant's compiled step is checked against its own model run eager: greedy tokens, and the
logits of every step with the eager greedy tokens fed in turn (engine.forced_logits).
Part 2 (lm-eval's generation): `generate` at batch --gen-batch, a --gen-context token prompt
(left-padded rows, as lm-eval's batches) and --gen-tokens new tokens: plain; with lm-eval's
stop-sequence criteria (which decode the batch's last tokens on the host every step); with a new
prompt length every call, as lm-eval's batches have (so every step's shape is new: cuDNN attention,
torch's first choice on Hopper, builds a plan per new shape); and that with cuDNN attention excluded
(why quantbench's lm-eval runs exclude cuDNN attention: engine.EAGER_ATTENTION). What each variant
measured is in docs/benchmarks.md.

    python benchmarks/decode_profile.py --arch llama-3.2-1b --batch 1 --gen-arch smollm2-135m
"""
import argparse
import statistics
import time

import torch

from quantbench import cost, models
from quantbench.engines import transformers as engine


def timed(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _kernels(fn):
    """{kernel name: (GPU microseconds, calls)} from a profiler trace of fn(), after one untraced run."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = by_name.get(e.name, (0.0, 0))
            by_name[e.name] = (t + e.device_time, n + 1)
    return by_name


def kernel_time_per_step(run, steps, top=0):
    """GPU kernel time and kernel count per decode step: a trace of run(steps + 1) minus one of run(1)
    (the prefill and first token), over `steps`; and the `top` kernels by GPU time of the steps:
    [(ms per step, calls per step, name)]."""
    both, prefill = _kernels(lambda: run(steps + 1)), _kernels(lambda: run(1))
    per_step = {name: ((t - prefill.get(name, (0, 0))[0]) / 1000 / steps, (n - prefill.get(name, (0, 0))[1]) / steps)
                for name, (t, n) in both.items()}
    heaviest = sorted(((ms, calls, name) for name, (ms, calls) in per_step.items()), reverse=True)[:top]
    return sum(ms for ms, _ in per_step.values()), sum(calls for _, calls in per_step.values()), heaviest


def _fused_mlp_forward(self, x):
    gate, up = torch.nn.functional.linear(x, self.gate_up).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fuse_mlp(model):
    """Each layer's gate_proj and up_proj weights concatenated into one (their Linear modules
    dropped), the MLP's forward replaced by one that uses it: same products, one kernel fewer."""
    import types

    for layer in model.model.layers:
        mlp = layer.mlp
        # a parameter, so CUDA graphs treat it as static (a plain tensor attribute is copied in every replay)
        mlp.gate_up = torch.nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), requires_grad=False)
        del mlp.gate_proj, mlp.up_proj
        mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
    return model


def part1(args, rates):
    from transformers import AutoModelForCausalLM

    config = models.arch_config(args.arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    weights = engine.weight_bytes(model)["weight_bytes"]
    ideal_ms = weights / rates["copy_bytes_s"] * 1000
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt), device="cuda")
    print(f"\n## compiled decode, arch:{args.arch} float16, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; weights {weights / 1e9:.3f} GB: {ideal_ms:.3f} ms per step at "
          f"{rates['copy_bytes_s'] / 1e9:.0f} GB/s\n")
    print("| variant | compile+warm-up s | tok/s | ms/step | GPU kernel ms/step | kernels/step | % of copy bandwidth |")
    print("|---|---|---|---|---|---|---|")

    heaviest_lines, changed = [], {"eager-attention", "fused-mlp"}  # the variants that change the model
    cache_len = args.prompt + max(args.new_tokens, 17)
    variants = args.variants.split(",")
    if any(changed & set(name.split("+")) for name in variants):
        with torch.no_grad():  # the unchanged model's greedy tokens, which a changed model should repeat
            reference = engine.greedy_static(model, ids, args.new_tokens, step=model, cache=engine.static_cache(model, cache_len))
    for name in variants:
        parts = set(name.split("+"))  # e.g. eager-attention+no-pdl: both changes at once
        unknown = parts - {"plain", "quantbench", "autotune", "freezing", "no-pdl", "combo"} - changed
        if unknown:
            raise SystemExit(f"unknown variant part(s) {sorted(unknown)} in {name!r}")
        torch._dynamo.reset()
        inductor = torch._inductor.config
        inductor.coordinate_descent_tuning = "plain" not in parts
        inductor.freezing = "freezing" in parts
        inductor.combo_kernels = "combo" in parts
        inductor.triton.enable_pdl = False  # plain and autotune: without it; compiled_step sets its own
        cache = engine.static_cache(model, cache_len)
        model.set_attn_implementation("eager" if "eager-attention" in parts else "sdpa")
        if "fused-mlp" in parts:  # fused in place: the variants after it run on the fused model
            model = fuse_mlp(model) if not hasattr(model.model.layers[0].mlp, "gate_up") else model
            torch.cuda.empty_cache()
        with torch.no_grad():  # this variant's model run eager: what its compiled step should repeat
            own = engine.greedy_static(model, ids, args.new_tokens, step=model, cache=cache)
        if parts & changed:
            same = torch.equal(own, reference)
            print(f"({name}: eager greedy tokens {'equal' if same else 'DIFFER from'} the unchanged model's)")
        if not parts & {"plain", "autotune"}:  # quantbench's step (what --decode-mode compiled runs), changed
            step = engine.compile_step(model, "cuda")
            if "no-pdl" in parts:  # inductor reads it when it compiles, at the first call
                inductor.triton.enable_pdl = False
        else:  # plain (untuned), autotune
            step = torch.compile(model, mode="max-autotune" if "autotune" in parts else "reduce-overhead", dynamic=False)

        def run(n):
            return engine.greedy_static(model, ids, n, step=step, cache=cache)
        with torch.no_grad():
            t0 = time.perf_counter()
            run(args.new_tokens)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t_n, t_1 = timed(lambda: run(args.new_tokens)), timed(lambda: run(1))
            per_step = (t_n - t_1) / (args.new_tokens - 1)
            gpu_ms, kernels, heaviest = kernel_time_per_step(run, 16, top=args.top_kernels)
            same = torch.equal(run(args.new_tokens), own)
            eager_logits = engine.forced_logits(model, ids, own, step=model, cache=cache)
            diff = (engine.forced_logits(model, ids, own, step=step, cache=cache) - eager_logits).abs()
            print(f"({name}: compiled greedy tokens {'equal' if same else 'DIFFER from'} its eager model's; "
                  f"logits with its eager tokens fed, {len(diff)} steps: max |compiled - eager| {diff.max():.4f}, "
                  f"largest |logit| {eager_logits.abs().max():.2f})")
        share = weights / per_step / rates["copy_bytes_s"]
        print(f"| {name} | {first:.1f} | {args.batch / per_step:.1f} | {per_step * 1000:.3f} | {gpu_ms:.3f} | "
              f"{kernels:.0f} | {100 * share:.1f} |", flush=True)
        heaviest_lines += [f"| {name} | {ms:.3f} | {n:.0f} | {kernel[:90]} |" for ms, n, kernel in heaviest]
    if heaviest_lines:
        print(f"\nThe {args.top_kernels} heaviest kernels of each variant (16 decode steps, the prefill's kernels subtracted)\n")
        print("| variant | GPU ms/step | calls/step | kernel |\n|---|---|---|---|\n" + "\n".join(heaviest_lines))


# Part 2's variants: (name, lm-eval's stop check, a new prompt length each call, SDPA backends allowed
# (None: torch's default order, which on Hopper tries cuDNN attention first)). lm-eval's batches are
# left-padded (an explicit attention mask) and each has its own length, so every decode step meets
# a shape it has not seen; cuDNN builds an execution plan per new shape.
GENERATE_VARIANTS = [
    ("plain generate", False, False, None),
    ("with lm-eval's stop check", True, False, None),
    ("stop check, new shapes every call", True, True, None),
    ("stop check, new shapes, cuDNN attention excluded", True, True, engine.EAGER_ATTENTION),
]


def part2(args, device="cuda"):
    from lm_eval.models.utils_hf import stop_sequences_criteria
    from transformers import AutoModelForCausalLM

    config = models.arch_config(args.gen_arch)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    tokenizer = models.byte_tokenizer()
    print(f"\n## generate, arch:{args.gen_arch} float16 (eager), batch {args.gen_batch}, prompt {args.gen_context} "
          f"(every other row left-padded by 8), {args.gen_tokens} new tokens\n")
    print("| variant | s per call | ms per step |")
    print("|---|---|---|")
    for name, stop_check, new_shapes, backends in GENERATE_VARIANTS:
        calls = 0

        def run():
            nonlocal calls
            calls += 1  # with new_shapes, the k-th call's prompt is longer than every step of the calls before
            length = args.gen_context + (calls * (args.gen_tokens + 1) if new_shapes else 0)
            ids = torch.randint(0, 256, (args.gen_batch, length), device=device)
            mask = torch.ones_like(ids)
            mask[::2, :8] = 0
            extra = {"stopping_criteria": stop_sequences_criteria(tokenizer, ["\n"], length, args.gen_batch)} \
                if stop_check else {}
            with engine.only_attention(backends):
                model.generate(ids, attention_mask=mask, max_new_tokens=args.gen_tokens,
                               min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=0, **extra)
        with torch.no_grad():
            s = timed(run)
        print(f"| {name} | {s:.2f} | {s / args.gen_tokens * 1000:.1f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", default="plain,quantbench",
                   help="also: autotune (mode max-autotune: Triton matmul templates tried, minutes to compile), "
                        "eager-attention (transformers' eager attention in place of SDPA), "
                        "fused-mlp (gate and up projections in one weight; put it last), "
                        "freezing (inductor's freezing: constant weights, concatenated products), "
                        "no-pdl (without programmatic dependent launch), combo (inductor's combo kernels: independent kernels, "
                        "such as q/k/v's products, in one launch); join parts with + (eager-attention+no-pdl)")
    p.add_argument("--top-kernels", type=int, default=8, help="list each variant's heaviest kernels (0: none)")
    p.add_argument("--gen-arch", default="smollm2-135m", help="'' to skip part 2")
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--gen-context", type=int, default=300)
    p.add_argument("--gen-tokens", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile.py measures CUDA kernels; run it on a GPU machine")
    rates = cost.device_rates("cuda")
    card = torch.cuda.get_device_name(0)
    print(f"{card}, torch {torch.__version__}; copy {rates['copy_bytes_s'] / 1e9:.0f} GB/s, "
          f"matmul {rates['matmul_flops'] / 1e12:.1f} TFLOP/s")
    if args.gen_arch:
        part2(args)
    if args.variants:
        part1(args, rates)


if __name__ == "__main__":
    main()
