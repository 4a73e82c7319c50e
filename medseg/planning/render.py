"""Write a planned config as YAML with a comment on every derived value, and the plan's summary table."""

from __future__ import annotations

from typing import Any

import yaml


def _flow(value: Any) -> str:
    """One-line YAML for a value (``[2, 2, 1]``, ``{mode: ct, window: [-5.9, 131.0]}``, ``0.33``, ``null``)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[1:-1]


def _lines(node: dict[str, Any], notes: dict[str, str], prefix: str, indent: int) -> list[str]:
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        pad = "  " * indent
        if isinstance(value, dict) and value and path not in notes:
            out.append(f"{pad}{key}:")
            out += _lines(value, notes, f"{path}.", indent + 1)
        else:
            line = f"{pad}{key}: {_flow(value)}"
            out.append(f"{line}  # {notes[path]}" if path in notes else line)
    return out


def plan_yaml(raw: dict[str, Any], notes: dict[str, str], header: list[str]) -> str:
    """``raw`` as block YAML (leaves in flow style), ``notes[key path]`` as a comment after its value."""
    return "".join(f"# {h}\n" for h in header) + "\n".join(_lines(raw, notes, "", 0)) + "\n"


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + "\n"
