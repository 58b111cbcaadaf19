"""The one exception type users see: a one-line message that names the bad value and the fix."""


class ZooError(ValueError):
    """Bad input to the zoo (config, data, weights, paths). The CLI prints it and exits with code 2."""
