"""The compressed checkpoint: a folder that keeps shared weights shared.

Layout::

    config.json          the model's Hugging Face config, unchanged
    compress.json        the manifest: format version, model class, pooling, sharing plan,
                         shared modules, LoRA rank and init
    model.safetensors    every tensor once (safetensors' ``save_model`` drops the aliases of a
                         shared tensor; Hugging Face ``save_pretrained`` refuses them)
    tokenizer files      as ``save_pretrained`` writes them

`load_checkpoint` rebuilds the model from the config, re-creates the sharing (the same
Parameter object in every member), and loads the weights; `compressor.models.load_model`
calls it for any folder with a ``compress.json``, so every command takes such a folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..adapters import ArchitectureAdapter, adapter_for, module_shape
from ..adapters.checks import prove
from ..errors import ModelLoadError, first_line
from ..io import staged_folder, write_text_atomic
from .loaded import LoadedModel, fit_tokenizer, load_config, load_tokenizer
from .sharing_manifest import SharingManifest

MANIFEST = "compress.json"
FORMAT = "compress-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def save_checkpoint(loaded: LoadedModel, folder: str | Path, *, overwrite: bool = False,
                    extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write ``loaded`` as a compressed checkpoint folder (atomically: all or nothing).

    Args:
        loaded: A `LoadedModel`, shared or dense.
        folder: Where to write; must not exist (or be empty) unless ``overwrite``.
        extra_files: Called with the staged folder once the weights are written (so it can
            measure them) to write further files there, e.g. a report or a trainer state. They
            land together with the checkpoint.

    Returns:
        The folder.
    """
    from safetensors.torch import save_model

    model = loaded.model
    with staged_folder(folder, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "family": loaded.adapter.family,
            "pooling": loaded.pooling,
            "normalize": loaded.normalize,
            "source": loaded.origin,  # the original dense model, the teacher for recovery
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "sharing": loaded.sharing.to_dict() if loaded.sharing else None,
            # what the adapter's self-checks settled on the dense model, for a reload whose
            # blocks may all be shared (and so cannot be checked again)
            "adapter": loaded.adapter.to_dict(),
        }
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp)
    return Path(folder)


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_checkpoint(folder: str | Path, *, name: str | None = None) -> LoadedModel:
    """Rebuild a model saved by `save_checkpoint`, with its sharing intact.

    Raises:
        ModelLoadError: a manifest that does not parse or has another format version, or
            weights that do not match the manifest.
    """
    from safetensors.torch import load_model as load_weights

    folder = Path(folder)
    manifest = read_manifest(folder)
    model = _empty_model(folder, manifest)
    adapter = _recorded_adapter(model, manifest, folder)
    sharing = SharingManifest.from_dict(manifest["sharing"]) if manifest.get("sharing") else None
    if sharing:
        _install_sharing(model, adapter, sharing)
    try:
        load_weights(model, str(folder / WEIGHTS), strict=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{folder}: weights do not match the manifest: {first_line(e)}") from None
    model.eval()
    adapter, checks = prove(model, adapter)
    return LoadedModel(model=model, tokenizer=fit_tokenizer(load_tokenizer(str(folder)), adapter, model.config),
                       adapter=adapter, source=str(folder), name=name or str(folder),
                       pooling=manifest.get("pooling", "mean"), normalize=bool(manifest.get("normalize", False)), sharing=sharing, origin=manifest.get("source"),
                       checks=checks)


def read_manifest(folder: Path) -> dict:
    """``compress.json`` of a checkpoint, checked for its format and version."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / MANIFEST} is not a valid manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        get = manifest.get if isinstance(manifest, dict) else (lambda key: None)
        raise ModelLoadError(
            f"{folder} was written in checkpoint format {get('format')!r} version "
            f"{get('format_version')!r}; this compress reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def _empty_model(folder: Path, manifest: dict):
    """The model class the manifest names, built from the folder's config, in its dtype; its
    weights are loaded afterwards."""
    import torch
    import transformers

    config = load_config(str(folder), str(folder), False)
    cls = getattr(transformers, str(manifest.get("model_class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{folder}: unknown model class {manifest.get('model_class')!r}")
    with transformers.modeling_utils.no_init_weights():  # the weights come from the file
        model = cls(config)
    model.tie_weights()  # skipped with the init above; GPT-2's head shares the embedding
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    return model


def _recorded_adapter(model, manifest: dict, folder: Path) -> ArchitectureAdapter:
    """The adapter the dense model was proven with, as the manifest records it.

    For an inferred family the recorded one is used as it is: pruning may leave widths that no
    longer tell the projections apart, and a model whose blocks are all shared cannot be
    permutation-checked again. A declared family keeps its declaration plus the recorded
    refusals. The load's checks run again on the loaded weights either way.
    """
    recorded = manifest.get("adapter")
    declared = adapter_for(model, settle=False) if not (isinstance(recorded, dict) and recorded.get("inferred")) else None
    try:
        adapter = ArchitectureAdapter.from_dict(recorded) if declared is None else declared
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{folder / MANIFEST}: the recorded adapter does not read: {e}") from None
    if declared is not None and isinstance(recorded, dict) and isinstance(recorded.get("refusals"), dict):
        adapter = adapter.with_refusals({str(k): str(v) for k, v in recorded["refusals"].items()})
    return adapter


def _install_sharing(model, adapter: ArchitectureAdapter, sharing: SharingManifest) -> None:
    """Put the shared modules back in place (empty, the same module in every member), for the
    weights file to fill."""
    import torch
    from torch import nn

    from .shared import install_shared

    blocks = adapter.blocks(model)
    for group in sharing.plan:
        if len(group) < 2:
            continue
        for path in sharing.modules:
            dense = blocks[group[0]].get_submodule(path)
            out_f, in_f = module_shape(dense)
            dtype = dense.weight.dtype
            base = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
            biases = {layer: None if blocks[layer].get_submodule(path).bias is None else torch.zeros(out_f, dtype=dtype)
                      for layer in group}
            install_shared(blocks, group, path, base, biases, sharing.lora_rank, sharing.lora_alpha)
