"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): the Llama block with q/k/v biases."""
