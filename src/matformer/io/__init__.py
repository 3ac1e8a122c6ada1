"""Checkpoint I/O: safetensors files (`safetensors`), which files make a checkpoint (`layout`),
the Hub (`hub`), and the public load/save API (`checkpoint`). See docs/FORMAT.md."""
