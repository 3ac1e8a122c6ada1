"""Checkpoint I/O. `source`: what a SRC argument means (folder, .safetensors file, Hub id,
multi-tier repo + tier), the one resolver every verb and loader uses; `checkpoint`: the public
load/save API; `layout`: which files make a checkpoint; `safetensors`: the strict reader and the
streaming writer; `reader`: positional reads of tensor prefixes (slicing); `manifest`: multi-tier
repos; `hub`: the one Hub download helper; `atomic`: the one atomic file write. Torch is imported
only inside the functions that build tensors. See docs/FORMAT.md."""
