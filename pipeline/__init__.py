"""llm-pipeline: raw text to a promoted model. What every entry point (the CLI, the torchrun launcher)
shares is kept here, light to import."""

import os

__version__ = "0.1.0"

DEFAULT_ROOT = "runs/local"


def default_root(explicit: str | None = None) -> str:
    """The run root: ``explicit`` (a ``--root`` flag), else ``$LLMPIPE_ROOT``, else :data:`DEFAULT_ROOT`."""
    return explicit or os.environ.get("LLMPIPE_ROOT") or DEFAULT_ROOT
