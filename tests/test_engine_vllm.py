"""The vLLM engine's scoring on the CPU: vLLM's prompt log-probabilities (its prompt token and top k a
position) read into arrays, and the KL divergence's lower bound from them against the exact divergence
in float64."""
import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from quantbench.engines import vllm


def _log_softmax(rng, n, vocab, scale=3.0):
    return torch.log_softmax(torch.from_numpy(rng.normal(size=(n, vocab)) * scale), dim=-1)


def _exact(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _as_vllm_gives(q_log, prompt, k, flat):
    """What vLLM returns for `prompt` whose next-token log-probabilities are `q_log` ([T - 1, V]): per
    position the prompt's own token, then the top k (vllm/logprobs.py, append_logprobs_for_next_position);
    flat keeps the repeat, the dict form folds it."""
    positions = [None]
    for t in range(1, len(prompt)):
        top = torch.topk(q_log[t - 1], k).indices.tolist()
        ids = [prompt[t], *top]
        positions.append([(i, float(q_log[t - 1, i])) for i in ids])
    if not flat:
        return [None] + [{i: types.SimpleNamespace(logprob=v) for i, v in pos} for pos in positions[1:]]
    out = types.SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[])
    for pos in positions[1:]:
        out.start_indices.append(len(out.token_ids))
        out.token_ids += [i for i, _ in pos]
        out.logprobs += [v for _, v in pos]
        out.end_indices.append(len(out.token_ids))
    return out


def test_the_bound_is_below_the_exact_divergence_tightens_with_k_and_is_exact_where_it_should_be():
    rng = np.random.default_rng(0)
    p_log, q_log = _log_softmax(rng, 6, 500), _log_softmax(rng, 6, 500)
    exact = _exact(p_log, q_log)
    previous = None
    for k in (1, 5, 20, 100, 499):
        ids = torch.topk(q_log, k, dim=-1).indices
        got = vllm.kld_lower_bound(p_log, ids, q_log.gather(1, ids))
        assert (got["kld"] <= exact + 1e-12).all()
        if previous is not None:  # a larger set of known tokens never loosens it
            assert (got["kld"] >= previous - 1e-12).all()
        previous = got["kld"]
    every = torch.arange(500).repeat(6, 1)
    got = vllm.kld_lower_bound(p_log, every, q_log)
    assert torch.allclose(got["kld"], exact, rtol=0, atol=1e-12) and (got["reference_outside"] < 1e-12).all()
    # Equality of the log-sum inequality: q proportional to p outside the known tokens.
    known = torch.topk(q_log, 10, dim=-1).indices
    inside = torch.zeros_like(p_log, dtype=torch.bool).scatter_(1, known, True)
    q = torch.where(inside, q_log.exp(), 0)
    p_out = torch.where(inside, 0, p_log.exp())
    q = q + p_out / p_out.sum(1, keepdim=True) * (1 - q.sum(1, keepdim=True))
    got = vllm.kld_lower_bound(p_log, known, q.log().gather(1, known))
    assert torch.allclose(got["kld"], _exact(p_log, q.log()), rtol=0, atol=1e-12)
    assert torch.allclose(got["method_outside"], 1 - torch.where(inside, q, 0).sum(1))


@pytest.mark.parametrize("flat", [True, False])
def test_vllms_prompt_logprobs_read_as_arrays_score_the_prompt_and_bound_the_divergence(flat):
    rng = np.random.default_rng(1)
    vocab, k = 300, 8
    q_log, p_log = _log_softmax(rng, 11, vocab), _log_softmax(rng, 11, vocab, scale=2.5)
    prompt = [int(t) for t in rng.integers(0, vocab, 12)]
    prompt[5] = int(q_log[4].argmax())  # a prompt token among the top k: the dict form folds its repeat
    top = vllm.flat_arrays(_as_vllm_gives(q_log, prompt, k, flat), k)
    assert top["ids"].shape == top["logprobs"].shape == (11, k + 1)
    assert (top["ids"][:, 0] == prompt[1:]).all()
    assert np.allclose(top["target"], [float(q_log[t, i]) for t, i in enumerate(prompt[1:])], rtol=0, atol=1e-12)
    got = vllm.kld_lower_bound(p_log, top["ids"], top["logprobs"])
    assert (got["kld"] <= _exact(p_log, q_log) + 1e-12).all() and (got["kld"] > 0).all()
    outside = [1 - float(q_log[t, sorted(set(row.tolist()))].exp().sum()) for t, row in enumerate(top["ids"])]
    assert np.allclose(got["method_outside"].numpy(), outside, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected 4 or 5"):
        vllm.flat_arrays(_as_vllm_gives(q_log, prompt, k, flat), 4)


def test_vllm_bench_results_read_in_quantbench_units():
    """The JSON `vllm bench` writes (fields as vllm/benchmarks/latency.py, throughput.py and serve.py of
    0.26.0 write them), read into the units of quantbench's speed columns."""
    one = {"avg_latency": 0.0105, "latencies": [0.011, 0.010, 0.012], "percentiles": {"50": 0.011}}
    many = {"avg_latency": 0.138, "latencies": [0.139, 0.138, 0.137, 0.400], "percentiles": {"50": 0.1385}}
    got = vllm.read_latency(one, many, batch_size=8, output_len=128)
    step = (0.1385 - 0.011) / 127  # the medians' difference over the 127 steps after the first token
    assert got["ttft_ms"] == pytest.approx(11.0) and got["time_per_output_token_ms"] == pytest.approx(1e3 * step)
    assert got["decode_tokens_per_s"] == pytest.approx(8 / step) and got["iterations"] == [3, 4]
    with pytest.raises(ValueError, match="no decode time"):
        vllm.read_latency(many, one, batch_size=8, output_len=128)
    through = vllm.read_throughput({"elapsed_time": 2.0, "num_requests": 64, "total_num_tokens": 40960,
                                    "requests_per_second": 32.0, "tokens_per_second": 20480.0}, output_len=128)
    assert through == {"requests_per_s": 32.0, "total_tokens_per_s": 20480.0, "output_tokens_per_s": 64 * 128 / 2.0}
    serve = vllm.read_serve({"request_rate": 4.0, "completed": 100, "failed": 0, "output_throughput": 480.5,
                             "mean_ttft_ms": 20.1, "median_ttft_ms": 19.0, "std_ttft_ms": 3.0, "p50_ttft_ms": 19.0,
                             "p90_ttft_ms": 25.0, "p99_ttft_ms": 41.0, "mean_tpot_ms": 2.1, "median_tpot_ms": 2.0,
                             "std_tpot_ms": 0.2, "p50_tpot_ms": 2.0, "p90_tpot_ms": 2.4, "p99_tpot_ms": 3.3,
                             "mean_e2el_ms": 300.0, "p99_e2el_ms": 420.0})
    assert serve["ttft_ms"] == {"mean": 20.1, "median": 19.0, "p50": 19.0, "p90": 25.0, "p99": 41.0}
    assert serve["tpot_ms"]["p99"] == 3.3 and "std" not in serve["tpot_ms"] and serve["output_tokens_per_s"] == 480.5


def test_vllm_bench_commands_name_the_settings_they_are_compared_on():
    """The `vllm bench` and `vllm serve` command lines own_benchmarks runs: the experiment's positions and dtype,
    the sweep's lengths, warm-ups, and percentiles (flags as vLLM 0.26.0's argument parsers name them)."""
    latency = vllm.latency_command("/ck", "/t/l.json", batch_size=1, input_len=32, output_len=64, dtype="bfloat16",
                                   warmup=3, iters=10, max_model_len=8192)
    assert latency[:5] == [*vllm.VLLM_CLI, "bench", "latency"]
    assert " ".join(latency[5:]) == ("--model /ck --dtype bfloat16 --batch-size 1 --input-len 32 --output-len 64 "
                                     "--num-iters-warmup 3 --num-iters 10 --max-model-len 8192 --disable-detokenize "
                                     "--output-json /t/l.json")
    through = vllm.throughput_command("/ck", "/t/t.json", batch_size=8, input_len=32, output_len=64, dtype="float16",
                                      num_prompts=32, max_model_len=8192)
    assert " ".join(through[3:]) == ("bench throughput --model /ck --dtype float16 --dataset-name random --input-len 32 "
                                     "--output-len 64 --num-prompts 32 --max-num-seqs 8 --num-warmups 8 "
                                     "--max-model-len 8192 --output-json /t/t.json")
    server = vllm.server_command("/ck", port=8123, dtype="float16", max_model_len=8192)
    assert " ".join(server[3:]) == "serve /ck --host 127.0.0.1 --port 8123 --dtype float16 --max-model-len 8192"
    serve = " ".join(vllm.serve_command("/ck", "/t", "s.json", request_rate=4, input_len=32, output_len=64,
                                        num_prompts=40, port=8123)[3:])
    assert serve.startswith("bench serve --backend vllm --model /ck --host 127.0.0.1 --port 8123 --dataset-name random")
    assert ("--request-rate 4 --ignore-eos --percentile-metrics ttft,tpot --metric-percentiles 50,90,99 --save-result "
            "--result-dir /t --result-filename s.json") in serve


def test_a_benchmark_process_that_fails_or_hangs_is_recorded_and_leaves_nothing_running(tmp_path):
    """run_bench on real processes: a failing command is a failure with the end of its output; one that outlives
    BENCH_TIMEOUT_S is ended with the child it started (vLLM's engine process); a server that exits before it is
    ready is said so; a server that answers /health is ready."""
    import subprocess
    import sys
    import time

    failing = [sys.executable, "-c", "import sys; print('line 1'); print('CUDA error: out of memory'); sys.exit(3)"]
    got = vllm._recorded(lambda: vllm.run_bench(failing, tmp_path / "failing.json"))
    assert got["status"] == "failed" and "failed (3)" in got["error"] and got["error"].endswith("CUDA error: out of memory")
    pid_file = tmp_path / "child.pid"
    hangs = [sys.executable, "-c", "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(600)']); open(sys.argv[1], 'w').write(str(c.pid)); time.sleep(600)", str(pid_file)]
    old, vllm.BENCH_TIMEOUT_S = vllm.BENCH_TIMEOUT_S, 3
    try:
        with pytest.raises(RuntimeError, match="no end after 3 s"):
            vllm.run_bench(hangs, tmp_path / "hangs.json")
    finally:
        vllm.BENCH_TIMEOUT_S = old
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    log = tmp_path / "serve.log"
    log.write_text("ValueError: no such model\n")
    exits = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"], start_new_session=True)
    with pytest.raises(RuntimeError, match="did not become ready \\(exit code 1\\): ValueError: no such model"):
        vllm._wait_ready(exits, vllm._free_port(), log, timeout=30)
    port = vllm._free_port()
    health = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n    def do_GET(self):\n"
              "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
              f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()")
    server = subprocess.Popen([sys.executable, "-c", health], start_new_session=True)
    try:
        assert vllm._wait_ready(server, port, log, timeout=30)["start_s"] >= 0
    finally:
        vllm._stop(server)
    assert server.poll() is not None


@pytest.mark.gpu
def test_vllm_scores_the_tokens_transformers_scores(tmp_path):
    """On the GPU machine with vLLM: a float16 Llama in vLLM gives each prompt token the log-probability
    transformers gives it, and the KLD bound from its top 20 against transformers' full distribution sits
    near zero."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "m", hidden=256, intermediate=512)  # head size 64, as vLLM's kernels take
    windows = np.random.default_rng(0).integers(3, 200, size=(4, 64)).tolist()
    lm, info = vllm.open_llm(path, dtype="float16", max_model_len=128, k=20, gpu_memory_utilization=0.2)
    try:
        assert info["quantization"] is None and "UnquantizedLinearMethod" in info["quant_methods"]
        got = vllm.prompt_logprobs(lm.model, windows, 20)
    finally:  # vLLM's engine process gives its share of the GPU back: the next test's vLLM wants 90% of it
        lm.model.llm_engine.engine_core.shutdown()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor(windows).cuda()).logits.float(), -1)[:, :-1].cpu()
    for ref, top, ids in zip(reference, got, windows):
        own = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()
        assert torch.allclose(torch.from_numpy(top["target"]), own, atol=0.05)
        bound = vllm.kld_lower_bound(ref, top["ids"], top["logprobs"])
        assert float(bound["kld"].mean()) < 1e-3 and torch.isfinite(bound["kld"]).all()
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("k", [5, 399])
def test_the_kld_summary_from_vllms_top_k_against_the_exact_one(tiny_model_dir, tmp_path, k):
    """A perturbed copy of the tiny Llama scored as vLLM returns its prompts (its token and top k a
    position), against a baseline reference written by the transformers engine: every statistic but
    the KLD equals quality.compare_to_reference's, the KLD is below the exact one (float64, against the
    same stored reference), and with the whole vocabulary but one token returned it is the exact KLD."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbench import quality, tasks
    from quantbench.engines import transformers as engine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    text = tasks.perplexity_corpus(None, hub=False)[0]
    chunks, bos = quality.kld_chunks(AutoTokenizer.from_pretrained(tiny_model_dir), text, n_ctx=32, max_tokens=32 * 4 + 5)
    quality.write_reference(engine, model, chunks, tmp_path / "ref", adds_bos=bos, dtype="float32", batch_size=4,
                            about={"experiment": "fp16"})
    summary, _ = quality.compare_to_reference(engine, other, tmp_path / "ref", dtype="float32", batch_size=4)
    with torch.no_grad():
        q_log = torch.log_softmax(other(chunks).logits[:, :-1].float(), -1)
    scored = [vllm.flat_arrays(_as_vllm_gives(q, c.tolist(), k, flat=True), k) for q, c in zip(q_log, chunks)]
    got, used = vllm.compare_to_reference(scored, tmp_path / "ref")
    assert got["tokens"] == summary["tokens"] == 4 * (32 - 1 - 16) and used["reference"] == "fp16"
    for key in ("same_top_p", "delta_p_mean", "delta_p_rms", "ppl", "ppl_base", "ppl_ratio"):
        assert got[key] == pytest.approx(summary[key], rel=1e-6, abs=1e-9), key
    p_log = torch.from_numpy(np.load(tmp_path / "ref" / "logprobs.npy").astype(np.float64))
    exact = float(_exact(p_log, q_log[:, 16:].reshape(-1, q_log.shape[-1]).double()).mean())
    assert got["kld_is_lower_bound"] and got["top_k"] == k and 0 < got["kld_mean"] <= exact + 1e-12
    if k == 399:  # the tiny vocabulary is 400: one token outside, whose term the bound then gives exactly
        assert got["kld_mean"] == pytest.approx(exact, rel=1e-5)
    else:
        assert got["method_outside_mean"] > 0 and got["kld_mean"] < 0.999 * exact


def test_engines_vllm_adds_each_method_vllm_serves_after_its_own_and_on_a_cpu_skips_them(tiny_model_dir, tmp_path):
    """--engines transformers,vllm: `<name>@vllm` for the float and saved-checkpoint methods (not bitsandbytes,
    which quantizes as it loads), after the transformers experiments, the baseline still the KLD reference;
    on the CPU each is skipped with vLLM's reason and the fix. vLLM alone, or a GGUF type left without llama.cpp,
    is refused before anything runs."""
    import dataclasses
    import json

    from quantbench import sweep
    from quantbench.config import ConfigError, RunConfig, make_experiment, validate

    config = dataclasses.replace(RunConfig(), models=[str(tiny_model_dir)], tasks=[], out=str(tmp_path), device="cpu",
                                 engines=["transformers", "vllm"],
                                 experiments=[make_experiment(m) for m in ["gptq-w4g128", "fp16", "nf4"]])
    validate(config)
    run_dir = sweep.create_run(config, tmp_path / "cache", hub=False)
    run = json.loads((run_dir / "run.json").read_text())
    assert [e["id"] for e in run["experiments"]] == ["fp16", "gptq-w4g128", "nf4", "gptq-w4g128@vllm", "fp16@vllm"]
    assert run["models"][0]["reference_experiment"] == "fp16"
    exp = next(e for e in run["experiments"] if e["id"] == "fp16@vllm")
    assert exp["engine"] == "vllm" and exp["method"] == "fp16"
    assert sweep.skip_unrunnable(run_dir, exp, run)
    skipped = json.loads((run_dir / "fp16@vllm.json").read_text())
    assert skipped["status"] == "skipped" and skipped["engine"] == "vllm"
    assert "vLLM runs on a CUDA GPU" in skipped["error"] and "NVIDIA GPU" in skipped["fix"]
    with pytest.raises(ConfigError, match="needs transformers too"):
        validate(dataclasses.replace(config, engines=["vllm"]))
    with pytest.raises(ConfigError, match="gguf-q8_0 runs in llama.cpp"):
        validate(dataclasses.replace(config, experiments=[make_experiment("gguf-q8_0")]))


@pytest.mark.gpu
def test_a_run_measures_the_baseline_again_in_vllm_on_the_same_tokens(shared_data, tmp_path, tiny_wide_model_dir):
    """fp16 in transformers and fp16@vllm in one run: vLLM's perplexity within 1% of transformers' on the
    same windows, its KLD bound from the top 256 near the precision floor with the top token mostly agreeing,
    the task's documents scored in both, vLLM's compiled decode and TTFT timed, and vLLM's own benchmarks of
    it (throughput at each batch size, serving at 8 requests a second) in the result and summary."""
    pytest.importorskip("vllm")
    import json

    from quantbench import cli
    from tests.test_sweep import _documented

    code = cli.main(["run", "--model", str(tiny_wide_model_dir), "--methods", "fp16", "--engines", "transformers,vllm",
                     "--tasks", "lambada_openai", "--limit", "16", "--data-dir", str(shared_data), "--out", str(tmp_path / "r"),
                     "--cache-dir", str(tmp_path / "cache"), "--ppl-window", "256", "--ppl-tokens", "2048", "--kld-ctx", "128",
                     "--kld-tokens", "1024", "--prompt-lengths", "32,128", "--batch-sizes", "1,4", "--new-tokens", "16",
                     "--repeats", "2", "--vllm-bench", "throughput", "--serve-rates", "8"])
    assert code == 0
    run_dir = tmp_path / "r" / "run001"
    base, mine = (json.loads((run_dir / f"{e}.json").read_text()) for e in ("fp16", "fp16@vllm"))
    assert mine["status"] == "ok", (mine.get("error"), mine.get("traceback_tail"))
    assert mine["engine"] == "vllm" and "UnquantizedLinearMethod" in mine["backend"]["quant_methods"]
    assert mine["backend"]["kernels"] == []  # vLLM's unquantized linear method keeps no kernel object of its own
    assert mine["quality"]["perplexity"] == pytest.approx(base["quality"]["perplexity"], rel=0.01)
    kld = mine["quality"]["kld"]
    assert kld["kld_is_lower_bound"] and 0 <= kld["kld_mean"] < 1e-3 and kld["same_top_p"] > 0.95
    assert kld["ppl_ratio"] == pytest.approx(1, abs=0.01)
    assert mine["quality"]["lambada_openai"]["n"] == base["quality"]["lambada_openai"]["n"] == 16
    decode = mine["cost"]["decode"]
    assert decode["compiled"]["1"]["tok_s"] > 0 and decode["compiled"]["4"]["tok_s"] > 0 and "eager" not in decode
    assert mine["cost"]["prefill"]["128"]["ttft_ms"] > 0 and mine["cost"]["weight_bytes"] > 0
    bench = mine["cost"]["vllm_bench"]  # vLLM's own, a process each (latency: issue 24's command runs it)
    assert bench["status"] == "ok" and bench["latency"] == {}, bench
    assert all(bench["throughput"][b]["status"] == "ok" and bench["throughput"][b]["output_tokens_per_s"] > 0
               for b in ("1", "4")), bench["throughput"]
    serve = bench["serve"]["8"]
    assert serve["status"] == "ok" and serve["completed"] == serve["num_prompts"] == 80, serve
    kept = run_dir / bench["files"]  # vLLM's own JSON and output of each benchmark, and the server's log
    assert {p.name for p in kept.iterdir()} >= {"throughput-1.json", "throughput-1.log", "serve-8.json", "serve.log"}
    assert 0 < serve["ttft_ms"]["p50"] <= serve["ttft_ms"]["p99"] and serve["tpot_ms"]["p50"] > 0
    summary = (run_dir / "summary.md").read_text()
    assert "**vLLM against transformers, the same method**" in summary and "## vLLM's own benchmarks" in summary
    _documented(run_dir)
