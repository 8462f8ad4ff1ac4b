import json
from pathlib import Path

import yaml

from quantbench import tasks


def test_wikitext_rows_follow_the_hub_layout(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" \n = Title = \n \n Some text . \n")
    assert tasks.wikitext_rows(f) == ["", " = Title = \n", "", " Some text . \n"]


def test_perplexity_corpus_offline_fallback_is_labelled():
    text, label = tasks.perplexity_corpus(None, hub=False)
    assert len(text) > 100_000
    assert "pydoc_data" in label and "not comparable" in label


def test_perplexity_corpus_from_data_dir(shared_data):
    text, label = tasks.perplexity_corpus(shared_data, hub=False)
    assert label.startswith("wikitext-2-raw-v1 test (local")
    assert text.startswith("\n\n = Robert Boulter = \n")  # '' then the title row, joined by blank lines


def test_task_without_data_is_skipped_with_the_fix(tmp_path):
    t = tasks.resolve_task("coqa", data_dir=None, hub=False, task_dir=tmp_path)
    assert t["status"] == "skipped" and "--data-dir" in t["fix"]
    t = tasks.resolve_task("hellaswag", data_dir=tmp_path, hub=False, task_dir=tmp_path)
    assert t["status"] == "skipped" and "hub" in t["fix"]
    assert tasks.resolve_task("hellaswag", data_dir=None, hub=True, task_dir=tmp_path)["lm_eval_task"] == "hellaswag"


LM_EVAL_YAML = {"lambada_openai": "lambada/lambada_openai.yaml", "coqa": "coqa/default.yaml", "arc_easy": "arc/arc_easy.yaml",
                "piqa": "piqa/piqa.yaml", "boolq": "super_glue/boolq/default.yaml", "winogrande": "winogrande/default.yaml"}


def _lm_eval_yaml(name):
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks"
    path = folder / LM_EVAL_YAML[name]
    # lm-eval's YAML uses !function tags; read them as their text.
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda l, n: f"!function {l.construct_scalar(n)}")
    return yaml.load(path.read_text(), Loader=loader), loader


def test_local_yaml_repeats_lm_eval_task_definition(shared_data, tmp_path):
    """Everything that shapes prompt, target and metric is lm-eval's own; only the data source differs."""
    for name in LM_EVAL_YAML:
        hub, loader = _lm_eval_yaml(name)
        t = tasks.resolve_task(name, data_dir=shared_data, hub=False, task_dir=tmp_path)
        local = yaml.load((tmp_path / name / f"{name}_local.yaml").read_text(), Loader=loader)
        assert local["task"] == t["lm_eval_task"] == f"{name}_local"
        for key in ["output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "generation_kwargs",
                    "process_results", "should_decontaminate", "doc_to_decontamination_query", "metadata"]:
            assert local.get(key) == hub.get(key), (name, key)
        assert local["dataset_path"] == "json"


def test_coqa_local_prompt_and_target_match_lm_eval(shared_data, tmp_path):
    from lm_eval.tasks.coqa import utils

    official = json.loads((shared_data / "coqa" / "coqa-dev-1story.json").read_text())["data"][0]
    tasks.resolve_task("coqa", data_dir=shared_data, hub=False, task_dir=tmp_path)
    doc = json.loads((tmp_path / "coqa" / "coqa_hub_layout.jsonl").read_text().splitlines()[0])

    # The prompt: story, then every Q/A turn, the last answer left open; built by hand from the file.
    qs, ans = official["questions"], official["answers"]
    expected = official["story"] + "\n\n"
    for i, q in enumerate(qs):
        expected += f"Q: {q['input_text']}\n\n" + (f"A: {ans[i]['input_text']}\n\n" if i < len(qs) - 1 else "A:")
    assert utils.doc_to_text(doc) == expected
    golds = utils.doc_to_target(doc)
    assert golds[0] == ans[-1]["input_text"]
    extra = [official["additional_answers"][k][-1]["input_text"] for k in official["additional_answers"]]
    assert set(golds) == {ans[-1]["input_text"], *extra} or set(a.lower() for a in golds) <= {
        a.lower() for a in [ans[-1]["input_text"], *extra]}
    # The metric: a perfect answer scores 1, a wrong one 0.
    assert utils.process_results(doc, [golds[0]])["f1"] == 1.0
    assert utils.process_results(doc, ["zebra crossing"])["em"] == 0.0


def test_calibration_set_is_fixed_and_recorded(tiny_model_dir, shared_data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a, info = tasks.calibration_texts(tok, source=None, data_dir=shared_data, hub=False, n_samples=4, seq_len=32)
    b, again = tasks.calibration_texts(tok, source=None, data_dir=shared_data, hub=False, n_samples=4, seq_len=32)
    assert a == b and info == again and len(a) == 4
    assert info["source"].startswith("wikitext-2-raw-v1 validation") and info["tokens_per_sample"] == 32
    assert len(info["sha256"]) == 64
    f = tmp_path / "mine.txt"
    f.write_text("Calibration text of my own domain. " * 200)
    c, cinfo = tasks.calibration_texts(tok, source=str(f), data_dir=shared_data, hub=False, n_samples=2, seq_len=16)
    assert cinfo["source"] == f"file: {f}" and cinfo["sha256"] != info["sha256"]
    import pytest

    with pytest.raises(ValueError, match="fewer than"):
        tasks.calibration_texts(tok, source=str(f), data_dir=None, hub=False, n_samples=1000, seq_len=512)
    with pytest.raises(FileNotFoundError, match="no calibration text"):
        tasks.calibration_texts(tok, source=None, data_dir=None, hub=False, n_samples=1, seq_len=8)


def _first_hub_rows(data):
    """The first document of each set as the hub dataset lm-eval's own task reads serves it, written
    out by hand from the local file's fields (the hub's column names and types)."""
    arc = json.loads((data / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    piqa = json.loads((data / "piqa" / "valid.jsonl").read_text().splitlines()[0])
    boolq = json.loads((data / "boolq" / "val.jsonl").read_text().splitlines()[0])
    return {
        "arc_easy": {"id": arc["id"], "question": arc["question"]["stem"], "answerKey": arc["answerKey"],
                     "choices": {"text": [c["text"] for c in arc["question"]["choices"]],
                                 "label": [c["label"] for c in arc["question"]["choices"]]}},
        "piqa": {"goal": piqa["goal"], "sol1": piqa["sol1"], "sol2": piqa["sol2"],
                 "label": int((data / "piqa" / "valid-labels.lst").read_text().split()[0])},
        "boolq": {"question": boolq["question"], "passage": boolq["passage"], "idx": 0, "label": 0},  # "false" = 0
        # allenai/winogrande (winogrande_xl, validation), its first row:
        "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                       "option1": "Sarah", "option2": "Maria", "answer": "2"},
    }


def test_local_tasks_build_the_same_prompts_as_lm_eval_own_tasks(shared_data, tmp_path, monkeypatch):
    """For the first document of each set: the local task (local file, converted) and lm-eval's own
    task definition (given the hub's row) give the same context, choices and target."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    rows = _first_hub_rows(shared_data)
    names = list(rows)
    for name in names:
        tasks.resolve_task(name, data_dir=shared_data, hub=False, task_dir=tmp_path)
    local = get_task_dict([f"{n}_local" for n in names], TaskManager(include_path=str(tmp_path)))

    def offline_download(self, dataset_kwargs=None, **kwargs):  # lm-eval's own task, fed the hub row
        self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list([self._row])
                                             for s in ("train", "validation", "test")})

    monkeypatch.setattr(ConfigurableTask, "download", offline_download)
    for name in names:
        config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name])
        config.pop("tag", None)
        ConfigurableTask._row = rows[name]
        own = ConfigurableTask(config=config)
        mine = local[f"{name}_local"]
        doc, hub_doc = next(iter(mine.eval_docs)), next(iter(own.eval_docs))
        assert mine.doc_to_text(doc) == own.doc_to_text(hub_doc), name
        assert mine.doc_to_choice(doc) == own.doc_to_choice(hub_doc), name
        assert mine.doc_to_target(doc) == own.doc_to_target(hub_doc), name
    assert own.doc_to_choice(hub_doc)[1] == "Sarah was a much better surgeon than Maria so Maria"


def test_squad_task_prompt_and_official_scoring(shared_data, tmp_path):
    from lm_eval.tasks.squadv2.task import SQuAD2

    t = tasks.resolve_task("squad_v1", data_dir=shared_data, hub=False, task_dir=tmp_path)
    assert t["lm_eval_task"] == "squad_v1_local" and t["source"].endswith("dev-v1.1.json.zip")
    lines = (tmp_path / "squad_v1" / "squad_v1_hub_layout.jsonl").read_text().splitlines()
    assert len(lines) == 10570  # every question of the dev set
    doc = json.loads(lines[0])
    assert doc["question"] == "Which NFL team represented the AFC at Super Bowl 50?" and doc["title"] == "Super_Bowl_50"
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["squad_v1_local"], TaskManager(include_path=str(tmp_path)))["squad_v1_local"]
    local_doc = next(iter(task.eval_docs))
    assert task.doc_to_text(local_doc) == SQuAD2.doc_to_text(None, doc)  # lm-eval's SQuAD prompt
    # An answer is a short span: at most 48 tokens (lm-eval's squad_completion bound), in the YAML
    # (lm-eval alone reads it) and in quantbench's bound, which --max-gen-toks can only lower.
    assert task.config.generation_kwargs["max_gen_toks"] == 48 and task.config.generation_kwargs["until"] == ["\n"]
    assert (tasks.generation_bound("squad_v1", 128), tasks.generation_bound("squad_v1", 8)) == (48, 8)
    assert tasks.generation_bound("coqa", 128) == 128
    # SQuAD's normalisation: case, punctuation and articles do not count; the best gold answer wins.
    assert tasks.squad_process_results(doc, [" the denver broncos.\nQ: next"]) == {"em": 1, "f1": 1.0}
    partial = tasks.squad_process_results(doc, ["Broncos of Denver"])
    assert partial["em"] == 0 and 0 < partial["f1"] < 1


# allenai/ai2_arc's columns, as its dataset card declares them.
def arc_features():
    import datasets

    return datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                              "choices": {"text": datasets.List(datasets.Value("string")),
                                          "label": datasets.List(datasets.Value("string"))},
                              "answerKey": datasets.Value("string")})


def arc_cache(data, cache):
    """allenai/ai2_arc ARC-Easy in a datasets cache, as a download leaves it. Only its test split is
    here: its first 10 rows are the test split, and rows from further on stand in for the train and
    validation splits (lm-eval opens all three; its few-shot examples come from train)."""
    from tests.conftest import write_hub_dataset_cache

    rows = list(tasks._arc_rows(data / "arc" / "ARC-Easy-Test.jsonl"))
    return write_hub_dataset_cache(cache, "allenai/ai2_arc", "ARC-Easy",
                                   {"train": rows[100:110], "validation": rows[110:115], "test": rows[:10]}, arc_features())


def test_lm_evals_own_task_resolves_offline_from_the_datasets_cache_and_is_skipped_with_the_fix_without_it(
        shared_data, tmp_path, monkeypatch):
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = arc_cache(shared_data, tmp_path / "hf" / "datasets")
    # datasets reads HF_DATASETS_CACHE once, on import: the setting it gives, in this process
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    t = tasks.resolve_task("arc_easy", data_dir=None, hub=False, task_dir=tmp_path / "tasks")
    assert t == {"name": "arc_easy", "lm_eval_task": "arc_easy",
                 "source": f"lm-eval's own task, offline: allenai/ai2_arc (ARC-Easy) from the datasets cache, {folder}"}
    with tasks.datasets_offline():  # and lm-eval's own task loads its documents from there
        task = TaskManager(include_defaults=False).load([str(Path(lm_eval.__file__).parent / "tasks/arc/arc_easy.yaml")])
    docs = list(task["tasks"]["arc_easy"].eval_docs)
    assert len(docs) == 10 and docs[0]["question"] == next(tasks._arc_rows(shared_data / "arc" / "ARC-Easy-Test.jsonl"))["question"]
    # --data-dir's local copy still comes first, as before
    assert tasks.resolve_task("arc_easy", data_dir=shared_data, hub=False, task_dir=tmp_path / "tasks")["source"].startswith("local:")

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    t = tasks.resolve_task("arc_easy", data_dir=None, hub=False, task_dir=tmp_path / "tasks")
    assert t["status"] == "skipped" and "allenai/ai2_arc (ARC-Easy) is not in the datasets cache" in t["reason"]
    assert "datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')" in t["fix"] and "HF_DATASETS_CACHE" in t["fix"]
    assert "--data-dir" in t["fix"]  # a local copy would do too


SUMS_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {folder}/train.jsonl
    test: {folder}/test.jsonl
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def sums_task(folder, name="sums", n=10):
    """A small multiple-choice task of the user's: a YAML and its JSONL documents (`n` to score, 3 to
    draw few-shot examples from) in `folder`."""
    def doc(a, b):
        return {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a + b + 10)],
                "label": (a * b) % 3}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(doc(a, 7)) + "\n" for a in range(3)))
    (folder / "test.jsonl").write_text("".join(json.dumps(doc(10 + i, 3 + i)) + "\n" for i in range(n)))
    (folder / f"{name}.yaml").write_text(SUMS_YAML.format(name=name, folder=folder))
    return folder


def test_include_path_tasks_are_checked_and_what_lm_eval_rejects_is_named_by_file(tmp_path):
    import pytest

    from quantbench.config import ConfigError

    folder = sums_task(tmp_path / "mine")
    user, passed_over = tasks.include_path_tasks(folder)
    assert set(user) == {"sums"} and passed_over == {}
    tasks.check_tasks(["sums"], include_path=folder, hub=False)  # local files: built (data loaded) and fine
    t = tasks.resolve_task("sums", data_dir=None, hub=False, task_dir=tmp_path / "tasks", user=user)
    assert t == {"name": "sums", "lm_eval_task": "sums", "source": f"include path: {folder / 'sums.yaml'}"}

    def error(names, folder=folder):
        with pytest.raises(ConfigError) as e:
            tasks.check_tasks(names, include_path=folder, hub=False)
        return str(e.value)

    (tmp_path / "empty").mkdir()
    assert error(["sums"], tmp_path / "empty") == f"--include-path {tmp_path / 'empty'} holds no lm-eval task YAML (*.yaml)"
    (folder / "broken.yaml").write_text("task: broken\n  doc_to_text: [oops\n")  # lm-eval's index drops it silently
    assert error(["broken"]) == (f"task 'broken': lm-eval cannot read {folder / 'broken.yaml'}, which names it: "
                                 "ScannerError: mapping values are not allowed in this context (line 2, column 14)")
    (folder / "typo.yaml").write_text((folder / "sums.yaml").read_text().replace("task: sums", "task: typo")
                                      .replace("multiple_choice", "multiple_choise"))
    assert error(["typo"]).startswith(f"task 'typo' of --include-path ({folder / 'typo.yaml'}): lm-eval rejects it: "
                                      "ValueError: Got invalid output_type 'multiple_choise'")
    (folder / "nometric.yaml").write_text((folder / "sums.yaml").read_text().replace("task: sums", "task: nometric")
                                          .replace("metric: acc", "metric: no_such_metric"))
    assert error(["nometric"]).endswith(": lm-eval rejects it: lm-eval said: no_such_metric not found in the evaluate "
                                        "library! Please check https://huggingface.co/evaluate-metric")  # it only logs that
    (folder / "noagg.yaml").write_text("task: noagg\n" + "".join(l + "\n" for l in (folder / "sums.yaml").read_text().splitlines()[1:]
                                                                if "aggregation" not in l and "higher_is" not in l)
                                       .replace("metric: acc", "metric: no_such_metric"))
    assert error(["noagg"]).endswith(": lm-eval rejects it: KeyError: None; lm-eval said: no_such_metric metric is not "
                                     "assigned a default aggregation!")
    (folder / "lost.yaml").write_text((folder / "sums.yaml").read_text().replace("task: sums", "task: lost")
                                      .replace(f"{folder}/test.jsonl", "lost.jsonl"))
    assert "Unable to find" in error(["lost"]) and "relative data_files path" in error(["lost"])
    assert error(["sum"]).startswith("unknown task(s) sum: not an lm-eval task name")
    assert "nor a task of --include-path" in error(["sum"]) and "(it has: lost, noagg, nometric, sums, typo)" in error(["sum"])
    (folder / "both.yaml").write_text("group: both\ntask: [sums, typo]\n")
    assert error(["both"]) == ("'both' is an lm-eval group of 2 tasks (sums, typo): name its tasks in --tasks "
                               "(quantbench scores and pairs them task by task)")
