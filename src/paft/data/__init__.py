"""Data: built-in demo generator, format adapters, file loading, tokenisation."""
