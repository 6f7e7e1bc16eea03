"""The integer grids weights are rounded onto, in PyTorch and numpy: int4 blocks along a
projection's input (round-to-nearest and GPTQ, `gptq`), int8 channels and training on those
roundings (`aware`), and symmetric blocks along a table's rows (`rows`).

Part of the core: the quantization stage stores these roundings in an ONNX graph, and the
fine-tuning stage trains on them (``--quantize-aware``, ``--int8-aware``, ``--embedding-bits``)
without either importing the other.
"""
