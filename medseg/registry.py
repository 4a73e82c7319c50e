"""A tiny name -> builder registry; unknown names and unknown parameters list the valid ones."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from medseg.errors import ConfigError


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

    def build(self, name: str, params: Mapping[str, Any] | None = None, key: str = "name", **fixed: Any) -> Any:
        """Build ``name`` with ``params`` (user config) and ``fixed`` (arguments the caller decides).

        An unknown parameter raises :class:`ConfigError` at ``<key-parent>.params.<param>`` listing the
        accepted ones, instead of a bare ``TypeError``.
        """
        builder = self.get(name, key)
        params = dict(params or {})
        accepted = valid_parameters(builder)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        prefix = f"{parent}.params" if parent else "params"
        if accepted is not None:
            for p in params:
                if p not in accepted:
                    raise ConfigError(
                        f"{prefix}.{p}",
                        f"unknown parameter for {self.kind} '{name}'; expected one of: {', '.join(sorted(accepted))}",
                    )
        try:
            return builder(**fixed, **params)
        except (ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(prefix, f"{self.kind} '{name}' rejected its parameters: {err}") from err


def valid_parameters(builder: Callable[..., Any]) -> set[str] | None:
    """Keyword parameters ``builder`` accepts, or None when it takes ``**kwargs``."""
    sig = inspect.signature(builder)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
