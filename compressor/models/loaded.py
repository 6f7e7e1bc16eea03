"""A loaded model with what every stage needs beside it, and the readers of its config and
tokenizer (shared by `load_model` and the compressed-checkpoint loader)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import ArchitectureAdapter
from ..errors import ModelLoadError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..adapters.checks import AdapterChecks
    from .sharing_manifest import SharingManifest


@dataclass
class LoadedModel:
    """A model with what every stage needs beside it.

    Attributes:
        model: The ``transformers`` model (with its task head, if the checkpoint has one).
        tokenizer: Its tokenizer, or ``None`` if the folder ships none.
        adapter: The architecture adapter for its family.
        source: Where it came from (a resolved folder or a hub id).
        name: A short name for reports (what the user typed, or the bundled model's name).
        pooling: How a sentence embedding is made from token states: ``"mean"``, ``"cls"`` or
            ``"last"`` (from a sentence-transformers pooling config where present).
        normalize: Whether its sentence embeddings are L2-normalized (a sentence-transformers
            pipeline ending in ``Normalize``); exports write it into their sentence-transformers
            layout, so that dot products stay cosines.
        sharing: The sharing manifest (plan, shared modules, LoRA rank...) of a shared model,
            ``None`` for a dense one.
        checks: What the adapter's self-checks found (`compressor.adapters.checks.AdapterChecks`).
        origin: The original dense model this one was made from (an absolute folder or a hub
            id); for a dense model, its own source. Checkpoints record it, so that
            `compress finetune` finds its teacher however many stages ago the model was made.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    adapter: ArchitectureAdapter
    source: str
    name: str = ""
    pooling: str = "mean"
    normalize: bool = False
    sharing: SharingManifest | None = None
    origin: str | None = None
    checks: AdapterChecks | None = None

    def __post_init__(self):
        if self.origin is None:
            self.origin = self.source

    @property
    def config(self):
        return self.model.config

    @property
    def geometry(self):
        return self.adapter.geometry(self.model.config)


def load_config(location: str, shown: str, trust_remote_code: bool):
    """The model's transformers config, refusing in one line what transformers would guess past
    (a config.json that is not an object or names no model_type) or cannot read."""
    config_file = Path(location) / "config.json"
    if config_file.is_file():  # a local folder: what transformers would guess past, refuse here
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not read the config of {shown}: {config_file} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{config_file} holds a JSON {type(raw).__name__}, not a config object")
        if "model_type" not in raw:
            # transformers would guess the family from the folder's name
            raise ModelLoadError(f"{config_file} names no model_type")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = first_line(e)
        if "trust_remote_code" in str(e) or "custom code" in msg:
            raise ModelLoadError(
                f"{shown} needs its own code to run; pass --trust-remote-code if you trust it"
            ) from None
        if "model_type" in msg or "Unrecognized model" in msg:
            from ..adapters import SUPPORTED_MODEL_TYPES

            raise ModelLoadError(
                f"{shown}: unrecognised architecture; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            ) from None
        raise ModelLoadError(f"could not read the config of {shown}: {msg}") from None
    except OSError as e:
        raise ModelLoadError(f"could not read the config of {shown}: {first_line(e)}") from None


def fit_tokenizer(tokenizer, adapter, config):
    """Cap the tokenizer's ``model_max_length`` at the positions the model holds, so that every
    stage's truncation stays inside them (a tokenizer folder often says nothing, or more)."""
    limit = adapter.max_positions(config)
    if tokenizer is not None and limit and (tokenizer.model_max_length or 0) > limit:
        tokenizer.model_max_length = limit
    return tokenizer


def load_tokenizer(location: str, trust_remote_code: bool = False):
    """The folder's tokenizer, with a pad token (the EOS token where it ships none, as GPT-2
    and Llama users do), or ``None`` for a folder without one."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None  # a bare weights folder; stages that need text say so
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 and Llama ship no pad token
    return tok
