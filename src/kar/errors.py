"""Errors a user can fix. The entry point prints their message alone, without a traceback."""


class KarError(Exception):
    """Bad input a user can fix; the message names the problem and the fix."""


class ConfigError(KarError, ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


class DataError(KarError, ValueError):
    """A data or knowledge file is missing, corrupt or inconsistent."""
