"""loratune: LoRA fine-tuning for seq2seq and causal language models, with offline ROUGE."""

__version__ = "0.1.0"
