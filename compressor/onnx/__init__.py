"""ONNX graph passes and the helpers they share: the one home of every rewrite of an exported
graph (`tests/test_layout.py` fails on one anywhere else).

A pass has one signature: an in-memory ``onnx.ModelProto`` in, ``(model, record)`` out: the
rewritten model (the same object, changed in place, unless the pass builds a new one) and a small
number or dict that says what changed. The export loads the traced graph once, runs its passes
and the quantization method's handler, and writes the file once; only onnxruntime's optimizers,
which read files, see one (written in a scratch folder of the export's).

* `graph`: helpers (initializers, readers, scopes, stored numbers, feeds) and the storage passes
  `inline_identity_weights`, `gemm_to_matmul`, `merge_identical_initializers`;
* `tied_head`: an LM head tied to the input embeddings stored once;
* `tables`: embedding tables and output heads as weight-only blocks;
* `per_token`: int8 projection inputs rounded with a range per token;
* `zero_points`: HQQ's float zero points carried beside symmetric blocks;
* `nbits`: MatMulNBits' accuracy level, blocks fitted elsewhere put in place;
* `optimize`, `attention`: onnxruntime's fusions, and ours for decoder attention.
"""
