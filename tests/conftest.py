import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network: a hub id must fail fast and clearly, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, save_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a tiny seeded model with its tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compressor.models import bundled_model_dir

    return bundled_model_dir()
