"""Shared fixtures: tiny random T5 and Llama models with tokenizers built in code.

Nothing is downloaded. The tokenizer is a word-level vocabulary built from the demo
dialogues that ship with loratune, so every word in those files has its own id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from loratune.data.loading import DEMO_DIR

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REAL_DATA_ENV = "LORATUNE_SAMSUM_DIR"


def _vocabulary() -> list[str]:
    splitter = pre_tokenizers.Whitespace()
    words: set[str] = {"summarize", "this", "dialogue", ":"}
    for path in DEMO_DIR.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for field in ("dialogue", "summary"):
                words.update(word for word, _ in splitter.pre_tokenize_str(row[field].lower()))
    return SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))


def build_tokenizer(family: str, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer; seq2seq inputs end with </s>, causal ones start with <s>."""
    vocab = {token: index for index, token in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "seq2seq":
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_t5(tokenizer: PreTrainedTokenizerFast) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(folder: Path, family: str, chat_template: bool = False, seed: int = 0) -> Path:
    """Write a tiny random model and its tokenizer to ``folder``; return the folder."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(family, chat_template)
    model = build_tiny_t5(tokenizer) if family == "seq2seq" else build_tiny_llama(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-t5"), "seq2seq")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "causal", chat_template=True)


@pytest.fixture(scope="session")
def tiny_llama_plain_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has no chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-plain"), "causal")


@pytest.fixture
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture
def real_samsum_dir() -> Path | None:
    """The real SAMSum folder when ``LORATUNE_SAMSUM_DIR`` points at one, else None."""
    value = os.environ.get(REAL_DATA_ENV)
    if value and (Path(value) / "test.jsonl").is_file():
        return Path(value)
    return None


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep test runs out of the user's caches, except the shared GGUF conversion."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
