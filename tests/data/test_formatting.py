from transformers import AutoTokenizer

from loratune.data.formatting import IGNORE_INDEX, PromptFormat, build_training_features, encode_prompt
from loratune.data.lengths import choose_max_lengths, length_stats, percentile_length

TEMPLATE = "summarize this dialogue : {text}"
TEXT = "anna : are you coming to the party tonight ?"


def test_causal_labels_cover_response_only(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = PromptFormat.for_tokenizer("causal", TEMPLATE, tokenizer)
    features, _, _ = build_training_features(tokenizer, fmt, TEXT, "they talk about the party", None, None)
    prompt, _ = encode_prompt(tokenizer, fmt, TEXT, None)
    labels = features["labels"]
    assert features["input_ids"][: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    response = features["input_ids"][len(prompt):]
    assert labels[len(prompt):] == response
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response, skip_special_tokens=True) == "they talk about the party"


def test_causal_prompt_uses_chat_template(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = PromptFormat.for_tokenizer("causal", TEMPLATE, tokenizer)
    assert fmt.use_chat_template
    prompt, _ = encode_prompt(tokenizer, fmt, TEXT, None)
    text = tokenizer.decode(prompt)
    assert text.startswith("<|user|>")
    assert text.endswith("<|assistant|>")


def test_causal_without_chat_template(tiny_llama_plain_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_dir)
    fmt = PromptFormat.for_tokenizer("causal", TEMPLATE, tokenizer)
    assert not fmt.use_chat_template
    prompt, _ = encode_prompt(tokenizer, fmt, TEXT, None)
    assert prompt[0] == tokenizer.bos_token_id


def test_seq2seq_labels_are_summary_ids(tiny_t5_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    fmt = PromptFormat.for_tokenizer("seq2seq", TEMPLATE, tokenizer)
    features, _, _ = build_training_features(tokenizer, fmt, TEXT, "anna asks", None, None)
    assert features["labels"] == tokenizer(text_target="anna asks")["input_ids"]
    assert features["labels"][-1] == tokenizer.eos_token_id
    assert features["input_ids"][-1] == tokenizer.eos_token_id
    assert IGNORE_INDEX not in features["labels"]


def test_truncation_cuts_text_not_template(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = PromptFormat.for_tokenizer("causal", TEMPLATE, tokenizer)
    long_text = " ".join(["party"] * 100)
    prompt, cut = encode_prompt(tokenizer, fmt, long_text, 20)
    assert cut
    assert len(prompt) <= 20
    assert tokenizer.decode(prompt).endswith("<|assistant|>")
    _, cut_short = encode_prompt(tokenizer, fmt, TEXT, 200)
    assert not cut_short


def test_target_truncation_keeps_eos(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = PromptFormat.for_tokenizer("causal", TEMPLATE, tokenizer)
    features, _, target_cut = build_training_features(tokenizer, fmt, TEXT, " ".join(["party"] * 30), None, 5)
    assert target_cut
    labels = [t for t in features["labels"] if t != IGNORE_INDEX]
    assert len(labels) == 5
    assert labels[-1] == tokenizer.eos_token_id


def test_length_stats_and_percentiles():
    lengths = list(range(1, 101))
    stats = length_stats(lengths)
    assert stats == {"count": 100, "mean": 50.5, "p50": 51, "p90": 91, "p95": 96, "max": 100}
    assert percentile_length(lengths, 85) == 86


def test_max_lengths_prefer_fixed_values_and_model_limit():
    assert choose_max_lengths([10, 20, 30], [5, 6, 7], 90, 90, None, None, None) == (30, 7)
    assert choose_max_lengths([10, 20, 30], [5, 6, 7], 90, 90, 12, 4, None) == (12, 4)
    assert choose_max_lengths([10, 2000], [5], 100, 100, None, None, 512) == (512, 5)
