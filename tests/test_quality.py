import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantbench import quality, tasks
from quantbench.engines import transformers as engine
from quantbench.config import EVAL_MAX_BATCH, EVAL_MIN_START


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def test_perplexity_matches_float64_recomputation(tiny):
    model, tokenizer = tiny
    text = tasks.perplexity_corpus(None, hub=False)[0]
    value, got = quality.perplexity(engine, model, tokenizer, text, window=64, max_tokens=64 * 5 + 17, batch_size=2,
                                    dtype="float32")

    # Independent: float64 log-softmax over each window, token by token.
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: 64 * 5]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in ids.view(5, 64):
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            for pos in range(63):
                nll -= logp[pos, w[pos + 1]].item()
                count += 1
    assert got["windows"] == 5 and got["tokens_scored"] == count == 5 * 63
    assert value == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_too_short_corpus_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="fewer than one window"):
        quality.perplexity(engine, model, tokenizer, "a b c", window=64, dtype="float32")


def test_degenerate_detection():
    assert quality.is_degenerate([5, 6, 7], "   ") == "empty output"
    assert quality.is_degenerate([9] * 10, "x" * 10) == "one token repeated"
    assert quality.is_degenerate([1, 2] * 8, "ab" * 8).startswith("only 2 distinct")
    assert quality.is_degenerate(list(range(20)), "Paris is the capital") is None


def test_sanity_generation_records_prompt_and_output(tiny):
    model, tokenizer = tiny
    s = quality.sanity(engine, model, tokenizer, "float32")
    assert s["prompt"] == quality.SANITY_PROMPT
    assert 1 <= s["new_tokens"] <= quality.SANITY_NEW_TOKENS
    assert isinstance(s["degenerate"], bool)
    # A random-weight model usually babbles; either way the flag and the reason agree.
    assert s["degenerate"] == (s["problem"] is not None)


def test_lm_eval_local_lambada_on_tiny_model(tiny, shared_data, tmp_path, monkeypatch):
    model, tokenizer = tiny
    import torch.utils.collect_env

    env_reports = []  # lm-eval's environment report (seconds of subprocesses) is skipped
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: env_reports.append(1) or "")
    task = tasks.resolve_task("lambada_openai", data_dir=shared_data, hub=False, task_dir=tmp_path)
    # lm-eval's forward passes run without cuDNN attention (a plan per new shape); torch's flags return after
    cudnn_seen = []
    hook = model.register_forward_pre_hook(lambda *_: cudnn_seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    scores, docs, prompting = quality.run_tasks(engine, model, tokenizer, [task], task_dir=tmp_path, limit=6, batch_size=4,
                                                dtype="float32", max_length=256, max_gen_toks=16)
    hook.remove()
    assert env_reports == []
    assert cudnn_seen and not any(cudnn_seen) and torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    s = scores["lambada_openai"]
    assert s["n"] == 6
    # Per-document scores for the mean-aggregated metric (acc), not for perplexity (not a mean).
    assert docs["lambada_openai"]["doc_ids"] == list(range(6)) and set(docs["lambada_openai"]) == {"doc_ids", "acc"}
    assert sum(docs["lambada_openai"]["acc"]) / 6 == pytest.approx(s["acc"])
    assert 0.0 <= s["acc"] <= 1.0 and s["acc_stderr"] >= 0
    assert s["perplexity"] > 1.0
    # How it was prompted: lm-eval's default of 0 examples, no chat template, the first document's context.
    first = json.loads((shared_data / "lambada" / "lambada_test.jsonl").read_text().splitlines()[0])["text"]
    p = prompting["lambada_openai"]
    assert (p["num_fewshot"], p["apply_chat_template"], p["fewshot_as_multiturn"], p["chat_template_sha256"]) == (0, False, False, None)
    assert p["first_prompt"] == first.rsplit(" ", 1)[0] and len(p["requests_sha256"]) == 64


def test_lm_evals_batch_detection_starts_at_what_its_probe_fits(tiny):
    model, _ = tiny
    c, element = model.config, torch.finfo(model.dtype).bits // 8
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * element
    per_sequence = 128 * (3 * c.vocab_size * element + kv_per_token)  # three logits tensors and the KV cache
    assert quality.eval_batch_start(engine.shapes(model), 128, free_bytes=100 * per_sequence / 0.9 + 1) == 100
    assert quality.eval_batch_start(engine.shapes(model), 128, free_bytes=0) == EVAL_MIN_START  # lm-eval's own start at least
    assert quality.eval_batch_start(engine.shapes(model), 128, free_bytes=10**15) == EVAL_MAX_BATCH


def _kld_setup(tiny, tmp_path, n_ctx=32, chunks=4):
    model, tokenizer = tiny
    text = tasks.perplexity_corpus(None, hub=False)[0]
    ids, adds_bos = quality.kld_chunks(tokenizer, text, n_ctx=n_ctx, max_tokens=n_ctx * chunks + 5)
    info = quality.write_reference(engine, model, ids, tmp_path / "ref", adds_bos=adds_bos, dtype="float32", batch_size=3,
                                   about={"experiment": "fp16"})
    return ids, info


def test_kld_of_the_baseline_against_itself_is_exactly_zero(tiny, tmp_path):
    ids, info = _kld_setup(tiny, tmp_path)
    assert ids.shape == (4, 32) and info["tokens_scored"] == 4 * (32 - 1 - 16)
    stats, used = quality.compare_to_reference(engine, tiny[0], tmp_path / "ref", dtype="float32", batch_size=2)
    assert stats["tokens"] == info["tokens_scored"] and used["reference"] == "fp16"
    assert stats["kld_mean"] == 0.0 and stats["kld_max"] == 0.0 and stats["same_top_p"] == 1.0
    assert stats["delta_p_mean"] == 0.0 and stats["delta_p_rms"] == 0.0 and stats["ppl_ratio"] == 1.0


def test_kld_against_a_perturbed_copy_matches_float64_recomputation(tiny, tmp_path):
    import copy

    model, _ = tiny
    ids, info = _kld_setup(tiny, tmp_path)
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    stats, _ = quality.compare_to_reference(engine, other, tmp_path / "ref", dtype="float32", batch_size=4)

    # Independent: both models' full distributions in float64, the second half of each chunk.
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[:, 16:-1].double(), -1)
        lq = torch.log_softmax(other(ids).logits[:, 16:-1].double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1).flatten().numpy()
    target = ids[:, 17:].unsqueeze(-1)
    nll_p, nll_q = -lp.gather(-1, target).flatten(), -lq.gather(-1, target).flatten()
    assert stats["kld_mean"] > 1e-4  # the perturbation is visible
    assert stats["kld_mean"] == pytest.approx(kld.mean(), rel=2e-3, abs=1e-6)
    # One token's KLD carries the float16 rounding of the stored log-probabilities (about 1e-4 here,
    # where the tiny model spreads its mass over all 400 tokens); the mean averages it away.
    assert stats["kld_max"] == pytest.approx(kld.max(), abs=2e-4)
    assert stats["kld_p99"] == pytest.approx(np.percentile(kld, 99), abs=2e-4)
    assert stats["same_top_p"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).double().mean().item())
    assert stats["ppl"] == pytest.approx(math.exp(nll_q.mean().item()), rel=1e-5)
    assert stats["ppl_base"] == pytest.approx(math.exp(nll_p.mean().item()), rel=1e-5)
    assert stats["delta_p_mean"] == pytest.approx((torch.exp(-nll_q) - torch.exp(-nll_p)).mean().item(), abs=1e-7)


def test_kld_statistics_match_numpy_on_known_inputs():
    rng = np.random.default_rng(0)
    kld = rng.exponential(0.05, size=1001)
    same = rng.random(1001) < 0.9
    lq, lp = np.log(rng.uniform(0.01, 1, 1001)), np.log(rng.uniform(0.01, 1, 1001))
    s = quality.kld_statistics(kld, same, lq, lp)
    n = 1001
    assert s["kld_mean"] == pytest.approx(kld.mean()) and s["kld_max"] == kld.max()
    assert s["kld_mean_stderr"] == pytest.approx(kld.std(ddof=1) / math.sqrt(n))
    for name, q in [("median", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p99_9", 99.9)]:
        assert s[f"kld_{name}"] == pytest.approx(np.percentile(kld, q))
    p = same.mean()
    assert s["same_top_p"] == pytest.approx(p) and s["same_top_p_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    dp = np.exp(lq) - np.exp(lp)
    assert s["delta_p_rms"] == pytest.approx(math.sqrt((dp ** 2).mean()))
    assert s["delta_p_mean_stderr"] == pytest.approx(dp.std(ddof=1) / math.sqrt(n))
    assert s["ln_ppl_ratio_mean"] == pytest.approx((lp - lq).mean())
    assert s["ppl_ratio"] == pytest.approx(math.exp(-lq.mean()) / math.exp(-lp.mean()))


def test_lm_eval_runs_every_local_task_on_tiny_model(tiny, shared_data, tmp_path):
    model, tokenizer = tiny
    names = ["arc_easy", "piqa", "boolq", "winogrande", "squad_v1"]
    resolved = [tasks.resolve_task(n, data_dir=shared_data, hub=False, task_dir=tmp_path) for n in names]
    # squad_v1's own bound (48) is below the cap: two lm-eval calls, one per bound, one result
    scores, docs, _ = quality.run_tasks(engine, model, tokenizer, resolved, task_dir=tmp_path, limit=3, batch_size=4,
                                        dtype="float32", max_length=512, max_gen_toks=64)
    assert set(docs["squad_v1"]) == {"doc_ids", "em", "f1"} and set(docs["arc_easy"]) == {"doc_ids", "acc", "acc_norm"}
    for n in names[:4]:
        assert scores[n]["n"] == 3 and 0 <= scores[n]["acc"] <= 1 and scores[n]["acc_stderr"] >= 0, scores[n]
        # per-document values for the paired deltas, also where the task names no aggregation (boolq's acc)
        assert len(docs[n]["acc"]) == 3 and sum(docs[n]["acc"]) / 3 == scores[n]["acc"], (n, docs[n])
    assert scores["squad_v1"]["n"] == 3 and 0 <= scores["squad_v1"]["f1"] <= 1


def test_non_finite_logits_fail_the_phase_with_where_and_the_dtype(tiny_overflow_model_dir, tmp_path):
    """The overflow model: float16 activations pass 65504, so every scored position is NaN; in bfloat16
    the same phases give finite numbers, and no reference is kept from the float16 model."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_overflow_model_dir)
    text = tasks.perplexity_corpus(None, hub=False)[0]
    fp16 = AutoModelForCausalLM.from_pretrained(tiny_overflow_model_dir, dtype=torch.float16).eval()
    with pytest.raises(quality.NonFinite) as e:
        quality.perplexity(engine, fp16, tokenizer, text, window=64, max_tokens=64 * 3, batch_size=2, dtype="float16")
    assert (e.value.phase, e.value.dtype, e.value.nonfinite, e.value.positions) == ("perplexity", "float16", 192, 192)
    assert str(e.value) == "perplexity: non-finite logits (NaN or infinite) at 192 of 192 positions, computing in float16"

    chunks, bos = quality.kld_chunks(tokenizer, text, n_ctx=64, max_tokens=128)
    with pytest.raises(quality.NonFinite, match="kld reference"):
        quality.write_reference(engine, fp16, chunks, tmp_path / "ref", adds_bos=bos, dtype="float16")
    assert not (tmp_path / "ref").exists() and not list(tmp_path.iterdir())  # nothing half-written kept

    bf16 = AutoModelForCausalLM.from_pretrained(tiny_overflow_model_dir, dtype=torch.bfloat16).eval()
    value, _ = quality.perplexity(engine, bf16, tokenizer, text, window=64, max_tokens=64 * 3, dtype="bfloat16")
    assert math.isfinite(value)
    quality.write_reference(engine, bf16, chunks, tmp_path / "ref", adds_bos=bos, dtype="bfloat16")
    assert (tmp_path / "ref" / "reference.json").exists()


def test_a_non_finite_result_fails_its_phase():
    quality.check_finite("kld", {"kld_mean": 0.1, "tokens": 5, "kld_mean_stderr": None}, "bfloat16")
    with pytest.raises(quality.NonFinite, match=r"^tasks \(arc_easy\): acc is nan, computing in float16$"):
        quality.check_finite("tasks (arc_easy)", {"acc": float("nan"), "n": 4}, "float16")
