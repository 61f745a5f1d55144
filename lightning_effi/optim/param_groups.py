"""Split a module's parameters into optimizer groups by weight decay and by layer adaptation (LAMB's trust ratio).

Categories are detected by module type, not by parameter name alone, so a LayerNorm called ``ln_f`` or an RMSNorm
called ``scale`` is still recognised:

- ``"bias"``: every bias: a parameter whose own name (the part after the last dot) is ``bias`` or ends with
  ``_bias`` (``nn.MultiheadAttention.in_proj_bias``). ``bias_k``/``bias_v`` (``add_bias_kv=True``) are not: they
  are learned key/value rows, not offsets; the regex ``r"bias_[kv]$"`` adds them.
- ``"norm"``: every parameter owned by a normalisation layer: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
  ``nn.LocalResponseNorm``, any ``nn.modules.batchnorm._NormBase`` (BatchNorm/InstanceNorm), and any module whose
  class name ends with ``Norm`` (custom RMSNorm implementations).
- ``"embedding"``: weights of ``nn.Embedding`` / ``nn.EmbeddingBag``. Not excluded by default: GPT-2/nanoGPT decay
  (tied) embeddings, BERT's reference LAMB setup does too.
- ``"1d"``: every parameter with fewer than 2 dimensions (the common "no decay on vectors" rule).
- anything else: a regular expression searched in the fully qualified parameter name (``re.search``).

A parameter may be excluded from decay but not from adaptation, and the reverse. Shared (tied) parameters appear
once, under their first name.

An entry that is neither a category nor a regex matching some parameter's name raises ``ValueError`` (a misspelt
``"nrom"`` would otherwise leave every norm decayed). A category with no members is fine: the default
``("bias", "norm")`` applies to a model without biases as well.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

_BUILTIN = ("bias", "norm", "embedding", "1d")
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith("_bias")


def _categories(module: nn.Module) -> dict[str, set[str]]:
    """Map every parameter's qualified name to the built-in categories it belongs to."""
    cats: dict[str, set[str]] = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            c = set()
            if _is_bias(p_name):
                c.add("bias")
            if _is_norm(mod):
                c.add("norm")
            if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                c.add("embedding")
            if p.ndim < 2:
                c.add("1d")
            cats[full] = c
    return cats


def check_rules(rules: Sequence[str], what: str) -> list[re.Pattern]:
    """Validate ``no_decay``/``no_adapt`` entries without a model; return the compiled regexes (not categories).

    Raises ``TypeError`` for a bare string (it would be read as a sequence of one-letter rules) and ``ValueError``
    for an entry that is not a valid regex."""
    if isinstance(rules, str):
        raise TypeError(f"{what} must be a list of categories or patterns, got the string {rules!r}; write [{rules!r}]")
    patterns = []
    for r in rules:
        if r in _BUILTIN:
            continue
        try:
            patterns.append(re.compile(r))
        except re.error as e:
            raise ValueError(f"Invalid {what} entry {r!r}: not one of {_BUILTIN} and not a valid regex ({e})") from e
    return patterns


def _matcher(module: nn.Module, rules: Sequence[str], what: str):
    patterns = check_rules(rules, what)
    names = [n for n, _ in module.named_parameters()]
    for pattern in patterns:
        if any(pattern.search(n) for n in names):
            continue
        aliases = [n for n, _ in module.named_parameters(remove_duplicate=False) if pattern.search(n)]
        hint = (f" (it matches only {aliases[:3]}, a second name of a shared parameter, which is grouped under its "
                "first name)") if aliases else ""
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(f"Invalid {what} entry {pattern.pattern!r}: not a category and no parameter name matches it"
                         f"{hint}; use a category of {_BUILTIN} or a regex searched in names such as [{shown}]")
    builtin = {r for r in rules if r in _BUILTIN}

    def match(name: str, cats: set[str]) -> bool:
        return bool(builtin & cats) or any(p.search(name) for p in patterns)

    return match


def param_groups(
    module: nn.Module,
    weight_decay: float = 0.01,
    no_decay: Sequence[str] = ("bias", "norm"),
    no_adapt: Sequence[str] = (),
    *,
    with_names: bool = False,
) -> list[dict]:
    """Return optimizer parameter groups for ``module``.

    Args:
        module: the model; only parameters with ``requires_grad`` are returned.
        weight_decay: decay for the decayed group(s). Default ``0.01``.
        no_decay: categories (``"bias"``, ``"norm"``, ``"embedding"``, ``"1d"``) or name regexes whose
            parameters get ``weight_decay=0``; a regex must match at least one parameter name. Default
            ``("bias", "norm")``.
        no_adapt: the same, for parameters whose LAMB trust ratio is fixed to 1 (group key ``adapt=False``;
            optimizers other than :class:`~lightning_effi.optim.Lamb` ignore the key). Default ``()``.
        with_names: also store the parameter names of each group under ``"param_names"`` (for telemetry).

    Returns:
        Up to four groups, one per (decay, adapt) combination that has parameters, in a fixed order. Groups only
        carry the keys they override, so optimizer defaults still apply to everything else.
    """
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay {weight_decay!r}: must be >= 0")
    decay_off = _matcher(module, no_decay, "no_decay")
    adapt_off = _matcher(module, no_adapt, "no_adapt")
    cats = _categories(module)
    named = dict(module.named_parameters())
    buckets: dict[tuple[bool, bool], tuple[list, list]] = {}
    for name, p in named.items():
        if not p.requires_grad:
            continue
        c = cats.get(name, set())
        key = (not decay_off(name, c), not adapt_off(name, c))
        params, names = buckets.setdefault(key, ([], []))
        params.append(p)
        names.append(name)
    groups = []
    for decay, adapt in ((True, True), (True, False), (False, True), (False, False)):
        if (decay, adapt) not in buckets:
            continue
        params, names = buckets[(decay, adapt)]
        g: dict = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if not adapt:
            g["adapt"] = False
        if with_names:
            g["param_names"] = names
        groups.append(g)
    return groups
