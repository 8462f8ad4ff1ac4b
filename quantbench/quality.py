"""Quality of a loaded model: perplexity, lm-evaluation-harness tasks, and a sanity generation.

Perplexity follows the GPTQ/AWQ papers: the corpus is tokenized once, cut into non-overlapping
windows of `window` tokens (the tail that does not fill a window is dropped), each window is scored
on its own, and perplexity is exp(total negative log-likelihood / tokens predicted), where every
window predicts its tokens 2..window.

    >>> perplexity(model, tokenizer, text, window=2048, max_tokens=16384)
    {'perplexity': 15.1, 'tokens_scored': 16376, 'windows': 8, 'window': 2048, 'stride': 2048}
    >>> run_tasks(model, tokenizer, [{'name': 'coqa', 'lm_eval_task': 'coqa_local'}], ...)
"""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

SANITY_PROMPT = "The capital of France is"
SANITY_NEW_TOKENS = 24


@torch.no_grad()
def perplexity(model, tokenizer, text, *, window, max_tokens=None, batch_size=1):
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total_tokens = ids.numel()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // window
    if n_windows == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one window of {window}")
    windows = ids[: n_windows * window].view(n_windows, window)
    nll = 0.0
    device = model.device
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
    scored = n_windows * (window - 1)
    return {"perplexity": math.exp(nll / scored), "nll_mean": nll / scored, "tokens_scored": scored,
            "windows": n_windows, "window": window, "stride": window, "corpus_tokens": total_tokens}


def _flatten_metrics(task_results):
    """lm-eval's {'f1,none': x, 'f1_stderr,none': s, 'alias': ...} -> {'f1': x, 'f1_stderr': s}."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        out[name] = None if isinstance(value, float) and math.isnan(value) else value
    return out


def run_tasks(model, tokenizer, tasks, *, task_dir, limit, batch_size, max_length, max_gen_toks):
    """Evaluate the already-loaded model on resolved tasks with lm-eval's simple_evaluate.

    Returns {user task name: {metric: value, metric_stderr: se, 'n': documents}}. lm-eval ignores
    simple_evaluate's batch_size for a model object, so the batch size is set on HFLM itself, and
    max_length is explicit so it never falls back to the model's full position count."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = TaskManager(include_path=str(task_dir)) if any(t["lm_eval_task"] != t["name"] for t in tasks) \
        else TaskManager()
    out = simple_evaluate(model=lm, tasks=[t["lm_eval_task"] for t in tasks], limit=limit,
                          task_manager=manager, gen_kwargs={"max_gen_toks": max_gen_toks},
                          log_samples=False, bootstrap_iters=1000, verbosity="WARNING")
    scores = {}
    for t in tasks:
        metrics = _flatten_metrics(out["results"][t["lm_eval_task"]])
        metrics["n"] = out["n-samples"][t["lm_eval_task"]]["effective"]
        scores[t["name"]] = metrics
    return scores


def is_degenerate(token_ids, text):
    """Why a generation looks broken (empty, one token repeated, a short loop), or None."""
    if not text.strip():
        return "empty output"
    if len(token_ids) >= 8 and len(set(token_ids)) == 1:
        return "one token repeated"
    if len(token_ids) >= 12 and len(set(token_ids)) <= len(token_ids) // 6:
        return f"only {len(set(token_ids))} distinct tokens in {len(token_ids)}"
    return None


@torch.no_grad()
def sanity_generation(model, tokenizer):
    """A short greedy answer to a fixed prompt, flagged if empty or degenerate."""
    enc = tokenizer(SANITY_PROMPT, return_tensors="pt").to(model.device)
    out = model.generate(**enc, max_new_tokens=SANITY_NEW_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    problem = is_degenerate(new, text)
    return {"prompt": SANITY_PROMPT, "output": text, "new_tokens": len(new),
            "degenerate": problem is not None, "problem": problem}
