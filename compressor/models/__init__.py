"""Loading models: aliases, local folders, sentence-transformers folders and hub ids."""

from ..hub import ALIASES, bundled_model_dir, resolve
from .loading import LoadedModel, as_loaded, load_model
from .stats import unique_parameters

__all__ = ["ALIASES", "LoadedModel", "as_loaded", "bundled_model_dir", "load_model", "resolve", "unique_parameters"]
