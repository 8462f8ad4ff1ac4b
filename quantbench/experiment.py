"""One experiment (one model, one method, one engine), run in its own process by the sweep.

    python -m quantbench.experiment results/run001 nf4

Reads the run's `run.json`, loads the model once through the method's engine, and measures, in
order: weight memory, a sanity generation, perplexity, the KL divergence from the baseline, the
lm-eval tasks, and speed. Each phase returns its part of the result, and the result so far is
written to `<experiment>.json` (status "running") after every phase, so a crash keeps what was
measured; at the end the status becomes "ok", "failed" or "skipped".
"""
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from quantbench import cost, quality, tasks
from quantbench.config import EVAL_MAX_BATCH, EVAL_MIN_START, KV_CACHE_BITS, decode_modes, eval_batch, from_run
from quantbench.engines import ENGINES, vllm
from quantbench.messages import import_libraries, quantizer_messages
from quantbench.methods import (METHODS, MethodUnsuitable, MissingLibrary, bfloat16_variants, dtype_setting, engine_of,
                                group_size_problem, library_version, method_settings)
from quantbench.models import model_slug
from quantbench.results import SCHEMA, atomic_folder, read_json, read_run_file, write_json
from quantbench.tasks import generation_bound


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _model_identity(path):
    """What makes two checkpoints the same, cheaply: config.json and the weight files' names and sizes."""
    path = Path(path)
    files = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return hashlib.sha256(((path / "config.json").read_text() + json.dumps(files)).encode()).hexdigest()


def effective_settings(exp, model_info):
    """(the experiment's settings with its compute dtype resolved, why that dtype): a method's "auto"
    is the run's compute dtype for the model (its checkpoint's, or --compute-dtype)."""
    key, settings = dtype_setting(exp["method"]), dict(exp["settings"])
    if exp.get("baseline_from"):  # `baseline`, made the float method of the model's dtype
        return settings, exp["baseline_from"]
    if engine_of(exp) == "llama.cpp":
        return settings, "llama.cpp's: float32 activations with the GGUF's weight types"
    if key is None:
        return settings, "chosen by the quantization library when it loads the checkpoint"
    value = settings.get(key, method_settings(exp["method"])[key])
    if value == "auto":
        settings[key] = model_info["compute_dtype"]
        return settings, model_info["compute_dtype_why"]
    return settings, f"{value}, set by " + ("the method table's " + key if key in exp["settings"] else f"the method {exp['method']}")


def nonfinite_fix(exp, dtype):
    """What to do about non-finite numbers computed in `dtype` by experiment `exp`."""
    if dtype != "float16":
        return (f"the model computes NaN or infinite values in {dtype} too: check the checkpoint, or try "
                "--compute-dtype float32")
    variants = bfloat16_variants(exp["method"])
    how = [f"the bfloat16 variant {' or '.join(variants)}"] if variants else []
    key = dtype_setting(exp["method"])
    how += ["--compute-dtype bfloat16"] + ([f"a method table with {key}: bfloat16"] if key else [])
    return ("this model's activations exceed float16's range (largest value 65504); compute in bfloat16: "
            + ", or ".join(how))


def quantized_checkpoint(run, config, exp, model_info, given):
    """(the method's quantized checkpoint in the cache, made once (timed) and reused after that; what
    the quantization did). `given`: the experiment's settings with its compute dtype resolved. The
    cache key covers the model, method, settings, calibration set and library versions."""
    engine, device, m = ENGINES[METHODS[exp["method"]]["engine"]], run["device"], METHODS[exp["method"]]
    settings = {**method_settings(exp["method"]), **given}
    problem = group_size_problem(model_info["path"], exp["method"], given.get("group_size", m["group_size"]))
    if problem:
        raise MethodUnsuitable(problem)
    calibration, calibration_info = None, None
    if m["calibration"]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_info["path"])
        calibration, calibration_info = tasks.calibration_texts(
            tokenizer, source=config.calibration, data_dir=config.data_dir, hub=run["hub_reachable"],
            n_samples=config.calibration_samples, seq_len=config.calibration_tokens)
    versions = {d: library_version(d) for d in ("torch", "transformers", *m["modules"])}
    key = {"model": _model_identity(model_info["path"]), "method": exp["method"], "settings": settings,
           "calibration": calibration_info and calibration_info["sha256"], "device": device, "versions": versions}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    dst = Path(run["cache_dir"]) / "quantized" / model_slug(model_info["name"]) / f"{exp['method']}-{digest}"
    record = dst / "quantbench-quantized.json"
    if record.exists() and read_json(record).get("schema") == SCHEMA:  # another schema's record: made again
        return dst, {**read_json(record), "reused_from_cache": True, "path": str(dst)}
    with atomic_folder(dst) as tmp:  # no half-written checkpoint is ever left in the cache
        engine.reset_peak(device)
        t = time.perf_counter()
        import_libraries(m)
        with quantizer_messages() as messages:
            m["quantize"](model_info["path"], str(tmp), device=device, calibration=calibration,
                          trust_remote_code=config.trust_remote_code, **given)
        info = {"schema": SCHEMA, "quantize_s": round(time.perf_counter() - t, 3),
                "quantize_peak_bytes": engine.peak_bytes(device)["peak_bytes"], "calibration": calibration_info,
                "settings": settings, "key": key, "made": now(), "messages": messages}
        write_json(tmp / "quantbench-quantized.json", info)
    engine.release(device)  # the reload's memory is measured from a clean allocator
    return dst, {**info, "reused_from_cache": False, "path": str(dst)}


def load(run, config, exp, model_info, checkpoint, settings):
    """(model, tokenizer, the result's part: backend, compute dtype, load cost and, for a method that
    quantizes as it loads, what its library said)."""
    method, device = METHODS[exp["method"]], run["device"]
    engine = ENGINES[engine_of(exp)]
    quantizes_on_load = method["family"] not in ("baseline", "checkpoint") and not method["quantize"]  # bitsandbytes
    import_libraries(method)  # before the clock: load_s is loading, not importing
    t = time.perf_counter()
    engine.reset_peak(device)
    with quantizer_messages() if quantizes_on_load else contextlib.nullcontext() as said:
        model, tokenizer, backend = engine.load(exp["method"], checkpoint, model_path=model_info["path"], device=device,
                                                settings=settings, trust_remote_code=config.trust_remote_code)
    part = {"backend": backend, "compute_dtype": backend["compute_dtype"], "gpu": engine.device_name(device),
            "cost": {"load_s": round(time.perf_counter() - t, 3), "peak_load_bytes": engine.peak_bytes(device)["peak_bytes"],
                     **engine.weight_bytes(model),
                     # What stays allocated after the load, garbage collected; minus weight_bytes it is
                     # what the weights' count misses (kernel workspaces, repacked copies).
                     "resident_after_load_bytes": engine.resident_bytes(device)}}
    if quantizes_on_load:
        part["quantization"] = {"at_load": True, "messages": said}
    if exp.get("kv_cache"):  # the method's model with transformers' quantized KV cache (sweep.create_run)
        part["kv_cache"] = {"precision": exp["kv_cache"], "of": exp["kv_of"],
                            **engine.use_quantized_cache(model, nbits=KV_CACHE_BITS[exp["kv_cache"]],
                                                         backend=config.kv_cache_backend)}
    return model, tokenizer, part


def measure(run, config, exp):
    """The experiment's phases in order: yields (phase, its part of the result) as each is done."""
    device, model_info = run["device"], next(m for m in run["models"] if m["name"] == exp["model"])
    engine = ENGINES[engine_of(exp)]
    given, why = effective_settings(exp, model_info)
    checkpoint, settings = model_info["path"], given
    if METHODS[exp["method"]]["quantize"]:
        checkpoint, quantization = quantized_checkpoint(run, config, exp, model_info, given)
        settings = {}  # the checkpoint carries them
        yield "quantize", {"quantization": quantization}
    model, tokenizer, part = load(run, config, exp, model_info, checkpoint, settings)
    note = part["backend"].get("note")
    part["compute_dtype_why"] = why + (f"; {note}" if note else "")
    if model_info["kind"] == "arch":
        skipped = {"status": "skipped", "reason": "random weights (architecture only)",
                   "fix": "pass a real checkpoint to --model for quality"}
        part["quality_info"] = {name: skipped for name in ["perplexity", "kld", *(x["name"] for x in run["tasks"])]}
    yield "load", part
    dtype = part["compute_dtype"]

    text, corpus = tasks.perplexity_corpus(config.data_dir, run["hub_reachable"])
    engine.reset_peak(device)
    shapes = engine.shapes(model)
    batch_size = 4 if device == "cuda" else 1
    kv = exp.get("kv_cache")
    if model_info["kind"] != "arch":
        yield "sanity", {"sanity": quality.sanity(engine, model, tokenizer, dtype)}
        if kv:
            # A forward over a whole window reads no cache: a quantized cache's cost in quality is the KLD's, whose
            # scored tokens each decode after a prefill of their chunk's first half (kld.ppl: their perplexity).
            why = {"status": "skipped", "reason": f"a {kv} KV cache changes what decoding reads back, not a whole "
                   "window's forward: see the KLD (its ppl: the perplexity of the scored tokens, decoded through the cache)",
                   "fix": "compare kld and kld.ppl with the same method's fp16-cache experiment"}
            yield "perplexity", {"quality_info": {"perplexity": why, **({"long_context": why} if config.long_context else {})}}
        else:
            window = min(config.ppl_window, shapes["positions"])
            ppl, info = perplexity(engine, model, tokenizer, text, window=window, max_tokens=config.ppl_tokens,
                                   batch_size=batch_size, dtype=dtype)
            yield "perplexity", {"quality": {"perplexity": ppl}, "quality_info": {
                "perplexity": {"corpus": corpus, "protocol": "GPTQ/AWQ papers: non-overlapping windows", **info}}}
        if config.kld_tokens != 0:  # None is the whole corpus; 0 is off
            yield "kld", kld(engine, model, tokenizer, text, corpus, run, config, exp, model_info, shapes, dtype, batch_size)
        if config.long_context and not kv:
            yield "long_context", long_context(engine, model, tokenizer, text, corpus, run, config, exp, model_info,
                                               shapes, dtype)
        yield "tasks", run_tasks(engine, model, tokenizer, run, config, exp, shapes, dtype)
    eval_peak = engine.peak_bytes(device)["peak_bytes"]

    engine.reset_peak(device)
    stream = tokenizer(text[:200_000], return_tensors="pt").input_ids[0]
    weights = part["cost"]["weight_bytes"]
    modes = ["eager"] if kv else decode_modes(config.decode_mode)  # a quantized cache has no static form to compile
    if engine is vllm:  # vLLM decodes only as it serves: its compiled graphs
        modes = list(vllm.DECODE_MODES)
    speed = cost.measure_speed(engine, model, stream, device=device, pad_token_id=tokenizer.pad_token_id,
                               prompt_lengths=config.prompt_lengths, decode_prompt_tokens=config.decode_prompt_tokens,
                               new_tokens=config.new_tokens, batch_sizes=config.batch_sizes, repeats=config.repeats,
                               decode_runs=config.decode_runs, weight_bytes=weights, rates=run.get("device_rates"),
                               decode_modes=modes)
    if kv:  # (eager decode only: compiled decode needs a static cache, which has no quantized form)
        lengths = [n for n in config.prompt_lengths if n <= min(len(stream), shapes["positions"] - 1)]
        speed["kv_cache"] = {str(n): {"bytes": engine.quantized_cache_bytes(model, stream[None, :n].to(engine.input_device(model))),
                                      "model_cache_bytes": cost.kv_cache_bytes(shapes, 1, n + 1)} for n in lengths}
    yield "speed", {"cost": {"peak_eval_bytes": eval_peak, **engine.peak_bytes(device), **speed}}  # a GPU's peak: the sweep's
    if engine is vllm and (config.vllm_bench or config.serve_rates):  # last: they shut this process's vLLM down
        yield "vllm_bench", {"cost": {"vllm_bench": vllm.own_benchmarks(
            model, Path(run["run_dir"]) / f"{exp['id']}.vllm_bench", which=config.vllm_bench,
            prompt_length=min(config.prompt_lengths), prompt_tokens=config.decode_prompt_tokens, new_tokens=config.new_tokens,
            batch_sizes=config.batch_sizes, serve_rates=config.serve_rates, dtype=dtype)}}


def kld(engine, model, tokenizer, text, corpus, run, config, exp, model_info, shapes, dtype, batch_size, n_ctx=None):
    """The KL divergence from the model's baseline, in chunks of --kld-ctx (or `n_ctx`, a long context's
    own reference). The baseline experiment first writes the reference (its log-probabilities on the
    scored tokens) into the run folder; every experiment of the model, the baseline included (which
    must give exactly 0), is then compared with it."""
    reference_id = model_info.get("reference_experiment")
    folder = Path(run["run_dir"]) / "reference" / (model_slug(model_info["name"]) + (f"-ctx{n_ctx}" if n_ctx else ""))
    if exp["id"] == reference_id:
        positions = shapes["positions"]
        ctx = n_ctx or min(config.kld_ctx, positions - positions % 2)  # a chunk must fit the model's context
        tokens = config.kld_tokens and max(config.kld_tokens, ctx)  # at least one chunk of a long context
        chunks, adds_bos = quality.kld_chunks(tokenizer, text, n_ctx=ctx, max_tokens=tokens)
        quality.write_reference(engine, model, chunks, folder, adds_bos=adds_bos, dtype=dtype, batch_size=batch_size,
                                about={"experiment": reference_id, "corpus": corpus})
    if not (folder / "reference.json").exists():
        if reference_id is None:
            reason, fix = "no fp16 or bf16 baseline in this run", "add baseline to --methods"
        else:
            reason = f"the baseline experiment {reference_id} has not written its reference (it failed or has not run)"
            fix = f"fix {reference_id}, then `quantbench run --resume {run['run_dir']}` (rerun both)"
        return {"quality_info": {"kld": {"status": "skipped", "reason": reason, "fix": fix}}}
    if engine is vllm:  # from the top k log-probabilities it returns: a lower bound (engines/vllm.py)
        stats, info = vllm.kld(model, folder, dtype=dtype)
    else:
        stats, info = quality.compare_to_reference(engine, model, folder, dtype=dtype, batch_size=batch_size)
    return {"quality": {"kld": stats},
            "quality_info": {"kld": {"corpus": corpus, "protocol": "llama.cpp perplexity --kl-divergence", **info}}}


def perplexity(engine, model, tokenizer, text, *, window, max_tokens, batch_size, dtype):
    """quality.perplexity, or vLLM's own from the prompt tokens' log-probabilities (it returns no logits)."""
    if engine is vllm:
        return vllm.perplexity(model, tokenizer, text, window=window, max_tokens=max_tokens, dtype=dtype)
    return quality.perplexity(engine, model, tokenizer, text, window=window, max_tokens=max_tokens,
                              batch_size=batch_size, dtype=dtype)


def long_context(engine, model, tokenizer, text, corpus, run, config, exp, model_info, shapes, dtype):
    """Perplexity and KLD at each --long-context length the model's positions allow, by the same
    protocols as at the run's own window: perplexity in non-overlapping windows of that length (at
    least two), the KLD in chunks of it with their second half scored, against the baseline's
    reference at that length. A length past the model's positions is recorded as skipped."""
    values, info = {}, {}
    for n in config.long_context:
        if n > shapes["positions"]:
            info[str(n)] = {"status": "skipped", "reason": f"longer than the model's {shapes['positions']} positions",
                            "fix": f"--long-context of at most {shapes['positions']}"}
            continue
        tokens = config.ppl_tokens and max(config.ppl_tokens, 2 * n)
        try:
            ppl, pinfo = perplexity(engine, model, tokenizer, text, window=n, max_tokens=tokens, batch_size=1, dtype=dtype)
            values[str(n)], info[str(n)] = {"perplexity": ppl}, {"perplexity": {"corpus": corpus, **pinfo}}
            if config.kld_tokens != 0:
                part = kld(engine, model, tokenizer, text, corpus, run, config, exp, model_info, shapes, dtype, 1, n_ctx=n)
                values[str(n)].update(part.get("quality", {}))
                info[str(n)].update(part["quality_info"])
        except quality.NonFinite as e:  # recorded as the long context's failure, not its window's phase
            raise quality.NonFinite(f"long_context {n} {e.phase}", e.what, e.dtype, e.nonfinite, e.positions) from None
    return {"quality": {"long_context": values}, "quality_info": {"long_context": info}}


def run_tasks(engine, model, tokenizer, run, config, exp, shapes, dtype):
    """The lm-eval tasks: their scores and how they ran; each document's scores go to
    `<experiment>.docs.json` for the paired differences against the baseline."""
    device = run["device"]
    info = {x["name"]: {"status": "skipped", "reason": x["reason"], "fix": x["fix"]}
            for x in run["tasks"] if x.get("status") == "skipped"}
    runnable = [x for x in run["tasks"] if x.get("status") != "skipped"]
    if not runnable:
        return {"quality_info": info}
    max_length = config.max_length or min(shapes["positions"], 2048)
    batch = eval_batch(config.eval_batch_size, device)
    start = quality.eval_batch_start(shapes, max_length) if batch == "auto" else EVAL_MAX_BATCH
    # Offline, each lm-eval task's dataset comes from the datasets cache (resolve_task found it there).
    with contextlib.nullcontext() if run["hub_reachable"] else tasks.datasets_offline():
        scores, per_document, prompting = quality.run_tasks(
            engine, model, tokenizer, runnable, task_dir=Path(run["run_dir"]) / "tasks", limit=config.limit,
            batch_size=batch, max_batch_size=start, max_length=max_length, max_gen_toks=config.max_gen_toks, dtype=dtype,
            include_path=config.include_path, num_fewshot=config.num_fewshot,
            apply_chat_template=config.apply_chat_template, fewshot_as_multiturn=config.fewshot_as_multiturn)
    if batch == "auto":
        batch = f"auto (lm-eval's detection from {start}: what its probe fits in free memory, {EVAL_MIN_START} to {EVAL_MAX_BATCH})"
    write_json(Path(run["run_dir"]) / f"{exp['id']}.docs.json", {"schema": SCHEMA, **per_document})
    for x in runnable:
        info[x["name"]] = {"source": x["source"], "lm_eval_task": x["lm_eval_task"], "n": scores[x["name"]]["n"],
                           "limit": config.limit, "max_length": max_length, "batch_size": batch,
                           "max_gen_toks": generation_bound(x["name"], config.max_gen_toks),
                           "attention_kernels": engine.EAGER_ATTENTION, **prompting[x["name"]]}
    return {"quality": scores, "quality_info": info}


def _merge(result, part):
    """Put a phase's part into the result: its dicts into the result's dicts of the same name."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key].update(value)
        else:
            result[key] = value


def main(run_dir, exp_id, process="its own interpreter"):
    """Run experiment `exp_id` of the run in `run_dir`, writing its result; `process` says how this
    process started (its own interpreter, or forked from the preloaded forkserver)."""
    run_dir = Path(run_dir)
    run = read_run_file(run_dir / "run.json")
    config = from_run(run)
    os.environ["QUANTBENCH_CACHE"] = run["cache_dir"]  # what a method keeps in the cache goes to the run's
    exp = next(e for e in run["experiments"] if e["id"] == exp_id)
    path = run_dir / f"{exp_id}.json"
    model_info = next(m for m in run["models"] if m["name"] == exp["model"])
    result = {"schema": SCHEMA, "experiment": exp_id, "method": exp["method"], "engine": engine_of(exp),
              "settings": exp["settings"], "model": model_info, "device": run["device"], "status": "running",
              "error": None, "pid": os.getpid(), "process": process, "started": now(), "quality": {},
              "quality_info": {}, "cost": {}, "phases_s": {}}
    started = time.perf_counter()

    def save():
        result["duration_s"] = round(time.perf_counter() - started, 3)
        write_json(path, result)

    save()
    try:
        t = time.perf_counter()
        for phase, part in measure(run, config, exp):
            _merge(result, part)
            result["phases_s"][phase] = round(time.perf_counter() - t, 3)
            save()
            t = time.perf_counter()
        result["status"] = "ok"
    except quality.NonFinite as e:  # a NaN is never "ok": the phase and the experiment fail with the fix
        fix = nonfinite_fix(exp, e.dtype)
        result.update(status="failed", error=str(e), fix=fix)
        result["quality_info"][e.phase.split()[0]] = {"status": "failed", "reason": str(e), "fix": fix,
                                                      "compute_dtype": e.dtype, "nonfinite_positions": e.nonfinite,
                                                      "positions": e.positions}
    except MissingLibrary as e:
        result.update(status="skipped", error=str(e).split(": pip")[0],
                      fix=str(e).split(": ", 1)[1] if ": " in str(e) else None)
    except MethodUnsuitable as e:
        result.update(status="skipped", error=str(e), fix="pick another method for this model or card")
    except Exception as e:  # every failure is recorded with its cause; the sweep goes on
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            result.update(error=f"out of GPU memory: {str(e).splitlines()[0]}",
                          fix="lower --eval-batch-size or --batch-sizes, or use a larger GPU")
        else:
            result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        result["status"] = "failed"
        result["traceback_tail"] = traceback.format_exc().splitlines()[-25:]
    result["finished"] = now()
    save()
    return 0


def child(run_dir, exp_id, process, alive, nvml_check):
    """An experiment's process, started by the sweep (local.local_launcher): Ctrl-C is the sweep's to
    handle (it stops this process itself); the process ends when the sweep's ends (`alive`: a pipe
    whose other end only the sweep holds), so no orphan keeps the GPU; and a process that a preloaded
    server forked with CUDA initialised says so with exit code FORK_UNUSABLE, for the sweep to start
    it afresh."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":  # and ends with the process that started it (the forkserver, or the sweep)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch():
        try:
            alive.recv()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    if nvml_check is None:  # the server imported with torch's NVML check; the experiment runs as the user set it
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml_check
    import torch

    if getattr(torch.cuda, "_is_in_bad_fork", lambda: False)():
        sys.exit(FORK_UNUSABLE)
    code = main(run_dir, exp_id, process=process)
    end_child_processes()
    sys.exit(code)


def end_child_processes(grace_s=10):
    """End the processes this one started that still run (vLLM's engine core, say), as vLLM's own shutdown
    does: SIGTERM, then SIGKILL after `grace_s`. Why: multiprocessing joins a process's children before
    it ends, and vLLM's engine core ends only when its LLM object is collected, which a reference cycle can
    put off past the end of the experiment: the experiment's process would then never end, nor the sweep."""
    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


FORK_UNUSABLE = 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
