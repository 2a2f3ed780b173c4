"""The ONNX frontend: export a model folder to ONNX, rewrite contrib and quantized ops,
normalize, import to Relax.

Encoders come through here; decoders have their own frontend (``compiler/decoder``), which keeps
an ONNX export of the model as the parity reference and fallback.
"""
