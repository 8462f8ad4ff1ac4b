"""Quality of a loaded model, in any engine: a sanity generation, perplexity, the KL divergence from
the baseline, and lm-evaluation-harness tasks. Each phase returns its part of the result; what it
asks of the model goes through the engine (engines/*.py), so the numbers of two engines come from
the same code on the same token ids.

Perplexity follows the GPTQ/AWQ papers: the corpus is tokenized once, cut into non-overlapping
windows of `window` tokens (the tail that does not fill a window is dropped), each window is scored
on its own, and perplexity is exp(total negative log-likelihood / tokens predicted), where every
window predicts its tokens 2..window. A NaN or an infinity in the logits or the results fails the
phase (NonFinite): such a number is never "ok".

    >>> perplexity(engine, model, tokenizer, text, window=2048, max_tokens=16384, dtype="float16")
    (15.1, {'tokens_scored': 16376, 'windows': 8, 'window': 2048, 'stride': 2048, ...})
    >>> run_tasks(engine, model, tokenizer, [{'name': 'coqa', 'lm_eval_task': 'coqa_local'}], ...)
"""
import contextlib
import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantbench.config import EVAL_MAX_BATCH, EVAL_MIN_START
from quantbench.cost import kv_cache_bytes
from quantbench.results import SCHEMA, atomic_folder, write_json
from quantbench.tasks import generation_bound

# lm-eval warns that the generation bound quantbench passes overrides the tasks' own: on purpose.
logging.getLogger("lm_eval.evaluator").addFilter(lambda record: "specified through cli" not in record.getMessage())

SANITY_PROMPT = "The capital of France is"
SANITY_NEW_TOKENS = 24


class NonFinite(Exception):
    """A quality phase met NaN or infinite logits or numbers: the experiment fails with this reason,
    and nothing it measured is ranked or compared. `phase`, `dtype` (the compute dtype) and the
    count of non-finite positions out of all say where."""

    def __init__(self, phase, what, dtype, nonfinite=None, positions=None):
        super().__init__(f"{phase}: {what}, computing in {dtype}")
        self.phase, self.what, self.dtype, self.nonfinite, self.positions = phase, what, dtype, nonfinite, positions


@contextlib.contextmanager
def finite_logits(engine, model, phase, dtype, *, varying_shapes=False):
    """The engine's forwards within the block (engine.forwards), and NonFinite when it ends if any gave
    logits holding a NaN or an infinity, with how many positions did."""
    with engine.forwards(model, varying_shapes=varying_shapes) as seen:
        yield
    if seen["nonfinite"]:
        raise NonFinite(phase, f"non-finite logits (NaN or infinite) at {seen['nonfinite']} of {seen['positions']} "
                        "positions", dtype, nonfinite=seen["nonfinite"], positions=seen["positions"])


def check_finite(phase, numbers, dtype):
    """Raise NonFinite if any of `numbers` ({name: value}) is a NaN or an infinity."""
    bad = [k for k, v in numbers.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFinite(phase, ", ".join(f"{k} is {numbers[k]}" for k in bad), dtype)


def is_degenerate(token_ids, text):
    """Why a generation looks broken (empty, one token repeated, a short loop), or None."""
    if not text.strip():
        return "empty output"
    if len(token_ids) >= 8 and len(set(token_ids)) == 1:
        return "one token repeated"
    if len(token_ids) >= 12 and len(set(token_ids)) <= len(token_ids) // 6:
        return f"only {len(set(token_ids))} distinct tokens in {len(token_ids)}"
    return None


def sanity(engine, model, tokenizer, dtype):
    """A short greedy answer to a fixed prompt, flagged if empty or degenerate."""
    with finite_logits(engine, model, "sanity generation", dtype, varying_shapes=True):
        new, text = engine.generate(model, tokenizer, SANITY_PROMPT, SANITY_NEW_TOKENS)
    problem = is_degenerate(new, text)
    return {"prompt": SANITY_PROMPT, "output": text, "new_tokens": len(new),
            "degenerate": problem is not None, "problem": problem}


def perplexity(engine, model, tokenizer, text, *, window, max_tokens=None, batch_size=1, dtype):
    """(perplexity, how it was measured) on `text` in non-overlapping windows of `window` tokens."""
    windows, corpus_tokens = perplexity_windows(tokenizer, text, window=window, max_tokens=max_tokens)
    nll = 0.0
    with finite_logits(engine, model, "perplexity", dtype):
        batches = engine.logprobs(model, windows, first=0, batch_size=batch_size)
        for start, logp in zip(tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", leave=False), batches):
            targets = windows[start:start + batch_size, 1:].reshape(-1).to(logp.device)
            nll += F.nll_loss(logp.reshape(-1, logp.size(-1)), targets, reduction="sum").item()
    return perplexity_of(nll, windows, corpus_tokens, dtype)


def perplexity_windows(tokenizer, text, *, window, max_tokens=None):
    """(the corpus's first `max_tokens` tokens cut into non-overlapping windows [n, window] of token ids, how
    many tokens the whole corpus has)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total_tokens = ids.numel()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // window
    if n_windows == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n_windows * window].view(n_windows, window), total_tokens


def perplexity_of(nll, windows, corpus_tokens, dtype):
    """(perplexity, how it was measured) from the negative log-likelihood summed over `windows`' tokens 2..window."""
    n_windows, window = windows.shape
    scored = n_windows * (window - 1)
    info = {"nll_mean": nll / scored, "tokens_scored": scored, "windows": n_windows, "window": window,
            "stride": window, "corpus_tokens": corpus_tokens}
    value = math.exp(nll / scored) if nll / scored < 700 else float("inf")  # exp overflows past about 709
    check_finite("perplexity", {"perplexity": value, **info}, dtype)
    return value, info


def _flatten_metrics(task_results):
    """lm-eval's {'f1,none': x, 'f1_stderr,none': s, 'alias': ...} -> {'f1': x, 'f1_stderr': s}."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        # A NaN metric stays, for the phase's check to fail on; a NaN standard error is one lm-eval
        # could not compute (a single document).
        undefined = name.endswith("_stderr") and isinstance(value, float) and math.isnan(value)
        out[name] = None if undefined else value
    return out


def eval_batch_start(shapes, max_length, free_bytes=None):
    """Where lm-eval's batch detection ("auto") starts on a GPU: as many sequences as its probe of a
    generation task fits in the free device memory (`free_bytes`, default: free now, the allocator's
    cached blocks included), at most EVAL_MAX_BATCH and never below lm-eval's own start of
    EVAL_MIN_START (a loglikelihood task's probe is only as long as its longest request, so more
    than this estimate may fit there). The probe runs the model on [batch, max_length] tokens five
    times and holds three [batch, max_length, vocabulary] tensors of logits at once (an output, its
    log-softmax and the previous log-softmax) besides the KV cache the forward builds; a tenth of
    the memory is left for activations. Each attempt that does not fit is a whole forward pass,
    retried at 0.9x the batch: starting where it fits saves those passes."""
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    size = shapes["element_bytes"]
    per_sequence = max_length * (3 * shapes["vocab"] * size + kv_cache_bytes(shapes, 1, 1))
    return max(EVAL_MIN_START, min(EVAL_MAX_BATCH, int(0.9 * free_bytes // per_sequence)))


def without_lm_eval_env_report():
    """A context in which lm-eval's simple_evaluate skips the environment report it adds to its results
    (torch's collect_env, which runs pip, nvidia-smi and compilers in subprocesses: seconds per call,
    so per experiment); run.json keeps the environment. The evaluation itself is untouched."""
    from unittest import mock

    from lm_eval import evaluator

    if not hasattr(evaluator, "add_env_info"):  # a lm-eval that no longer has it: nothing to skip
        return contextlib.nullcontext()
    return mock.patch.object(evaluator, "add_env_info", lambda results: None)


def run_tasks(engine, model, tokenizer, tasks, *, task_dir, limit, batch_size, max_length, max_gen_toks, dtype,
              max_batch_size=EVAL_MAX_BATCH, include_path=None, num_fewshot=None, apply_chat_template=False,
              fewshot_as_multiturn=False):
    """Evaluate the loaded model on resolved tasks with lm-eval's simple_evaluate, on the engine's
    lm-eval LM (engine.lm: the batch size is set there, "auto" being lm-eval's detection from
    max_batch_size down), prompted as lm-eval's --num_fewshot, --apply_chat_template and
    --fewshot_as_multiturn say; the tasks are found in the run's task folder, the user's include
    path, and lm-eval's own tasks.

    Returns (scores, per_document, prompting): scores is {user task name: {metric: value,
    metric_stderr: se, 'n': documents}}; per_document is {user task name: {'doc_ids': [...], metric:
    [value per doc]}} for the metrics lm-eval aggregates by their mean, so that two methods can be
    compared document by document; prompting is {user task name: how its prompts were built: the
    few-shot count lm-eval used, the chat settings, the first document's prompt and a sha256 of every
    request, which two engines given the same tokenizer share}. lm-eval's environment report is skipped."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = engine.lm(model, tokenizer, batch_size=batch_size, max_length=max_length, max_batch_size=max_batch_size)
    # lm-eval's own ~26,000 task YAMLs take seconds per experiment to index: only when a task is not
    # found in the run's folder of local copies and the user's include path (which, as in lm-eval,
    # override lm-eval's tasks of the same name).
    paths = [str(task_dir)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not {t["lm_eval_task"] for t in tasks} <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    template = lm.chat_template(True) if apply_chat_template else None
    by_bound = {}  # lm-eval takes one generation bound per call: one call per bound (most runs: one)
    for t in tasks:
        by_bound.setdefault(generation_bound(t["name"], max_gen_toks), []).append(t)
    outs = {}
    with finite_logits(engine, model, "tasks", dtype, varying_shapes=True):
        for bound, group in by_bound.items():
            with without_lm_eval_env_report():
                out = simple_evaluate(model=lm, tasks=[t["lm_eval_task"] for t in group], limit=limit,
                                      task_manager=manager, gen_kwargs={"max_gen_toks": bound},
                                      num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                      fewshot_as_multiturn=fewshot_as_multiturn,
                                      log_samples=True, bootstrap_iters=1000, verbosity="WARNING")
            outs.update({t["lm_eval_task"]: out for t in group})
    scores, per_document, prompting = {}, {}, {}
    for t in tasks:
        key, out = t["lm_eval_task"], outs[t["lm_eval_task"]]
        metrics = _flatten_metrics(out["results"][key])
        metrics["n"] = out["n-samples"][key]["effective"]
        check_finite(f"tasks ({t['name']})", metrics, dtype)
        scores[t["name"]] = metrics
        config = out["configs"][key]
        means = averaged_metrics(config.get("metric_list") or default_metrics(config["output_type"]))
        samples = sorted((s for s in out["samples"][key] if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
        per_document[t["name"]] = {"doc_ids": [s["doc_id"] for s in samples],
                                   **{m: [float(s[m]) for s in samples] for m in means if all(m in s for s in samples)}}
        requests = json.dumps([s["arguments"] for s in samples], default=str, ensure_ascii=False)
        prompting[t["name"]] = {
            "num_fewshot": config.get("num_fewshot"), "apply_chat_template": apply_chat_template,
            "fewshot_as_multiturn": fewshot_as_multiturn,
            "chat_template_sha256": template and hashlib.sha256(template.encode()).hexdigest(),
            "first_prompt": samples[0]["arguments"][0][0] if samples else None,
            "requests_sha256": hashlib.sha256(requests.encode()).hexdigest()}
    return scores, per_document, prompting


def default_metrics(output_type):
    """The metric_list lm-eval gives a task whose YAML names none (a multiple-choice task: acc, acc_norm)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    return [{"metric": m} for m in DEFAULT_METRIC_REGISTRY[output_type]]


def averaged_metrics(metric_list):
    """The metrics of a task's metric_list that lm-eval averages over documents: aggregation mean, or
    none given and mean its default for the metric (boolq's acc), so their per-document values pair."""
    from lm_eval.api.metrics import mean
    from lm_eval.api.registry import get_metric_aggregation

    return [m["metric"] for m in metric_list
            if m.get("aggregation") == "mean" or ("aggregation" not in m and get_metric_aggregation(m["metric"]) is mean)]


# ---- Divergence from the baseline, as llama.cpp's `perplexity --kl-divergence` measures it ----
#
# The corpus tokens are cut into consecutive chunks of n_ctx (default 512); the first token of each
# chunk is replaced by BOS when the tokenizer adds one; only the second half of each chunk is scored
# (positions n_ctx/2 .. n_ctx-2 predicting the next token), so every scored token has at least
# n_ctx/2 tokens of context. The baseline's log-probabilities over the whole vocabulary at the
# scored positions are written once per run (float16, 2 bytes per vocabulary entry per token), with
# its top-1 token and the log-probability of the true next token (float32). Every other method is
# compared on exactly those tokens; its log-probabilities are rounded to float16 the same way before
# the KL divergence is summed, so the baseline against itself gives exactly 0.

REFERENCE_FILES = ("logprobs.npy", "tokens.npz", "reference.json")


def kld_chunks(tokenizer, text, *, n_ctx, max_tokens=None):
    """(chunks [n, n_ctx] of token ids, whether the first token of each is BOS)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // n_ctx
    if n == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one KLD chunk of {n_ctx}")
    chunks = ids[: n * n_ctx].view(n, n_ctx).clone()
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    if adds_bos:
        chunks[:, 0] = bos
    return chunks, adds_bos


def _scored_logprobs(engine, model, chunks, batch_size):
    """Per batch of chunks: (log-probs [tokens, vocab] float32, top-1 ids, log p(next token))."""
    first = chunks.shape[1] // 2
    batches = engine.logprobs(model, chunks, first=first, batch_size=batch_size)
    for start, logp in zip(range(0, len(chunks), batch_size), batches):
        target = chunks[start:start + batch_size, first + 1:].to(logp.device)
        yield (logp.flatten(0, 1), logp.argmax(-1).flatten(),
               logp.gather(-1, target.unsqueeze(-1)).flatten())


def write_reference(engine, model, chunks, folder, *, adds_bos, dtype, batch_size=1, about=None):
    """Write the baseline's scored log-probabilities into `folder` (made atomically); returns its info."""
    n_ctx = chunks.shape[1]
    per_chunk = n_ctx - 1 - n_ctx // 2
    # The logits' check ends before the folder is moved into place: a non-finite reference is never kept.
    with atomic_folder(folder) as tmp, finite_logits(engine, model, "kld reference", dtype):
        logprobs, top1, lp_target, row = None, [], [], 0
        for logp, top, lpt in tqdm(_scored_logprobs(engine, model, chunks, batch_size), desc="kld reference",
                                   total=-(-len(chunks) // batch_size), leave=False):
            if logprobs is None:
                logprobs = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float16,
                                                     shape=(len(chunks) * per_chunk, logp.shape[-1]))
            logprobs[row:row + len(logp)] = logp.half().cpu().numpy()
            row += len(logp)
            top1.append(top.cpu())
            lp_target.append(lpt.cpu())
        logprobs.flush()
        del logprobs
        np.savez(tmp / "tokens.npz", chunks=chunks.numpy(), top1=torch.cat(top1).numpy(),
                 logp_target=torch.cat(lp_target).numpy())
        info = {"schema": SCHEMA, "n_ctx": n_ctx, "chunks": len(chunks), "tokens_scored": row, "bos_first": adds_bos,
                "scored": f"positions {n_ctx // 2}..{n_ctx - 2} of each chunk predict the next token",
                "storage": "log-probabilities as float16 (2 bytes x vocabulary per scored token)",
                "bytes": sum((tmp / f).stat().st_size for f in REFERENCE_FILES[:2]), **(about or {})}
        write_json(tmp / "reference.json", info)
    return info


def compare_to_reference(engine, model, folder, *, dtype, batch_size=1):
    """(the method's divergence from the baseline reference in `folder`, token by token, summarised;
    how it was measured)."""
    info, base, saved = read_reference(folder)
    chunks = torch.from_numpy(saved["chunks"])
    kld, same_top, lp_target, row = [], [], [], 0
    with finite_logits(engine, model, "kld", dtype):
        for logp, top, lpt in tqdm(_scored_logprobs(engine, model, chunks, batch_size), desc="kld", leave=False,
                                   total=-(-len(chunks) // batch_size)):
            n, vocab = logp.shape
            if vocab != base.shape[1]:
                raise ValueError(f"the model has {vocab} output tokens but the baseline reference {base.shape[1]}")
            lp_base = torch.from_numpy(np.array(base[row:row + n])).to(logp.device).float()
            lp_q = logp.half().float()  # the baseline's rounding, so a model against itself gives 0
            kld.append((lp_base.exp() * (lp_base - lp_q)).sum(-1).double().cpu())
            same_top.append((top.cpu().numpy() == saved["top1"][row:row + n]))
            lp_target.append(lpt.double().cpu())
            row += n
    stats = kld_statistics(torch.cat(kld).numpy(), np.concatenate(same_top), torch.cat(lp_target).numpy(),
                           saved["logp_target"].astype(np.float64))
    check_finite("kld", stats, dtype)
    return stats, reference_used(info)


def read_reference(folder):
    """(reference.json, the stored log-probabilities memory-mapped, tokens.npz: the chunks and the baseline's
    top-1 ids and target log-probabilities) of a folder written by write_reference."""
    folder = Path(folder)
    return (json.loads((folder / "reference.json").read_text()), np.load(folder / "logprobs.npy", mmap_mode="r"),
            np.load(folder / "tokens.npz"))


def reference_used(info):
    """What a comparison records of the reference (its reference.json) it was made against."""
    return {k: info[k] for k in ("n_ctx", "chunks", "tokens_scored", "bos_first", "scored", "storage", "bytes")
            if k in info} | {"reference": info.get("experiment")}


def kld_statistics(kld, same_top, logp_target, logp_target_base):
    """llama.cpp's KL-divergence summary from per-token arrays (float64): KLD mean with its standard
    error, median, 90/95/99/99.9th percentiles (numpy's linear interpolation) and maximum; the share of
    tokens whose top-1 token agrees with the baseline's; the change in the probability of the true
    next token (mean and RMS); PPL of both on the scored tokens, their ratio and mean log ratio."""
    kld = np.asarray(kld, dtype=np.float64)
    n = kld.size

    def se(x):
        return float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else None

    same = np.asarray(same_top, dtype=np.float64)
    dp = np.exp(logp_target) - np.exp(logp_target_base)
    ln_ratio = logp_target_base - logp_target          # ln PPL(Q) - ln PPL(base), per token
    rms = float(np.sqrt(np.mean(dp ** 2)))
    ratio = float(np.exp(ln_ratio.mean()))
    out = {"tokens": n, "kld_mean": float(kld.mean()), "kld_mean_stderr": se(kld)}
    for name, q in [("median", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p99_9", 99.9)]:
        out[f"kld_{name}"] = float(np.percentile(kld, q))
    out["kld_max"] = float(kld.max())
    out["kld_percentiles"] = [float(v) for v in np.percentile(kld, range(101))]  # the distribution, for plots
    out.update({"same_top_p": float(same.mean()), "same_top_p_stderr": se(same),
                "delta_p_mean": float(dp.mean()), "delta_p_mean_stderr": se(dp),
                "delta_p_rms": rms, "delta_p_rms_stderr": (se(dp ** 2) / (2 * rms)) if rms > 0 and n > 1 else None,
                "ppl": float(np.exp(-np.mean(logp_target))), "ppl_base": float(np.exp(-np.mean(logp_target_base))),
                "ln_ppl_ratio_mean": float(ln_ratio.mean()), "ln_ppl_ratio_mean_stderr": se(ln_ratio),
                "ppl_ratio": ratio, "ppl_ratio_stderr": ratio * se(ln_ratio) if n > 1 else None})
    return out
