"""llavanext: a declarative experiment runner for LLaVA-NeXT vision-language models."""

__version__ = "0.1.0"
