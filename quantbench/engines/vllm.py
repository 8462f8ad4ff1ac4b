"""The vLLM engine's scoring, the part of it that needs no GPU (the engine's load and its measurements,
issue 24, run on the GPU machine only).

vLLM returns log-probabilities of a prompt's tokens, not logits: per position the prompt's own next
token and the `k` most likely ones (`SamplingParams(prompt_logprobs=k, flat_logprobs=True)`). The whole
vocabulary (`prompt_logprobs=-1`) comes back as Python floats, vocabulary x positions of them, which is
what makes it slow. So the KL divergence from the run's reference (the baseline's full log-probabilities,
quality.py) is computed from the method's top `k`, with the bound the missing mass puts on it:

    KL(p || q) = sum over S of p log(p / q)  +  sum outside S of p log(p / q)
              >= sum over S of p log(p / q)  +  P log(P / Q)

where S holds the tokens vLLM returned, P = 1 - p(S) and Q = 1 - q(S) are the mass the reference and the
method put outside S, and the inequality is the log-sum inequality (equal when q is proportional to p
outside S). It is a lower bound, and the estimate quantbench reports with P and Q beside it: there is no
upper bound, since q may put almost nothing on a token p likes.

    top = flat_arrays(output.prompt_logprobs, k)           # what vLLM gave for one window
    per_token = kld_lower_bound(reference_logprobs, top["ids"], top["logprobs"])
"""
import numpy as np
import torch

# float32 log-probabilities sum to 1 within about this much: a missing mass below it is rounding
MASS_RESOLUTION = 1e-6


def flat_arrays(prompt_logprobs, k):
    """vLLM's prompt log-probabilities of one prompt of T tokens (a FlatLogprobs, or the list of T
    {token id: Logprob} it stands for; position 0 is None, as nothing predicts the first token) as arrays
    of T - 1 rows, row t about token t + 1: 'target' the log-probability of the prompt's own token, 'ids'
    and 'logprobs' [T - 1, k + 1] those of the tokens returned, the prompt's own first, then the top `k`."""
    if hasattr(prompt_logprobs, "start_indices"):  # flat: one list per field, positions by start and end
        starts, ends = prompt_logprobs.start_indices[1:], prompt_logprobs.end_indices[1:]
        ids, values = np.asarray(prompt_logprobs.token_ids), np.asarray(prompt_logprobs.logprobs, dtype=np.float64)
        rows = [(ids[a:b], values[a:b]) for a, b in zip(starts, ends)]
    else:
        rows = [(np.fromiter(d.keys(), dtype=np.int64, count=len(d)), np.array([v.logprob for v in d.values()]))
                for d in prompt_logprobs[1:]]
    width = k + 1
    if any(len(i) not in (k, width) for i, _ in rows):  # k when the prompt's token is itself in the top k
        raise ValueError(f"expected {k} or {width} log-probabilities a position (prompt_logprobs={k})")
    # a row of k repeats its first entry (the prompt's token, also among the top k) to keep one width
    ids = np.stack([np.resize(i, width) if len(i) == k else i for i, _ in rows])
    logprobs = np.stack([np.resize(v, width) if len(v) == k else v for _, v in rows])
    return {"target": logprobs[:, 0], "ids": ids, "logprobs": logprobs}


def kld_lower_bound(reference, ids, logprobs):
    """Per position, the lower bound above on KL(reference || method) and the masses outside the returned
    tokens: reference [n, V] the baseline's log-probabilities; ids, logprobs [n, m] the method's for m
    tokens a position (repeats allowed). In float64: {'kld', 'reference_outside', 'method_outside'}, [n] each."""
    p_log = torch.as_tensor(reference).double()
    ids = torch.as_tensor(ids, dtype=torch.long)
    q_log = torch.full_like(p_log, float("nan")).scatter_(1, ids, torch.as_tensor(logprobs).double())
    inside = torch.zeros_like(p_log, dtype=torch.bool).scatter_(1, ids, True)
    p = p_log.exp()
    known = torch.where(inside, p * (p_log - q_log), 0).sum(1)
    p_out = (1 - torch.where(inside, p, 0).sum(1)).clamp(min=0)
    q_out = (1 - torch.where(inside, q_log.exp(), 0).sum(1)).clamp(min=MASS_RESOLUTION)
    rest = torch.where(p_out > 0, p_out * (p_out.clamp(min=1e-300).log() - q_out.log()), 0)
    return {"kld": known + rest, "reference_outside": p_out, "method_outside": q_out}
