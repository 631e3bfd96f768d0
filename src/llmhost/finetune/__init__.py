"""LoRA fine-tuning on the user's JSONL data: preflight, training with checkpoints and resume,
and the result registered in the store as a model (base reference + adapter)."""
