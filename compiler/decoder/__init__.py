"""The decoder frontend: a causal LM's own definition, as `relax.frontend.nn` modules.

`config` reads and refuses, `llama` / `gpt2` define the families, `entry` the functions a
compiled decoder exports and its paged KV cache, `weights` maps checkpoint tensors onto the
definitions, `sources` turns a LoRA adapter or a GGUF file into an HF folder, `lower` exports the
definition to Relax and compiles it.
"""
