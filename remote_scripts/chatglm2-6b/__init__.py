"""Model, config and tokenizer code for chatglm2-6b; copy this folder's .py files next to the official weights."""
