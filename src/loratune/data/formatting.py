"""Turn examples into token ids for training and generation.

Both model families share one prompt template (``data.prompt``):

- seq2seq: the encoder reads the filled template; the decoder labels are the summary ids.
- causal: the filled template is wrapped in the tokenizer's chat template when it has one,
  the summary and the end-of-sequence token follow, and only the summary positions carry
  labels. Prompt positions get ``IGNORE_INDEX`` so they add nothing to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptFormat:
    """How inputs are turned into model prompts; saved with every run."""

    family: str
    template: str
    use_chat_template: bool

    @classmethod
    def for_tokenizer(cls, family: str, template: str, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        chat = family == "causal" and bool(getattr(tokenizer, "chat_template", None))
        return cls(family, template, chat)

    def to_dict(self) -> dict:
        return {"family": self.family, "template": self.template, "use_chat_template": self.use_chat_template}


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, text: str) -> list[int]:
    filled = fmt.template.replace("{text}", text)
    if fmt.family == "seq2seq":
        return tokenizer(filled)["input_ids"]
    if fmt.use_chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": filled}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; older releases return a list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ids = tokenizer(filled + "\n")["input_ids"]
    return list(ids)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, text: str, max_length: int | None
) -> tuple[list[int], bool]:
    """Return the prompt ids for ``text`` and whether the input text had to be cut.

    Only the input text is shortened, never the template, so the instruction and the
    assistant turn marker stay intact.
    """
    ids = _prompt_ids(tokenizer, fmt, text)
    if max_length is None or len(ids) <= max_length:
        return ids, False
    overhead = len(_prompt_ids(tokenizer, fmt, ""))
    budget = max(max_length - overhead, 1)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
    shortened = tokenizer.decode(text_ids, skip_special_tokens=True)
    ids = _prompt_ids(tokenizer, fmt, shortened)
    # Re-tokenising decoded text can add a token or two; cut the front text further if so.
    while len(ids) > max_length and budget > 1:
        budget -= max(1, len(ids) - max_length)
        shortened = tokenizer.decode(text_ids[:budget], skip_special_tokens=True)
        ids = _prompt_ids(tokenizer, fmt, shortened)
    return ids, True


def encode_target(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, summary: str, max_length: int | None) -> tuple[list[int], bool]:
    """Return the label ids for ``summary`` (ending with EOS) and whether it was cut."""
    if fmt.family == "seq2seq":
        ids = tokenizer(text_target=summary)["input_ids"]
    else:
        ids = tokenizer(summary, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_length is not None and len(ids) > max_length:
        # Keep the final EOS so the model still learns to stop.
        return ids[: max_length - 1] + [ids[-1]], True
    return ids, False


def build_training_features(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    text: str,
    summary: str,
    max_source_length: int | None,
    max_target_length: int | None,
) -> tuple[dict, bool, bool]:
    """Tokenize one example for training; return the features and the two truncation flags."""
    prompt, source_cut = encode_prompt(tokenizer, fmt, text, max_source_length)
    target, target_cut = encode_target(tokenizer, fmt, summary, max_target_length)
    if fmt.family == "seq2seq":
        features = {"input_ids": prompt, "labels": target, "length": len(prompt)}
    else:
        features = {
            "input_ids": prompt + target,
            "labels": [IGNORE_INDEX] * len(prompt) + target,
            "length": len(prompt) + len(target),
        }
    return features, source_cut, target_cut
