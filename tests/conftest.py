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


def build_tiny_model(path, hidden=64, intermediate=128):
    """A 2-layer Llama (hidden 64 unless asked) and a 400-token BPE tokenizer trained on Python's pydoc topics."""
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_wide_model_dir(tmp_path_factory):
    """Widths that group size 128 and the GPU kernels' tiles divide (256 and 512), for GPU methods."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-wide-llama"), hidden=256, intermediate=512)


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
