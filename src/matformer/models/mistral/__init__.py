"""Mistral (`MistralForCausalLM`): the Llama block with a sliding attention window."""
