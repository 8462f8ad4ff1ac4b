"""One experiment (one model in one quantized form), run in its own process by the sweep.

    python -m quantbench.experiment results/run001 nf4

Reads the run's `run.json`, loads the model once with the method's loader, and measures, in order:
weight memory, a sanity generation, perplexity, the lm-eval tasks, and speed. After every phase
the result so far is written to `<experiment>.json` (status "running"), so a crash keeps what was
measured; at the end the status becomes "ok", "failed" or "skipped".
"""
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

from quantbench.config import EVAL_MAX_BATCH, EVAL_MIN_START, decode_modes, eval_batch, prompt_lengths
from quantbench.methods import MethodUnsuitable, group_size_problem, unquantized_linears
from quantbench.models import model_slug
from quantbench.results import atomic_folder, read_json, write_json
from quantbench.tasks import generation_bound


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _phase(result, name, started, save):
    result["phases_s"][name] = round(time.perf_counter() - started, 3)
    save()


def _model_identity(path):
    """What makes two checkpoints the same, cheaply: config.json and the weight files' names and sizes."""
    path = Path(path)
    files = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return hashlib.sha256(((path / "config.json").read_text() + json.dumps(files)).encode()).hexdigest()


LEVELED_LINE = re.compile(r"^(WARN|WARNING|ERROR|CRIT|CRITICAL)\b[\s:]*(.+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MESSAGES_KEPT = 50


def import_libraries(method):
    """Import what quantizing with `method` imports, so that what those imports print is not taken for
    the quantizer's word about this model (transformers' model code imports torchao when installed)."""
    import importlib

    for name in ("transformers.modeling_utils", *method["modules"]):
        importlib.import_module(name)


@contextlib.contextmanager
def quantizer_messages():
    """What the quantization library complains about within the block, in the dict it yields (filled
    when the block ends): Python warnings, logging records of WARNING and above, and the lines it
    prints with a WARN or ERROR level (GPTQModel's logger writes to the terminal, not through
    logging: its Hessian and damp-recovery messages come this way). The output still reaches the terminal."""
    kept, found = {}, []

    class Keep(logging.Handler):
        def emit(self, record):
            found.append((record.levelname, record.name, record.getMessage()))

    handler = Keep(logging.WARNING)
    # the root, and every logger that does not pass its records up to it (transformers' own)
    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger) and not x.propagate]
    for x in loggers:
        x.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, _tee_output() as printed:
            warnings.simplefilter("always")
            yield kept
    finally:
        for x in loggers:
            x.removeHandler(handler)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)  # shown as they would have been
        found.append(("WARNING", w.category.__name__, str(w.message)))
    for line in printed:
        m = LEVELED_LINE.match(line)
        if m:
            found.append(("ERROR" if m.group(1).startswith(("ERR", "CRIT")) else "WARNING", "printed output",
                          m.group(2).strip()))
    counts = collections.Counter(found)
    order = sorted(counts, key=lambda m: (m[0] == "WARNING", -counts[m]))  # errors first, then the most frequent
    kept.update({"warnings": sum(n for (level, _, _), n in counts.items() if level == "WARNING"),
                 "errors": sum(n for (level, _, _), n in counts.items() if level != "WARNING"),
                 "messages": [{"level": level, "source": source, "message": text[:500], "count": n}
                              for level, source, text in order[:MESSAGES_KEPT] for n in [counts[level, source, text]]]})
    if len(counts) > MESSAGES_KEPT:
        kept["messages_left_out"] = len(counts) - MESSAGES_KEPT


@contextlib.contextmanager
def _tee_output():
    """The lines written to file descriptors 1 and 2 within the block (by Python or native code),
    passed through to where they were going."""
    lines, saved, pumps = [], {}, []
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        saved[fd] = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        pumps.append(threading.Thread(target=_pump, args=(read_end, saved[fd], lines), daemon=True))
        pumps[-1].start()
    try:
        yield lines
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)  # closes the pipe's write end: its pump sees the end
        for fd, pump in zip((1, 2), pumps):
            # a process started within the block may still hold the pipe (a compile worker): its pump
            # then goes on passing output through, and what it read so far is kept
            pump.join(timeout=5)
            if not pump.is_alive():
                os.close(saved[fd])


def _pump(read_end, out, lines):
    tail = b""
    while chunk := os.read(read_end, 65536):
        os.write(out, chunk)
        tail += chunk
        *done, tail = re.split(rb"[\r\n]", tail)
        lines += [ANSI.sub("", d.decode(errors="replace")).strip() for d in done]
    lines.append(ANSI.sub("", tail.decode(errors="replace")).strip())
    os.close(read_end)


def quantized_checkpoint(run, exp, model_info, given, result, save):
    """The method's quantized checkpoint in the cache, made once (timed) and reused after that;
    `given`: the experiment's settings with its compute dtype resolved (effective_settings).

    The cache key covers the model, method, settings, calibration set and library versions."""
    import torch

    from quantbench import cost, tasks
    from quantbench.methods import METHODS, library_version, method_settings

    config, device = run["config"], run["device"]
    m = METHODS[exp["method"]]
    settings = {**method_settings(exp["method"]), **given}
    problem = group_size_problem(model_info["path"], exp["method"], settings.get("group_size", m["group_size"]))
    if problem:
        raise MethodUnsuitable(problem)
    calibration, calibration_info = None, None
    if m["calibration"]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_info["path"])
        calibration, calibration_info = tasks.calibration_texts(
            tokenizer, source=config["calibration"], data_dir=config["data_dir"], hub=run["hub_reachable"],
            n_samples=config["calibration_samples"], seq_len=config["calibration_tokens"])
    versions = {d: library_version(d) for d in ("torch", "transformers", *m["modules"])}
    key = {"model": _model_identity(model_info["path"]), "method": exp["method"], "settings": settings,
           "calibration": calibration_info and calibration_info["sha256"], "device": device, "versions": versions}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    dst = Path(run["cache_dir"]) / "quantized" / model_slug(model_info["name"]) / f"{exp['method']}-{digest}"
    record = dst / "quantbench-quantized.json"
    if record.exists():
        info = read_json(record)
        info["reused_from_cache"] = True
    else:
        with atomic_folder(dst) as tmp:  # no half-written checkpoint is ever left in the cache
            cost.reset_peak(device)
            t = time.perf_counter()
            import_libraries(m)
            with quantizer_messages() as messages:
                m["quantize"](model_info["path"], str(tmp), device=device, calibration=calibration,
                              trust_remote_code=config["trust_remote_code"], **given)
            info = {"quantize_s": round(time.perf_counter() - t, 3),
                    "quantize_peak_bytes": cost.peak_bytes(device)["peak_bytes"],
                    "calibration": calibration_info, "settings": settings, "key": key, "made": now(),
                    "messages": messages}
            write_json(tmp / "quantbench-quantized.json", info)
        info["reused_from_cache"] = False
        if device == "cuda":
            torch.cuda.empty_cache()
    info["path"] = str(dst)
    result["quantization"] = info
    save()
    return dst


def measure_quality(model, tokenizer, text, corpus, run, result, save):
    """Sanity generation, perplexity on `text`, then the lm-eval tasks, each phase saved."""
    from quantbench import cost, quality

    config, device = run["config"], run["device"]
    dtype = result["backend"]["compute_dtype"]
    t = time.perf_counter()
    with quality.finite_logits(model, "sanity generation", dtype):
        result["sanity"] = quality.sanity_generation(model, tokenizer)
    _phase(result, "sanity", t, save)

    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    t = time.perf_counter()
    window = min(config["ppl_window"], positions)
    with quality.finite_logits(model, "perplexity", dtype):
        ppl = quality.perplexity(model, tokenizer, text, window=window, max_tokens=config["ppl_tokens"],
                                 batch_size=4 if device == "cuda" else 1)
    quality.check_finite("perplexity", ppl, dtype)
    result["quality"]["perplexity"] = ppl.pop("perplexity")
    result["quality_info"]["perplexity"] = {"corpus": corpus, "protocol": "GPTQ/AWQ papers: non-overlapping windows", **ppl}
    _phase(result, "perplexity", t, save)

    if config.get("kld_tokens", 0) != 0:  # None is the whole corpus; 0 (or a run from before KLD) is off
        t = time.perf_counter()
        measure_kld(model, tokenizer, text, corpus, run, result, positions=positions, dtype=dtype)
        _phase(result, "kld", t, save)

    t = time.perf_counter()
    runnable = [x for x in run["tasks"] if x.get("status") != "skipped"]
    for x in run["tasks"]:
        if x.get("status") == "skipped":
            result["quality_info"][x["name"]] = {"status": "skipped", "reason": x["reason"], "fix": x["fix"]}
    if runnable:
        max_length = config["max_length"] or min(positions, 2048)
        batch = eval_batch(config["eval_batch_size"], device)
        start = quality.eval_batch_start(model, max_length) if batch == "auto" else EVAL_MAX_BATCH
        with quality.finite_logits(model, "tasks", dtype):
            scores, per_document = quality.run_tasks(model, tokenizer, runnable, task_dir=Path(run["run_dir"]) / "tasks",
                                                     limit=config["limit"], batch_size=batch, max_batch_size=start,
                                                     max_length=max_length, max_gen_toks=config["max_gen_toks"])
        for name, metrics in scores.items():
            quality.check_finite(f"tasks ({name})", metrics, dtype)
        if batch == "auto":
            batch = f"auto (lm-eval's detection from {start}: what its probe fits in free memory, {EVAL_MIN_START} to {EVAL_MAX_BATCH})"
        # Each document's score, for paired differences against the baseline in the summary.
        write_json(Path(run["run_dir"]) / f"{result['experiment']}.docs.json", per_document)
        for x in runnable:
            result["quality"][x["name"]] = scores[x["name"]]
            result["quality_info"][x["name"]] = {"source": x["source"], "lm_eval_task": x["lm_eval_task"],
                                                 "n": scores[x["name"]]["n"], "limit": config["limit"],
                                                 "max_length": max_length, "batch_size": batch,
                                                 "max_gen_toks": generation_bound(x["name"], config["max_gen_toks"]),
                                                 "attention_kernels": cost.EAGER_ATTENTION}
    _phase(result, "tasks", t, save)


def measure_kld(model, tokenizer, text, corpus, run, result, *, positions, dtype):
    """The KL divergence from the model's baseline. The baseline experiment first writes the reference
    (its log-probabilities on the scored tokens) into the run folder; every experiment of the model,
    the baseline included (which must give exactly 0), is then compared with it."""
    from quantbench import quality

    config, device = run["config"], run["device"]
    model_info = next(m for m in run["models"] if m["name"] == result["model"]["name"])
    reference_id = model_info.get("reference_experiment")
    folder = Path(run["run_dir"]) / "reference" / model_slug(model_info["name"])
    batch_size = 4 if device == "cuda" else 1
    if result["experiment"] == reference_id:
        n_ctx = min(config["kld_ctx"], positions - positions % 2)  # a chunk must fit the model's context
        chunks, adds_bos = quality.kld_chunks(tokenizer, text, n_ctx=n_ctx, max_tokens=config["kld_tokens"])
        quality.write_reference(model, chunks, folder, adds_bos=adds_bos, dtype=dtype, batch_size=batch_size,
                                about={"experiment": reference_id, "corpus": corpus})
    if not (folder / "reference.json").exists():
        if reference_id is None:
            reason, fix = "no fp16 or bf16 baseline in this run", "add fp16 to --methods"
        else:
            reason = f"the baseline experiment {reference_id} has not written its reference (it failed or has not run)"
            fix = f"fix {reference_id}, then `quantbench run --resume {run['run_dir']}` (rerun both)"
        result["quality_info"]["kld"] = {"status": "skipped", "reason": reason, "fix": fix}
        return
    with quality.finite_logits(model, "kld", dtype):
        stats, info = quality.compare_to_reference(model, folder, batch_size=batch_size)
    quality.check_finite("kld", stats, dtype)
    result["quality"]["kld"] = stats
    result["quality_info"]["kld"] = {"corpus": corpus, "protocol": "llama.cpp perplexity --kl-divergence", **info}


def effective_settings(exp, model_info):
    """(the experiment's settings with its compute dtype resolved, why that dtype): a method's "auto"
    is the run's compute dtype for the model (its checkpoint's, or --compute-dtype)."""
    from quantbench.methods import dtype_setting, method_settings

    key, settings = dtype_setting(exp["method"]), dict(exp["settings"])
    if exp.get("baseline_from"):  # `baseline`, made the float method of the model's dtype
        return settings, exp["baseline_from"]
    if key is None:
        return settings, "chosen by the quantization library when it loads the checkpoint"
    value = settings.get(key, method_settings(exp["method"])[key])
    if value == "auto":
        settings[key] = model_info["compute_dtype"]
        return settings, model_info["compute_dtype_why"]
    return settings, f"{value}, set by " + ("the method table's " + key if key in exp["settings"] else f"the method {exp['method']}")


def nonfinite_fix(exp, dtype):
    """What to do about non-finite numbers computed in `dtype` by experiment `exp`."""
    from quantbench.methods import bfloat16_variants, dtype_setting

    if dtype != "float16":
        return (f"the model computes NaN or infinite values in {dtype} too: check the checkpoint, or try "
                "--compute-dtype float32")
    variants = bfloat16_variants(exp["method"])
    how = [f"the bfloat16 variant {' or '.join(variants)}"] if variants else []
    key = dtype_setting(exp["method"])
    how += ["--compute-dtype bfloat16"] + ([f"a method table with {key}: bfloat16"] if key else [])
    return ("this model's activations exceed float16's range (largest value 65504); compute in bfloat16: "
            + ", or ".join(how))


def measure(run, exp, result, save):
    """Fill `result` phase by phase; exceptions propagate with what was measured kept in `result`."""
    import torch

    from quantbench import cost, tasks
    from quantbench.methods import METHODS

    config, device = run["config"], run["device"]
    torch.manual_seed(0)
    model_info = next(m for m in run["models"] if m["name"] == exp["model"])

    method = METHODS[exp["method"]]
    given, result["compute_dtype_why"] = effective_settings(exp, model_info)
    if method["quantize"]:
        t = time.perf_counter()
        checkpoint = quantized_checkpoint(run, exp, model_info, given, result, save)
        _phase(result, "quantize", t, save)
        settings = {}  # the checkpoint carries them
    else:
        checkpoint, settings = model_info["path"], given
    from transformers import AutoTokenizer  # imported before the clock: load_s is loading, not importing

    t = time.perf_counter()
    cost.reset_peak(device)
    quantizes_on_load = method["family"] != "baseline" and not method["quantize"]  # bitsandbytes
    if quantizes_on_load:
        import_libraries(method)
    with quantizer_messages() if quantizes_on_load else contextlib.nullcontext() as messages:
        model, backend = method["load"](str(checkpoint), device=device, trust_remote_code=config["trust_remote_code"],
                                        **settings)
    if quantizes_on_load:
        result["quantization"] = {"at_load": True, "messages": messages}
    if method["family"] != "baseline":
        backend["unquantized_linears"] = unquantized_linears(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_info["path"], trust_remote_code=config["trust_remote_code"])
    backend["device"] = device
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    result["cost"]["load_s"] = round(time.perf_counter() - t, 3)
    result["cost"]["peak_load_bytes"] = cost.peak_bytes(device)["peak_bytes"]
    result["backend"] = backend
    result["compute_dtype"] = backend["compute_dtype"]  # what ran (the CPU runs a float16 baseline in float32)
    if backend.get("note"):
        result["compute_dtype_why"] += f"; {backend['note']}"
    result["gpu"] = torch.cuda.get_device_name(0) if device == "cuda" else None  # this process's card (Ray, Modal)
    result["cost"].update(cost.weight_bytes(model))
    # What stays allocated after the load, garbage collected; minus weight_bytes it is what the
    # weights' count misses (kernel workspaces, repacked copies). On an H200, right after reloading
    # GPTQ, AWQ and torchao checkpoints of a 1B model, 0.3-1 GB more than the weights was allocated
    # before any collection; this says whether such memory is live.
    result["cost"]["resident_after_load_bytes"] = cost.resident_bytes(device)
    _phase(result, "load", t, save)

    text, corpus = tasks.perplexity_corpus(config["data_dir"], run["hub_reachable"])
    cost.reset_peak(device)
    if model_info["kind"] == "arch":
        for name in ["perplexity", "kld", *(x["name"] for x in run["tasks"])]:
            result["quality_info"][name] = {"status": "skipped", "reason": "random weights (architecture only)",
                                            "fix": "pass a real checkpoint to --model for quality"}
    else:
        measure_quality(model, tokenizer, text, corpus, run, result, save)
    result["cost"]["peak_eval_bytes"] = cost.peak_bytes(device)["peak_bytes"]

    t = time.perf_counter()
    cost.reset_peak(device)
    stream = tokenizer(text[:200_000], return_tensors="pt").input_ids[0]
    speed = cost.measure_speed(model, stream, device=device, pad_token_id=tokenizer.pad_token_id,
                               prompt_lengths=prompt_lengths(config),
                               decode_prompt_tokens=config["decode_prompt_tokens"],
                               new_tokens=config["new_tokens"], batch_sizes=config["batch_sizes"],
                               repeats=config["repeats"], decode_runs=config.get("decode_runs", 1),
                               weight_bytes=result["cost"]["weight_bytes"],
                               rates=run.get("device_rates"),
                               decode_modes=decode_modes(config.get("decode_mode", "eager")))
    result["cost"].update(cost.peak_bytes(device))
    result["cost"].update(speed)  # on a GPU its peak_bytes is the whole sweep's
    _phase(result, "speed", t, save)


def main(run_dir, exp_id, process="its own interpreter"):
    """Run experiment `exp_id` of the run in `run_dir`, writing its result; `process` says how this
    process started (a new interpreter, or forked from quantbench.forkserver with the imports done)."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    exp = next(e for e in run["experiments"] if e["id"] == exp_id)
    path = run_dir / f"{exp_id}.json"
    model_info = next(m for m in run["models"] if m["name"] == exp["model"])
    result = {"experiment": exp_id, "method": exp["method"], "settings": exp["settings"],
              "model": model_info, "device": run["device"], "status": "running", "error": None,
              "pid": os.getpid(), "process": process, "started": now(), "quality": {}, "quality_info": {}, "cost": {},
              "phases_s": {}}
    started = time.perf_counter()

    def save():
        result["duration_s"] = round(time.perf_counter() - started, 3)
        write_json(path, result)

    save()
    from quantbench.methods import MethodUnsuitable, MissingLibrary
    from quantbench.quality import NonFinite

    try:
        measure(run, exp, result, save)
        result["status"] = "ok"
    except NonFinite as e:  # a NaN is never "ok": the phase and the experiment fail with the fix
        fix = nonfinite_fix(exp, e.dtype)
        result.update(status="failed", error=str(e), fix=fix)
        key = e.phase.split()[0]
        result["quality_info"][key] = {"status": "failed", "reason": str(e), "fix": fix, "compute_dtype": e.dtype,
                                       "nonfinite_positions": e.nonfinite, "positions": e.positions}
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
