"""Whole runs of the tiny model through the command line: results, isolation, resume, Ctrl-C."""
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY_RUN_FLAGS


def start(*args, env=None, **kw):
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "quantbench", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def run(*args):
    p = start(*args)
    out, _ = p.communicate(timeout=900)
    return p.returncode, out


run_cli = run  # for tests that name a run.json `run`


def load(path):
    return json.loads(path.read_text())


def wait_for(predicate, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def status(path):
    try:
        return load(path)
    except (OSError, ValueError):
        return None


def test_run_writes_results_a_person_and_a_program_can_read(tiny_model_dir, shared_data, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"model: {tiny_model_dir}\nmethods: [fp16_baseline, bnb_4bit_nf4, int8]\n"
                     f"tasks: [coqa]\nlimit: 1\nmax_gen_toks: 8\n")
    code, out = run("run", "--config", str(sweep), "--data-dir", str(shared_data), "--out", str(tmp_path / "r"),
                    *TINY_RUN_FLAGS)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("report-")) == [
        "fp16.docs.json", "fp16.json", "int8.docs.json", "int8.json", "nf4.docs.json", "nf4.json", "reference",
        "report.html", "report.md", "run.json", "summary.md", "sweep.yaml", "tasks"]
    assert "The smallest method within noise" in (run_dir / "report.md").read_text() or \
        "No quantized method is within noise" in (run_dir / "report.md").read_text()
    meta = load(run_dir / "run.json")
    assert meta["status"] == "finished" and meta["device"] == "cpu" and meta["config"]["limit"] == 1
    assert meta["environment"]["libraries"]["transformers"] and meta["started"] <= meta["finished"]
    assert set(meta["phases_s"]) == {"fp16", "nf4", "int8"} and meta["phases_s"]["nf4"]["kld"] > 0
    assert meta["device_rates"]["copy_bytes_s"] > 0 and meta["device_rates"]["matmul_flops"] > 0
    pids = set()
    for name in ["fp16", "nf4", "int8"]:
        r = load(run_dir / f"{name}.json")
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["process"] == "forked from the preloaded forkserver" and r["pid"] not in pids  # one process each
        pids.add(r["pid"])
        assert r["quality"]["perplexity"] > 1
        assert set(r["quality"]["coqa"]) >= {"em", "f1", "n"} and r["quality"]["coqa"]["n"] == 1
        assert r["quality_info"]["coqa"]["source"].startswith("local:")
        c = r["cost"]
        assert c["weight_bytes"] > 0 and c["peak_bytes"] > 0 and c["load_s"] > 0 and c["prefill"]["16"]["ttft_ms"] > 0
        assert set(c["decode"]) == {"eager"} and set(c["decode"]["eager"]) == {"1", "2"}
        assert r["schema"] == meta["schema"] and r["engine"] == "transformers"
        assert r["sanity"]["prompt"] and set(r["phases_s"]) == {"load", "sanity", "perplexity", "kld", "tasks", "speed"}
        assert r["quality"]["kld"]["tokens"] == 4 * (64 - 1 - 32) and r["quality_info"]["kld"]["reference"] == "fp16"
    kld = {name: load(run_dir / f"{name}.json")["quality"]["kld"] for name in ["fp16", "nf4", "int8"]}
    assert kld["fp16"]["kld_mean"] == 0 and kld["fp16"]["same_top_p"] == 1  # the baseline against itself
    # 4-bit moves the distributions far more than LLM.int8, whose KLD here is below the float16
    # rounding floor of the stored log-probabilities (|mean| ~ 1e-6 on this near-uniform tiny model).
    assert kld["nf4"]["kld_mean"] > 2e-5 > abs(kld["int8"]["kld_mean"])
    assert load(run_dir / "nf4.json")["cost"]["weight_bytes"] < load(run_dir / "fp16.json")["cost"]["weight_bytes"]
    assert load(run_dir / "fp16.json")["backend"]["weight_dtype"] == "float32"  # fp16 on the CPU
    against = load(run_dir / "nf4.json")["against_baseline"]  # added when nf4 arrived, from both docs files
    assert against["baseline"] == "fp16" and set(against["tasks"]["coqa"]["metrics"]) == {"em", "f1"}
    assert "against_baseline" not in load(run_dir / "fp16.json")
    summary = (run_dir / "summary.md").read_text()
    assert "| fp16 (baseline) |" in summary and "| nf4 |" in summary and "coqa f1" in summary and "KLD mean" in summary
    assert summary.splitlines()[0] in out  # printed to the terminal too
    assert "paired difference from the baseline" in summary
    _documented(run_dir)

    # A second run gets the next number and leaves the first alone.
    code, out = run("run", "--model", str(tiny_model_dir), "--experiment", "fp16_baseline", "--tasks", "none",
                    "--out", str(tmp_path / "r"), *TINY_RUN_FLAGS)
    assert code == 0, out
    assert (tmp_path / "r" / "run002" / "fp16.json").exists()
    assert load(tmp_path / "r" / "run002" / "fp16.json")["quality_info"]["perplexity"]["corpus"].startswith("pydoc_data")


def _documented(run_dir):
    """Every key a run writes is named in docs/results.md, the result files' schema."""
    import re

    doc = (REPO / "docs" / "results.md").read_text()
    named = {w for phrase in re.findall(r"`([^`]+)`", doc) for w in re.split(r"[^A-Za-z0-9_]+", phrase) if w}
    keys = set(load(run_dir / "run.json"))
    for path in run_dir.glob("*.json"):
        if path.name.endswith(".docs.json") or path.name == "run.json":
            continue
        r = load(path)
        keys |= set(r) | set(r["cost"]) | set(r["backend"]) | {k for points in r["cost"]["decode"].values()
                                                                for p in points.values() for k in p}
        keys |= {k for p in r["cost"]["prefill"].values() for k in p} | {k for i in r["quality_info"].values() for k in i}
    keys = {k for k in keys if not k.isdigit()}  # lengths and batch sizes: <length>, <batch> in the docs
    assert keys <= named, f"not in docs/results.md: {sorted(keys - named)}"


def test_tasks_without_data_are_skipped_with_the_flag_that_supplies_them(tiny_model_dir, tmp_path):
    code, out = run("run", "--model", str(tiny_model_dir), "--methods", "fp16", "--tasks", "coqa",
                    "--out", str(tmp_path), *TINY_RUN_FLAGS)
    assert code == 0, out
    r = load(tmp_path / "run001" / "fp16.json")
    assert r["status"] == "ok" and "coqa" not in r["quality"]
    assert r["quality_info"]["coqa"]["status"] == "skipped" and "--data-dir" in r["quality_info"]["coqa"]["fix"]
    assert "Tasks not run" in (tmp_path / "run001" / "summary.md").read_text()


def test_killed_experiment_keeps_the_others_and_resume_finishes_it(tiny_model_dir, tmp_path):
    p = start("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4,fp4", "--tasks", "none",
              "--out", str(tmp_path), *TINY_RUN_FLAGS)
    run_dir = tmp_path / "run001"
    victim = wait_for(lambda: (r := status(run_dir / "nf4.json")) and r.get("status") == "running" and r)
    os.kill(victim["pid"], signal.SIGKILL)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    fp16_before = (run_dir / "fp16.json").read_text()
    nf4 = load(run_dir / "nf4.json")
    assert nf4["status"] == "failed" and "SIGKILL" in nf4["error"] and nf4["duration_s"] > 0
    assert load(run_dir / "fp4.json")["status"] == "ok"
    assert "nf4** failed" in (run_dir / "summary.md").read_text()

    code, out = run("run", "--resume", str(run_dir))
    assert code == 0, out
    assert "1 to run" in out
    assert load(run_dir / "nf4.json")["status"] == "ok"
    assert (run_dir / "fp16.json").read_text() == fp16_before  # finished work untouched


def test_ctrl_c_stops_cleanly_and_keeps_what_finished(tiny_model_dir, tmp_path):
    # SIGINT as a terminal's job has it, also where the tests themselves run in the background (which ignores it)
    p = start("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4,fp4", "--tasks", "none",
              "--out", str(tmp_path), *TINY_RUN_FLAGS, start_new_session=True,
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = tmp_path / "run001"
    wait_for(lambda: (r := status(run_dir / "nf4.json")) and r.get("status") == "running")
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)  # pressed again while it stops: the record is still written
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 130, out
    assert "Traceback" not in out and "--resume" in out
    assert load(run_dir / "fp16.json")["status"] == "ok"
    assert load(run_dir / "nf4.json")["status"] == "interrupted"
    assert load(run_dir / "run.json")["status"] == "interrupted"
    assert not (run_dir / "fp4.json").exists()
    code, out = run("run", "--resume", str(run_dir))
    assert code == 0, out
    assert all(load(run_dir / f"{m}.json")["status"] == "ok" for m in ["fp16", "nf4", "fp4"])


def test_quantized_checkpoints_are_cached_and_unfit_group_sizes_skipped(tiny_model_dir, tmp_path):
    args = ["run", "--model", str(tiny_model_dir), "--tasks", "none", "--out", str(tmp_path / "r"),
            "--cache-dir", str(tmp_path / "cache"), *TINY_RUN_FLAGS]
    code, out = run(*args, "--methods", "hqq-w4g64,torchao-int8wo,gptq-w4g128")
    assert code == 0, out
    first = load(tmp_path / "r" / "run001" / "hqq-w4g64.json")
    assert first["status"] == "ok" and first["quantization"]["reused_from_cache"] is False
    assert first["quantization"]["quantize_s"] > 0 and first["quantization"]["quantize_peak_bytes"] > 0
    assert first["backend"]["hqq_backend"] and first["cost"]["quant_state_bytes"] > 0
    assert load(tmp_path / "r" / "run001" / "torchao-int8wo.json")["status"] == "ok"
    gptq = load(tmp_path / "r" / "run001" / "gptq-w4g128.json")
    assert gptq["status"] == "skipped" and "group size 128 does not divide" in gptq["error"]

    code, out = run(*args, "--methods", "hqq-w4g64")
    assert code == 0, out
    second = load(tmp_path / "r" / "run002" / "hqq-w4g64.json")
    assert second["quantization"]["reused_from_cache"] is True
    assert second["quantization"]["path"] == first["quantization"]["path"]
    assert second["quality"]["perplexity"] == first["quality"]["perplexity"]
    assert "(cached)" in (tmp_path / "r" / "run002" / "summary.md").read_text()


def test_a_checkpoint_quantized_by_an_earlier_run_passed_by_its_path_gives_the_same_numbers(tiny_model_dir,
                                                                                          tiny_wide_model_dir, tmp_path):
    """Item 5 of the formats issue: a quantized checkpoint named in --methods by its folder is loaded as its
    format says (hqq's own save; torchao's and compressed-tensors' quantization_config), named by its
    folder, and measured against the run's baseline on the same tokens; another model's checkpoint is
    refused in one line."""
    from quantbench import methods

    args = ["run", "--model", str(tiny_model_dir), "--tasks", "none", "--cache-dir", str(tmp_path / "cache"), *TINY_RUN_FLAGS]
    # compressed-tensors (llm-compressor's FP8, which needs no calibration) where llmcompressor is installed
    ours = ["hqq-w4g64", "torchao-int8wo"] + ([] if methods.why_not_runnable("llmc-fp8", "cpu") else ["llmc-fp8"])
    code, out = run(*args, "--out", str(tmp_path / "a"), "--methods", ",".join(["fp16", *ours]))
    assert code == 0, out
    made = {m: load(tmp_path / "a" / "run001" / f"{m}.json") for m in ours}
    other = tmp_path / "other-model-hqq"
    methods.quantize_hqq(str(tiny_wide_model_dir), str(other), device="cpu")
    paths = [made[m]["quantization"]["path"] for m in made]
    code, out = run(*args, "--out", str(tmp_path / "b"), "--methods", ",".join(["fp16", *paths, str(other)]))
    assert code == 0, out
    again = {m: load(tmp_path / "b" / "run001" / f"{first['quantization']['path'].split('/')[-1]}.json")
             for m, first in made.items()}
    for m, first in made.items():
        r = again[m]
        assert r["status"] == "ok" and r["method"] == "checkpoint", r
        assert r["backend"]["checkpoint"] == first["quantization"]["path"]
        assert r["backend"]["linear_classes"] == first["backend"]["linear_classes"]
        assert r["quality"]["perplexity"] == first["quality"]["perplexity"]
        assert r["quality"]["kld"] == first["quality"]["kld"]
        assert r["cost"]["weight_bytes"] == first["cost"]["weight_bytes"]
    assert again["torchao-int8wo"]["backend"].get("bits") is None  # torchao's config says none
    assert again["hqq-w4g64"]["backend"]["bits"] == 4
    if "llmc-fp8" in made:
        assert again["llmc-fp8"]["backend"]["schemes"] == made["llmc-fp8"]["backend"]["schemes"]
    refused = load(tmp_path / "b" / "run001" / "other-model-hqq.json")
    assert refused["status"] == "skipped" and refused["error"] == (
        f"{other} is a checkpoint of another model: its hidden_size is 256, the run's model's is 64")
    summary = (tmp_path / "b" / "run001" / "summary.md").read_text()
    assert f"| {paths[0].split('/')[-1]} |" in summary


def test_a_quantized_kv_cache_crosses_each_method_and_says_the_bytes_it_saves_and_the_kld_it_costs(tiny_model_dir,
                                                                                                  tmp_path):
    """--kv-cache fp16,int4: each transformers method again with transformers' quantized cache (HQQ), its
    KLD from the fp16 baseline measured on tokens decoded through the cache, its bytes at each context length
    against the model's own cache, eager decode with it."""
    code, out = run("run", "--model", str(tiny_model_dir), "--methods", "fp16,hqq-w4g64", "--kv-cache", "fp16,int4",
                    "--tasks", "none", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache"), *TINY_RUN_FLAGS)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    assert [e["id"] for e in load(run_dir / "run.json")["experiments"]] == ["fp16", "hqq-w4g64", "fp16-kv-int4",
                                                                           "hqq-w4g64-kv-int4"]
    base, kv = load(run_dir / "fp16.json"), load(run_dir / "fp16-kv-int4.json")
    assert kv["status"] == "ok", kv
    assert kv["kv_cache"]["precision"] == "int4" and kv["kv_cache"]["backend"] == "hqq" and kv["kv_cache"]["of"] == "fp16"
    assert kv["kv_cache"]["nbits"] == 4 and kv["kv_cache"]["q_group_size"] == 16  # the tiny model's heads are 16 wide
    assert kv["quality_info"]["perplexity"]["status"] == "skipped" and "perplexity" not in kv["quality"]
    assert 0 != abs(kv["quality"]["kld"]["kld_mean"]) < 0.01 and kv["quality"]["kld"]["tokens"] == base["quality"]["kld"]["tokens"]
    assert set(kv["cost"]["decode"]) == {"eager"} and kv["cost"]["decode"]["eager"]["1"]["tok_s"] > 0
    for n, b in kv["cost"]["kv_cache"].items():  # 4 bits and their scales against float32 (the CPU's baseline)
        assert 0 < b["bytes"] < 0.4 * b["model_cache_bytes"], (n, b)
    assert set(kv["cost"]["kv_cache"]) == {"16"}  # 600 is past the tiny model's positions
    summary = (run_dir / "summary.md").read_text()
    assert "**Quantized KV cache**" in summary and "| fp16-kv-int4 | int4 (hqq) |" in summary
    assert "fp16-kv-int4 (noise floor)" not in summary


def test_group_size_that_does_not_tile_the_model_is_skipped_with_the_reason(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("methods:\n  - {name: hqq-g48, method: hqq-w4g64, group_size: 48}\ntasks: none\n")
    code, out = run("run", "--config", str(sweep), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                    "--cache-dir", str(tmp_path / "cache"), *TINY_RUN_FLAGS)
    assert code == 0, out
    r = load(tmp_path / "r" / "run001" / "hqq-g48.json")
    assert r["status"] == "skipped" and "group size 48 does not divide" in r["error"]


def test_standard_suite_offline_uses_squad_for_coqa_and_puts_the_baseline_first(tiny_model_dir, shared_data, tmp_path,
                                                                                 monkeypatch):
    import dataclasses

    from quantbench import sweep
    from quantbench.config import SUITES, RunConfig, make_experiment

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = dataclasses.replace(RunConfig(), models=[str(tiny_model_dir)], suite="standard",
                                 tasks=list(SUITES["standard"]["tasks"]), limit=1000, data_dir=str(shared_data),
                                 out=str(tmp_path), experiments=[make_experiment(m) for m in ["nf4", "fp16", "int8"]])
    run = json.loads((sweep.create_run(config, tmp_path / "cache") / "run.json").read_text())
    assert [t["name"] for t in run["tasks"]] == ["lambada_openai", "arc_easy", "piqa", "boolq", "winogrande", "squad_v1"]
    assert all(t["source"].startswith("local:") for t in run["tasks"])
    assert [e["id"] for e in run["experiments"]] == ["fp16", "nf4", "int8"]  # the KLD reference runs first
    assert run["models"][0]["reference_experiment"] == "fp16"


def _strict(text):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_float16_overflow_fails_with_the_reason_and_fix_and_the_bfloat16_checkpoint_runs_in_bfloat16(
        tiny_overflow_model_dir, shared_data, tmp_path):
    """A bfloat16 Gemma 3 whose activations pass float16's range: the default baseline and nf4 compute in
    bfloat16 and finish with finite numbers; the float16-compute methods fail with the reason and the fix
    (GPTQ's quantizer saying what it met), are left out of the comparison and every file is strict JSON."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("methods:\n  - baseline\n  - nf4\n  - {name: nf4-fp16, method: nf4, compute_dtype: float16}\n"
                     "  - {name: gptq-fp16, method: gptq-w4g32, dtype: float16}\n"
                     "tasks: [arc_easy]\nlimit: 4\ncalibration_samples: 8\ncalibration_tokens: 64\n")
    code, out = run("run", "--config", str(sweep), "--model", str(tiny_overflow_model_dir), "--data-dir", str(shared_data),
                    "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache"), *TINY_RUN_FLAGS)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    for path in run_dir.rglob("*.json"):
        _strict(path.read_text())
    meta = load(run_dir / "run.json")
    assert meta["models"][0]["dtype"] == "bfloat16" and meta["models"][0]["compute_dtype"] == "bfloat16"
    assert [e["id"] for e in meta["experiments"]] == ["bf16", "nf4", "nf4-fp16", "gptq-fp16"]  # baseline: the checkpoint's
    for name in ["bf16", "nf4"]:
        r = load(run_dir / f"{name}.json")
        assert r["status"] == "ok" and r["compute_dtype"] == "bfloat16", r
        assert r["compute_dtype_why"] == "the checkpoint's dtype (config.json dtype: bfloat16)"
        assert all(math.isfinite(v) for v in [r["quality"]["perplexity"], r["quality"]["kld"]["kld_mean"],
                                              r["quality"]["arc_easy"]["acc"]])
    for name in ["nf4-fp16", "gptq-fp16"]:
        r = load(run_dir / f"{name}.json")
        assert r["status"] == "failed" and r["compute_dtype"] == "float16", r
        assert r["error"] == "sanity generation: non-finite logits (NaN or infinite) at 24 of 24 positions, computing in float16"
        assert "exceed float16's range" in r["fix"] and "--compute-dtype bfloat16" in r["fix"]
        assert r["quality_info"]["sanity"]["nonfinite_positions"] == 24 and r["quality"] == {}
    assert "nf4-bf16" in load(run_dir / "nf4-fp16.json")["fix"]  # its bfloat16 variant, by name
    said = load(run_dir / "gptq-fp16.json")["quantization"]["messages"]  # GPTQModel's own words on the Hessian
    assert said["errors"] > 0 and any("Hessian" in m["message"] and m["level"] == "ERROR" for m in said["messages"])
    summary = (run_dir / "summary.md").read_text()
    assert "| bf16 (baseline) |" in summary and "| nf4 |" in summary and "nan%" not in summary and "| nan" not in summary
    assert "| nf4-fp16 |" not in summary and "- **nf4-fp16** failed: sanity generation" in summary
    assert "- **gptq-fp16**: " in summary and "Hessian" in summary  # what the quantizer reported
    report_md = (run_dir / "report.md").read_text()
    assert "**nf4-fp16** (run001) failed" in report_md and "| nf4-fp16" not in report_md  # never ranked


def test_compute_dtype_flag_and_the_default_comparison(tiny_model_dir, tiny_overflow_model_dir, tmp_path):
    from quantbench import config as settings
    from quantbench import sweep

    args = settings.run_parser().parse_args(["--model", str(tiny_overflow_model_dir), "--compute-dtype", "float16",
                                             "--out", str(tmp_path), "--tasks", "none", "--device", "cpu"])
    config = settings.from_args(args)
    assert [e["method"] for e in config.experiments] == ["baseline", "nf4", "fp4", "gptq-w4g128", "awq-w4g128"]
    run = json.loads((sweep.create_run(config, tmp_path / "cache") / "run.json").read_text())
    assert run["models"][0]["compute_dtype"] == "float16" and run["models"][0]["compute_dtype_why"] == "--compute-dtype float16"
    assert run["experiments"][0]["id"] == "fp16" and run["models"][0]["reference_experiment"] == "fp16"

    # The default comparison on a model whose widths group 128 does not tile: the two it cannot run say why.
    code, out = run_cli("run", "--model", str(tiny_model_dir), "--tasks", "none", "--out", str(tmp_path / "r"), *TINY_RUN_FLAGS)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    assert [load(run_dir / f"{m}.json")["status"] for m in ["fp16", "nf4", "fp4"]] == ["ok"] * 3
    for m in ["gptq-w4g128", "awq-w4g128"]:
        r = load(run_dir / f"{m}.json")
        assert r["status"] == "skipped" and "group size 128 does not divide the model's hidden_size 64" in r["error"], r
    assert "needs a CUDA GPU" in load(run_dir / "awq-w4g128.json")["error"]


def test_an_experiment_runs_forked_from_the_preloaded_forkserver_and_how_it_ended_is_recorded(tmp_path):
    from quantbench import local

    context = local.process_context()
    assert context.get_start_method() == "forkserver"
    local.start_forkserver(context)
    run = {"models": [{"name": "m"}], "device": "cpu"}
    exp = {"id": "fp16", "model": "m", "method": "fp16", "settings": {}}
    assert local.run_child(tmp_path, exp, run, context) == 1  # no run.json there: the experiment fails
    r = load(tmp_path / "fp16.json")
    assert r["status"] == "failed" and r["error"] == "the experiment process exited with code 1 before writing its result"
    assert local.run_child(tmp_path, {**exp, "id": "nf4", "method": "nf4"}, run, context) == 1  # and the next one


def test_quantbench_forkserver_0_starts_each_experiment_in_its_own_interpreter(tiny_model_dir, tmp_path, monkeypatch):
    from quantbench import local

    monkeypatch.setenv("QUANTBENCH_FORKSERVER", "0")
    assert local.process_context().get_start_method() == "spawn"
    p = start("run", "--model", str(tiny_model_dir), "--methods", "fp16", "--tasks", "none", "--out", str(tmp_path),
              *TINY_RUN_FLAGS, env={**os.environ, "QUANTBENCH_FORKSERVER": "0", "HF_HUB_OFFLINE": "1"})
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    r = load(tmp_path / "run001" / "fp16.json")
    assert r["status"] == "ok" and r["process"] == "its own interpreter"


def _parent(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def test_a_forkserver_that_dies_mid_run_costs_one_experiment_and_the_rest_run(tiny_model_dir, tmp_path):
    p = start("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4,fp4", "--tasks", "none",
              "--out", str(tmp_path), *TINY_RUN_FLAGS)
    run_dir = tmp_path / "run001"
    victim = wait_for(lambda: (r := status(run_dir / "nf4.json")) and r.get("status") == "running" and r)
    os.kill(_parent(victim["pid"]), signal.SIGKILL)  # the forkserver: the experiment goes with it
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    nf4 = load(run_dir / "nf4.json")
    assert nf4["status"] == "failed" and "forkserver ended" in nf4["error"] and "--resume" in nf4["fix"]
    fp4 = load(run_dir / "fp4.json")  # a new forkserver serves the rest
    assert fp4["status"] == "ok", (fp4["error"], fp4.get("traceback_tail"))
    assert fp4["process"] == "forked from the preloaded forkserver"


def test_an_experiment_ends_when_the_sweep_that_started_it_dies(tiny_model_dir, tmp_path):
    """No orphan keeps the GPU: the sweep killed outright (no Ctrl-C to handle), its running experiment ends too."""
    p = start("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4", "--tasks", "none",
              "--out", str(tmp_path), *TINY_RUN_FLAGS)
    victim = wait_for(lambda: (r := status(tmp_path / "run001" / "nf4.json")) and r.get("status") == "running" and r)
    p.kill()
    p.communicate(timeout=60)
    wait_for(lambda: not os.path.exists(f"/proc/{victim['pid']}") or
             open(f"/proc/{victim['pid']}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=30)


def test_long_context_perplexity_and_kld_at_each_length_the_model_allows(tiny_model_dir, shared_data, tmp_path):
    """--long-context 256,1024 on a model of 512 positions: at 256 the perplexity (against a float64
    recomputation on the same windows) and the KLD against the baseline's own reference at that length
    (exactly 0 for the baseline); 1024 is recorded as skipped with the reason; the summary's table."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbench import tasks

    code, out = run("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4", "--tasks", "none",
                    "--long-context", "256,1024", "--data-dir", str(shared_data), "--out", str(tmp_path / "r"), *TINY_RUN_FLAGS)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    fp16, nf4 = load(run_dir / "fp16.json"), load(run_dir / "nf4.json")
    assert fp16["quality"]["long_context"]["256"]["kld"]["kld_mean"] == 0
    assert nf4["quality"]["long_context"]["256"]["kld"]["kld_mean"] > 0 and "long_context" in nf4["phases_s"]
    info = nf4["quality_info"]["long_context"]
    assert info["256"]["kld"]["n_ctx"] == 256 and info["256"]["perplexity"]["windows"] == 4  # --ppl-tokens 1024
    assert info["1024"] == {"status": "skipped", "reason": "longer than the model's 512 positions",
                            "fix": "--long-context of at most 512"}
    assert [p.name.endswith("-ctx256") for p in sorted((run_dir / "reference").iterdir())] == [False, True]
    # Independent: the float32 checkpoint's float64 log-softmax over the same four windows of 256.
    text = tasks.perplexity_corpus(str(shared_data), hub=False)[0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids[0][:1024].view(4, 256)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert fp16["quality"]["long_context"]["256"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    summary = (run_dir / "summary.md").read_text()
    assert "**Long context**" in summary and "| experiment | perplexity @128 | KLD mean | perplexity @256 | KLD mean @256 |" in summary
    _documented(run_dir)


# The least of a run besides the tasks: no KLD, one prefill and one decode point.
TASKS_ONLY = [*TINY_RUN_FLAGS, "--kld-tokens", "0", "--prompt-lengths", "16", "--batch-sizes", "1", "--new-tokens", "2",
              "--repeats", "1"]


def test_a_task_of_the_users_include_path_runs_for_each_method_and_pairs_document_by_document(tiny_model_dir, tmp_path):
    from quantbench.results import load_run
    from quantbench.rows import rows_of
    from tests.test_tasks import sums_task

    folder = sums_task(tmp_path / "my-tasks")
    code, out = run("run", "--model", str(tiny_model_dir), "--methods", "fp16,nf4", "--include-path", str(folder),
                    "--tasks", "sums", "--num-fewshot", "1", "--out", str(tmp_path / "r"), *TASKS_ONLY)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    meta = load(run_dir / "run.json")
    assert meta["config"]["include_path"] == str(folder) and meta["config"]["num_fewshot"] == 1
    assert meta["tasks"] == [{"name": "sums", "lm_eval_task": "sums", "source": f"include path: {folder / 'sums.yaml'}"}]
    docs = {}
    for name in ["fp16", "nf4"]:
        r = load(run_dir / f"{name}.json")
        assert r["status"] == "ok", r
        assert r["quality"]["sums"]["n"] == 10 and 0 <= r["quality"]["sums"]["acc"] <= 1
        info = r["quality_info"]["sums"]
        assert info["source"] == f"include path: {folder / 'sums.yaml'}" and info["num_fewshot"] == 1
        assert (info["apply_chat_template"], info["fewshot_as_multiturn"], info["chat_template_sha256"]) == (False, False, None)
        # one example from the task's train split, then the document
        assert info["first_prompt"].startswith("Question: What is ") and info["first_prompt"].count("Question:") == 2
        assert info["first_prompt"].endswith("Question: What is 10 plus 3?\nAnswer:")
        docs[name] = load(run_dir / f"{name}.docs.json")["sums"]
        assert docs[name]["doc_ids"] == list(range(10)) and set(docs[name]["acc"]) <= {0.0, 1.0}
        assert sum(docs[name]["acc"]) / 10 == pytest.approx(r["quality"]["sums"]["acc"])
    assert load(run_dir / "fp16.json")["quality_info"]["sums"]["requests_sha256"] == \
        load(run_dir / "nf4.json")["quality_info"]["sums"]["requests_sha256"]  # the same prompts for both
    rows = {row["experiment"]: row for row in rows_of("run001", run_dir, *load_run(run_dir))}
    delta = rows["nf4"]["deltas"]["sums acc"]
    flips = sum(a != b for a, b in zip(docs["fp16"]["acc"], docs["nf4"]["acc"]))  # documents whose verdict changed
    assert delta["n"] == 10 and delta["delta"] == pytest.approx((sum(docs["nf4"]["acc"]) - sum(docs["fp16"]["acc"])) / 10)
    assert flips >= abs(round(delta["delta"] * 10))
    # quantbench's own flips and recovery of the user's task, in rows and in nf4's result file alike
    b, q = docs["fp16"]["acc"], docs["nf4"]["acc"]
    lost, gained = sum(x == 1 and y == 0 for x, y in zip(b, q)), sum(x == 0 and y == 1 for x, y in zip(b, q))
    assert lost + gained == flips
    for against in (rows["nf4"]["against"], load(run_dir / "nf4.json")["against_baseline"]):
        f = against["tasks"]["sums"]["metrics"]["acc"]["flips"]
        assert (f["lost_p"], f["gained_p"], f["n"]) == (pytest.approx(lost / 10), pytest.approx(gained / 10), 10)
        assert against["tasks"]["sums"]["metrics"]["acc"]["test"] == "McNemar exact"
    summary = (run_dir / "summary.md").read_text()
    assert "sums acc" in summary and "max_gen_toks 128; attention kernels FLASH_ATTENTION" in summary and "; 1-shot." in summary
    assert "**Against the baseline**" in summary and f"lost {100 * lost / 10:.1f} ±" in summary
    _documented(run_dir)


def test_lm_evals_own_task_runs_offline_from_the_datasets_cache(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    from tests.test_tasks import arc_cache

    folder = arc_cache(shared_data, tmp_path / "hf" / "datasets")  # no --data-dir: only the cache has the documents
    for var, value in {"HF_HOME": tmp_path / "hf", "HF_DATASETS_CACHE": tmp_path / "hf" / "datasets",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(var, str(value))
    code, out = run("run", "--model", str(tiny_model_dir), "--methods", "fp16", "--tasks", "arc_easy", "--limit", "4",
                    "--out", str(tmp_path / "r"), *TASKS_ONLY)
    assert code == 0, out
    run_dir = tmp_path / "r" / "run001"
    source = f"lm-eval's own task, offline: allenai/ai2_arc (ARC-Easy) from the datasets cache, {folder}"
    assert load(run_dir / "run.json")["tasks"] == [{"name": "arc_easy", "lm_eval_task": "arc_easy", "source": source}]
    r = load(run_dir / "fp16.json")
    assert r["status"] == "ok" and r["quality"]["arc_easy"]["n"] == 4 and r["quality_info"]["arc_easy"]["source"] == source
    assert load(run_dir / "fp16.docs.json")["arc_easy"]["doc_ids"] == [0, 1, 2, 3]


def _experiment_whose_engine_process_outlives_it(pids):
    """An experiment's process whose engine started a process of its own that nothing stops when the
    experiment is done (vLLM's engine core, while a reference cycle keeps its LLM object from being collected)."""
    from quantbench import experiment

    engine = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
    engine.start()
    pids.put(engine.pid)
    experiment.end_child_processes(grace_s=5)


def test_an_experiment_process_ends_though_its_engine_left_a_process_running():
    """multiprocessing joins a process's children before it ends: without ending them first, the experiment's
    process (and the sweep waiting on it) would wait for the engine's process forever."""
    context = multiprocessing.get_context("fork")
    pids = context.Queue()
    p = context.Process(target=_experiment_whose_engine_process_outlives_it, args=(pids,))
    p.start()
    engine = pids.get(timeout=120)
    p.join(60)
    assert p.exitcode == 0
    assert not os.path.exists(f"/proc/{engine}")  # ended, and reaped by the experiment's process
