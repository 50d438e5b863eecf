"""Task categories and their capability points, as data (a YAML or JSON taxonomy file)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Capability:
    """One capability point of a category, e.g. roleplay's character consistency."""

    name: str
    """Identifier: lower-case letters, digits and underscores (it names a LoRA adapter)."""
    definition: str
    """One-line English definition, used in judge prompts."""
    definition_zh: str | None = None
    """Chinese definition, where given."""


@dataclass(frozen=True)
class Category:
    """A task category: the router's class and one inner model."""

    name: str
    """Identifier: lower-case letters, digits and underscores."""
    description: str
    """One-line English description."""
    capabilities: tuple[Capability, ...]
    """The capability points the category's task decomposes into (one expert each)."""
    description_zh: str | None = None


@dataclass(frozen=True)
class Taxonomy:
    """Categories with their capability points, plus mappings from source labels onto categories."""

    name: str
    categories: tuple[Category, ...]
    mappings: dict = field(default_factory=dict, compare=False, hash=False)
    """Source label -> category name, per source (e.g. ``{"autoj": {"roleplay": "roleplay", ...}}``)."""
