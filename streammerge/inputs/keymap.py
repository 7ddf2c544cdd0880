"""Map an adapter's module names onto the base's tensor names when the two models differ in prefix.

An adapter saved from a task model names its modules after that model: PEFT on
``BertForSequenceClassification`` saves ``bert.encoder.layer.0.attention.self.query``, while the
bare backbone it was built on (``BertModel``, how most encoder checkpoints ship) stores
``encoder.layer.0.attention.self.query.weight``; an adapter trained on a bare ``LlamaModel``
lacks the ``model.`` prefix of ``LlamaForCausalLM``.  One mapping — strip a prefix, add a
prefix, or both — must fit every LoRA module of the adapter; it is found here, from names alone.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

__all__ = ["KeyMapping", "IDENTITY", "find_key_mapping"]

# Prefix candidates are the first one or two dotted components of the names.
_PREFIX_DEPTH = 2


@dataclass(frozen=True)
class KeyMapping:
    """``strip`` removed from the front of adapter-side names, then ``add`` put in front.

    A name that does not start with ``strip`` (e.g. a task head outside the backbone) is left as it is.
    """

    strip: str = ""
    add: str = ""

    def apply(self, name: str) -> str:
        if self.strip:
            if not name.startswith(self.strip):
                return name
            name = name[len(self.strip):]
        return self.add + name

    def describe(self) -> str:
        """In words, for the plan output and the model card ('' for the identity)."""
        if self.strip and self.add:
            return f"module names: {self.strip!r} replaced by {self.add!r}"
        if self.strip:
            return f"module names: prefix {self.strip!r} removed"
        if self.add:
            return f"module names: prefix {self.add!r} added"
        return ""


IDENTITY = KeyMapping()


def _prefixes(names: Iterable[str]) -> set[str]:
    found = set()
    for name in names:
        parts = name.split(".")
        for depth in range(1, min(_PREFIX_DEPTH, len(parts) - 2) + 1):  # keep at least "<module>.weight"
            found.add(".".join(parts[:depth]) + ".")
    return found


def _cost(mapping: KeyMapping) -> tuple[int, int]:
    return (bool(mapping.strip) + bool(mapping.add), len(mapping.strip) + len(mapping.add))


def find_key_mapping(module_weights: list[str], other_names: list[str],
                     base_names: Collection[str]) -> tuple[KeyMapping | None, list[KeyMapping]]:
    """The mapping under which every module weight name is a base tensor name.

    Args:
        module_weights: the adapter's LoRA modules as weight names (``<module>.weight``).
        other_names: the adapter's other tensors as base-side names (biases, saved modules); they
            break ties between mappings that fit every module but place these differently.
        base_names: the base's tensor names.

    Returns:
        (the mapping, []) when exactly one fits — the identity whenever it fits; (None, the candidates)
        when several fit and disagree; (the mapping that fits most modules or the identity, []) when none fits
        all — the modules it leaves out are then reported one by one by the caller.
    """
    if all(name in base_names for name in module_weights):
        return IDENTITY, []
    strips = [""] + sorted(_prefixes(module_weights))
    adds = [""] + sorted(_prefixes(base_names))
    scored: list[tuple[int, KeyMapping]] = []
    for strip in strips:
        for add in adds:
            mapping = KeyMapping(strip, add)
            scored.append((sum(mapping.apply(n) in base_names for n in module_weights), mapping))
    best = max(count for count, _ in scored)
    if best < len(module_weights):
        candidates = sorted((m for c, m in scored if c == best), key=_cost)
        return (candidates[0] if best else IDENTITY), []
    fitting = sorted((m for c, m in scored if c == best), key=_cost)
    # Mappings that place every tensor of the adapter on the same base tensor are the same mapping.
    distinct: dict[tuple[str, ...], KeyMapping] = {}
    for mapping in fitting:
        placed = tuple(mapping.apply(n) for n in [*module_weights, *other_names])
        distinct.setdefault(placed, mapping)
    if len(distinct) == 1:
        return next(iter(distinct.values())), []
    return None, list(distinct.values())
