"""models/gemma3: Gemma 3 text (`Gemma3ForCausalLM`), nested on FFN neurons and KV groups."""
