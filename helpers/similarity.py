"""Cosine similarity between regions, per conv layer, and the layer_1/2/3 selection.

``layer_1``, ``layer_2``, ``layer_3`` are the **last**, **3rd-last** and **5th-last** Conv3d
layers in execution order (the seed's definition; its code used the first conv for all
three). For DenseNet-121 these are ``denseblock4.denselayer16.conv2``,
``denseblock4.denselayer15.conv2`` and ``denseblock4.denselayer14.conv2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .extract import Features

PAIRS: tuple[tuple[str, str], ...] = (("tibia", "femur"), ("tibia", "background"), ("femur", "background"))
COLUMNS: tuple[str, ...] = ("layer_1", "layer_2", "layer_3")
#: Position of each column's layer counted from the end (1 = last conv).
FROM_END = {"layer_1": 1, "layer_2": 3, "layer_3": 5}


@dataclass(frozen=True, eq=False)
class SimilarityTable:
    """Cosine similarities: the results table (pairs x layer_1..3) and the full per-layer profile."""

    pairs: list[str]  #: row names, e.g. "tibia_femur"
    columns: list[str]  #: "layer_1", "layer_2", "layer_3"
    column_layers: list[str]  #: the Conv3d layer behind each column
    values: np.ndarray  #: (n_pairs, 3) float64
    layer_names: list[str]  #: every Conv3d layer, execution order
    profile: np.ndarray  #: (n_pairs, n_layers) float64, cosine at every layer

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {p: {c: float(v) for c, v in zip(self.columns, row)} for p, row in zip(self.pairs, self.values)}


def format_table(table: SimilarityTable) -> str:
    """The results table as plain text (4 decimals) and a line naming each column's layer."""
    width = max(len(p) for p in table.pairs)
    lines = [f"{'pair':<{width}}  " + "  ".join(f"{c:>8}" for c in table.columns)]
    lines += [f"{p:<{width}}  " + "  ".join(f"{v:8.4f}" for v in row) for p, row in zip(table.pairs, table.values)]
    lines.append("layers: " + ", ".join(f"{c}={n}" for c, n in zip(table.columns, table.column_layers)))
    return "\n".join(lines)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors in float64 (0 when either is all zeros)."""
    a64, b64 = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64) / denom if denom > 0 else 0.0


def select_layers(layer_names: Sequence[str]) -> dict[str, str]:
    """The layer behind each column: last, 3rd-last and 5th-last of ``layer_names``."""
    if len(layer_names) < max(FROM_END.values()):
        raise ValueError(f"need at least {max(FROM_END.values())} conv layers, got {len(layer_names)}")
    return {col: layer_names[-k] for col, k in FROM_END.items()}


def compare(features: Features, pairs: Sequence[tuple[str, str]] = PAIRS) -> SimilarityTable:
    """Cosine similarity of every region pair at every conv layer; the table keeps layer_1..3."""
    names = features.layer_names
    profile = np.array(
        [[cosine(features.vectors[a][i], features.vectors[b][i]) for i in range(len(names))] for a, b in pairs]
    )
    chosen = select_layers(names)
    idx = [names.index(chosen[c]) for c in COLUMNS]
    return SimilarityTable(
        pairs=[f"{a}_{b}" for a, b in pairs],
        columns=list(COLUMNS),
        column_layers=[chosen[c] for c in COLUMNS],
        values=profile[:, idx],
        layer_names=list(names),
        profile=profile,
    )
