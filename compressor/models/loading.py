"""Load the model the user named (resolved by `compressor.hub`) with its tokenizer and its
architecture adapter, proven on the loaded weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..adapters import declared_adapter
from ..errors import ConfigError, ModelLoadError, UnsupportedModelError, first_line
from ..hub import BUNDLED_ALIAS, BUNDLED_NAME, bundled_model_dir, cached_or_reachable, resolve, st_modules
from ..io import quiet
from .loaded import LoadedModel, fit_tokenizer, load_config, load_tokenizer
from .memory import check_fits, weights_numel

#: Top-level modules that may be missing from a checkpoint (task heads, BERT's pooler).
_HEAD_PREFIXES = {"pooler", "classifier", "score", "lm_head", "pre_classifier", "qa_outputs"}

def _sentence_head(folder: Path) -> tuple[str | None, bool]:
    """The pooling a sentence-transformers folder declares (else ``None``) and whether its
    pipeline ends in a Normalize module."""
    for root in (folder, folder.parent):
        modules = root / "modules.json"
        if not modules.is_file():
            continue
        entries = st_modules(modules)
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling"):
                return _pooling_mode(root / entry.get("path", "") / "config.json"), normalize
        return None, normalize
    return None, False


def _pooling_mode(cfg_file: Path) -> str:
    if not cfg_file.is_file():
        return "mean"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file} is not a pooling config")
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    return "mean"


def _model_class(config):
    """The Auto class matching the checkpoint's task head, so the head is kept."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return transformers.AutoModelForSequenceClassification
        if arch.endswith(("LMHeadModel", "ForCausalLM")):
            return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def as_loaded(model: LoadedModel | str | os.PathLike | None, **kwargs: Any) -> LoadedModel:
    """``model`` itself when it is already loaded, else `load_model` of it (with ``kwargs``):
    a stage's runner takes a model or where to find one."""
    return model if isinstance(model, LoadedModel) else load_model(model, **kwargs)


def _is_bundled(location: str) -> bool:
    try:
        return Path(location).resolve() == bundled_model_dir().resolve()
    except ModelLoadError:  # the bundled package is not installed
        return False


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    trust_remote_code: bool = False,
    dtype: Any = None,
    infer_adapter: bool = False,
) -> LoadedModel:
    """Load a model for compression.

    Args:
        spec: A local folder (a Hugging Face model, a sentence-transformers model, or a
            compressed checkpoint written by `compress`), a hub id, an alias from ``ALIASES``,
            or ``None`` for the bundled all-MiniLM-L6-v2.
        trust_remote_code: Allow a checkpoint's own Python code to run (off by default).
        dtype: torch dtype (or its name) to load in; ``"auto"``: the checkpoint's own
            (``torch_dtype`` in its config; float32 when it names none); ``None``: float32.
        infer_adapter: Infer the adapter from the model's structure even where one is declared.

    Returns:
        The model in eval mode with its tokenizer and architecture adapter.

    Raises:
        ModelLoadError: missing folder, not a model, unreadable weights, or no network for a hub id.
        UnsupportedModelError: no adapter could be inferred for an undeclared architecture, or
            the adapter failed its mapping self-check on the loaded weights.
    """
    location, local = resolve(spec)
    if spec is not None and (str(spec) == BUNDLED_ALIAS or (local and _is_bundled(location))):
        spec = None  # the bundled model by its folder (a checkpoint's origin): named as the bundled model
    shown = str(spec) if spec is not None else BUNDLED_NAME
    if local:
        from .checkpoint import is_checkpoint, load_checkpoint

        if is_checkpoint(location):  # a compressed checkpoint written by `compress`
            return load_checkpoint(location, name=str(spec).rstrip("/"))
    if not local:
        location = cached_or_reachable(location)
    config = load_config(location, shown, trust_remote_code)
    _check_architecture(config, shown)  # fail before reading weights

    dtype = _dtype(dtype, config)
    if local:  # before reading any weights: a missing shard, or a model this machine cannot hold
        check_fits(weights_numel(Path(location), shown), dtype, _dtype("auto", config), shown)
    model = _load_weights(location, config, shown, trust_remote_code=trust_remote_code, dtype=dtype)
    model.eval()
    adapter, checks = prove_adapter(model, infer=infer_adapter)

    tokenizer = fit_tokenizer(load_tokenizer(location, trust_remote_code), adapter, model.config)
    declared, normalize = _sentence_head(Path(location)) if local else (None, False)
    # without a sentence-transformers pooling config: mean for encoders, last token for decoders
    pooling = declared or ("last" if adapter.is_decoder else "mean")
    name = BUNDLED_NAME if spec is None else (location if not local else str(spec).rstrip("/"))
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=location, name=name, pooling=pooling,
                       normalize=normalize, checks=checks)


#: The dtypes a model is read in, by name (`load_model`'s ``dtype``).
DTYPES = ("float32", "bfloat16", "float16")


def _dtype(dtype: Any, config):
    """``dtype`` as a torch dtype: ``"auto"`` is the checkpoint's own as its config names it."""
    import torch

    if dtype == "auto":
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        named = str(named).removeprefix("torch.") if named is not None else "float32"
        return getattr(torch, named) if named in DTYPES else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}", option="dtype")
        return getattr(torch, dtype)
    return dtype


def _load_weights(location: str, config, shown: str, *, trust_remote_code: bool, dtype):
    """The model with its weights; a weight the config needs and the folder lacks is an error,
    not a random tensor."""
    cls = _model_class(config)
    try:
        # transformers' own "newly initialized" warnings would come before our one line: the
        # missing weights are judged below
        with quiet("transformers"):
            model, info = cls.from_pretrained(
                location,
                config=config,
                trust_remote_code=trust_remote_code,
                dtype=dtype,
                use_safetensors=None,  # prefer model.safetensors, accept pytorch_model.bin
                output_loading_info=True,
            )
    except Exception as e:  # noqa: BLE001  (OSError, SafetensorError, RuntimeError...: all mean unreadable)
        raise ModelLoadError(f"could not load the weights of {shown}: {first_line(e)}") from None
    # transformers fills missing weights with random values and only warns; analysing or
    # compressing those would be silently wrong. Only a task head may be new (e.g. a pooler).
    missing = [k for k in info.get("missing_keys", []) if not _HEAD_PREFIXES & set(k.split(".")[:2])]
    if missing:
        raise ModelLoadError(
            f"the weights of {shown} do not match its config: {len(missing)} tensors missing "
            f"(e.g. {missing[0]}); is config.json from another model?"
        )
    return model


def _check_architecture(config, shown: str) -> None:
    """Refuse what no adapter can describe before reading any weights: a model without
    Transformer blocks, or an encoder-decoder (the toolkit compresses one stack of blocks)."""
    if declared_adapter(config) is not None:
        return
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{shown}: {config.model_type} is an encoder-decoder model; compress handles "
                                    "encoder-only and decoder-only Transformers")
    if not isinstance(getattr(config, "vocab_size", None), int):
        raise UnsupportedModelError(f"{shown}: {config.model_type} has no token vocabulary (vocab_size); compress "
                                    "handles text Transformers")
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise UnsupportedModelError(f"{shown}: {config.model_type} has no Transformer block list "
                                    "(its config names no num_hidden_layers)")


def prove_adapter(model, *, infer: bool = False):
    """The model's adapter (declared or inferred) after its self-checks, and the checks.

    Raises:
        UnsupportedModelError: no adapter could be inferred, or the mapping check failed.
    """
    from ..adapters import adapter_for
    from ..adapters.checks import prove

    return prove(model, adapter_for(model, infer=infer))
