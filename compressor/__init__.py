"""compress: compression and conversion of pretrained dense Transformers.

Stages are functions ``model, record = stage(model, config)`` in the subpackages
(`compressor.analysis`, `compressor.sharing`, ...), each with a runner on folders
(``runner.py``) that the CLI and recipes share. They stand on a small core (errors, io,
config, record, hub, onnx, grids, adapters, models, data) that imports no stage; `report` and
`pipeline` run the stages. `tests/test_layout.py` keeps it so. Importing this package is cheap:
torch and transformers load only when a model does.
"""

__version__ = "0.1.0"


def load(spec=None, **kwargs):
    """Load a model: a local folder (a compressed checkpoint too), a hub id, an alias, or
    ``None`` for the bundled all-MiniLM-L6-v2. See `compressor.models.load_model`."""
    from .models import load_model

    return load_model(spec, **kwargs)


__all__ = ["__version__", "load"]
