"""Where a model's super weights sit and what they write: plain data that several areas consume.

The super-weight area detects them; the quantization area holds them out of round-to-nearest. This type lets
the second ask for the first's result (through the session's artifacts) without importing that area.
"""

from __future__ import annotations

from dataclasses import dataclass

Coordinate = tuple[int, int, int]  # (layer, row, col) of W_down as [hidden, intermediate]


@dataclass(frozen=True)
class SuperActivation:
    """The super activation ``y[token, channel]`` that a super weight of ``layer`` writes (signed value)."""

    layer: int
    token: int
    channel: int
    value: float


@dataclass(frozen=True)
class SuperWeightSites:
    """The confirmed super weights of the model under audit (possibly none) and their super activations."""

    coordinates: tuple[Coordinate, ...]
    activations: tuple[SuperActivation, ...]
    description: str = ""  # how they were found (detector, prompt, confirmation), for reports

    def __bool__(self) -> bool:
        return bool(self.coordinates)
