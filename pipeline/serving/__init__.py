"""Serving the registry's champion: resolve an alias to a version and a folder (``resolve``), and serve it through
an OpenAI-compatible API (``server``)."""
