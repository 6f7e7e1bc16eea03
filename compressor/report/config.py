"""Options of the size / speed / accuracy report."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_int, check_positive
from ..errors import ConfigError
from ..evaluation.suite import SuiteConfig


@dataclass
class ReportConfig(SuiteConfig):
    """How the report measures. With ``suite``, every row of an encoder's report is also scored
    on the quality suite of ``compress evaluate --suite`` (its options are the suite's).

    Attributes:
        threads: Intra-op threads for every row (PyTorch and onnxruntime alike; the PyTorch work
            of an ONNX row's generate loop runs on one thread).
        batch_sizes: Batch sizes latency is measured at.
        seq_len: Tokens per sequence in the latency runs (texts truncated or padded to it).
        warmup: Untimed runs per row and batch size before the timed ones.
        repeats: Timed runs per row and batch size; rows take turns run by run, so that a
            noisy neighbour slows them all alike. A run lasts at least 50 ms (a fast call is
            repeated within it, the run timing their mean). Latencies are medians (p50) and p90s.
        baselines: Add the original as plain ONNX fp32 and int8, made the way optimum makes them
            (``main_export``, then ``ORTQuantizer`` with ``AutoQuantizationConfig.<cpu>(is_static=False)``),
            and for encoders optimum's strongest route as well: ``ORTOptimizer`` level 2 (O2), in
            fp32 and then dynamic int8.
        fp32_baselines: With ``baselines``, an encoder's or classifier's report keeps optimum's
            fp32 exports as rows too (the int8 routes are built from them either way); they
            score what the original scores (fp32 ONNX computes what PyTorch computes), so
            leaving them out spends the report's time on the rows that differ. A causal LM's
            fp32 export stays a row: its decode and size targets are set against it.
        data: Labelled data for the task metric (as ``compress evaluate --data``).
        train_size: Probe training examples.
        test_size: Test examples for the task metric.
        fidelity_size: Test texts fidelity to the original is measured on.
        max_length: Tokens per text for the task metric and fidelity.
        batch_size: Texts per forward pass for the task metric.
        prompt_tokens: Causal LMs: prompt length of the generation runs (batch 1, greedy).
        new_tokens: Causal LMs: tokens generated per run; decode tokens/s is measured on all
            but the first.
        generation_repeats: Causal LMs: timed generation runs per row, rows taking turns (medians).
        peak_memory: Causal LMs: measure each row's peak memory in a fresh process (a few
            seconds per row).
        genai_builder: Causal LMs, with ``baselines``: the Python that runs onnxruntime-genai's
            model builder (``python -m onnxruntime_genai.models.builder -p int4 -e cpu``, its
            defaults) on the original, whose int4 build becomes the row ``onnxruntime-genai
            builder int4``: the route a user deploying with onnxruntime-genai takes without
            compress. Default: this Python, where the builder imports (onnxruntime-genai 0.18's
            needs a transformers newer than optimum-onnx 0.1 allows, so it often runs from an
            environment of its own); the report says why when the row is left out.
        suite: Encoders: score every row on the quality suite (several real tasks and neighbour
            agreement with the original; a few minutes per row at the default sizes).
    """

    threads: int = 2
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    seq_len: int = 128
    warmup: int = 3
    repeats: int = 10
    baselines: bool = True
    fp32_baselines: bool = True
    data: str = "movie-snippets"
    train_size: int = 4000
    test_size: int = 2000
    fidelity_size: int = 500
    max_length: int = 64
    batch_size: int = 64
    prompt_tokens: int = 128
    new_tokens: int = 64
    generation_repeats: int = 3
    peak_memory: bool = True
    genai_builder: str | None = None
    suite: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("threads", "seq_len", "repeats", "train_size", "test_size", "fidelity_size", "max_length",
                     "batch_size", "prompt_tokens", "new_tokens", "generation_repeats"):
            check_positive(name, getattr(self, name))
        check_int("warmup", self.warmup, 0)
        if isinstance(self.batch_sizes, (str, bytes)) or not self.batch_sizes:
            raise ConfigError("--batch-sizes must list at least one batch size", option="batch_sizes")
        self.batch_sizes = list(self.batch_sizes)
        for b in self.batch_sizes:
            check_int("batch_sizes", b, 1)
