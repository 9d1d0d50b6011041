"""Which detector classes are defects and which are structural elements.

The detector's metadata (written at export) carries one role per class slot. Where a checkpoint or labels
file names classes without roles, `role_of` decides by name: known structural elements are structures,
empty names (background slots) are ignored, and every other class is a defect, so a fine-tuned model
with its own defect names ("hairline_crack") works without configuration.
"""

from __future__ import annotations

DEFAULT_DEFECTS = (
    "crack",
    "spalling",
    "corrosion",
    "efflorescence",
    "exposed_rebar",
    "delamination",
    "scaling",
    "honeycombing",
    "leakage",
    "pop_out",
)

DEFAULT_STRUCTURES = (
    "beam",
    "column",
    "deck",
    "pier",
    "girder",
    "wall",
    "slab",
    "bearing",
    "joint",
    "abutment",
    "tunnel_lining",
    "parapet",
)

# The class list of untrained models and the default for labels files without roles.
DEFAULT_CLASSES = DEFAULT_DEFECTS + DEFAULT_STRUCTURES

STRUCTURE_NAMES = frozenset(DEFAULT_STRUCTURES) | {
    "girders",
    "beams",
    "columns",
    "piers",
    "walls",
    "slabs",
    "bearings",
    "joints",
    "expansion_joint",
    "cap_beam",
    "pile",
    "footing",
    "culvert",
    "railing",
    "barrier",
    "lining",
}

ROLES = ("defect", "structure", "ignore")


def normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def role_of(name: str) -> str:
    """defect / structure / ignore for a class name without an explicit role."""
    key = normalise(name)
    if not key or key in ("__background__", "background", "no_object"):
        return "ignore"
    if key in STRUCTURE_NAMES:
        return "structure"
    return "defect"
