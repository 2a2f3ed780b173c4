"""Hand-written kernels and rule-based schedules: CPU GEMMs (fp32, int8, bf16), attention, the
rules for the kernels around them, weight packing, bounds-safe `take`, and CUDA's DLight build.

The stages (quantize, build) pick these by target profile; nothing here imports a stage.
"""
