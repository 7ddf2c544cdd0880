"""Reading mergekit parameter settings: model references, numbers, flags, gradients and
``{filter, value}`` lists, each problem recorded with its field path (``mergekit_config.py``
uses these to translate a whole config).
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from typing import Any

from .recipe import Weight, WeightOverride

__all__ = ["ModelRef", "SettingReader"]


@dataclass(frozen=True)
class ModelRef:
    """A parsed mergekit model reference ``path[@rev][+lora[@rev]]``."""

    path: str
    revision: str | None
    lora: str | None = None
    lora_revision: str | None = None

    def model_key(self) -> tuple[str, str | None]:
        return self.path.rstrip("/"), self.revision


class SettingReader:
    """Reads settings; every problem goes to ``problems`` with its path, notes to ``notes``."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.notes: list[str] = []

    def ref(self, value: Any, where: str) -> ModelRef | None:
        if isinstance(value, dict):
            extra = sorted(set(value) - {"model", "lora", "override_architecture"})
            if extra or "override_architecture" in value:
                self.problems.append(f"{where}: only 'model' and 'lora' are supported in a model mapping, got "
                                     f"{sorted(value)}")
                return None
            value = str(value.get("model", "")) + (f"+{value['lora']}" if value.get("lora") else "")
        if not isinstance(value, str) or not value.strip():
            self.problems.append(f"{where}: expected a model path or Hub id (optionally 'model+lora'), got {value!r}")
            return None
        chunks = value.split("+")
        if len(chunks) > 2:
            self.problems.append(f"{where}: {value!r} has more than one '+'; write 'model' or 'model+lora'")
            return None
        parts = []
        for chunk in chunks:
            path, sep, rev = chunk.partition("@")
            if "@" in rev:
                self.problems.append(f"{where}: {chunk!r} has more than one '@' (path@revision)")
                return None
            parts.append((path.strip(), rev.strip() if sep else None))
        (path, rev), lora = parts[0], parts[1] if len(parts) == 2 else (None, None)
        return ModelRef(path, rev, lora[0], lora[1])

    def number(self, value: Any, where: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.problems.append(f"{where}: expected a number, got {value!r}")
            return None
        try:
            number = float(value)
        except ValueError:
            self.problems.append(f"{where}: expected a number, got {value!r}")
            return None
        if not math.isfinite(number):
            self.problems.append(f"{where}: {value!r} is not finite")
            return None
        return number

    def flag(self, value: Any, where: str) -> bool | None:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        self.problems.append(f"{where}: expected true or false, got {value!r}")
        return None

    def gradient(self, value: Any, where: str) -> Weight | None:
        """A scalar or a gradient list (mergekit interpolates it over layers exactly as ``interpolate``)."""
        if isinstance(value, list):
            if not value:
                return None
            values = [self.number(v, f"{where}[{i}]") for i, v in enumerate(value)]
            if any(v is None for v in values):
                return None
            return tuple(values) if len(values) > 1 else values[0]  # type: ignore[return-value]
        return self.number(value, where)

    def conditional(self, setting: Any, where: str) -> tuple[list[tuple[str, Any, str]], Any, str] | None:
        """A setting as (filtered entries before the catch-all, the catch-all value or None, its path)."""
        entries = setting if isinstance(setting, list) else [setting]
        filtered: list[tuple[str, Any, str]] = []
        for j, entry in enumerate(entries):
            at = f"{where}[{j}]" if isinstance(setting, list) else where
            extra = sorted(set(entry) - {"filter", "value"})
            if extra or "value" not in entry:
                self.problems.append(f"{at}: a conditional parameter is {{filter: SUBSTRING, value: V}}, got {entry!r}")
                return None
            text = entry.get("filter")
            if text is None or text == "*":
                return filtered, entry["value"], f"{at}.value"
            if not isinstance(text, str) or not text:
                self.problems.append(f"{at}.filter: expected a substring of tensor names, got {text!r}")
                return None
            filtered.append((text, entry["value"], f"{at}.value"))
        return filtered, None, ""

    def setting(self, chain: list[tuple[Any, str]]) -> tuple[Weight | None, list[tuple[str, Weight]]]:
        """A per-input parameter through mergekit's precedence chain: its value where no filter matches (None
        when none applies) and its ``(glob, value)`` filter entries in precedence order (first match wins)."""
        overrides: list[tuple[str, Weight]] = []
        for setting, at in chain:
            if setting is None or setting == []:
                continue
            if isinstance(setting, dict) or (isinstance(setting, list) and any(isinstance(e, dict) for e in setting)):
                if isinstance(setting, list) and not all(isinstance(e, dict) for e in setting):
                    self.problems.append(f"{at}: mixes numbers and {{filter, value}} entries")
                    return None, []
                parsed = self.conditional(setting, at)
                if parsed is None:
                    return None, []
                filtered, rest, rest_at = parsed
                for text, value, value_at in filtered:
                    w = self.gradient(value, value_at)
                    if w is not None:  # mergekit's filter is a substring test: the glob *text*
                        overrides.append((f"*{glob.escape(text)}*", w))
                if rest is not None:
                    return self.gradient(rest, rest_at), overrides
                continue
            return self.gradient(setting, at), overrides
        return None, overrides

    def weight(self, chain: list[tuple[Any, str]], where: str) -> tuple[Weight | None, tuple[WeightOverride, ...]]:
        """A per-input ``weight`` through mergekit's precedence chain → our weight and overrides."""
        value, overrides = self.setting(chain)
        return value, tuple(WeightOverride(match=m, weight=w) for m, w in overrides)
