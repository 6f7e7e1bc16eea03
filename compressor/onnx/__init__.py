"""ONNX graph passes and the helpers they share: the one home of every rewrite of an exported
graph.

A pass has one signature: it takes an in-memory ``onnx.ModelProto`` and returns
``(model, record)``, the rewritten model (the same object, changed in place, unless a pass says
otherwise) and a small dict or number that says what changed. Passes never read or write files:
the export loads the graph once, runs its passes and quantization, and writes the file once.

* `graph`: helpers (initializers, readers, scopes, stored numbers, feeds) and the storage passes
  (`graph.inline_identity_weights`, `graph.gemm_to_matmul`, `graph.merge_identical_initializers`);
* `tied_head`: an LM head tied to the input embeddings stored once;
* `tables`: embedding tables and output heads as weight-only blocks;
* `per_token`: int8 projection inputs rounded with a range per token;
* `zero_points`: HQQ's float zero points carried beside symmetric blocks;
* `attention`, `optimize`: onnxruntime's encoder fusions and our decoder ones.
"""
