"""distill: knowledge distillation for OpenAI's Parameter Golf.

Bottom layer (imports nothing of ours): errors, fsutil, shards, tokenizer, cache, quant, losses.
Stages: teachers/ (offline scoring), student/ (training). Top: artifact, score, demo, bench, cli.
"""

__version__ = "0.1.0"
