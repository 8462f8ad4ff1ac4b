import dataclasses

import pytest

from quantbench.config import (FIELDS, FILE_KEYS, ConfigError, RunConfig, from_args, from_run, load_sweep_file,
                               make_experiment, parse_names, run_parser, validate)


def test_yaml_sweep_file_with_method_settings(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("""\
models: [smollm2-135m]
methods:
  - fp16_baseline
  - bnb_4bit_nf4
  - {name: nf4-plain-bf16, method: nf4, double_quant: false, compute_dtype: bfloat16}
tasks: [coqa, lambada_openai]
limit: 50
batch_sizes: [1, 16]
""")
    v = load_sweep_file(f)
    assert [e["name"] for e in v["experiments"]] == ["fp16", "nf4", "nf4-plain-bf16"]
    assert v["experiments"][2] == {"name": "nf4-plain-bf16", "method": "nf4",
                                   "settings": {"double_quant": False, "compute_dtype": "bfloat16"}}
    assert v["tasks"] == ["coqa", "lambada_openai"] and v["limit"] == 50 and v["batch_sizes"] == [1, 16]


def test_toml_sweep_file(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text('model = "smollm2-135m"\nmethods = ["fp16", "int8"]\ntasks = "none"\n')
    v = load_sweep_file(f)
    assert v["models"] == ["smollm2-135m"] and v["tasks"] == [] and [e["method"] for e in v["experiments"]] == ["fp16", "int8"]


@pytest.mark.parametrize("text, line, words", [
    ("methods: [fp16]\nlimt: 5\n", 2, "unknown key 'limt'"),
    ("methods: [fp16]\nlimit: 0\n", 2, "positive whole number"),
    ("methods:\n  - fp16\n  - {method: nf4, dubble_quant: false}\n", 3, "no setting 'dubble_quant'"),
    ("methods:\n  - fp16\n  - gptq-w9\n", 3, "unknown method 'gptq-w9'"),
    ("methods:\n  - {method: nf4, double_quant: 'no'}\n", 2, "must be bool"),
    ("batch_sizes: [1, -8]\n", 1, "batch-sizes"),
    ("methods:\n  - {method: nf4, compute_dtype: half}\n", 2, "must be one of float16, bfloat16, float32 or auto"),
    ("methods: [nf4]\ncompute_dtype: fp8\n", 2, "--compute-dtype must be one of float16, bfloat16, float32"),
])
def test_bad_yaml_names_the_line(tmp_path, text, line, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_sweep_file(f)
    assert f"bad.yaml:{line}:" in str(e.value) and words in str(e.value)


def test_bad_toml_names_the_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('methods = ["fp16"]\n\nrepeat = 3\n')
    with pytest.raises(ConfigError, match=r"bad.toml:3: unknown key 'repeat'"):
        load_sweep_file(f)


def test_unparsable_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("methods: [fp16\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_sweep_file(f)


def test_validate_rejects_duplicates_and_bad_values():
    exps = [make_experiment("nf4"), make_experiment("bnb_4bit_nf4")]
    with pytest.raises(ConfigError, match="unique"):
        validate(dataclasses.replace(RunConfig(), experiments=exps))
    with pytest.raises(ConfigError, match="--limit"):
        validate(dataclasses.replace(RunConfig(), limit=-3))
    with pytest.raises(ConfigError, match="--new-tokens"):
        validate(dataclasses.replace(RunConfig(), new_tokens=1))


def test_parse_names():
    assert parse_names("none") == [] and parse_names("coqa, piqa") == ["coqa", "piqa"]


def test_vllms_own_benchmarks_are_chosen_by_name_or_none(tmp_path):
    def config(*argv):
        return from_args(run_parser().parse_args(argv))

    assert config().vllm_bench == ["latency", "throughput"] and config().serve_rates == []
    assert config("--vllm-bench", "none").vllm_bench == [] and config("--vllm-bench", "latency").vllm_bench == ["latency"]
    assert config("--serve-rates", "4,16").serve_rates == [4, 16]
    f = tmp_path / "s.yaml"
    f.write_text("vllm_bench: none\nserve_rates: [2, 8]\n")
    assert config("--config", str(f)).vllm_bench == [] and config("--config", str(f)).serve_rates == [2, 8]
    with pytest.raises(ConfigError, match="--vllm-bench must be distinct names among latency, throughput, or none"):
        config("--vllm-bench", "latency,serve")
    with pytest.raises(ConfigError, match="--serve-rates must be positive whole numbers"):
        config("--serve-rates", "0")


def test_suites_set_tasks_and_limit_unless_flags_do(tmp_path):
    def config(*argv):
        return from_args(run_parser().parse_args(argv))

    quick = config("--suite", "quick")
    assert quick.suite == "quick" and quick.tasks == ["lambada_openai", "arc_easy"] and quick.limit == 500
    assert quick.kld_tokens > 0  # perplexity and KLD run in every suite
    standard = config("--suite", "standard", "--limit", "50")
    assert standard.tasks[-1] == "coqa" and "winogrande" in standard.tasks and standard.limit == 50
    assert config("--suite", "standard", "--tasks", "piqa").tasks == ["piqa"]
    assert config().tasks == ["coqa"] and config().suite is None  # CoQA stays the default without a suite
    f = tmp_path / "s.yaml"
    f.write_text("suite: quick\nlimit: 20\n")
    assert config("--config", str(f)).tasks == ["lambada_openai", "arc_easy"] and config("--config", str(f)).limit == 20
    with pytest.raises(ConfigError, match="--kld-ctx"):
        config("--kld-ctx", "511")


def test_decode_modes():
    from quantbench.config import decode_modes

    assert RunConfig().decode_mode == "eager" and decode_modes("eager") == ["eager"]
    assert decode_modes("both") == ["eager", "compiled"] and decode_modes("compiled") == ["compiled"]
    with pytest.raises(ConfigError, match="--decode-mode"):
        validate(dataclasses.replace(RunConfig(), decode_mode="fast", experiments=[make_experiment("fp16")]))


def test_all_tokens_means_the_whole_corpus():
    c = from_args(run_parser().parse_args(["--ppl-tokens", "all", "--kld-tokens", "all"]))
    assert c.ppl_tokens is None and c.kld_tokens is None
    c = from_args(run_parser().parse_args(["--kld-tokens", "0"]))
    assert c.kld_tokens == 0 and c.ppl_tokens == 16384


def test_all_tokens_in_a_sweep_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("ppl_tokens: all\nkld_tokens: all\n")
    assert load_sweep_file(f) == {"ppl_tokens": None, "kld_tokens": None}


def test_eval_batch_is_lm_evals_detection_on_a_gpu_and_16_on_the_cpu():
    from quantbench.config import eval_batch

    def config(*argv):
        return from_args(run_parser().parse_args(argv))

    assert config().eval_batch_size == "auto" and config("--eval-batch-size", "64").eval_batch_size == 64
    assert eval_batch("auto", "cuda") == "auto" and eval_batch("auto", "cpu") == 16 and eval_batch(8, "cuda") == 8
    for bad in (0, "big", True):
        with pytest.raises(ConfigError, match="--eval-batch-size"):
            validate(dataclasses.replace(RunConfig(), eval_batch_size=bad, experiments=[make_experiment("fp16")]))


def test_every_setting_has_a_flag_and_a_sweep_file_key_and_travels_through_run_json(tmp_path):
    """Declared once on RunConfig: the parser, the file keys and the checks come from the fields, so a
    new field without a flag or key cannot exist."""
    flags = {a.dest: a.option_strings for a in run_parser()._actions}
    for name in FIELDS:
        assert flags.get(name), f"RunConfig.{name} has no flag"
        assert FILE_KEYS.get(name) == name, f"RunConfig.{name} has no sweep-file key"
    assert flags["experiments"] == ["--methods"] and flags["models"] == ["--model"] and flags["all_methods"] == ["--all"]
    assert flags["decode_prompt_tokens"] == ["--decode-prompt-tokens"]
    assert FILE_KEYS["model"] == "models" and FILE_KEYS["methods"] == "experiments" and FILE_KEYS["all"] == "all_methods"
    c = from_args(run_parser().parse_args(["--model", "a,b", "--model", "c", "--methods", "nf4", "--experiment", "bnb_8bit",
                                           "--decode-prompt-tokens", "16", "--batch-sizes", "1,4"]))
    assert c.models == ["a", "b", "c"] and [e["method"] for e in c.experiments] == ["nf4", "int8"]
    assert c.decode_prompt_tokens == 16 and c.batch_sizes == [1, 4]
    assert from_run({"config": dataclasses.asdict(c)}) == c  # an experiment rebuilds the same config from run.json


def test_run_help_groups_the_flags_by_purpose():
    text = run_parser().format_help()
    text = text[text.index("what to compare:"):]  # after the usage line, which names every flag
    order = [text.index(title) for title in ("what to compare:", "quality budget:", "speed sweep:", "where to run:")]
    assert order == sorted(order) and text.index("--methods") < text.index("quality budget:")
    assert text.index("--decode-mode") > text.index("speed sweep:") > text.index("--limit")


def test_prompting_flags_and_the_include_path(tmp_path, monkeypatch):
    def config(*argv):
        return from_args(run_parser().parse_args(argv))

    c = config()
    assert (c.include_path, c.num_fewshot, c.apply_chat_template, c.fewshot_as_multiturn) == (None, None, False, False)
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    c = config("--include-path", "mine", "--num-fewshot", "5", "--apply-chat-template", "--fewshot-as-multiturn")
    assert c.include_path == str(tmp_path / "mine") and c.num_fewshot == 5  # the path stored absolute
    assert c.apply_chat_template and c.fewshot_as_multiturn
    assert config("--num-fewshot", "0").num_fewshot == 0
    with pytest.raises(ConfigError, match=r"^--include-path nowhere: no such folder$"):
        config("--include-path", "nowhere")
    with pytest.raises(ConfigError, match=r"^--fewshot-as-multiturn needs --apply-chat-template"):
        config("--fewshot-as-multiturn")
    with pytest.raises(ConfigError, match="--num-fewshot must be a whole number, 0 or more, got -1"):
        config("--num-fewshot", "-1")
    with pytest.raises(SystemExit):  # argparse's one line: argument --num-fewshot: expected a whole number, got 'two'
        run_parser().parse_args(["--num-fewshot", "two"])
    f = tmp_path / "s.yaml"
    f.write_text("include_path: mine\nnum_fewshot: 1\napply_chat_template: true\nfewshot_as_multiturn: true\n")
    assert load_sweep_file(f) == {"include_path": "mine", "num_fewshot": 1, "apply_chat_template": True,
                                  "fewshot_as_multiturn": True}
    assert config("--config", str(f)).include_path == str(tmp_path / "mine")
    for text, words in [("num_fewshot: two\n", "s.yaml:1: --num-fewshot must be a whole number"),
                        ("apply_chat_template: 'yes'\n", "s.yaml:1: --apply-chat-template must be true or false"),
                        ("fewshot_as_multiturn: true\n", "s.yaml:1: --fewshot-as-multiturn needs --apply-chat-template")]:
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_sweep_file(f)
        assert words in str(e.value), str(e.value)


def test_a_checkpoint_in_methods_by_its_path_or_hub_id(tmp_path):
    """A folder with a config.json runs in transformers, a GGUF file or a folder of one in llama.cpp, each
    named by its folder (a file by its name); an org/name is a hub id; a missing path is an error."""
    from quantbench.config import make_experiment

    folder = tmp_path / "Llama-3.2-1B-AWQ"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    ggufs = tmp_path / "smol-gguf"
    ggufs.mkdir()
    (ggufs / "smol-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert make_experiment(str(folder)) == {"name": "Llama-3.2-1B-AWQ", "method": "checkpoint",
                                            "settings": {"source": str(folder)}}
    assert make_experiment(str(ggufs)) == {"name": "smol-gguf", "method": "gguf-file",
                                           "settings": {"source": str(ggufs / "smol-Q4_K_M.gguf")}}
    assert make_experiment(str(ggufs / "smol-Q4_K_M.gguf"))["name"] == "smol-Q4_K_M"
    assert make_experiment("org/Llama-3.2-1B-GPTQ") == {"name": "Llama-3.2-1B-GPTQ", "method": "checkpoint",
                                                        "settings": {"source": "org/Llama-3.2-1B-GPTQ"}}
    (ggufs / "smol-Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="holds 2 GGUF files; name one of them: smol-Q4_K_M.gguf, smol-Q8_0.gguf"):
        make_experiment(str(ggufs))
    with pytest.raises(ConfigError, match="no checkpoint folder or GGUF file ./not-here"):
        make_experiment("./not-here")
    with pytest.raises(ConfigError, match="method 'checkpoint' needs 'source'"):
        make_experiment({"method": "checkpoint"})
    table = make_experiment({"method": "checkpoint", "name": "theirs", "source": str(folder)})
    assert table == {"name": "theirs", "method": "checkpoint", "settings": {"source": str(folder)}}
