"""The project's own error type for mistakes in what a user gave jaxeff, and the exit codes.

Anything a user can fix (a config key, a data file, a path, a command-line flag, a workdir) is raised
as `UserError` (or its subclass `ConfigError`) with a one-line message that names the thing and the
fix. `jaxeff.cli.main` maps these, `TrainingStopped` and Ctrl-C to exit codes in one place.
"""

EXIT_TRAINING_STOPPED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class UserError(ValueError):
    """A mistake in the user's input; never a bug in jaxeff. The message is one line."""


class ConfigError(UserError):
    """A user error in the configuration (bad key, type or value). Never a bug in jaxeff."""
