"""Model resolution: aliases (smollm2-135m, tiny), local HF folders, hub ids when online."""

from paft.models.loading import load_model, load_tokenizer, resolve_model_dir

__all__ = ["load_model", "load_tokenizer", "resolve_model_dir"]
