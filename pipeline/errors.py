"""Errors the CLI turns into one clear line instead of a traceback."""


class PipelineError(Exception):
    """A problem the user can fix: bad input, bad config, missing upstream output."""

    exit_code = 1


class ConfigError(PipelineError):
    exit_code = 2


class InputError(PipelineError):
    """Missing, malformed or corrupt input data."""


class CorruptShardError(InputError):
    """A shard whose bytes do not match the checksum in its index."""
