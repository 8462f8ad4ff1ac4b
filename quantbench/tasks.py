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
import urllib.request
from pathlib import Path

# lm-eval 0.4.13's task definitions with the dataset swapped for a local file. Everything that
# decides the prompt, target and metric is copied from lm_eval/tasks/<task>/*.yaml unchanged.
LOCAL_TASKS = {
    "lambada_openai": {
        "file": "lambada/lambada_test.jsonl",
        "yaml": """\
task: lambada_openai_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
should_decontaminate: true
doc_to_decontamination_query: "{{{{text}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    },
    "coqa": {
        "file": "coqa",  # any official-format CoQA json in this folder
        "yaml": """\
task: coqa_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {path}
output_type: generate_until
validation_split: validation
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  until:
    - "\\nQ:"
metric_list:
  - metric: em
    aggregation: mean
    higher_is_better: true
  - metric: f1
    aggregation: mean
    higher_is_better: true
metadata:
  version: 3.0
""",
    },
}

# lm-eval's own CoQA functions, so the local task prompts and scores exactly as the hub task.
COQA_UTILS = "from lm_eval.tasks.coqa.utils import doc_to_target, doc_to_text, process_results  # noqa: F401\n"


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
    """Write the local YAML (and data conversion) for `name` under task_dir; returns its task name."""
    folder = Path(task_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(data_file).resolve()
    if name == "coqa":
        stories = json.loads(path.read_text())["data"]
        path = folder / "coqa_hub_layout.jsonl"
        path.write_text("".join(json.dumps(coqa_to_hub_layout(s)) + "\n" for s in stories))
        (folder / "utils.py").write_text(COQA_UTILS)
    (folder / f"{name}_local.yaml").write_text(LOCAL_TASKS[name]["yaml"].format(path=json.dumps(str(path))))
    return f"{name}_local"


def resolve_task(name, *, data_dir, hub, task_dir):
    """How `name` will run: lm-eval's hub task, a local copy, or skipped with the reason and fix."""
    if hub:
        return {"name": name, "lm_eval_task": name, "source": "hub (lm-eval's own task)"}
    if name in LOCAL_TASKS:
        data_file = _local_data(name, data_dir)
        if data_file is not None:
            task = write_local_task(name, data_file, task_dir)
            return {"name": name, "lm_eval_task": task, "source": f"local: {data_file}"}
        fix = (f"pass --data-dir (or set QUANTBENCH_DATA_DIR) to a folder holding {LOCAL_TASKS[name]['file']}"
               if data_dir is None else f"{Path(data_dir) / LOCAL_TASKS[name]['file']} is missing")
    else:
        fix = ("connect to the Hugging Face hub; quantbench has local copies only of "
               + ", ".join(LOCAL_TASKS))
    return {"name": name, "status": "skipped", "reason": "the hub is unreachable and no local copy of its data",
            "fix": fix}


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
