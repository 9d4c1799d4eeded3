"""Whether a finetuned model is better than its parent, in plain words (no torch needed, so the panel can ask).

The held-back labelled cases decide. A finetuned model is *selected* (the panel's Segment
section switches to it, ``medsegsuite models`` lists it without a warning) only when its
mean Dice on the held-back cases is above its parent's, or when the user asked to keep
it anyway. Without held-back cases (fewer than three labelled cases) the gain cannot be
checked and the model is not selected either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

__all__ = ["BETTER", "NOT_BETTER", "UNCHECKED", "FinetuneVerdict"]

BETTER = "better"
NOT_BETTER = "not better"
UNCHECKED = "not checked"


@dataclass(frozen=True)
class FinetuneVerdict:
    """The held-back check of one finetuning run.

    Attributes:
        outcome: ``"better"``, ``"not better"`` or ``"not checked"`` (no held-back cases).
        held_back: number of labelled cases held back from training for the check.
        dice_before, dice_after: mean Dice of the parent and of the new model on them
            (on the training cases when none was held back).
        kept_parent: no finetuned checkpoint beat the parent, so the new model has the parent's weights.
        selected: the new model is meant to replace its parent (better, or kept at the user's request).
    """

    outcome: str
    held_back: int
    dice_before: Optional[float]
    dice_after: Optional[float]
    kept_parent: bool = False
    selected: bool = False

    @classmethod
    def judge(
        cls,
        dice_before: float,
        dice_after: float,
        held_back: int,
        kept_parent: bool = False,
        keep_if_worse: bool = False,
    ) -> FinetuneVerdict:
        """The verdict on these numbers: better only with held-back cases and a strictly higher Dice."""
        if held_back <= 0:
            outcome = UNCHECKED
        else:
            outcome = BETTER if dice_after > dice_before and not kept_parent else NOT_BETTER
        return cls(
            outcome,
            int(held_back),
            round(float(dice_before), 4),
            round(float(dice_after), 4),
            bool(kept_parent),
            outcome == BETTER or bool(keep_if_worse),
        )

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> Optional[FinetuneVerdict]:
        """The verdict a card or a worker result recorded, or ``None`` when it has none (older models)."""
        if not isinstance(data, Mapping) or data.get("outcome") not in (BETTER, NOT_BETTER, UNCHECKED):
            return None

        def number(key: str) -> Optional[float]:
            value = data.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        return cls(
            str(data["outcome"]),
            int(data.get("held_back") or 0),
            number("dice_before"),
            number("dice_after"),
            bool(data.get("kept_parent", False)),
            bool(data.get("selected", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what cards and worker results carry)."""
        return asdict(self)

    @property
    def better(self) -> bool:
        return self.outcome == BETTER

    def _dice(self) -> str:
        if self.dice_before is None or self.dice_after is None:
            return ""
        return f"Dice {self.dice_before:.3f} \u2192 {self.dice_after:.3f}"

    def sentence(self, parent: str) -> str:
        """One sentence a clinician reads at a glance: is the new model better than ``parent`` (a name or id)?"""
        cases = f"{self.held_back} held-back case{'s' if self.held_back != 1 else ''}"
        if self.outcome == UNCHECKED:
            return (
                "The gain could not be checked: with fewer than three labelled cases none was held back "
                "to test the new model on."
            )
        if self.outcome == BETTER:
            gain = (self.dice_after or 0.0) - (self.dice_before or 0.0)
            return f"Better than {parent} on the {cases}: {self._dice()} (+{gain:.3f})."
        if self.kept_parent:
            return (
                f"Not better than {parent}: no finetuned version beat it on the {cases} "
                f"(Dice {self.dice_before:.3f}), so the new model keeps the parent's weights."
            )
        if self.dice_after is not None and self.dice_before is not None and self.dice_after < self.dice_before:
            return f"Worse than {parent} on the {cases}: {self._dice()}."
        return f"Not better than {parent} on the {cases}: {self._dice()}."
