"""A tiny name -> builder registry; unknown names and unknown parameters list the valid ones."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from medseg.errors import ConfigError, InvalidArguments


class Registry:
    """Maps names to builders (classes or functions) of one kind, e.g. networks.

    Args:
        kind: what is registered, used in error messages (``"network"``).

    Example:
        >>> NETWORKS = Registry("network")
        >>> @NETWORKS.register("unet")
        ... class UNet: ...
        >>> NETWORKS.build("unet", key="model", spatial_dims=2)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            return builder

        return wrap

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str, key: str = "name") -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise ConfigError(
                key, f"unknown {self.kind} '{name}'; expected one of: {', '.join(self.names())}"
            ) from None

    def build(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        key: str = "name",
        fixed_keys: Mapping[str, str] | None = None,
        **fixed: Any,
    ) -> Any:
        """Build ``name`` with ``params`` (user config) and ``fixed`` (arguments the caller decides).

        Problems become one :class:`ConfigError` listing all of them: an unknown parameter at
        ``<key-parent>.params.<param>`` with the accepted ones (never the ``fixed`` ones, which the user does
        not set), a fixed argument set in ``params``, and every argument the builder rejects with
        :class:`~medseg.errors.InvalidArguments`: its own parameters at ``<key-parent>.params.<name>``, a fixed
        one at ``fixed_keys[name]`` (e.g. ``{"spatial_dims": "data.spatial_dims"}``) or its bare name.
        """
        builder = self.get(name, key)
        params = dict(params or {})
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        prefix = f"{parent}.params" if parent else "params"
        problems = self._parameter_problems(name, builder, params, fixed, prefix)
        accepted = valid_parameters(builder)
        usable = {p: v for p, v in params.items() if p not in fixed and (accepted is None or p in accepted)}
        built = None
        try:
            built = builder(**fixed, **usable)  # also with unknown parameters: its own problems count too
        except InvalidArguments as err:
            keys = {arg: f"{prefix}.{arg}" for arg in params} | dict(fixed_keys or {})
            problems += [(keys.get(arg, arg), message) for arg, message in err.problems.items()]
        except (ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise
            problems.append((prefix, f"{self.kind} '{name}' rejected its parameters: {err}"))
        if problems:
            raise ConfigError(*problems[0], others=problems[1:])
        return built

    def _parameter_problems(self, name: str, builder: Callable[..., Any], params: Mapping[str, Any],
                            fixed: Mapping[str, Any], prefix: str) -> list[tuple[str, str]]:
        accepted = valid_parameters(builder)
        problems = [(f"{prefix}.{p}", f"set by the pipeline itself (from the data); remove it from {prefix}")
                    for p in params if p in fixed]
        if accepted is not None:
            settable = ", ".join(sorted(accepted - set(fixed)))
            problems += [(f"{prefix}.{p}", f"unknown parameter for {self.kind} '{name}'; expected one of: {settable}")
                         for p in params if p not in accepted and p not in fixed]
        return problems


def valid_parameters(builder: Callable[..., Any]) -> set[str] | None:
    """Keyword parameters ``builder`` accepts, or None when it takes ``**kwargs``."""
    sig = inspect.signature(builder)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
