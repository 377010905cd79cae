"""Named algorithms as presets: one key (``loss.preset``) that sets the keys the algorithm needs.

A preset expands into dotted config keys before the config is built. Keys the user
sets explicitly must agree with the preset (a conflicting value is an error, never a
silent override); keys it does not name keep their values. docs/algorithms.md has the
table of options and papers.
"""

from __future__ import annotations

from typing import Any

from grpo.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no std scaling of the
    # advantage, and a constant normaliser instead of each sequence's length.
    "dr_grpo": {"loss.advantage_scale": "none", "loss.aggregation": "constant"},
    # DAPO (Yu et al. 2025): clip-higher, token-level loss, dynamic sampling (with backfill).
    "dapo": {"loss.epsilon_low": 0.2, "loss.epsilon_high": 0.28, "loss.aggregation": "token_mean",
             "rollout.dynamic_sampling": True},
    # GSPO (Zheng et al. 2025): the length-normalised sequence ratio, clipped at 3e-4 / 4e-4
    # (the paper's range), per-sequence loss.
    "gspo": {"loss.ratio_level": "sequence", "loss.epsilon_low": 3e-4, "loss.epsilon_high": 4e-4,
             "loss.aggregation": "seq_mean"},
    # RLOO (Ahmadian et al. 2024): the leave-one-out baseline.
    "rloo": {"loss.advantage_scale": "rloo"},
}


def expand_preset(data: dict[str, Any]) -> None:
    """Expand ``data["loss"]["preset"]`` into its keys, in place; conflicting explicit values raise."""
    loss = data.get("loss")
    name = loss.get("preset", "none") if isinstance(loss, dict) else "none"
    if name not in PRESETS:
        return  # the config's type check reports the bad name with the valid ones
    for dotted, value in PRESETS[name].items():
        section, key = dotted.split(".")
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            return  # the type check reports the malformed section
        if key in node and not _same(node[key], value):
            raise UserError(f"config: loss.preset={name} sets {dotted}={value!r}, but the config sets "
                            f"{dotted}={node[key]!r}; remove one of the two")
        node[key] = value


def _same(given: Any, preset: Any) -> bool:
    """The config's value equals the preset's, also when YAML 1.1 read a number as text
    (``epsilon_low: 3e-4`` is the string "3e-4"; the config's types turn it into 0.0003 later)."""
    if given == preset:
        return True
    if isinstance(preset, float) and isinstance(given, str):
        try:
            return float(given) == preset
        except ValueError:
            return False
    return False
