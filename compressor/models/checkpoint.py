"""The compressed checkpoint: a folder that keeps shared weights shared.

Layout::

    config.json          the model's Hugging Face config, unchanged
    compress.json        the manifest: format version, model class, pooling, sharing plan,
                         shared modules, LoRA rank and init
    model.safetensors    every tensor once, in the model's dtype (the aliases of a shared
                         tensor are dropped; Hugging Face ``save_pretrained`` refuses them);
                         past `SHARD_BYTES`, shards as transformers names them
                         (``model-00001-of-00004.safetensors`` ...) and
                         ``model.safetensors.index.json``
    tokenizer files      as ``save_pretrained`` writes them

`load_checkpoint` rebuilds the model from the config, re-creates the sharing (the same
Parameter object in every member), and loads the weights; `compressor.models.load_model`
calls it for any folder with a ``compress.json``, so every command takes such a folder.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..adapters import ArchitectureAdapter, adapter_for, module_shape
from ..adapters.checks import prove
from ..errors import CompressError, ModelLoadError, first_line
from ..io import staged_folder, write_text_atomic
from ..progress import track
from .loaded import LoadedModel, fit_tokenizer, load_config, load_tokenizer
from .memory import INDEX, WEIGHTS, check_fits, safetensors_files, weights_numel
from .sharing_manifest import SharingManifest

MANIFEST = "compress.json"
FORMAT = "compress-checkpoint"
FORMAT_VERSION = 1
#: The largest weights file a checkpoint writes (a 1.7 B bf16 model: two files).
SHARD_BYTES = 2 * 2**30


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
    model = loaded.model
    with staged_folder(folder, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        write_weights(model, tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": model_class(model).__name__,
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


def model_class(model) -> type:
    """The model's own class: the first in its MRO from outside ``torch.distributed`` (FSDP2's
    ``fully_shard`` turns a ``LlamaForCausalLM`` into an ``FSDPLlamaForCausalLM`` subclass)."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_checkpoint(folder: str | Path, *, name: str | None = None) -> LoadedModel:
    """Rebuild a model saved by `save_checkpoint`, with its sharing intact.

    Raises:
        ModelLoadError: a manifest that does not parse or has another format version, or
            weights that do not match the manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    dtype = _manifest_dtype(manifest)
    check_fits(weights_numel(folder, name or str(folder)), dtype, dtype, name or str(folder))
    model = _empty_model(folder, manifest)
    adapter = _recorded_adapter(model, manifest, folder)
    sharing = SharingManifest.from_dict(manifest["sharing"]) if manifest.get("sharing") else None
    adapter.fit_head_state(model)  # MPNet's bias, when its heads were pruned
    if sharing:
        _install_sharing(model, adapter, sharing)
    read_weights(model, folder)
    model.eval()
    adapter, checks = prove(model, adapter)
    return LoadedModel(model=model, tokenizer=fit_tokenizer(load_tokenizer(str(folder)), adapter, model.config),
                       adapter=adapter, source=str(folder), name=name or str(folder),
                       pooling=manifest.get("pooling", "mean"), normalize=bool(manifest.get("normalize", False)), sharing=sharing, origin=manifest.get("source"),
                       checks=checks)


def unique_tensors(model) -> dict:
    """The model's state dict with every tensor once: the first name of each storage (a shared
    base or a tied embedding is stored under the first layer or module that holds it)."""
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor
    return tensors


def write_weights(model, folder: Path) -> None:
    """Write the model's tensors, each once, in its dtype: ``model.safetensors``, or shards of at
    most `SHARD_BYTES` and their index, one file at a time."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, tensor in unique_tensors(model).items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                                 for k in range(1, len(shards) + 1)]
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    free = shutil.disk_usage(folder).free
    if total > free:  # refused before the first byte, not when the disk is full
        raise CompressError(f"{folder.parent} has {free / 2**30:.1f} GiB free and the weights need "
                            f"{total / 2**30:.1f} GiB; nothing was written")
    for name, shard in track(list(zip(names, shards)), "writing weights", unit="files"):
        try:
            save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name), metadata={"format": "pt"})
        except Exception as e:  # noqa: BLE001  (safetensors reports a full disk as its own error)
            if not _out_of_space(e):
                raise
            raise CompressError(f"the disk filled while writing {name} into {folder.parent}: "
                                f"{first_line(e)}; nothing was written") from None
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        write_text_atomic(folder / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")


def _out_of_space(error: BaseException) -> bool:
    """A write failed for want of disk space (an OSError, or safetensors' own error naming it)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return "No space left" in text or "StorageFull" in text or "os error 28" in text


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards its index names, else ``model.safetensors``.

    Raises:
        ModelLoadError: an index that does not parse, or a file the checkpoint needs is missing.
    """
    files = safetensors_files(folder, str(folder))
    if files is None:
        raise ModelLoadError(f"{folder}: {WEIGHTS} is missing (the checkpoint's weights); copy the whole folder")
    return files


def read_weights(model, folder: Path) -> None:
    """Fill ``model`` (built from the config, sharing installed) from the checkpoint's files, one
    tensor at a time; every tensor must be there once, with its shape.

    Raises:
        ModelLoadError: a missing file, an unknown or misshapen tensor, or one the model needs
            that no file holds.
    """
    import torch
    from safetensors import safe_open

    expected = model.state_dict(keep_vars=True)
    filled: set[int] = set()
    for path in track(weight_files(folder), "reading weights", unit="files"):
        try:
            with safe_open(str(path), framework="pt") as f, torch.no_grad():
                for name in f.keys():
                    target = expected.get(name)
                    if target is None:
                        raise ModelLoadError(f"{folder}: weights do not match the manifest: {path.name} holds "
                                             f"{name}, which the model does not have")
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelLoadError(f"{folder}: weights do not match the manifest: {name} is "
                                             f"{tuple(tensor.shape)} in {path.name}, the model's is {tuple(target.shape)}")
                    target.copy_(tensor)
                    filled.add(target.untyped_storage().data_ptr())
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001  (OSError, safetensors' own error: a truncated or corrupt file)
            raise ModelLoadError(f"{folder}: could not read {path.name}: {first_line(e)}") from None
    # an alias (a tied head, a shared base in its other layers) is filled with its first name
    unfilled = [name for name, t in expected.items() if t.untyped_storage().data_ptr() not in filled]
    if unfilled:
        raise ModelLoadError(f"{folder}: weights do not match the manifest: {len(unfilled)} tensors missing "
                             f"(e.g. {unfilled[0]})")


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
    dtype = _manifest_dtype(manifest)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a bf16 model never exists in float32
    try:
        with transformers.modeling_utils.no_init_weights():  # the weights come from the file
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()  # skipped with the init above; GPT-2's head shares the embedding
    return model


def _manifest_dtype(manifest: dict):
    """The dtype the checkpoint was written in (float32 for one that names none it can use)."""
    import torch

    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


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
        # what self-checks ruled out on the dense model; a declared refusal comes from today's
        # declaration (an MPNet checkpoint written when its heads could not be pruned can be now)
        adapter = adapter.with_refusals({str(k): str(v) for k, v in recorded["refusals"].items()
                                         if str(v).startswith("self-check ")})
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
