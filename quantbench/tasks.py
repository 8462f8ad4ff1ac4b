"""Evaluation data: lm-eval tasks from the hub, the datasets cache, local files or the user's own task
YAMLs, and perplexity corpora.

A task name resolves, in order, to a task of the user's `--include-path` (lm-eval task YAMLs, their
data local files or a hub dataset); to lm-eval's own (hub-backed) task when the Hugging Face hub is
reachable; otherwise to a local copy of the same task when `--data-dir` holds its data (a YAML
written into the run folder that repeats lm-eval's task definition with the dataset pointed at the
local file and, for CoQA, the official file converted to the hub layout lm-eval's CoQA code reads);
otherwise to lm-eval's own task when its dataset is in the datasets cache, as datasets finds it
offline; else it is skipped with the reason and the fix. The results say which one ran.

    >>> resolve_task("lambada_openai", data_dir=Path("../shared/data"), hub=False, task_dir=run / "tasks")
    {'name': 'lambada_openai', 'lm_eval_task': 'lambada_openai_local', 'source': 'local: .../lambada_test.jsonl'}
    >>> resolve_task("hellaswag", data_dir=None, hub=False, task_dir=run / "tasks")
    {'name': 'hellaswag', 'lm_eval_task': 'hellaswag', 'source': "lm-eval's own task, offline: Rowan/hellaswag from ..."}
"""
import contextlib
import functools
import json
import os
import re
import urllib.request
from pathlib import Path

from quantbench.config import ConfigError

# lm-eval 0.4.13's task definitions with the dataset swapped for a local file (PATH, written in
# at run time). Everything that decides the prompt, target and metric is copied from
# lm_eval/tasks/<task>/*.yaml unchanged; where the local file's layout differs from the hub
# dataset's, `convert` rewrites it into the hub layout first. The tests check each task's prompts,
# choices and targets against lm-eval's own task on the same document in the hub's layout.
# `lm_eval_yaml` is lm-eval's own definition (under lm_eval/tasks), read for its dataset offline.
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
        "lm_eval_yaml": "lambada/lambada_openai.yaml",
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
        "lm_eval_yaml": "arc/arc_easy.yaml",
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
        "lm_eval_yaml": "piqa/piqa.yaml",
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
        "lm_eval_yaml": "super_glue/boolq/default.yaml",
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
        "lm_eval_yaml": "winogrande/default.yaml",
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
        "lm_eval_yaml": "coqa/default.yaml",
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


def resolve_task(name, *, data_dir, hub, task_dir, user=None):
    """How `name` will run: a task of the user's include path (`user`: include_path_tasks' tasks),
    lm-eval's hub task, a local copy, lm-eval's task on its dataset from the datasets cache (offline),
    or skipped with the reason and fix. quantbench's own tasks (no lm-eval task of that name) prefer
    the local file, else the hub's set."""
    if name in (user or {}):
        entry = user[name]
        found, why = offline_dataset(entry.cfg) if not hub and hub_dataset(entry.cfg) else (None, None)
        if why:
            return {"name": name, "status": "skipped", "reason": f"the hub is unreachable, {why}", "fix": offline_fix(entry.cfg)}
        return {"name": name, "lm_eval_task": name, "source": f"include path: {entry.yaml_path}" + (f" ({found})" if found else "")}
    spec = LOCAL_TASKS.get(name)
    own = bool(spec and spec.get("local_only"))
    if hub and not own:
        return {"name": name, "lm_eval_task": name, "source": "hub (lm-eval's own task)"}
    data_file = _local_data(name, data_dir) if spec else None
    if data_file is not None:
        return {"name": name, "lm_eval_task": write_local_task(name, data_file, task_dir), "source": f"local: {data_file}"}
    if hub:
        return {"name": name, "lm_eval_task": write_local_task(name, None, task_dir), "source": f"hub: {spec['hub_dataset']}"}
    local_fix = spec and (f"pass --data-dir (or set QUANTBENCH_DATA_DIR) to a folder holding {spec['file']}"
                          if data_dir is None else f"{Path(data_dir) / spec['file']} is missing")
    if own:
        return {"name": name, "status": "skipped", "reason": "the hub is unreachable and no local copy of its data",
                "fix": local_fix}
    config = lm_eval_config(name)
    found, why = offline_dataset(config)
    if found:
        return {"name": name, "lm_eval_task": name, "source": f"lm-eval's own task, offline: {found}"}
    return {"name": name, "status": "skipped", "reason": f"the hub is unreachable, {why}"
            + (", and no local copy of its data" if spec else ""),
            "fix": "; or ".join(f for f in [local_fix, offline_fix(config)] if f)}


# What datasets.load_dataset takes that its builder does not (lm-eval passes dataset_kwargs to the former).
LOAD_ONLY = {"split", "keep_in_memory", "save_infos", "verification_mode", "streaming", "num_proc", "trust_remote_code"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@contextlib.contextmanager
def datasets_offline():
    """datasets as with HF_HUB_OFFLINE=1 in the block, which it reads once, when imported: where the hub
    does not answer, a dataset comes from the cache at once, not after the hub client's retries."""
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def hub_dataset(config):
    """Whether the dataset of an lm-eval task config is a hub dataset: not local files read by one of
    datasets' own builders (dataset_path json, csv, parquet, ...), nor a local folder."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES  # the builders load_dataset tries first

    path = config.get("dataset_path")
    return bool(path) and not config.get("custom_dataset") and path not in _PACKAGED_DATASETS_MODULES and not Path(path).exists()


def offline_dataset(config):
    """Offline, where the dataset of an lm-eval task config (its YAML, as lm-eval indexes it) comes from,
    found as datasets.load_dataset finds it, without reading it: (where, None), or (None, why not).
    datasets 5 reads only its own cache offline (HF_DATASETS_CACHE: what load_dataset wrote), never the
    hub cache's snapshots; local files (dataset_path json, csv, ...) need no cache."""
    import datasets

    path, name = config.get("dataset_path"), config.get("dataset_name")
    if config.get("custom_dataset") or path is None:
        return "the task's own loader", None
    kwargs = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k not in LOAD_ONLY}
    label = path + (f" ({name})" if name else "")
    try:
        with datasets_offline():
            builder = datasets.load_dataset_builder(path, name, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets' own reason, whatever it is
        return None, f"{label} is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}): {_first_line(e)}"
    have = builder.info.splits or getattr(builder.config, "data_files", None) or {}
    missing = [config[k] for k in SPLIT_KEYS if config.get(k) and config[k] not in have]
    if missing:
        return None, f"{label} has no split {', '.join(missing)} in {builder.cache_dir} (it has {', '.join(have)})"
    cached = type(builder).__name__ == "Cache"  # datasets' builder of a hub dataset it reads from its cache
    return (f"{label} from the datasets cache, {builder.cache_dir}" if cached else f"{label}, local files"), None


def offline_fix(config):
    """What makes a task's hub dataset available offline."""
    import datasets

    path, name = config.get("dataset_path"), config.get("dataset_name")
    call = f"datasets.load_dataset({path!r}" + (f", {name!r}" if name else "") + ")"
    return (f"run python -c \"import datasets; {call}\" once where the hub answers (it fills the datasets cache, "
            f"{datasets.config.HF_DATASETS_CACHE}), or set HF_DATASETS_CACHE (or HF_HOME) to a cache that holds it "
            "(datasets does not read a `huggingface-cli download` snapshot offline)")


def _first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


@functools.cache
def lm_eval_index():
    """lm-eval's own task index {name: entry, with its YAML's config} (seconds: it reads every task
    YAML it has), made once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def lm_eval_config(name):
    """lm-eval's own config of task `name` (its YAML, includes resolved, functions unresolved): for the
    local tasks read from their YAML file, else from lm-eval's index."""
    if name in LOCAL_TASKS:
        import lm_eval
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(Path(lm_eval.__file__).parent / "tasks" / LOCAL_TASKS[name]["lm_eval_yaml"], resolve_func=False)
    return lm_eval_index()[name].cfg


def include_path_tasks(folder):
    """The tasks lm-eval reads from the task YAMLs in `folder` (--include-path): ({name: lm-eval's
    index entry}, {YAML file: why lm-eval's index passes it over}); lm-eval says why only at debug
    level, so a task the user names that is missing is traced to its file from here. ConfigError when
    the folder holds no YAML, or none that defines a task."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    files = sorted(p for p in Path(folder).glob("**/*.yaml") if "__pycache__" not in p.parts)
    if not files:
        raise ConfigError(f"--include-path {folder} holds no lm-eval task YAML (*.yaml)")
    index = TaskManager(include_path=str(folder), include_defaults=False).task_index
    used = {Path(e.yaml_path).resolve() for e in index.values() if e.yaml_path}
    passed_over = {}
    for f in files:
        if f.resolve() in used:
            continue
        try:
            cfg = load_yaml(f, resolve_func=False)
            passed_over[str(f)] = ("a second definition of a task or group of that name" if "task" in cfg or "group" in cfg
                                   else f"it defines no task or group (keys: {', '.join(cfg)})")
        except Exception as e:  # noqa: BLE001 - what lm-eval's index met: a YAML error, an include missing, ...
            mark = getattr(e, "problem_mark", None)
            passed_over[str(f)] = _first_line(e) + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    if not index:
        raise ConfigError(f"--include-path {folder}: lm-eval reads no task from its YAML files: "
                          + "; ".join(f"{f}: {why}" for f, why in passed_over.items()))
    return index, passed_over


def _members(entry):
    """The task names of an lm-eval group or tag entry."""
    if entry.cfg is None:  # a tag
        return sorted(entry.tags)
    return [t if isinstance(t, str) else t.get("task") or t.get("group") for t in entry.cfg.get("task", [])]


def check_tasks(names, *, include_path, hub):
    """ConfigError, naming the flag or the file, for a task name that neither the include path,
    quantbench nor lm-eval knows (where a YAML of the include path that lm-eval could not read names
    it: that file and why), a group or tag (quantbench scores and pairs documents task by task), or a
    task of the include path that lm-eval cannot build (its data is loaded for that, unless offline
    and not in the cache: it is then skipped with the fix)."""
    user, passed_over = include_path_tasks(include_path) if include_path else ({}, {})
    rest = [n for n in names if n not in user and n not in LOCAL_TASKS]
    known = lm_eval_index() if rest else {}  # the user's and quantbench's own names need no index of lm-eval's
    for n in (n for n in rest if n not in known):
        for f, why in passed_over.items():
            if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", Path(f).read_text(errors="replace")):
                raise ConfigError(f"task '{n}': lm-eval cannot read {f}, which names it: {why}")
    unknown = [n for n in rest if n not in known]
    if unknown:
        mine = f" nor a task of --include-path {include_path} (it has: {', '.join(sorted(user))})" if include_path else ""
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task name (lm-eval's `lm_eval ls tasks` "
                          f"lists them){mine}, or 'none'")
    for n in names:
        entry = user.get(n) or known.get(n)
        if entry is not None and entry.kind.name in ("GROUP", "TAG"):
            members = _members(entry)
            raise ConfigError(f"'{n}' is an lm-eval {entry.kind.name.lower()} of {len(members)} tasks "
                              f"({', '.join(members[:6])}{', ...' if len(members) > 6 else ''}): name its tasks in --tasks "
                              "(quantbench scores and pairs them task by task)")
    mine = [n for n in names if n in user and (hub or not hub_dataset(user[n].cfg) or offline_dataset(user[n].cfg)[0])]
    if mine:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        for n in mine:
            problem = build_problem(manager, n)
            if problem:
                raise ConfigError(f"task '{n}' of --include-path ({user[n].yaml_path}): lm-eval rejects it: {problem}")


def build_problem(manager, name):
    """Why lm-eval rejects task `name` as it builds it (its data loaded, its first document rendered):
    its error, with what it logged on the way where the error says little; or the error it logged
    without raising (an unknown metric, choices that are not a list); or None."""
    import logging

    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append((record.levelno, record.getMessage().splitlines()[0][:200]))
    logger = logging.getLogger("lm_eval")
    logger.addHandler(handler)
    try:
        manager.load([name])
    except Exception as e:  # noqa: BLE001 - lm-eval's own error, in one line
        hint = (" (a relative data_files path is taken from the folder quantbench runs in, as in lm-eval)"
                if isinstance(e, FileNotFoundError) else "")
        # Some of lm-eval's errors say little (an unknown metric: "KeyError: None"); its last warning says which.
        terse = len(str(e)) < 30 and said
        return _first_line(e) + hint + (f"; lm-eval said: {said[-1][1]}" if terse else "")
    finally:
        logger.removeHandler(handler)
    errors = [text for level, text in said if level >= logging.ERROR]
    return f"lm-eval said: {errors[0]}" if errors else None


def generation_bound(name, cap):
    """The most tokens a generation task may generate: --max-gen-toks (`cap`), or the task's own
    smaller bound (squad_v1: 48)."""
    return min(LOCAL_TASKS.get(name, {}).get("max_gen_toks") or cap, cap)


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
