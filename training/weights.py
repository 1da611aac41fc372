"""The trained weights the builder turns into stage modules, and their file format.

A weights file is one `torch.save` of plain tensors, numbers and strings (loaded with
`weights_only=True`): nothing executable is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Tuple

import torch

# bump when the meaning of a saved field changes: older files are then retrained, not reused
# 2: the linear model's user vectors are unit length; 3: built histories (target-aware OverArch)
FORMAT_VERSION = 3


@dataclass
class TrainedWeights:
    """Everything the user, ann and scorer stages need, item tensors in catalog order.

    user_tower: {"config": UserTowerConfig fields, "raw_ids": int64 [U] (the users the id map
        was built from), "feature_values"/"feature_weights": [R, M] per id-map row,
        "num_feature_values": int, "state": state_dict}.
    item_vectors: float32 [N, D] item tower outputs: what the ANN indexes.
    over_arch: {"config": OverArchConfig fields, "state": state_dict}.
    item_extra: float32 [N, E] the OverArch's free per-item vectors.
    histories: {"user_ids": int64 [U] raw ids, "offsets": int64 [U + 1], "items": int64 [M]
        catalog rows}: each user's built history, newest first (what the target-aware
        OverArch attends over for a request without `history`); {}: none.
    """

    tasks: Tuple[str, ...]
    user_tower: Dict
    item_vectors: torch.Tensor
    over_arch: Dict
    item_extra: torch.Tensor
    histories: Dict = field(default_factory=dict)
    metrics: Dict = field(default_factory=dict)
    fingerprint: Dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        blob = {f.name: getattr(self, f.name) for f in fields(self)}
        torch.save({"format_version": FORMAT_VERSION, **blob}, tmp)
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file

    @staticmethod
    def load(path: Path) -> TrainedWeights:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        version = blob.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: weights format {version}, expected {FORMAT_VERSION}")
        blob["tasks"] = tuple(blob["tasks"])
        return TrainedWeights(**blob)
