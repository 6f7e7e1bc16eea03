"""What a model needs before it is read: how many numbers its weights files hold (from their
headers) and whether they fit the memory left, so that a model too large for the machine is
refused with what it needs rather than killed by the kernel halfway through loading."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, ModelLoadError, first_line

#: A model is refused when its weights alone take more than this share of the memory left: the
#: command's own work (activations, one layer in float32, the output) needs the rest.
MEMORY_SHARE = 0.9
GIB = 2**30


#: transformers' names for a safetensors checkpoint: one file, or shards and their index.
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def safetensors_files(folder: Path, shown: str) -> list[Path] | None:
    """A folder's safetensors weight files: the shards its index names, else ``model.safetensors``;
    ``None`` for a folder without either (``pytorch_model.bin``).

    Raises:
        ModelLoadError: an index that does not parse, or a shard it names is missing.
    """
    index = folder / INDEX
    if not index.is_file():
        return [folder / WEIGHTS] if (folder / WEIGHTS).is_file() else None
    try:
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{shown}: {index.name} is not a valid shard index: {first_line(e)}") from None
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ModelLoadError(f"{shown}: {missing[0]} is missing ({len(missing)} of the {len(files)} files "
                             f"{index.name} names); copy or download the whole folder")
    return [folder / f for f in files]


def weights_numel(folder: Path, shown: str) -> int | None:
    """How many numbers a folder's safetensors weights hold, read from their headers (no
    weights are read); ``None`` for a folder without safetensors (``pytorch_model.bin``).

    Raises:
        ModelLoadError: a shard its index names is missing, or an index that does not parse.
    """
    from safetensors import safe_open

    files = safetensors_files(folder, shown)
    if files is None:
        return None
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    count = 1
                    for d in shape:
                        count *= d
                    total += count
        except Exception as e:  # noqa: BLE001  (safetensors' own error on a truncated header)
            raise ModelLoadError(f"could not load the weights of {shown}: {path.name}: {first_line(e)}") from None
    return total


def check_fits(numel: int | None, dtype, own_dtype, shown: str) -> None:
    """Refuse, before reading any weights, a model whose weights in ``dtype`` would not fit the
    memory left (with `MEMORY_SHARE`'s room for the work), saying what it needs and, where the
    checkpoint's own dtype is smaller, that ``--dtype auto`` reads it in less.

    Raises:
        ConfigError: the model does not fit.
    """
    import torch

    from ..io import available_memory_bytes

    available = available_memory_bytes()
    if numel is None or available is None:
        return
    dtype = torch.float32 if dtype is None else dtype  # load_model's dtype=None: float32
    size = torch.empty((), dtype=dtype).element_size()
    needed = numel * size
    if needed <= MEMORY_SHARE * available:
        return
    own = torch.empty((), dtype=own_dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    hint = (f"; --dtype auto (where the command takes it) reads it in its own "
            f"{str(own_dtype).removeprefix('torch.')}, {numel * own / GIB:.1f} GiB"
            if own < size else "; free memory, or run it on a machine with more")
    raise ConfigError(f"{shown} needs {needed / GIB:.1f} GiB for its weights in {name} and this machine has "
                      f"{available / GIB:.1f} GiB available{hint}", option="dtype")
