import json
import math

import numpy as np
import pytest

from quantbench import results


def test_paired_difference_matches_numpy_and_marks_noise():
    rng = np.random.default_rng(0)
    base = {i: float(v) for i, v in enumerate(rng.random(500) < 0.6)}
    worse = {i: float(v) for i, v in enumerate(rng.random(500) < 0.4)}
    d = np.array([worse[i] - base[i] for i in range(500)])
    p = results.paired_difference(base, worse)
    assert p["n"] == 500 and p["delta"] == pytest.approx(d.mean())
    assert p["stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(500))
    assert not p["within_noise"]  # 0.6 vs 0.4 on 500 documents is real
    # The same scores with three documents flipped: a difference well inside the noise.
    close = dict(base)
    for i in range(3):
        close[i] = 1.0 - close[i]
    assert results.paired_difference(base, close)["within_noise"]
    # Only the documents both scored are paired.
    assert results.paired_difference({0: 1.0, 1: 0.0}, {1: 1.0, 2: 0.0})["n"] == 1
    assert results.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_summary_shows_paired_deltas_with_error_bars_and_noise(tmp_path):
    """From result files alone: deltas paired on documents, ± their standard error, noise marked."""
    run = {"config": {"batch_sizes": [1], "prompt_tokens": 8, "repeats": 1, "new_tokens": 4, "decode_prompt_tokens": 4},
           "environment": {"cpu_count": 2}, "device": "cpu", "started": "t", "models": [{"name": "m"}],
           "experiments": [{"id": e} for e in ["fp16", "nf4", "int8"]]}
    results.write_json(tmp_path / "run.json", run)
    acc = {"fp16": [1.0] * 60 + [0.0] * 40, "nf4": [1.0] * 40 + [0.0] * 60, "int8": [1.0] * 59 + [0.0] * 41}
    for name, values in acc.items():
        results.write_json(tmp_path / f"{name}.json", {
            "experiment": name, "method": name, "model": {"name": "m"}, "status": "ok", "error": None,
            "quality": {"arc_easy": {"acc": sum(values) / 100, "acc_stderr": 0.05, "n": 100}}, "cost": {},
            "quality_info": {"arc_easy": {"source": "local: arc", "lm_eval_task": "arc_easy_local", "n": 100,
                                          "batch_size": 16, "max_length": 2048, "max_gen_toks": 128,
                                          "attention_kernels": ["FLASH_ATTENTION", "MATH"]}}})
        results.write_json(tmp_path / f"{name}.docs.json", {"arc_easy": {"doc_ids": list(range(100)), "acc": values}})
    summary = results.summary_markdown(tmp_path)
    rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line.startswith("| ") and " | ok | " in line}
    # the protocol says how lm-eval ran: batch, context, generation bound, attention kernels
    assert ("- arc_easy: lm-eval arc_easy_local from local: arc; n = 100 documents; ± is lm-eval's standard error; "
            "batch 16, max_length 2048, max_gen_toks 128; attention kernels FLASH_ATTENTION, MATH.") in summary
    d = np.array(acc["nf4"]) - np.array(acc["fp16"])
    assert f"-0.2000 ± {d.std(ddof=1) / 10:.4f} |" in rows["nf4"]  # 20 documents lost: real
    assert "-0.0100 ± 0.0100 (noise)" in rows["int8"]              # one document lost: noise


def test_summary_names_memory_a_loaded_model_holds_beyond_its_weights(tmp_path):
    """Seen on an H200: a GPTQ group-32 (Marlin) reload of Llama-3.2-1B kept 1072 MiB allocated beyond its
    1026 MiB of weights; the summary must say so, and stay quiet where the two agree."""
    run = {"config": {"batch_sizes": [1], "prompt_tokens": 8, "repeats": 1, "new_tokens": 4, "decode_prompt_tokens": 4},
           "environment": {}, "device": "cuda", "started": "t", "models": [{"name": "m"}],
           "experiments": [{"id": e} for e in ["fp16", "gptq-w4g32"]]}
    results.write_json(tmp_path / "run.json", run)
    mib = 2**20
    for name, weights, resident in [("fp16", 2357 * mib, 2358 * mib), ("gptq-w4g32", 1026 * mib, 2098 * mib)]:
        results.write_json(tmp_path / f"{name}.json", {
            "experiment": name, "method": name, "model": {"name": "m"}, "status": "ok", "error": None, "quality": {},
            "cost": {"weight_bytes": weights, "resident_after_load_bytes": resident}})
    text = results.summary_markdown(tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("- Held after loading"))
    assert "gptq-w4g32 +1072.0 MiB" in line and "fp16" not in line
    assert results.held_beyond_weights({"weight_bytes": 100, "resident_after_load_bytes": None}) is None


def test_summary_states_the_decode_protocol_each_result_ran(tmp_path):
    """A run resumed across the change of decode clock holds results of both protocols: each line
    names its experiments; a run of one protocol has one line and names none."""
    run = {"config": {"batch_sizes": [1], "prompt_lengths": [8], "repeats": 3, "new_tokens": 64, "decode_prompt_tokens": 32},
           "environment": {}, "device": "cuda", "started": "t", "models": [{"name": "m"}],
           "experiments": [{"id": e} for e in ["fp16", "nf4"]]}
    results.write_json(tmp_path / "run.json", run)
    point = {"1": {"status": "ok", "tok_s": 50.0, "achieved_bytes_s": 1e11, "kv_cache_bytes": 2**20}}
    costs = {"fp16": {"decode": point, "decode_runs": 1, "attention_kernels": {"eager": ["FLASH_ATTENTION", "MATH"]}},
             "nf4": {"decode": point}}
    for name, c in costs.items():
        results.write_json(tmp_path / f"{name}.json", {"experiment": name, "method": name, "model": {"name": "m"},
                                                        "status": "ok", "error": None, "quality": {}, "cost": c})
    lines = [x for x in results.summary_markdown(tmp_path).splitlines() if x.startswith("- Speed")]
    assert len(lines) == 2
    assert lines[0].startswith("- Speed (fp16):") and "median step time over the 64 - 1 steps" in lines[0]
    assert "of 1 run(s)" in lines[0] and "eager attention kernels: FLASH_ATTENTION, MATH" in lines[0]
    assert lines[1].startswith("- Speed (nf4):") and "(t(64 tokens) - t(1 token))" in lines[1]
    (tmp_path / "nf4.json").unlink()
    lines = [x for x in results.summary_markdown(tmp_path).splitlines() if x.startswith("- Speed")]
    assert len(lines) == 1 and lines[0].startswith("- Speed: ")


def test_summary_says_how_compiled_mode_ran_and_where_its_step_broke(tmp_path):
    """The compiled settings in the protocol line; a compiled step with graph breaks says how many
    in its row and why under the table (the reason as cost records it, from dynamo)."""
    run = {"config": {"batch_sizes": [1], "prompt_lengths": [8], "repeats": 3, "new_tokens": 64, "decode_prompt_tokens": 32},
           "environment": {}, "device": "cuda", "started": "t", "models": [{"name": "m"}],
           "experiments": [{"id": e} for e in ["fp16", "int8"]]}
    results.write_json(tmp_path / "run.json", run)
    point = {"status": "ok", "tok_s": 50.0, "achieved_bytes_s": 1e11, "kv_cache_bytes": 2**20, "compiled": True}
    broken = {**point, "graph_breaks": 29, "note": "transformers' generate would not compile this quantization",
              "graph_break_reasons": ["25 x Dynamic shape operator: Operator `bitsandbytes.int8_vectorwise_quant.default`'s "
                                      "output shape depends on input Tensor data."]}
    settings = {"mode": "reduce-overhead", "dynamic": False, "coordinate_descent_tuning": True,
                "programmatic_dependent_launch": True}
    for name, p in [("fp16", {**point, "graph_breaks": 0}), ("int8", broken)]:
        results.write_json(tmp_path / f"{name}.json", {
            "experiment": name, "method": name, "model": {"name": "m"}, "status": "ok", "error": None, "quality": {},
            "cost": {"decode": {"1": point}, "decode_compiled": {"1": p}, "decode_runs": 1, "compiled_settings": settings}})
    text = results.summary_markdown(tmp_path)
    assert ("compiled step: torch.compile mode reduce-overhead (CUDA graphs), static shapes, inductor's "
            "coordinate-descent tuning, programmatic dependent launch;") in text
    assert "| fp16 | compiled | 1 |" in text
    assert "| int8 | compiled (generate would not compile it; 29 graph breaks) | 1 |" in text
    assert ("- Graph breaks in int8's compiled step (Python runs between its graphs): 25 x Dynamic shape operator: "
            "Operator `bitsandbytes.int8_vectorwise_quant.default`'s output shape depends on input Tensor data.") in text


def _strict(text):
    """Python's json with NaN, Infinity and -Infinity refused, as jq and JSON.parse refuse them."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_number_is_written_as_null_beside_what_it_was(tmp_path):
    results.write_json(tmp_path / "r.json", {"quality": {"perplexity": float("nan"), "kld": {"kld_max": float("inf")}},
                                             "points": [1.0, float("-inf")], "ok": 2.5})
    data = _strict((tmp_path / "r.json").read_text())
    assert data["quality"] == {"perplexity": None, "perplexity_nonfinite": "nan",
                               "kld": {"kld_max": None, "kld_max_nonfinite": "inf"}}
    assert data["points"] == [1.0, None] and data["ok"] == 2.5


def test_summary_lists_what_the_quantizers_reported_and_leaves_failed_rows_out_of_the_table(tmp_path):
    run = {"config": {"batch_sizes": [1], "prompt_tokens": 8, "repeats": 1, "new_tokens": 4, "decode_prompt_tokens": 4},
           "environment": {}, "device": "cpu", "started": "t", "models": [{"name": "m"}],
           "experiments": [{"id": e} for e in ["bf16", "gptq-fp16"]]}
    results.write_json(tmp_path / "run.json", run)
    results.write_json(tmp_path / "bf16.json", {"experiment": "bf16", "method": "bf16", "model": {"name": "m"},
                                                "status": "ok", "error": None, "quality": {"perplexity": 12.5}, "cost": {},
                                                "compute_dtype": "bfloat16", "compute_dtype_why": "the checkpoint's dtype"})
    messages = {"warnings": 3, "errors": 1, "messages": [
        {"level": "ERROR", "source": "printed output", "count": 1,
         "message": "Quantization: Module `hf_optimum` -> Hessian remained non positive-definite."},
        {"level": "WARNING", "source": "printed output", "count": 3, "message": "Damp recovery failed."}]}
    results.write_json(tmp_path / "gptq-fp16.json", {
        "experiment": "gptq-fp16", "method": "gptq-w4g32", "model": {"name": "m"}, "status": "failed",
        "error": "perplexity: non-finite logits (NaN or infinite) at 8 of 8 positions, computing in float16",
        "fix": "compute in bfloat16: --compute-dtype bfloat16", "quality": {"perplexity": None}, "cost": {},
        "quantization": {"quantize_s": 3.0, "messages": messages},
        "backend": {"unquantized_linears": {"count": 2, "of": 14, "names": ["model.layers.0.mlp.down_proj", "x"]}}})
    summary = results.summary_markdown(tmp_path)
    assert "| bf16 | ok |" in summary and "| gptq-fp16 |" not in summary  # failed: not in the comparison
    assert ("- **gptq-fp16** failed: perplexity: non-finite logits (NaN or infinite) at 8 of 8 positions, computing "
            "in float16. Fix: compute in bfloat16: --compute-dtype bfloat16") in summary
    assert ("- **gptq-fp16**: 1 error(s) and 3 warning(s) while quantizing: ERROR Quantization: Module `hf_optimum` -> "
            "Hessian remained non positive-definite; WARNING Damp recovery failed (x3); 2 of 14 linear layers left "
            "unquantized (model.layers.0.mlp.down_proj, x).") in summary
    assert "- Compute dtype: bf16 bfloat16 (the checkpoint's dtype)." in summary
