"""Qwen3 (`Qwen3ForCausalLM`): the Llama block with per-head q/k norms."""
