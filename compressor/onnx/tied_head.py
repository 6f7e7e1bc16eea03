"""An LM head tied to the input embeddings, stored once.

The exporter writes the tied matrix twice, once for the lookup (``Gather``) and once transposed
for the head (``MatMul``); as optimum's own post-processing does, the head then reads a
``Transpose`` of the lookup's table, which onnxruntime folds when it loads the file. For graphs
whose weights stay float (fp32, fp16): a quantizer would keep a float copy for the Transpose, and
int4 stores the pair once as blocks of its own (`tables`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def store_tied_once(model: onnx.ModelProto, table: np.ndarray) -> tuple[onnx.ModelProto, bool]:
    """The head MatMuls whose weight is ``table`` transposed read a ``Transpose`` of the lookup's
    ``table`` instead, and the transposed copy is dropped.

    Args:
        model: The exported graph.
        table: The tied matrix as the model holds it (vocabulary x hidden).

    Returns:
        The model and whether a lookup and a head of that table were found and tied.
    """
    inits = {t.name: t for t in model.graph.initializer}
    lookup = next((n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and tuple(inits[n.input[0]].dims) == table.shape), None)
    heads = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and tuple(inits[n.input[1]].dims) == table.shape[::-1]]
    heads = [n for n in heads if np.array_equal(numpy_helper.to_array(inits[n.input[1]]), table.T)]
    if lookup is None or not heads:
        return model, False
    transposed = f"{lookup}_transposed"
    model.graph.node.insert(0, helper.make_node("Transpose", [lookup], [transposed], name="/tied_head/Transpose",
                                                perm=[1, 0]))
    duplicates = {n.input[1] for n in heads}
    for node in heads:
        node.input[1] = transposed
    if not any(i in duplicates for n in model.graph.node for i in n.input):
        keep = [t for t in model.graph.initializer if t.name not in duplicates]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model, True
