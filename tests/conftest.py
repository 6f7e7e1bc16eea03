import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network: a hub id must fail fast and clearly, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TinyModelDirs  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> TinyModelDirs:
    """family -> folder of a tiny seeded model with its tokenizer, saved when a test first asks."""
    return TinyModelDirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compressor.models import bundled_model_dir

    return bundled_model_dir()


def assert_same_metrics(a: dict, b: dict):
    """Two jobs' metrics: the same names, floats equal to 1e-4, everything else exactly."""
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert b[k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), k


def stderr_lines(stderr: str) -> list[str]:
    """stderr's lines without progress lines (``compress: <step>: N/M ...``), which a slow or
    loaded machine adds before an error: the error itself must be one line."""
    import re

    progress = re.compile(r"^compress: [^:]+: \d+/\d+ ")
    return [line for line in stderr.strip().splitlines() if not progress.match(line)]
