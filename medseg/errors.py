"""Exceptions shared by the whole library.

Every error a user can cause names the file or the config key at fault and says what was expected,
so the CLI can print it as one line without a traceback.
"""


class MedsegError(Exception):
    """Base class of errors caused by the user's input (files, configs, arguments)."""


class ConfigError(MedsegError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible.

    Args:
        key: dotted key path, e.g. ``"model.params.features"``.
        message: what was expected and what was received.
        source: the config file, when there is one.
        others: further ``(key, message)`` problems found in the same validation, reported together.
    """

    def __init__(self, key: str, message: str, source: str | None = None, others=()):
        self.key = key
        self.message = message
        self.source = source
        self.problems = [(key, message), *others]
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(f"{prefix}{k}: {m}" if k else f"{prefix}{m}" for k, m in self.problems))


class DataError(MedsegError, ValueError):
    """A data file is missing, unreadable or does not hold what was expected.

    Args:
        path: the file (or folder) at fault.
        message: what was expected and what was found.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class InvalidArguments(ValueError):
    """Arguments of a library object (e.g. a network) that it cannot take, all found at once.

    A plain ``ValueError`` about the object's own arguments: it knows nothing of config files. The config
    layer (:meth:`medseg.registry.Registry.build`) maps each argument to its key path.

    Args:
        owner: what rejected them (``"UNet"``).
        problems: argument name -> what was expected and what was received.
    """

    def __init__(self, owner: str, problems: dict[str, str]):
        self.owner = owner
        self.problems = dict(problems)
        super().__init__(f"{owner}: " + "; ".join(f"{name}: {message}" for name, message in self.problems.items()))


def find_cause(err: BaseException | None) -> MedsegError | None:
    """The :class:`MedsegError` behind ``err``, following ``__cause__``/``__context__`` (MONAI wraps every error
    raised inside a transform in ``RuntimeError("applying transform ...")``); None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MedsegError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
