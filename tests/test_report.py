"""The pages, from fixture result files: the run's summary.md, `quantbench report` with failed and
skipped experiments, one method alone, two runs side by side, the recorded GPU run, and the page
opened in a headless browser where one is installed."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import numpy as np

from quantbench import report
from quantbench.report import summary_markdown
from quantbench.results import SCHEMA, read_json, write_json


def _write(path, data):
    write_json(path, {"schema": SCHEMA, **data})


def _run(folder, *, gpu="NVIDIA H200", transformers="5.17.0", methods=("fp16", "nf4", "int8", "gptq-w4g128", "awq-w4g128", "hqq-w4g64")):
    folder.mkdir(parents=True)
    _write(folder / "run.json", {
        "config": {"batch_sizes": [1, 8], "prompt_lengths": [128, 512], "repeats": 3, "new_tokens": 64,
                   "decode_prompt_tokens": 32, "tasks": ["arc_easy"], "suite": None, "out": str(folder.parent)},
        "environment": {"gpu": gpu, "cpu_count": 16, "libraries": {"transformers": transformers}},
        "device": "cuda", "started": "2026-11-26T00:00:00+00:00", "models": [{"name": "smollm2-135m", "note": "demo weights"}],
        "experiments": [{"id": m} for m in methods],
        "device_rates": {"copy_bytes_s": 3.9e12, "matmul_flops": 7e14, "method": "fixture"}})
    weights = {"fp16": 256, "nf4": 106, "int8": 156}
    kld = {"fp16": 0.0, "nf4": 0.08, "int8": 0.004}
    for i, m in enumerate(methods):
        if m == "gptq-w4g128":
            _write(folder / f"{m}.json", {"experiment": m, "method": m, "model": {"name": "smollm2-135m"},
                                          "status": "skipped", "error": "group size 128 does not divide 576",
                                              "fix": "use a group size that divides 576", "quality": {}, "cost": {}})
            continue
        if m == "hqq-w4g64":  # its process was killed with the run: no error recorded
            _write(folder / f"{m}.json", {"experiment": m, "method": m, "model": {"name": "smollm2-135m"},
                                          "status": "running", "quality": {}, "cost": {}})
            continue
        if m == "awq-w4g128":
            _write(folder / f"{m}.json", {"experiment": m, "method": m, "model": {"name": "smollm2-135m"},
                                          "status": "failed", "error": "CUDA out of memory", "quality": {}, "cost": {}})
            continue
        ones = {"fp16": 60, "nf4": 50, "int8": 59}[m]  # nf4 loses ten documents, int8 one
        acc = [1.0] * ones + [0.0] * (100 - ones)
        pct = [kld[m] * q / 50 for q in range(101)]
        _write(folder / f"{m}.docs.json", {"arc_easy": {"doc_ids": list(range(100)), "acc": acc}})
        _write(folder / f"{m}.json", {
            "shared_host_with": ["fp16"] if m == "int8" else [],  # int8 was timed beside fp16 on one host
            "experiment": m, "method": m, "model": {"name": "smollm2-135m"}, "status": "ok", "error": None,
            "quality": {"perplexity": 19 + 5 * i, "arc_easy": {"acc": sum(acc) / 100, "acc_stderr": 0.049, "n": 100},
                        "kld": {"kld_mean": kld[m], "kld_mean_stderr": kld[m] / 20, "same_top_p": 1 - kld[m],
                                "same_top_p_stderr": 0.001, "kld_p99": 2 * kld[m], "kld_max": 3 * kld[m],
                                "kld_percentiles": pct, "ppl_ratio": 1 + kld[m], "ppl_ratio_stderr": 0.001}},
            "cost": {"weight_bytes": weights[m] * 2**20, "peak_bytes": (weights[m] + 40) * 2**20,
                     "resident_after_load_bytes": (weights[m] + (300 if m == "int8" else 0)) * 2**20,
                     "decode": {"eager": {str(b): {"status": "ok", "tok_s": b * (50 - 5 * i), "bytes_per_step": weights[m] * 2**20,
                                                   "achieved_bytes_s": 1e11, "kv_cache_bytes": 2**20} for b in (1, 8)},
                                "compiled": {"1": {"status": "ok", "tok_s": 400 - 50 * i, "compiled": True,
                                                   "achieved_bytes_s": 1e11, "kv_cache_bytes": 2**20}}},
                     "prefill": {"128": {"status": "ok", "ttft_ms": 20 + i}, "512": {"status": "ok", "ttft_ms": 30 + i}}}})
    return folder


def test_report_of_a_run_with_failed_and_skipped_experiments(tmp_path):
    md, page = report.build([_run(tmp_path / "run001")])
    text = md.read_text()
    assert "Which quantization of smollm2-135m on NVIDIA H200?" in text and "> smollm2-135m: demo weights" in text
    # The recommendation is computed: int8 loses one document's worth (noise), nf4 loses ten (real).
    assert "The smallest method within noise of fp16 on every task is int8 (156 MiB of weights, 61% of fp16's)." in text
    assert "Among methods of 4 bits or fewer, nf4 has the lowest KLD (0.0800)" in text
    assert "outside their parameters; part of the peak): int8 +300 MiB." in text  # and no other method
    # Best of each column in bold: nf4's weights, fp16's decode speed, int8's KLD (the baseline's 0 does not count).
    nf4 = [line for line in text.splitlines() if line.startswith("| nf4 |")]  # its quality, against and cost rows
    int8 = [line for line in text.splitlines() if line.startswith(("| int8 |", "| int8 † |"))]
    assert len(nf4) == len(int8) == 3 and "**Quality**" in text and "**Against the baseline**" in text and "**Cost**" in text
    assert "**106.0**" in nf4[2] and "**0.00400 ± 0.00020**" in int8[0]
    # Recovery 50/60 and 59/60 with the delta method's interval; flips; McNemar on 10 lost and 0 gained: 2 / 2^10.
    assert "| experiment | mean recovery % | arc_easy acc |" in text
    assert nf4[1].startswith("| nf4 | 83.3 [") and "lost 10.0 ± 3.0%, gained 0.0 ± 0.0%; p 0.002 (McNemar exact) |" in nf4[1]
    assert int8[1].startswith("| int8 | 98.3 [") and "p 1 (McNemar exact), noise |" in int8[1]
    assert "| eager tok/s b=1 | eager tok/s b=8 | compiled tok/s b=1 |" in text  # each mode's measured batches
    assert "Fastest compiled decode at batch 1: fp16 (400 tok/s)." in text
    assert "(Δ -0.0100 ± 0.0100, p 1, noise)" in int8[0] and "noise" not in nf4[0] and "(Δ -0.1000 ± 0.0302, p 0.002)" in nf4[0]
    assert int8[2].startswith("| int8 † |") and "†" not in nf4[2]  # its speed was timed beside another experiment
    assert "† Timed while other experiments ran on the same host" in text and "speed from experiments that ran alone. int8." in text
    assert "**gptq-w4g128** (run001) skipped: group size 128 does not divide 576. Fix: use a group size" in text
    assert "**awq-w4g128** (run001) failed: CUDA out of memory." in text
    assert "**hqq-w4g64** (run001) running: not finished: still running, or the run was stopped while it ran" in text
    summary = summary_markdown(_run(tmp_path / "run002", methods=("hqq-w4g64",)))  # the run's own summary says so too
    assert "**hqq-w4g64** running: not finished: still running, or the run was stopped while it ran." in summary
    for name in ["quality-vs-memory", "decode-vs-batch", "kld-distribution", "ttft-vs-prompt"]:
        assert f"(report-{name}.png)" in text and (md.parent / f"report-{name}.png").stat().st_size > 5000
    html = page.read_text()
    assert html.count('src="data:image/png;base64,') == 4  # plots embedded
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html  # nothing to fetch


def test_report_of_a_single_method(tmp_path):
    md, page = report.build([_run(tmp_path / "run001", methods=("nf4",))])
    text = md.read_text()
    assert "| nf4 |" in text and "Smallest weights: nf4 (106 MiB)." in text
    assert "within noise" not in text  # no baseline, no such claim


def test_two_runs_side_by_side_show_how_they_differ(tmp_path):
    a = _run(tmp_path / "h200" / "run001")
    b = _run(tmp_path / "h100" / "run001", gpu="NVIDIA H100 80GB HBM3", transformers="5.19.0")
    md, page = report.build([a, b], out=tmp_path / "cmp")
    text = md.read_text()
    assert md.parent == tmp_path / "cmp" and "| run |" in text
    assert "| environment.gpu | NVIDIA H200 | NVIDIA H100 80GB HBM3 |" in text
    assert "| environment.libraries.transformers | 5.17.0 | 5.19.0 |" in text
    assert "h200/run001" in text and "h100/run001" in text  # same folder names told apart
    assert text.count("> smollm2-135m: demo weights") == 1
    assert "h200/run001: The smallest method within noise of fp16" in text  # a recommendation per run
    assert "h100/run001: The smallest method within noise of fp16" in text


def test_report_command_and_a_bad_folder(tmp_path):
    from quantbench.cli import main

    assert main(["report", str(_run(tmp_path / "run001"))]) == 0
    assert (tmp_path / "run001" / "report.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package for the screenshot")
def test_report_renders_in_a_headless_browser(tmp_path):
    md, page = report.build([_run(tmp_path / "run001")])
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1300,3000", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000  # a rendered page with its tables and plots, not a blank one


GPU_RUN = Path(__file__).resolve().parent / "fixtures" / "standard-h200"  # trimmed: two tasks' per-document scores


def test_report_of_the_recorded_gpu_run(tmp_path):
    """The result files of an H200 run of `--suite standard` (docs/benchmarks.md; kept with the
    per-document scores of LAMBADA and Winogrande) make the page their numbers say: what was measured,
    the recommendation, and the four skipped methods."""
    md, page = report.build([GPU_RUN], out=tmp_path)
    text = md.read_text()
    assert ("Quality: perplexity, KLD from the baseline and 6 tasks (the standard suite: arc_easy, boolq, "
            "lambada_openai, piqa, squad_v1, winogrande)") in text
    assert "No quantized method is within noise of fp16 on every task." in text
    assert "The closest to the baseline's next-token distributions is torchao-int8wo (mean KLD 0.0041" in text
    assert "Among methods of 4 bits or fewer, gptq-w4g32 has the lowest KLD (0.1970) at 113 MiB." in text
    assert text.count("cannot quantize its layers; use a group size that divides 576") == 4
    html = page.read_text()
    assert '<span class="d">Δ -0.0370 ± 0.0109, p &lt; 0.001</span>' in html  # nf4's LAMBADA loss is real
    assert '<span class="d n">Δ -0.0020 ± 0.0144, p 0.94, noise</span>' in html  # its Winogrande change is not
    # Without limits the answer is the Pareto set: int8 is beaten by torchao-int8wo (the same memory within 1%,
    # a lower KLD, faster), fp4 by nf4 (the same memory, a lower KLD).
    assert ("the methods no other beats on KLD, weight memory, decode speed at batch 1: nf4 (107 MiB, mean KLD 0.2717, "
            "mean recovery 93.6%, 35 tok/s at batch 1);") in text
    assert "Beaten: fp4 by nf4, int8 by torchao-int8wo, torchao-fp8 by int8 (ties:" in text


def test_a_run_without_quality_has_no_quality_table(tmp_path):
    run = _run(tmp_path / "run001", methods=("fp16", "nf4"))
    for m in ("fp16", "nf4"):  # an arch: model: speed and memory only
        r = read_json(run / f"{m}.json")
        r["quality"] = {}
        write_json(run / f"{m}.json", r)  # read_json kept its schema
        (run / f"{m}.docs.json").unlink()
    text = report.build([run])[0].read_text()
    assert "Quality: not measured; cost: memory and speed." in text
    assert "**Quality**" not in text and "**Cost**" in text


def _tiny_run(folder, results, docs=None, **run):
    """A run folder of the given results ({name: result fields}), written as quantbench writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "run.json", {"config": {"batch_sizes": [1], "prompt_lengths": [8], "tasks": [], "suite": None},
                                 "environment": {"cpu_count": 2}, "device": "cpu", "started": "t", "models": [{"name": "m"}],
                                 "experiments": [{"id": name} for name in results], **run})
    for name, r in results.items():
        _write(folder / f"{name}.json", {"experiment": name, "method": name, "model": {"name": "m"}, "status": "ok",
                                         "error": None, "quality": {}, "cost": {}, **r})
    for name, d in (docs or {}).items():
        _write(folder / f"{name}.docs.json", d)
    return folder


def test_summary_shows_paired_deltas_with_error_bars_and_noise(tmp_path):
    """From result files alone: deltas paired on documents, ± their standard error, noise marked."""
    acc = {"fp16": [1.0] * 60 + [0.0] * 40, "nf4": [1.0] * 40 + [0.0] * 60, "int8": [1.0] * 59 + [0.0] * 41}
    info = {"arc_easy": {"source": "local: arc", "lm_eval_task": "arc_easy_local", "n": 100, "batch_size": 16,
                         "max_length": 2048, "max_gen_toks": 128, "attention_kernels": ["FLASH_ATTENTION", "MATH"]}}
    folder = _tiny_run(tmp_path, {name: {"quality": {"arc_easy": {"acc": sum(v) / 100, "acc_stderr": 0.05, "n": 100}},
                                         "quality_info": info} for name, v in acc.items()},
                       {name: {"arc_easy": {"doc_ids": list(range(100)), "acc": v}} for name, v in acc.items()})
    summary = summary_markdown(folder)
    rows = {}  # each experiment's first row: the quality table's
    for line in summary.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    # the protocol says how lm-eval ran: batch, context, generation bound, attention kernels
    assert ("- arc_easy: lm-eval arc_easy_local from local: arc; n = 100 documents; ± is lm-eval's standard error; "
            "batch 16, max_length 2048, max_gen_toks 128; attention kernels FLASH_ATTENTION, MATH.") in summary
    d = np.array(acc["nf4"]) - np.array(acc["fp16"])
    # 20 documents lost, none gained: McNemar's p = 2 / 2^20, real; one lost: p = 1, noise
    assert f"(Δ -0.2000 ± {d.std(ddof=1) / 10:.4f}, p < 0.001)" in rows["nf4"]
    assert "(Δ -0.0100 ± 0.0100, p 1, noise)" in rows["int8"]
    assert rows["fp16 (baseline)"].startswith("| fp16 (baseline) |")
    assert "| nf4 | 66.7 [" in summary and "lost 20.0 ± 4.0%, gained 0.0 ± 0.0%; p < 0.001 (McNemar exact) |" in summary


def test_summary_names_memory_a_loaded_model_holds_beyond_its_weights(tmp_path):
    """A GPTQ group-32 (Marlin) reload of Llama-3.2-1B kept 1072 MiB allocated beyond its 1026 MiB of
    weights on an H200; the summary must say so, and stay quiet where the two agree."""
    mib = 2**20
    folder = _tiny_run(tmp_path, {name: {"cost": {"weight_bytes": w, "resident_after_load_bytes": r}} for name, w, r in
                                  [("fp16", 2357 * mib, 2358 * mib), ("gptq-w4g32", 1026 * mib, 2098 * mib)]})
    line = next(x for x in summary_markdown(folder).splitlines() if x.startswith("Held after loading"))
    assert "gptq-w4g32 +1072 MiB" in line and "fp16" not in line


def test_summary_says_how_the_speed_was_measured_and_where_a_compiled_step_broke(tmp_path):
    """The decode protocol and compiled settings in the protocol line; a compiled step with graph breaks
    says how many in the decode sweep and why under it (the reason as cost records it, from dynamo)."""
    point = {"status": "ok", "tok_s": 50.0, "achieved_bytes_s": 1e11, "kv_cache_bytes": 2**20, "compiled": True}
    broken = {**point, "graph_breaks": 29, "note": "transformers' generate would not compile this quantization",
              "graph_break_reasons": ["25 x Dynamic shape operator: Operator `bitsandbytes.int8_vectorwise_quant.default`'s "
                                      "output shape depends on input Tensor data."]}
    settings = {"mode": "reduce-overhead", "dynamic": False, "coordinate_descent_tuning": True,
                "programmatic_dependent_launch": True}
    timing = {"decode_runs": 1, "decode_modes": ["eager", "compiled"], "repeats": 3, "new_tokens": 64,
              "decode_prompt_tokens": 32, "attention_kernels": {"eager": ["FLASH_ATTENTION", "MATH"]}, "compiled_settings": settings}
    folder = _tiny_run(tmp_path, {name: {"cost": {"decode": {"eager": {"1": point}, "compiled": {"1": p}}, **timing}}
                                  for name, p in [("fp16", {**point, "graph_breaks": 0}), ("int8", broken)]})
    text = summary_markdown(folder)
    speed = next(x for x in text.splitlines() if x.startswith("- Speed"))
    assert "median step time over the 64 - 1 steps after the first token of 1 run(s), from 32-token prompts" in speed
    assert "eager attention kernels: FLASH_ATTENTION, MATH" in speed
    assert ("compiled step: torch.compile mode reduce-overhead (CUDA graphs), static shapes, inductor's "
            "coordinate-descent tuning, programmatic dependent launch;") in speed
    assert "| fp16 | compiled | 1 |" in text
    assert "| int8 | compiled (generate would not compile it; 29 graph breaks) | 1 |" in text
    assert ("- Graph breaks in int8's compiled step (Python runs between its graphs): 25 x Dynamic shape operator: "
            "Operator `bitsandbytes.int8_vectorwise_quant.default`'s output shape depends on input Tensor data.") in text


def test_summary_lists_what_the_quantizers_reported_and_leaves_failed_rows_out_of_the_table(tmp_path):
    messages = {"warnings": 3, "errors": 1, "messages": [
        {"level": "ERROR", "source": "printed output", "count": 1,
         "message": "Quantization: Module `hf_optimum` -> Hessian remained non positive-definite."},
        {"level": "WARNING", "source": "printed output", "count": 3, "message": "Damp recovery failed."}]}
    folder = _tiny_run(tmp_path, {
        "bf16": {"quality": {"perplexity": 12.5}, "compute_dtype": "bfloat16", "compute_dtype_why": "the checkpoint's dtype"},
        "gptq-fp16": {"method": "gptq-w4g32", "status": "failed", "quality": {"perplexity": None},
                      "error": "perplexity: non-finite logits (NaN or infinite) at 8 of 8 positions, computing in float16",
                      "fix": "compute in bfloat16: --compute-dtype bfloat16", "quantization": {"quantize_s": 3.0, "messages": messages},
                      "backend": {"unquantized_linears": {"count": 2, "of": 14, "names": ["model.layers.0.mlp.down_proj", "x"]}}}})
    summary = summary_markdown(folder)
    assert "| bf16 (baseline) |" in summary and "| gptq-fp16 |" not in summary  # failed: not in the comparison
    assert ("- **gptq-fp16** failed: perplexity: non-finite logits (NaN or infinite) at 8 of 8 positions, computing "
            "in float16. Fix: compute in bfloat16: --compute-dtype bfloat16") in summary
    assert ("- **gptq-fp16**: 1 error(s) and 3 warning(s) while quantizing: ERROR Quantization: Module `hf_optimum` -> "
            "Hessian remained non positive-definite; WARNING Damp recovery failed (x3); 2 of 14 linear layers left "
            "unquantized (model.layers.0.mlp.down_proj, x).") in summary
    assert "- Compute dtype: bf16 bfloat16 (the checkpoint's dtype)." in summary


def test_a_method_in_vllm_is_compared_with_itself_in_transformers_document_by_document(tmp_path):
    """int8@vllm beside int8 (fixture results): its KLD shown as the lower bound it is, its kernel as vLLM's
    linear method, and the parity table: the perplexity ratio, both KLDs, and the task's paired difference
    with the documents it flips against the same method in transformers."""
    folder = _run(tmp_path / "run001", methods=("fp16", "int8"))
    int8 = read_json(folder / "int8.json")
    acc = read_json(folder / "int8.docs.json")["arc_easy"]["acc"]
    mine = acc[:]
    mine[0], mine[70] = 0.0, 1.0  # one document lost, one gained against transformers' int8
    _write(folder / "int8@vllm.docs.json", {"arc_easy": {"doc_ids": list(range(100)), "acc": mine}})
    quality = {**int8["quality"], "perplexity": int8["quality"]["perplexity"] * 1.002,
               "kld": {**int8["quality"]["kld"], "kld_mean": 0.0039, "kld_is_lower_bound": True, "top_k": 256}}
    _write(folder / "int8@vllm.json", {**int8, "experiment": "int8@vllm", "engine": "vllm", "quality": quality, "shared_host_with": [],
                                        "backend": {"engine": "vllm", "quant_methods": ["UnquantizedLinearMethod"]}})
    run = read_json(folder / "run.json")
    write_json(folder / "run.json", {**run, "experiments": run["experiments"] + [{"id": "int8@vllm"}]})
    text = report.build([folder])[0].read_text()
    assert "**vLLM against transformers, the same method**" in text
    row = next(line for line in text.splitlines() if line.startswith("| int8@vllm | 1.0020 |"))
    assert "≥ 0.00390 / 0.00400" in row and "acc +0.0000" in row and "lost 1.0%, gained 1.0%" in row and "p 1" in row
    assert any(line.startswith("| int8@vllm |") and "≥ 0.00390 ± " in line for line in text.splitlines())
    assert any(line.startswith("| int8@vllm |") and "vLLM UnquantizedLinearMethod" in line for line in text.splitlines())


def test_vllms_own_benchmarks_are_shown_beside_quantbenchs_figures_of_the_same_experiment():
    """A vLLM experiment's `vllm bench` results (fixture values in engines.vllm's units): its batch-1 latency
    beside quantbench's own TTFT and decode of that experiment with their ratio, its offline throughput at each
    batch size, its serving percentiles at each rate, and a benchmark that failed as such."""
    cost = {"prefill": {"128": {"status": "ok", "ttft_ms": 7.2}},
            "decode": {"compiled": {"1": {"status": "ok", "tok_s": 600.0}, "8": {"status": "ok", "tok_s": 3600.0}}},
            "vllm_bench": {"status": "ok", "latency": {"status": "ok", "batch_size": 1, "prefill": {"128": {"ttft_ms": 7.5}},
                                       "decode": {"decode_tokens_per_s": 625.0}},
                           "throughput": {"1": {"status": "ok", "output_tokens_per_s": 540.4},
                                          "8": {"status": "failed", "error": "bench throughput failed (1): CUDA error"}},
                           "serve": {"4": {"status": "ok", "completed": 40, "num_prompts": 40, "output_tokens_per_s": 250.0,
                                           "ttft_ms": {"p50": 9.0, "p90": 12.5, "p99": 20.25},
                                           "tpot_ms": {"p50": 1.6, "p90": 1.8, "p99": 2.0}},
                                     "16": {"status": "failed", "error": "vllm serve did not become ready (exit code 1)"}}}}
    stuck = {"vllm_bench": {"status": "failed", "error": "this experiment's vLLM did not shut down: TimeoutError: "}}
    lines = report.vllm_bench_lines([{"experiment": "fp16", "result": {"cost": {}}},
                                     {"experiment": "int8@vllm", "result": {"cost": cost}},
                                     {"experiment": "fp16@vllm", "result": {"cost": stuck}}])
    assert lines[0] == "## vLLM's own benchmarks"
    assert lines[4] == "| experiment | TTFT ms at prompt tokens | decode tok/s, batch 1 | offline output tok/s at b = 1 / 8 |"
    assert lines[6] == "| int8@vllm | 128: 7.20 / 7.50 (0.960) | 600.0 / 625.0 (0.960) | 540 / failed |"
    assert "| int8@vllm | 4 | 40 of 40 | 9.0 / 12.5 / 20.2 | 1.6 / 1.8 / 2.0 | 250 |" in lines
    assert "| int8@vllm | 16 | failed: vllm serve did not become ready (exit code 1) | | | |" in lines
    assert "| fp16@vllm | failed: this experiment's vLLM did not shut down: TimeoutError:  | | |" in lines
