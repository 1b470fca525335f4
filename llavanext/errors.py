"""Errors a user can fix. The CLI prints them as one clear message, never a traceback."""


class LlavaNextError(Exception):
    """A mistake in the user's config, data or files, explained in the message."""


class ConfigError(LlavaNextError):
    """The composed config asks for something impossible or inconsistent."""


class DataError(LlavaNextError):
    """A dataset, record or image cannot be used."""


class CheckpointError(LlavaNextError):
    """A checkpoint or model folder is missing, malformed or does not fit the model."""
