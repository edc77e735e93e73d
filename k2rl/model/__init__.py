"""The K2 model family: presets, tokenizer and chat format, trainer model, checkpoints."""
