"""Options of the ONNX export stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import StageConfig, TextFormat, check_choice, check_int, check_positive, choice
from ..errors import ConfigError

#: Tasks an export can target, each with the optimum class that loads it (`ORT_CLASSES`).
#: Folder layouts: optimum's (``ORTModelFor*``) and onnxruntime-genai's (decoders), or ``auto``.
LAYOUTS = ("auto", "genai", "optimum")
TASKS = ("auto", "feature-extraction", "text-classification", "text-generation", "text-generation-with-past")
ORT_CLASSES = {
    "feature-extraction": "ORTModelForFeatureExtraction",
    "text-classification": "ORTModelForSequenceClassification",
    "text-generation": "ORTModelForCausalLM",
    "text-generation-with-past": "ORTModelForCausalLM",
}


@dataclass
class ExportConfig(TextFormat, StageConfig):
    """How to export to ONNX and how hard to check the result.

    Attributes:
        layout: The folder's layout. ``optimum``: the graph optimum's exporter traces, loaded by
            optimum's ``ORTModelFor*`` classes. ``genai`` (decoders): a graph written from the
            adapter in onnxruntime-genai's format (fused grouped-query attention with its cache,
            int4 ``MatMulNBits``, fused norms; ``genai_config.json``), loaded by
            ``onnxruntime_genai.Model``; fp32 or int4. ``auto`` (the default): ``genai`` for a
            decoder exported with its cache (no ``--task``, ``--optimize``, or a method other
            than int4) that the genai layout can express (the faster route on CPUs; figures in
            docs/export.md); ``optimum`` otherwise, the record saying why.
        task: What the ONNX model computes; ``auto``: ``text-generation-with-past`` for causal LMs,
            ``text-classification`` for models with a classification head, else
            ``feature-extraction`` (token states; pooling is left to the caller, as optimum does).
            A decoder ``text-generation-with-past`` has its KV cache as inputs and outputs, in
            optimum's layout, so ``ORTModelForCausalLM.from_pretrained(folder).generate()``
            works as it is; ``text-generation`` exports it without one (each new token then
            re-reads the whole prefix; load with ``use_cache=False``).
        generation_check: New tokens of the greedy decoding an fp32 export is checked on, token
            for token against PyTorch's (decoders with a KV cache: the prefill and the cached
            decode steps; a quantized export gets one prefill and one cached step, in the genai
            layout the prefill and three cached steps at each check length).
        opset: ONNX opset.
        atol: An fp32 export fails if any output differs from PyTorch's by more than
            ``atol + rtol * |PyTorch's|``.
        rtol: See ``atol``.
        check_data: Real text the export is checked on (default: the built-in sentences).
        check_lengths: Token lengths checked; each batch mixes that length with shorter,
            padded texts. Lengths past the model's maximum are capped to it.
        pooling_in_graph: Encoders: the graph also outputs ``sentence_embedding`` (the model's
            pooling, then its normalization, inside the graph), for onnxruntime in C#, Java or
            JavaScript with no pooling code of their own; checked with a plain
            ``onnxruntime.InferenceSession``.
        optimize: onnxruntime's transformer graph optimizations. Encoders, as optimum's
            ``ORTOptimizer`` applies them: 0 none, 1 basic, 2 also attention, LayerNorm and GELU
            fusion (optimum's O2). Decoders (onnxruntime's own optimizer; optimum's takes no
            Llama-style model): 1 RMSNorm (with the residual add) or LayerNorm fusion, 2 also
            rotary embeddings and each layer's attention as ``GroupQueryAttention`` in optimum's
            cache layout. A quantization method then quantizes the fused graph where it can take
            it (an export refuses the others and names those that can). Shared weights stay stored
            once (the fusions' copies are merged); the export is checked on the optimized graph.
    """

    task: str = choice("auto", TASKS)
    layout: str = choice("auto", LAYOUTS)
    opset: int = 17
    atol: float = 1e-4
    rtol: float = 1e-3
    check_data: str | None = None
    check_lengths: list[int] = field(default_factory=lambda: [8, 32, 128])
    generation_check: int = 32
    pooling_in_graph: bool = False
    optimize: int = 0

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        check_choice("layout", self.layout, LAYOUTS)
        check_int("opset", self.opset, 14)
        check_int("generation_check", self.generation_check, 0)
        check_int("optimize", self.optimize, 0)
        if self.optimize > 2:
            raise ConfigError(f"--optimize {self.optimize}: the levels are 0, 1 and 2", option="optimize")
        for name in ("atol", "rtol"):
            check_positive(name, getattr(self, name))
        if isinstance(self.check_lengths, (str, bytes)) or not self.check_lengths:
            raise ConfigError("--check-lengths must be a list of token lengths", option="check_lengths")
        self.check_lengths = list(self.check_lengths)
        for length in self.check_lengths:
            check_int("check_lengths", length, 2)
