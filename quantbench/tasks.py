"""Evaluation data: lm-eval tasks from the hub or from local files, and perplexity corpora.

A task name resolves to lm-eval's own (hub-backed) task when the Hugging Face hub is reachable, and
otherwise to a local copy of the same task when `--data-dir` holds its data: a YAML written into
the run folder that repeats lm-eval's task definition with the dataset pointed at the local file
(and, for CoQA, the official file converted to the hub layout lm-eval's CoQA code reads). The
results say which one ran.

    >>> resolve_task("lambada_openai", data_dir=Path("../shared/data"), hub=False, task_dir=run / "tasks")
    {'name': 'lambada_openai', 'lm_eval_task': 'lambada_openai_local', 'source': 'local: .../lambada_test.jsonl'}
"""
import json
import os
import re
import urllib.request
from pathlib import Path

# lm-eval 0.4.13's task definitions with the dataset swapped for a local file (PATH, written in
# at run time). Everything that decides the prompt, target and metric is copied from
# lm_eval/tasks/<task>/*.yaml unchanged; where the local file's layout differs from the hub
# dataset's, `convert` rewrites it into the hub layout first. The tests check each task's prompts,
# choices and targets against lm-eval's own task on the same document in the hub's layout.
def _yaml(task, split, output_type, body, version="1.0"):
    return (f"task: {task}_local\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    {split}: PATH\noutput_type: {output_type}\n{split}_split: {split}\n{body}"
            f"metadata:\n  version: {version}\n")


ACC = "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
ACC_NORM = ACC + "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
EM_F1 = ("metric_list:\n  - metric: em\n    aggregation: mean\n    higher_is_better: true\n"
         "  - metric: f1\n    aggregation: mean\n    higher_is_better: true\n")

SQUAD_MAX_GEN_TOKS = 48  # lm-eval's squad_completion bound: SQuAD answers are short spans

LOCAL_TASKS = {
    "lambada_openai": {
        "file": "lambada/lambada_test.jsonl",
        "yaml": _yaml("lambada_openai", "test", "loglikelihood", """\
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
should_decontaminate: true
doc_to_decontamination_query: "{{text}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""),
    },
    "arc_easy": {
        "file": "arc/ARC-Easy-Test.jsonl",
        "yaml": _yaml("arc_easy", "test", "multiple_choice", """\
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{question}}\\nAnswer:"
""" + ACC_NORM),
    },
    "piqa": {
        "file": "piqa/valid.jsonl",
        "yaml": _yaml("piqa", "validation", "multiple_choice", """\
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
should_decontaminate: true
doc_to_decontamination_query: goal
""" + ACC_NORM),
    },
    "boolq": {
        "file": "boolq/val.jsonl",
        "yaml": _yaml("boolq", "validation", "multiple_choice", """\
doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
should_decontaminate: true
doc_to_decontamination_query: passage
metric_list:
  - metric: acc
""", version="2.0"),
    },
    "winogrande": {
        "file": "winogrande/winogrande.jsonl",
        "utils_file": "preprocess_winogrande.py",  # the module name lm-eval's YAML refers to
        "utils": "from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401\n",
        "yaml": _yaml("winogrande", "validation", "multiple_choice", """\
doc_to_text: !function preprocess_winogrande.doc_to_text
doc_to_target: !function preprocess_winogrande.doc_to_target
doc_to_choice: !function preprocess_winogrande.doc_to_choice
should_decontaminate: true
doc_to_decontamination_query: sentence
""" + ACC),
    },
    "coqa": {
        "file": "coqa",  # any official-format CoQA json in this folder
        # lm-eval's own CoQA functions, so the local task prompts and scores exactly as the hub task.
        "utils": "from lm_eval.tasks.coqa.utils import doc_to_target, doc_to_text, process_results  # noqa: F401\n",
        "yaml": _yaml("coqa", "validation", "generate_until", """\
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
should_decontaminate: true
doc_to_decontamination_query: "{{story}} {{question.input_text|join('\\n')}}"
generation_kwargs:
  until:
    - "\\nQ:"
""" + EM_F1, version="3.0"),
    },
    # quantbench's own task (lm-eval has SQuAD 2.0 only): SQuAD v1.1 dev, the prompt of lm-eval's
    # squadv2, greedy answer up to the first newline or 48 tokens (lm-eval's squad_completion bound:
    # the answers are short spans), scored with SQuAD's official EM/F1 (the best over the gold
    # answers), whose answer normalisation CoQA's metric uses too.
    "squad_v1": {
        "file": "squad/dev-v1.1.json.zip",
        "local_only": True,
        "hub_dataset": "rajpurkar/squad",
        "max_gen_toks": SQUAD_MAX_GEN_TOKS,
        "utils": "from quantbench.tasks import squad_process_results as process_results  # noqa: F401\n",
        "yaml": _yaml("squad_v1", "validation", "generate_until", """\
doc_to_text: "Title: {{title}}\\n\\nBackground: {{context}}\\n\\nQuestion: {{question}}\\n\\nAnswer:"
doc_to_target: "{{answers.text[0]}}"
process_results: !function utils.process_results
generation_kwargs:
  until:
    - "\\n"
  do_sample: false
""" + f"  max_gen_toks: {SQUAD_MAX_GEN_TOKS}\n" + EM_F1),
    },
}


def squad_process_results(doc, results):
    """SQuAD v1.1's official scoring of one answer: exact match and token F1 after normalisation
    (lower case, no punctuation, articles or extra spaces), the best over the gold answers."""
    import transformers.data.metrics.squad_metrics as squad_metrics

    pred = results[0].strip().split("\n")[0]
    golds = doc["answers"]["text"]
    return {"em": max(squad_metrics.compute_exact(a, pred) for a in golds),
            "f1": max(squad_metrics.compute_f1(a, pred) for a in golds)}


def _arc_rows(path):
    """The official nested ARC file -> the hub's allenai/ai2_arc layout."""
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        yield {"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
               "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                           "label": [c["label"] for c in d["question"]["choices"]]}}


def _piqa_rows(path):
    """The authors' valid.jsonl and valid-labels.lst -> the hub's rows with an int `label`."""
    labels = (Path(path).parent / "valid-labels.lst").read_text().split()
    for line, label in zip(Path(path).read_text().splitlines(), labels, strict=True):
        d = json.loads(line)
        yield {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}


def _boolq_rows(path):
    """SuperGLUE's BoolQ (label "true"/"false") -> aps/super_glue's rows (label 1/0)."""
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        yield {"question": d["question"], "passage": d["passage"], "idx": d["idx"],
               "label": {"true": 1, "false": 0}[str(d["label"]).lower()]}


def _winogrande_rows(path):
    """The split form (two contexts, the continuation, gold 0/1) -> allenai/winogrande's rows: the
    sentence with '_' where the options differ, option1/option2 and answer "1"/"2". lm-eval rebuilds
    exactly the two contexts and the continuation from these."""
    import os

    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        a, b = d["context_options"]
        prefix = os.path.commonprefix([a, b])
        yield {"sentence": f"{prefix}_ {d['continuation']}", "option1": a[len(prefix):], "option2": b[len(prefix):],
               "answer": str(d["gold"] + 1)}


def _coqa_rows(path):
    yield from (coqa_to_hub_layout(s) for s in json.loads(Path(path).read_text())["data"])


def _squad_rows(path):
    """SQuAD v1.1's official dev json (zipped) -> rajpurkar/squad's rows, one per question."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".json"))))["data"]
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                yield {"id": qa["id"], "title": article["title"], "context": para["context"], "question": qa["question"],
                       "answers": {"text": [a["text"] for a in qa["answers"]],
                                   "answer_start": [a["answer_start"] for a in qa["answers"]]}}


CONVERT = {"arc_easy": _arc_rows, "piqa": _piqa_rows, "boolq": _boolq_rows, "winogrande": _winogrande_rows,
           "coqa": _coqa_rows, "squad_v1": _squad_rows}


def hub_reachable(timeout_s=3.0):
    """True if the Hugging Face hub answers; False offline or when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(f"{endpoint}/api/datasets/EleutherAI/coqa", timeout=timeout_s)
        return True
    except Exception:  # any failure to connect means: not reachable
        return False


def coqa_to_hub_layout(story):
    """One story of the official CoQA json -> one row in the layout of the hub's EleutherAI/coqa."""
    def columns(turns, keys):
        return {k: [t[k] for t in turns] for k in keys}
    answer_keys = ["span_start", "span_end", "span_text", "input_text", "turn_id"]
    return {
        "id": story["id"], "source": story["source"], "story": story["story"],
        "questions": columns(story["questions"], ["input_text", "turn_id"]),
        "answers": columns(story["answers"], answer_keys),
        "additional_answers": {k: columns(v, answer_keys) for k, v in story.get("additional_answers", {}).items()},
    }


def _local_data(name, data_dir):
    """Path of the task's local data file in data_dir, or None."""
    if data_dir is None:
        return None
    where = Path(data_dir) / LOCAL_TASKS[name]["file"]
    if name == "coqa":
        found = sorted(where.glob("*.json")) if where.is_dir() else []
        return found[0] if found else None
    return where if where.exists() else None


def write_local_task(name, data_file, task_dir):
    """Write the YAML for `name` under task_dir, with its data in the hub's layout beside it; with
    data_file None, pointed at the task's hub dataset instead (quantbench's own tasks, online).
    Returns the lm-eval task name."""
    folder = Path(task_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = LOCAL_TASKS[name]
    if data_file is None:
        data = re.search(r"dataset_kwargs:\n  data_files:\n    \w+: PATH\n", spec["yaml"]).group(0)
        yaml = spec["yaml"].replace("dataset_path: json", f"dataset_path: {spec['hub_dataset']}").replace(data, "")
    else:
        path = Path(data_file).resolve()
        if name in CONVERT:
            rows = CONVERT[name](path)
            path = folder / f"{name}_hub_layout.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        yaml = spec["yaml"].replace("PATH", json.dumps(str(path)))
    if "utils" in spec:
        (folder / spec.get("utils_file", "utils.py")).write_text(spec["utils"])
    (folder / f"{name}_local.yaml").write_text(yaml)
    return f"{name}_local"


def resolve_task(name, *, data_dir, hub, task_dir):
    """How `name` will run: lm-eval's hub task, a local copy, or skipped with the reason and fix.
    quantbench's own tasks (no lm-eval task of that name) prefer the local file, else the hub's set."""
    spec = LOCAL_TASKS.get(name)
    own = bool(spec and spec.get("local_only"))
    if hub and not own:
        return {"name": name, "lm_eval_task": name, "source": "hub (lm-eval's own task)"}
    data_file = _local_data(name, data_dir) if spec else None
    if data_file is not None:
        return {"name": name, "lm_eval_task": write_local_task(name, data_file, task_dir), "source": f"local: {data_file}"}
    if hub:
        return {"name": name, "lm_eval_task": write_local_task(name, None, task_dir), "source": f"hub: {spec['hub_dataset']}"}
    if spec:
        fix = (f"pass --data-dir (or set QUANTBENCH_DATA_DIR) to a folder holding {spec['file']}"
               if data_dir is None else f"{Path(data_dir) / spec['file']} is missing")
    else:
        fix = ("connect to the Hugging Face hub; quantbench has local copies only of "
               + ", ".join(LOCAL_TASKS))
    return {"name": name, "status": "skipped", "reason": "the hub is unreachable and no local copy of its data",
            "fix": fix}


def generation_bound(name, cap):
    """The most tokens a generation task may generate: --max-gen-toks (`cap`), or the task's own
    smaller bound (squad_v1: 48)."""
    return min(LOCAL_TASKS.get(name, {}).get("max_gen_toks") or cap, cap)


def known_task_names():
    """Every task name lm-eval knows (about 8 s: it indexes its YAML files) plus the local ones."""
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks) | set(LOCAL_TASKS)


def wikitext_rows(path):
    """The rows of the hub's wikitext-2-raw-v1 split from the raw file: each line with its newline,
    and '' for a blank line (as the README of the data directory describes)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    return ["" if line.strip() == "" else line for line in lines]


def perplexity_corpus(data_dir, hub):
    """(text, description) for perplexity: WikiText-2 test joined with '\\n\\n' as the GPTQ/AWQ papers
    do, from the data directory, else the hub; else Python's own pydoc topics, labelled as such."""
    if data_dir is not None and (Path(data_dir) / "wikitext-2-raw" / "wiki.test.raw").exists():
        path = Path(data_dir) / "wikitext-2-raw" / "wiki.test.raw"
        return "\n\n".join(wikitext_rows(path)), f"wikitext-2-raw-v1 test (local: {path})"
    if hub:
        from datasets import load_dataset

        rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows), "wikitext-2-raw-v1 test (hub: Salesforce/wikitext)"
    import platform

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text, (f"pydoc_data topics of Python {platform.python_version()} (offline fallback: not "
                  "comparable with published WikiText-2 numbers; pass --data-dir for WikiText-2)")


def calibration_texts(tokenizer, *, source, data_dir, hub, n_samples, seq_len):
    """A fixed, recorded calibration set for GPTQ/AWQ: `n_samples` consecutive windows of `seq_len`
    tokens, decoded back to text, from a text file the user names, else WikiText-2 validation in the
    data directory, else c4 from the hub. Returns (texts, info) with a sha256 of the set."""
    import hashlib

    if source not in (None, "auto"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        text, label = path.read_text(encoding="utf-8"), f"file: {path}"
    elif data_dir is not None and (Path(data_dir) / "wikitext-2-raw" / "wiki.valid.raw").exists():
        path = Path(data_dir) / "wikitext-2-raw" / "wiki.valid.raw"
        text, label = "\n\n".join(wikitext_rows(path)), f"wikitext-2-raw-v1 validation (local: {path})"
    elif hub:
        from datasets import load_dataset

        rows = load_dataset("allenai/c4", data_files="en/c4-validation.00000-of-00008.json.gz", split="train")
        text, label = "\n\n".join(rows["text"][:4000]), "c4 en validation shard 0 (hub: allenai/c4)"
    else:
        raise FileNotFoundError("no calibration text: pass --data-dir with wikitext-2-raw/wiki.valid.raw, "
                                "--calibration FILE, or connect to the hub for c4")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n_samples * seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than {n_samples} x {seq_len}; "
                         "lower --calibration-samples or --calibration-tokens")
    texts = [tokenizer.decode(ids[i * seq_len:(i + 1) * seq_len]) for i in range(n_samples)]
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return texts, {"source": label, "samples": n_samples, "tokens_per_sample": seq_len, "sha256": digest}
