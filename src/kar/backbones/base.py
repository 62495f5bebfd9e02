"""What every CTR backbone receives and promises.

A backbone sees tensors only: field embeddings (B, F, D), an optional dense knowledge input
(B, dense_dim) and an optional behaviour sequence. It never sees raw batches, the LLM or the
adaptor; `kar.models.KARModel` decides, from the class attribute `injection`, whether the
augmented knowledge vectors arrive as extra fields or as the dense input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

INJECTIONS = ("field", "dense")


@dataclass(frozen=True)
class SequenceInput:
    """Behaviour sequence for target-attention models (DIN, DIEN).

    target: (B, S) the candidate item; behaviours: (B, L, S) the history, oldest first;
    mask: (B, L) bool, true at valid history positions.
    """

    target: Tensor
    behaviours: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        b, length, s = self.behaviours.shape
        assert self.target.shape == (b, s), (self.target.shape, self.behaviours.shape)
        assert self.mask.shape == (b, length), (self.mask.shape, self.behaviours.shape)


class Backbone(nn.Module):
    """Base class of CTR backbones: sizes, the injection style, input checks.

    Subclasses set `injection`:
    - "field": knowledge arrives as extra fields, already counted in `num_fields`
      (the adaptor output dim must equal `embed_dim`); `dense_dim` must be 0.
    - "dense": knowledge arrives as `dense` (B, dense_dim), 0 when the model runs bare.
    Hyperparameters are keyword-only constructor arguments with defaults (see kar.registry).
    """

    injection: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "injection", None) not in INJECTIONS:
            raise TypeError(f"{cls.__name__}.injection must be one of {INJECTIONS}")

    def __init__(self, num_fields: int, embed_dim: int, dense_dim: int) -> None:
        super().__init__()
        if num_fields < 1 or embed_dim < 1 or dense_dim < 0:
            raise ValueError(
                f"{type(self).__name__}: need num_fields >= 1, embed_dim >= 1, dense_dim >= 0; "
                f"got {num_fields}, {embed_dim}, {dense_dim}"
            )
        if self.injection == "field" and dense_dim != 0:
            raise ValueError(
                f"{type(self).__name__} takes knowledge as fields; dense_dim must be 0, "
                f"got {dense_dim}"
            )
        self.num_fields = num_fields
        self.embed_dim = embed_dim
        self.dense_dim = dense_dim

    def check_inputs(self, fields: Tensor, dense: Tensor | None) -> None:
        """Assert fields (B, F, D) and dense (B, dense_dim) or None match this backbone."""
        b = fields.shape[0]
        assert fields.shape == (b, self.num_fields, self.embed_dim), (
            f"fields {tuple(fields.shape)} != (B, {self.num_fields}, {self.embed_dim})"
        )
        if self.dense_dim == 0:
            assert dense is None, "this backbone was built without a dense input (dense_dim=0)"
        else:
            assert dense is not None and dense.shape == (b, self.dense_dim), (
                f"dense {None if dense is None else tuple(dense.shape)} != (B, {self.dense_dim})"
            )

    def flat_input(self, fields: Tensor, dense: Tensor | None) -> Tensor:
        """Checked [flattened fields, dense]: (B, F*D + dense_dim)."""
        self.check_inputs(fields, dense)
        if dense is None:
            return fields.flatten(1)  # (B, F*D)
        return torch.cat([fields.flatten(1), dense], dim=1)  # (B, F*D + dense_dim)

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        """Logits (B,), no sigmoid."""
        raise NotImplementedError
