"""The llama.cpp engine and its GGUF methods: the real demo model converted and quantized by llama.cpp's
own tools, measured on the transformers baseline's tokens, and checked against llama.cpp's own
llama-perplexity; and the inputs llama.cpp refuses."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_RUN_FLAGS
from tests.test_sweep import _documented

pytest.importorskip("llama_cpp")


def _run(*args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTBENCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "quantbench", "run", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _cache(tmp_path):
    return os.environ.get("QUANTBENCH_CACHE") or str(tmp_path / "cache")


@pytest.mark.demo
def test_gguf_types_of_the_demo_in_llama_cpp_beside_transformers_and_as_llama_perplexity_says(shared_data, tmp_path,
                                                                                                tiny_model_dir):
    cache = _cache(tmp_path)
    _run("--methods", "fp16,gguf-f16,gguf-q8_0,gguf-q4_k_m,gguf-q4_k_m-imat", "--tasks", "lambada_openai", "--limit", "8",
         "--data-dir", str(shared_data), "--out", str(tmp_path / "r"), "--ppl-tokens", "2048", "--ppl-window", "1024",
         "--kld-tokens", "2048", "--prompt-lengths", "32", "--new-tokens", "8", "--batch-sizes", "1,2", "--repeats", "1",
         "--calibration-samples", "8", "--calibration-tokens", "256", cache=cache)
    run_dir = tmp_path / "r" / "run001"
    r = {m: json.loads((run_dir / f"{m}.json").read_text()) for m in ["fp16", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q4_k_m-imat"]}
    for name, res in r.items():
        assert res["status"] == "ok", (name, res.get("error"), res.get("traceback_tail"))
    kld = {m: res["quality"]["kld"]["kld_mean"] for m, res in r.items()}
    # The engine check: the float GGUF in llama.cpp against the float baseline in transformers, same tokens.
    assert abs(kld["gguf-f16"]) < 1e-4 < kld["gguf-q8_0"] < kld["gguf-q4_k_m"] < 1
    assert kld["gguf-q4_k_m-imat"] < 1 and r["gguf-q4_k_m-imat"]["quantization"]["calibration"]["samples"] == 8
    g = r["gguf-q4_k_m"]
    assert g["engine"] == "llama.cpp" and g["backend"]["gguf_type"] == "q4_k_m" and g["backend"]["tokenizer_check"]["agrees"]
    assert sum(g["backend"]["tensor_types"].values()) == 272 and "q5_0" in g["backend"]["tensor_types"]  # 576-wide fall back
    assert g["cost"]["weight_bytes"] == g["cost"]["gguf_file_bytes"] < r["gguf-q8_0"]["cost"]["weight_bytes"]
    assert g["cost"]["decode"]["eager"]["1"]["tok_s"] > 0 and g["cost"]["decode"]["eager"]["2"]["tok_s"] > 0
    assert g["cost"]["standard_bench"]["pp512"]["tok_s"] > 0 and g["cost"]["standard_bench"]["tg128"]["tok_s"] > 0
    assert r["gguf-f16"]["quality"]["lambada_openai"]["n"] == 8 and "lambada_openai" in r["gguf-q4_k_m"]["quality"]
    summary = (run_dir / "summary.md").read_text()
    assert "| fp16 (baseline) |" in summary and "| gguf-q4_k_m |" in summary and "Engine check: gguf-f16 in llama.cpp" in summary
    assert "## llama-bench's protocol" in summary
    _documented(run_dir)

    # llama.cpp's own llama-perplexity --kl-divergence, against the same base (the float GGUF) on the same
    # text and context, 16 chunks of 512 (the default budget): quantbench's KLD of the same models within 1%
    # of its figure (each stores the base's log-probabilities rounded its own way: on 4 chunks they part by 2%).
    from quantbench import gguf_files, quality, tasks
    from quantbench.engines import llamacpp

    os.environ["QUANTBENCH_CACHE"] = cache
    tool = gguf_files.tool("llama-perplexity")
    corpus = tasks.perplexity_corpus(str(shared_data), False)[0]
    text = tmp_path / "wiki.txt"
    text.write_text(corpus[:200_000])
    demo = r["fp16"]["model"]["path"]
    models = {m: llamacpp.load(m, r[m]["quantization"]["path"], model_path=demo, device="cpu", settings={})[:2]
              for m in ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]}
    base_model, tokenizer = models["gguf-f16"]
    # A batch decodes as parallel sequences of one context: each sequence gets the one-sequence decode's tokens.
    ids = tokenizer(corpus[:4000]).input_ids
    prompts = [ids[:12], ids[300:312]]
    q8 = models["gguf-q8_0"][0]
    assert llamacpp._parallel_greedy(q8, prompts, 10) == [llamacpp._greedy(q8, ids, 10) for ids in prompts]
    chunks, bos = quality.kld_chunks(tokenizer, corpus, n_ctx=512, max_tokens=8192)
    quality.write_reference(llamacpp, base_model, chunks, tmp_path / "ref", adds_bos=bos, dtype="float32")
    subprocess.run([str(tool), "-m", r["gguf-f16"]["quantization"]["path"] + "/model.gguf", "-f", str(text), "-c", "512",
                    "--chunks", "16", "--kl-divergence-base", str(tmp_path / "base.kld")], capture_output=True, check=True)
    for m in ["gguf-q8_0", "gguf-q4_k_m"]:
        ours = quality.compare_to_reference(llamacpp, models[m][0], tmp_path / "ref", dtype="float32")[0]["kld_mean"]
        out = subprocess.run([str(tool), "-m", r[m]["quantization"]["path"] + "/model.gguf", "--kl-divergence-base",
                              str(tmp_path / "base.kld"), "--kl-divergence"], capture_output=True, text=True, check=True).stdout
        theirs = float(re.search(r"Mean\s+KLD:\s+([-\d.]+)", out).group(1))
        print(f"{m}: quantbench mean KLD {ours:.6f}, llama-perplexity {theirs:.6f}, ratio {ours / theirs:.4f}")
        assert ours == pytest.approx(theirs, rel=0.01), (m, ours, theirs)

    # The GGUF files this run made, named in --methods by their folder and by their file, as someone else's
    # GGUFs are: the same numbers as the methods that made them, against a new run's baseline.
    q8, q4 = r["gguf-q8_0"]["quantization"]["path"], r["gguf-q4_k_m"]["quantization"]["path"] + "/model.gguf"
    _run("--methods", f"fp16,{q8},{q4}", "--tasks", "lambada_openai", "--limit", "8", "--data-dir", str(shared_data),
         "--out", str(tmp_path / "again"), "--ppl-tokens", "2048", "--ppl-window", "1024", "--kld-tokens", "2048",
         "--prompt-lengths", "32", "--new-tokens", "8", "--batch-sizes", "1", "--repeats", "1", cache=cache)
    for made, name in [("gguf-q8_0", q8.split("/")[-1]), ("gguf-q4_k_m", "model")]:
        again = json.loads((tmp_path / "again" / "run001" / f"{name}.json").read_text())
        assert again["status"] == "ok" and again["method"] == "gguf-file" and again["engine"] == "llama.cpp", again
        assert again["backend"]["gguf_type"] == r[made]["backend"]["gguf_type"] and again["backend"]["tokenizer_check"]["agrees"]
        assert again["backend"]["tensor_types"] == r[made]["backend"]["tensor_types"]
        for key in ("perplexity", "kld", "lambada_openai"):
            assert again["quality"][key] == r[made]["quality"][key], (made, key)
    from quantbench import methods

    with pytest.raises(methods.MethodUnsuitable, match=r"is a checkpoint of another model: its vocab_size is 49152, "
                                                       r"the run's model's is \d+$"):
        methods.load_gguf_file(str(tiny_model_dir), device="cpu", source=q4)


def test_choices_of_one_context_are_scored_from_its_cache_as_from_an_empty_one(tiny_chat_model_dir, tmp_path):
    """lm-eval's choices of a question share its context: the second choice is scored from the cache the
    first left, evaluating only the tokens past their common prefix, and its logits are a fresh context's."""
    import numpy as np

    from quantbench import methods
    from quantbench.engines import llamacpp

    (tmp_path / "g").mkdir()
    methods.METHODS["gguf-f16"]["quantize"](str(tiny_chat_model_dir), str(tmp_path / "g"), device="cpu")
    model, fresh = (llamacpp.gguf_model(tmp_path / "g" / "model.gguf") for _ in range(2))
    context, first, second = list(range(5, 45)), [50, 51, 52], [60, 61]
    llamacpp._scores(model, context + first, 64)
    evaluated, real = [], model["llm"].eval
    model["llm"].eval = lambda tokens: (evaluated.append(len(tokens)), real(tokens))[1]
    reused = llamacpp._scores(model, context + second, 64)
    want = llamacpp._scores(fresh, context + second, 64)
    assert evaluated == [2] and reused.shape == want.shape == (42, 400)
    assert np.abs(reused - want).max() <= 1e-4 * np.abs(want).max()
    again = llamacpp._scores(model, context + second, 64)  # the same sequence: its last token runs again
    assert evaluated == [2, 1] and np.array_equal(again[:-1], reused[:-1])
    assert np.abs(again - want).max() <= 1e-4 * np.abs(want).max()


def test_a_model_llama_cpps_converter_does_not_know_is_skipped_with_its_reason(tiny_model_dir, tmp_path):
    """The tiny model's tokenizer was trained here: llama.cpp's converter knows no such pre-tokenizer."""
    _run("--model", str(tiny_model_dir), "--methods", "fp16,gguf-q8_0", "--tasks", "none", "--out", str(tmp_path / "r"),
         *TINY_RUN_FLAGS, cache=tmp_path / "cache")
    r = json.loads((tmp_path / "r" / "run001" / "gguf-q8_0.json").read_text())
    assert r["status"] == "skipped" and r["error"].startswith("llama.cpp's converter (convert_hf_to_gguf.py of "
                                                              "llama-cpp-python 0.3.36) cannot convert this model: ")
    assert json.loads((tmp_path / "r" / "run001" / "fp16.json").read_text())["status"] == "ok"  # the sweep went on


def test_a_gguf_type_llama_cpp_lacks_names_the_types_it_has(tmp_path):
    from quantbench import gguf_files

    with pytest.raises(gguf_files.Unsuitable, match=r"has no GGUF type q9_z; it has: .*q4_k_m"):
        gguf_files.quantize(tmp_path / "f16.gguf", tmp_path / "out.gguf", "q9_z")


def test_the_quantizer_says_why_it_failed_in_one_line(tmp_path, monkeypatch):
    """A float GGUF cut short: llama.cpp's own reason, which its bindings log at what they take for
    logging.DEBUG, not the last bytes of its output."""
    import sys

    from quantbench import gguf_files

    monkeypatch.setattr(sys, "stderr", sys.__stderr__)  # the bindings print to sys.stderr: file descriptor 2, as in a run

    bad = tmp_path / "f16.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match=r"^llama.cpp's quantizer failed on q8_0 \(code 1\): llama_model_quantize: "
                                           r"failed to quantize: .+$"):
        gguf_files.quantize(bad, tmp_path / "out.gguf", "q8_0", threads=1)


def test_a_corrupt_gguf_fails_its_experiment_in_one_line(tmp_path):
    from quantbench.engines import llamacpp

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing after it
    (tmp_path / "gguf.json").write_text(json.dumps({"type": "q8_0", "tensor_types": {}, "matrices": 0, "unquantized": 0,
                                                    "unquantized_names": [], "llama_cpp_python": "0.3.36"}))
    with pytest.raises(ValueError, match="Failed to load model from file"):
        llamacpp._llm(llamacpp.gguf_model(bad, threads=1), 64, False)


def test_a_gguf_whose_tokenizer_llama_cpp_cannot_run_is_reported_not_a_crash(tmp_path):
    """llama.cpp aborts the process on a text its vocabulary cannot tokenize; the check runs it in a
    child, so the experiment goes on and the result says why (here: a file it cannot even open)."""
    from quantbench.engines import llamacpp
    from quantbench.models import byte_tokenizer

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    check = llamacpp.tokenizer_check(llamacpp.gguf_model(bad), byte_tokenizer(), text="hello world")
    assert check["agrees"] is False and check["tokens"] == 11
    assert check["error"].startswith("llama.cpp's tokenizer of this GGUF fails on the text (exit 1): ")


def test_the_demo_tokenizer_is_repaired_as_its_gguf_says(tmp_path):
    """transformers 5.17's GGUF reader gives a byte-level BPE a SentencePiece byte fallback and decoder
    and the start token as the end token; the demo's tokenizer is set back as the GGUF defines it,
    with the same ids."""
    import json as _json

    from gguf import GGUFWriter
    from tokenizers import Tokenizer

    from quantbench.models import _as_the_gguf_says, byte_tokenizer

    tok = byte_tokenizer()
    state = _json.loads(tok.backend_tokenizer.to_str())
    state["model"]["byte_fallback"] = True
    state["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    tok._tokenizer = Tokenizer.from_str(_json.dumps(state))
    tok.eos_token = tok.convert_ids_to_tokens(65)  # "b" in the byte alphabet: the wrong end token
    path = tmp_path / "vocab.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_eos_token_id(256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    text = "héllo wörld 🙂"
    before = tok(text).input_ids
    fixed = _as_the_gguf_says(tok, path)
    repaired = _json.loads(fixed.backend_tokenizer.to_str())
    assert repaired["model"]["byte_fallback"] is False and repaired["decoder"]["type"] == "ByteLevel"
    assert fixed(text).input_ids == before and fixed.decode(before) == text
    assert fixed.eos_token == "<|end|>" and fixed.eos_token_id == 256


def test_a_users_task_with_the_chat_template_is_prompted_alike_in_both_engines(tiny_chat_model_dir, tmp_path):
    """A task of the user's, 1-shot with the few-shot example as a chat turn: llama.cpp's LM applies the
    Hugging Face tokenizer's chat template with HFLM's own code, so both engines get the same requests."""
    import hashlib

    from tests.conftest import TINY_CHAT_TEMPLATE
    from tests.test_sweep import TASKS_ONLY
    from tests.test_tasks import sums_task

    folder = sums_task(tmp_path / "my-tasks")
    _run("--model", str(tiny_chat_model_dir), "--methods", "fp16,gguf-f16", "--include-path", str(folder), "--tasks", "sums",
         "--num-fewshot", "1", "--apply-chat-template", "--fewshot-as-multiturn", "--out", str(tmp_path / "r"), *TASKS_ONLY,
         cache=_cache(tmp_path))
    run_dir = tmp_path / "r" / "run001"
    r = {m: json.loads((run_dir / f"{m}.json").read_text()) for m in ["fp16", "gguf-f16"]}
    for name, res in r.items():
        assert res["status"] == "ok", (name, res.get("error"), res.get("traceback_tail"))
        assert res["quality"]["sums"]["n"] == 10
    assert r["gguf-f16"]["engine"] == "llama.cpp"
    fp16, gguf = (r[m]["quality_info"]["sums"] for m in ["fp16", "gguf-f16"])
    assert fp16["num_fewshot"] == 1 and fp16["apply_chat_template"] and fp16["fewshot_as_multiturn"]
    assert fp16["chat_template_sha256"] == hashlib.sha256(TINY_CHAT_TEMPLATE.encode()).hexdigest()
    # The example and its answer as a user and an assistant turn, then the document, the assistant's turn open.
    prompt = fp16["first_prompt"]
    assert prompt.startswith("<|user|>\nQuestion: What is ") and prompt.count("<|assistant|>\n") == 2
    assert prompt.endswith("<|end|>\n<|user|>\nQuestion: What is 10 plus 3?\nAnswer:<|end|>\n<|assistant|>\n")
    for key in ["first_prompt", "requests_sha256", "chat_template_sha256", "num_fewshot"]:
        assert gguf[key] == fp16[key], key
    docs = {m: json.loads((run_dir / f"{m}.docs.json").read_text())["sums"] for m in r}
    assert docs["gguf-f16"]["doc_ids"] == docs["fp16"]["doc_ids"] == list(range(10))
    _documented(run_dir)
