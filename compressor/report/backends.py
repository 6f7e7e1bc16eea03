"""One interface over the things a report measures: a PyTorch model or an ONNX folder.

A backend takes a tokenized batch and returns the model's main output (token states for an
encoder, logits for a classifier or a causal LM), so that latency, the task metric and fidelity
are measured the same way for every row.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CompressError, first_line


class Backend:
    """A model under measurement.

    Attributes:
        label: Its row name in the report.
        kind: ``PyTorch fp32``, ``ONNX fp32``, ``ONNX int8``...
        path: Where it lives.
        tokenizer: Its tokenizer (a vocabulary-pruned model has its own).
        task: ``feature-extraction``, ``text-classification`` or ``text-generation``.
        pooling: How sentence embeddings are made from token states.
        size_bytes: Bytes on disk of the weights (the ONNX file; the unique parameters in PyTorch).
        parameters: Unique parameters (numbers stored in the ONNX file).
    """

    label: str
    kind: str
    path: str
    tokenizer = None
    task: str = "feature-extraction"
    pooling: str = "mean"
    size_bytes: int = 0
    parameters: int = 0
    id2label: dict | None = None

    def __call__(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def generator(self):  # pragma: no cover - interface
        """An object with transformers' ``generate`` (causal LMs only)."""
        raise NotImplementedError


class TorchBackend(Backend):
    """A `LoadedModel` in PyTorch fp32 on the CPU."""

    def __init__(self, loaded, label: str):
        from ..models import unique_parameters
        from ..models.heads import pick_task

        self.loaded, self.label, self.kind, self.path = loaded, label, "PyTorch fp32", loaded.source
        self.model = loaded.model.float().eval()
        self.tokenizer, self.pooling = loaded.tokenizer, loaded.pooling
        self.task = pick_task(loaded, "auto")
        self.parameters, self.size_bytes = unique_parameters(self.model)
        self.id2label = getattr(self.model.config, "id2label", None)
        if self.task == "feature-extraction":
            self.model = loaded.adapter.base(self.model)
        self._accepts_token_types = "token_type_ids" in self.model.forward.__code__.co_varnames

    @torch.inference_mode()
    def __call__(self, enc):
        kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self._accepts_token_types and "token_type_ids" in enc:
            kw["token_type_ids"] = enc["token_type_ids"]
        out = self.model(**kw)
        return out.last_hidden_state if self.task == "feature-extraction" else out.logits

    def generator(self):
        return self.model


class OnnxBackend(Backend):
    """An export folder (model.onnx + config.json + tokenizer) in an onnxruntime CPU session."""

    def __init__(self, folder: str | Path, label: str, *, threads: int, pooling: str = "mean"):
        import onnx
        import onnxruntime as ort
        from transformers import AutoConfig

        from ..models.loading import load_tokenizer
        from ..onnx.graph import stored_elements

        folder = Path(folder)
        file = folder / "model.onnx"
        if not file.is_file():
            raise CompressError(f"{folder} holds no model.onnx; give an export folder (compress export) or a model folder")
        self.label, self.path, self.pooling = label, str(folder), pooling
        self.size_bytes = file.stat().st_size
        options = session_options(threads)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            graph = onnx.load(str(file), load_external_data=False)
            self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # protobuf's DecodeError, onnxruntime's Fail / InvalidGraph, ...
            first = first_line(e)
            raise CompressError(f"{file} is not an ONNX model onnxruntime can load: {first}") from None
        self.parameters = stored_elements(graph)
        self.kind = "ONNX " + _precision(graph)
        from ..onnx.graph import graph_inputs

        self.inputs = graph_inputs(graph)
        self.with_past = takes_past(self.inputs)
        self._threads, self._generator = threads, None
        self.output = self.session.get_outputs()[0].name
        self.task = {"last_hidden_state": "feature-extraction"}.get(self.output, "text-generation")
        config = AutoConfig.from_pretrained(folder)
        if self.output == "logits" and any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            self.task = "text-classification"
        self.id2label = getattr(config, "id2label", None)
        # optimum's own export keeps the hub tokenizer as it is: no pad token for a decoder
        self.tokenizer = load_tokenizer(str(folder))
        report = folder / "export_report.json"
        if report.is_file():  # our own exports say what they are
            self.kind = "ONNX " + json.loads(report.read_text())["metrics"]["precision"]
        if self.with_past:
            self.kind += " + KV cache"

    def __call__(self, enc):
        from ..onnx.graph import onnx_feed

        feed = onnx_feed({k: v.numpy() for k, v in enc.items()}, self.inputs)
        return torch.from_numpy(self.session.run([self.output], feed)[0])

    def generator(self):
        """optimum's ``ORTModelForCausalLM`` on the folder, as a user generates with it (a second
        session: optimum binds its own)."""
        if self._generator is None:
            self._generator = load_generator(self.path, self._threads, with_past=self.with_past)
        return self._generator


class GenaiBackend(Backend):
    """A folder in onnxruntime-genai's layout (``genai_config.json``: compress's ``--layout
    genai`` exports, onnxruntime-genai's own builder output), run by ``onnxruntime_genai``, the
    runtime it is made for, with ``threads`` intra-op threads."""

    def __init__(self, folder: str | Path, label: str, *, threads: int):
        import onnx

        from ..export.genai import genai_runtime
        from ..models.loading import load_tokenizer
        from ..onnx.graph import stored_elements

        og = genai_runtime()
        folder = Path(folder)
        config = json.loads((folder / "genai_config.json").read_text())
        file = folder / config["model"]["decoder"]["filename"]
        self.label, self.path, self.task = label, str(folder), "text-generation"
        self.size_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(file.name))
        graph = onnx.load(str(file), load_external_data=False)
        self.parameters = stored_elements(graph)
        self.kind = f"ONNX {_precision(graph)} (onnxruntime-genai)"
        del graph
        try:
            settings = og.Config(str(folder))
            settings.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
            self.model = og.Model(settings)
        except Exception as e:  # noqa: BLE001  (the runtime's own RuntimeError)
            raise CompressError(f"onnxruntime_genai cannot load {folder}: {first_line(e)}") from None
        self.og = og
        self.tokenizer = load_tokenizer(str(folder))

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def __call__(self, enc):
        """Logits per row, each row's real tokens run alone (the runtime batches by its own
        rules); padded positions are zeros."""
        import numpy as np

        ids, mask = enc["input_ids"], enc["attention_mask"]
        rows = []
        for row, keep in zip(ids, mask.bool()):
            real = row[keep]
            gen = self._generator(len(real) + 1)
            gen.append_tokens(real.numpy().astype(np.int32)[None])
            rows.append((keep, torch.from_numpy(np.asarray(gen.get_output("logits"), dtype=np.float32)[0])))
        out = torch.zeros(*ids.shape, rows[0][1].shape[-1])
        for i, (keep, logits) in enumerate(rows):
            out[i, keep] = logits
        return out

    def generator(self):
        return _GenaiGenerate(self)


class _GenaiGenerate:
    """transformers' ``generate`` (greedy, batch 1) over an onnxruntime-genai model, so that the
    report times every layout alike: the prefill, then one step per token, in the runtime's loop."""

    def __init__(self, backend: GenaiBackend):
        self.backend = backend

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 1, min_new_tokens: int = 0,
                 do_sample: bool = False, pad_token_id=None, logits_processor=()):
        import numpy as np

        gen = self.backend._generator(input_ids.shape[1] + max_new_tokens)
        gen.append_tokens(input_ids.numpy().astype(np.int32))  # the prefill
        for processor in logits_processor:  # only observers (`progress.TokenTicks`): the prefill's logits are there
            processor(input_ids, None)
        new = []
        while len(new) < max_new_tokens:
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)


def load_backend(path: str | Path, label: str, *, threads: int, pooling: str = "mean") -> Backend:
    """The backend a folder is measured with: onnxruntime-genai for its layout, an onnxruntime
    session for another export, PyTorch for a model folder."""
    if Path(path, "genai_config.json").is_file():
        return GenaiBackend(path, label, threads=threads)
    if Path(path, "model.onnx").is_file():
        return OnnxBackend(path, label, threads=threads, pooling=pooling)
    from ..models import load_model

    return TorchBackend(load_model(path), label)


def session_options(threads: int):
    """onnxruntime session options with ``threads`` intra-op threads, as every row runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options


def takes_past(inputs) -> bool:
    """Whether a graph with these input names takes past key values (optimum's with-past layout)."""
    return any(name.startswith("past_key_values.") for name in inputs)


def load_generator(folder: str | Path, threads: int, *, with_past: bool | None = None):
    """optimum's ``ORTModelForCausalLM`` on an export folder, with or without its KV cache as the
    graph has it (read from the graph when ``with_past`` is not given)."""
    from ..export.optimum import load_ort

    if with_past is None:
        import onnx

        from ..onnx.graph import graph_inputs

        with_past = takes_past(graph_inputs(onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)))
    return load_ort(folder, "text-generation-with-past" if with_past else "text-generation",
                    session_options=session_options(threads))


def _precision(graph) -> str:
    ops = {n.op_type for n in graph.graph.node}
    if "MatMulNBits" in ops:
        return "int4"
    if ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "DequantizeLinear"}:
        return "int8"
    if any(t.data_type == 10 for t in graph.graph.initializer):  # FLOAT16
        return "fp16"
    return "fp32"
