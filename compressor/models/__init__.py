"""Loading models: aliases, local folders, sentence-transformers folders and hub ids."""

from .loading import ALIASES, LoadedModel, as_loaded, bundled_model_dir, load_model, resolve
from .stats import unique_parameters

__all__ = ["ALIASES", "LoadedModel", "as_loaded", "bundled_model_dir", "load_model", "resolve", "unique_parameters"]
