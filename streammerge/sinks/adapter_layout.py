"""Where each merged tensor goes in a PEFT LoRA adapter, and the factors written for it.

Plain data and pure math for ``sinks/peft_adapter.py``: which PEFT module and kind (Linear,
embedding, LoRA bias, ``modules_to_save``) each merged tensor becomes, every reason a plan cannot
be written as an adapter (checked at plan time), and the factorisation (exact, or truncated by SVD)
of one update.

Module kinds: Linear (``lora_A``/``lora_B``); GPT-2 ``Conv1D`` (the same, ``fan_in_fan_out``);
Embedding (``lora_embedding_A [r, vocab]``, ``lora_embedding_B [hidden, r]``, ΔW = (B A)ᵀ);
the bias of a LoRA-targeted Linear (``lora_B.bias`` with ``lora_bias``); any other changed
tensor (norms, other biases) through ``modules_to_save`` with the module's merged values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..inputs.kinds import KINDS, REPLACEMENT
from ..inputs.lora import PEFT_PREFIX
from ..errors import OutputError
from ..methods import DenseUpdate, LowRankUpdate, TaskUpdate, get_method
from ..methods.extraction import extract_low_rank
from ..methods.lowrank import product_svd
from ..names import EMBEDDING_SUFFIXES
from ..planning.plan import MergePlan, TensorJob
from ..planning.tensor_jobs import Contribution

__all__ = ["AdapterTarget", "adapter_targets", "canonical_for", "factorize", "split_name", "CONV1D_MODEL_TYPES"]

# Model types whose Linear-like layers are transformers' Conv1D (weight stored [d_in, d_out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
_BASE_LAYER_KEY = ".base_layer."
# Dense updates wider than this on both sides are truncated by a randomized SVD.
RANDOMIZED_SVD_MIN_SIDE = 1024


@dataclass(frozen=True)
class AdapterTarget:
    """How one merged tensor goes into the adapter.

    Attributes:
        tensor: the base tensor name.
        module: the PEFT module path its keys are saved under.
        kind: "linear", "embedding", "bias" (lora_B.bias) or "saved" (modules_to_save).
        fan_in_fan_out: the module is a Conv1D (weight stored transposed).
    """

    tensor: str
    module: str
    kind: str
    fan_in_fan_out: bool = False


def split_name(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def _module_names(jobs: list[TensorJob]) -> dict[str, str]:
    """Module path per tensor prefix: the input adapters' own spelling (PEFT took it from the real model)."""
    names = {}
    for job in jobs:
        for c in job.contributions:
            if KINDS[c.kind].peft_factors:
                names[split_name(job.name)[0]] = c.keys[0].removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
                break
    return names


def _dense(c: Contribution) -> bool:
    """Whether a contribution makes the update dense.  PEFT saves embedding layers it wraps
    (``….base_layer.weight``) even when unchanged; the engine drops those equal to the base, so
    they are assumed unchanged here and checked when the tensor is merged."""
    kind = KINDS[c.kind]
    return kind.dense_in_adapter and not (kind is REPLACEMENT and _BASE_LAYER_KEY in c.keys[0])


def adapter_targets(plan: MergePlan, base_config: dict[str, Any]) -> tuple[list[AdapterTarget], list[str]]:
    """Every merged tensor's place in the adapter, and every reason the adapter cannot be written."""
    merged = [t for t in plan.tensors if t.contributions]
    modules = _module_names(merged)
    low_rank_prefixes = {split_name(t.name)[0] for t in merged if len(t.shape) == 2}
    conv1d = base_config.get("model_type") in CONV1D_MODEL_TYPES
    dense_method = get_method(plan.recipe.method).dense_inputs
    targets: list[AdapterTarget] = []
    problems: list[str] = []
    need_rank: list[str] = []
    for job in merged:
        prefix, leaf = split_name(job.name)
        module = modules.get(prefix, prefix)
        lora = [c for c in job.contributions if KINDS[c.kind].peft_factors]
        if len(job.shape) == 2:
            embedding = any("lora_embedding_" in c.keys[0] for c in lora) or job.name.endswith(EMBEDDING_SUFFIXES)
            if conv1d and not embedding and not lora:
                problems.append(
                    f"output_format: {job.name!r} of this {base_config.get('model_type')} model is a Conv1D layer, "
                    "and without a LoRA input on it its orientation for an adapter is unknown; use --output-format model")
            if plan.recipe.rank is None and (dense_method or any(_dense(c) for c in job.contributions)):
                need_rank.append(job.name)
            fan = bool(lora) and not embedding and all(c.transposed for c in lora)
            targets.append(AdapterTarget(job.name, module, "embedding" if embedding else "linear", fan))
        elif leaf == "bias" and prefix in low_rank_prefixes:
            targets.append(AdapterTarget(job.name, module, "bias"))
        else:
            targets.append(AdapterTarget(job.name, module, "saved"))
    if need_rank:
        problems.append(
            f"rank: method {plan.recipe.method!r} (or a full fine-tune / modules_to_save input) gives dense updates for "
            f"{len(need_rank)} tensor(s), e.g. {need_rank[0]!r}; an adapter stores them as a truncated SVD: "
            "pass --rank K (e.g. --rank 64), or use --output-format model")
    if len({t.fan_in_fan_out for t in targets if t.kind == "linear"}) > 1:
        problems.append("output_format: the merge changes both Conv1D (fan_in_fan_out) and Linear layers, but "
                        "fan_in_fan_out is one flag per PEFT adapter; restrict the inputs with include/exclude "
                        "filters, or use --output-format model")
    kinds = {t.kind for t in targets}
    if "bias" in kinds and "embedding" in kinds:
        problems.append("output_format: the merge changes both embeddings and Linear biases, but PEFT does not "
                        "support lora_bias with embedding LoRA; exclude one of them (include/exclude filters) "
                        "or use --output-format model")
    if not kinds & {"linear", "embedding"}:
        problems.append("output_format: the merge changes no matrix, so there is no LoRA to write; "
                        "use --output-format model")
    return targets, problems


def factorize(update: TaskUpdate, rank: int | None, seed: int = 0) -> tuple[LowRankUpdate, float]:
    """LoRA factors of a 2-D update, and the relative Frobenius error of the truncation.

    A low-rank update within ``rank`` (or with ``rank`` None) is returned as it is (exact, error 0);
    otherwise the best rank-``rank`` approximation, σ split evenly between the factors.  A dense
    update whose smaller side exceeds ``RANDOMIZED_SVD_MIN_SIDE`` is truncated by a seeded
    randomized SVD (``methods.extraction``: 40–170× faster than the full SVD at 4096–14336 wide,
    error within 1 % of it); ``seed`` makes the sketch, so a re-run or resumed job writes the same bytes.

    Raises:
        OutputError: a dense update with no ``rank`` to truncate to.
    """
    if isinstance(update, LowRankUpdate):
        if rank is None or update.rank <= rank:
            return update, 0.0
        u, s, vh = product_svd(update.up, update.down, rtol=0.0)
    else:
        if rank is None:
            raise OutputError("a merged update is dense (e.g. a saved embedding layer differs from the base), and an "
                              "adapter stores dense updates as a truncated SVD: pass --rank K, or use --output-format model")
        randomized = min(update.delta.shape) > RANDOMIZED_SVD_MIN_SIDE
        generator = torch.Generator(device=update.delta.device).manual_seed(seed) if randomized else None
        found = extract_low_rank(update.delta, rank, randomized=randomized, generator=generator)
        return LowRankUpdate(up=found.up, down=found.down), found.relative_error
    k = min(rank, s.numel())
    energy = s.double().square()
    total = float(energy.sum())
    error = (float(energy[k:].sum()) / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    return LowRankUpdate(up=u[:, :k] * root, down=root[:, None] * vh[:k]), error


def canonical_for(target: AdapterTarget, update: TaskUpdate, transposed: bool) -> TaskUpdate:
    """Embedding LoRA wants ``B A = ΔWᵀ`` ([hidden, vocab]); a dense embedding update comes as ΔW."""
    if target.kind != "embedding" or transposed:
        return update
    if isinstance(update, LowRankUpdate):
        return LowRankUpdate(up=update.down.T, down=update.up.T)
    return DenseUpdate(update.delta.T)
