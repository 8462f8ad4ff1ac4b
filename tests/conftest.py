"""Shared fixtures: a tiny random-weight Llama with a tokenizer trained here (nothing downloaded),
and the evaluation data directory beside the checkout (../shared/data)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir():
    """The data directory: $QUANTBENCH_DATA_DIR, else ../shared/data beside the checkout."""
    return Path(os.environ.get("QUANTBENCH_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data():
    path = data_dir()
    if not (path / "wikitext-2-raw" / "wiki.test.raw").exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the evaluation data at {path}")
        pytest.skip(f"no evaluation data at {path} (set QUANTBENCH_DATA_DIR)")
    return path


def tiny_tokenizer():
    """A 400-token BPE tokenizer trained on Python's pydoc topics (nothing downloaded)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


# A chat template of the usual shape (a marked turn per message, the assistant's turn opened last).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_chat_tokenizer(folder):
    """A 400-token SentencePiece BPE tokenizer trained on Python's pydoc topics, as Llama's are (which
    llama.cpp's converter reads from tokenizer.model), with a chat template."""
    import io

    import sentencepiece
    from pydoc_data.topics import topics
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(list(topics.values())), model_writer=model,
                                             vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(path, hidden=64, intermediate=128, model_type="llama", dtype="float16", scale=None, tokenizer=None):
    """A 2-layer random-weight model (a Llama with hidden 64 unless asked) saved in `dtype`, with the
    tiny tokenizer (or `tokenizer`); `scale(model)` may change its weights before it is saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                                  max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if scale:
        with torch.no_grad():
            scale(model)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """The tiny Llama with a SentencePiece tokenizer that has a chat template: llama.cpp's converter
    makes a GGUF of it, so both engines run it."""
    tokenizer = tiny_chat_tokenizer(tmp_path_factory.mktemp("sentencepiece"))
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat-llama"), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_wide_model_dir(tmp_path_factory):
    """Widths that group size 128 and the GPU kernels' tiles divide (256 and 512), for GPU methods."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-wide-llama"), hidden=256, intermediate=512)


def _overflow_float16(model):
    # Gemma's residual stream is known to pass float16's range; here the first layer's MLP output norm
    # (a weight float16 can hold) lifts the hidden state to about 9e4, past float16's 65504.
    model.model.layers[0].post_feedforward_layernorm.weight.fill_(3e4)


@pytest.fixture(scope="session")
def tiny_overflow_model_dir(tmp_path_factory):
    """A bfloat16 Gemma 3 checkpoint whose activations overflow float16 (finite in bfloat16 and float32)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3-bf16"), model_type="gemma3_text", dtype="bfloat16",
                            scale=_overflow_float16)


def write_hub_dataset_cache(cache, repo_id, config_name, splits, features, commit="0" * 40):
    """What `datasets.load_dataset(repo_id, config_name)` leaves in the datasets cache `cache` after
    downloading the hub repository at `commit`, made by datasets itself: the rows of each split
    (`splits`: {split: [row, ...]}) written as the repository's parquet files with the README that
    names its configs, then prepared by the same parquet builder into the folder a download fills,
    <namespace>___<name>/<config>/0.0.0/<commit>/ (dataset_info.json, <name>-<split>.arrow)."""
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / repo_id.split("/")[-1]
        for split, rows in splits.items():
            (repo / config_name).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(repo / config_name / f"{split}-00000-of-00001.parquet"))
        (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {config_name}\n  data_files:\n" + "".join(
            f"  - split: {s}\n    path: {config_name}/{s}-*\n" for s in splits) + "---\n")
        module = datasets.load.LocalDatasetModuleFactory(str(repo)).get_module()
        builder = datasets.load.get_dataset_builder_class(module, dataset_name=repo.name)(
            cache_dir=str(Path(tmp) / "scratch"), config_name=config_name, hash=commit, **module.builder_kwargs)
        namespace, name = repo_id.split("/")
        folder = Path(cache) / f"{namespace}___{name}" / config_name / "0.0.0" / commit
        builder.download_and_prepare(output_dir=str(folder))
    return folder


# Settings that keep a CPU run of the tiny model to seconds.
TINY_RUN_FLAGS = ["--ppl-tokens", "1024", "--ppl-window", "128", "--kld-tokens", "256", "--kld-ctx", "64", "--prompt-lengths", "16,600", "--new-tokens", "8",
                  "--batch-sizes", "1,2", "--repeats", "2", "--device", "cpu"]


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where torch sees a CUDA GPU (the GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
