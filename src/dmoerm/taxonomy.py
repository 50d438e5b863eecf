"""Task categories and their capability points, as data (a YAML or JSON taxonomy file).

A taxonomy file holds::

    name: default
    categories:
      - name: roleplay                      # lower-case identifier: it names the inner model / LoRA adapters
        description: Play a character ...
        description_zh: ...                 # optional
        capabilities:
          - name: character_consistency
            definition: Stays in the assigned persona ...
            definition_zh: ...              # optional
            label_source: judge             # optional: judge (default) or a bundled human set, see LABEL_SOURCES
    mappings:                               # optional: source label -> category name (or null), per source
      autoj: {roleplay: roleplay, default: null}
      rmb: {"Helpfulness/Code": code}       # path labels match by their longest '/'-prefix

:func:`load_taxonomy` reads a file or a packaged preset (``paper``, ``default``), :func:`save_taxonomy`
writes one, :func:`assign_categories` maps loaded records' source labels onto the taxonomy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

PRESETS = ("paper", "default", "finegrained")
"""Names :func:`load_taxonomy` resolves to packaged files ``dmoerm/presets/<name>.yaml``."""

JUDGE = "judge"
"""The default label source of a capability point: an LLM judge labels its pairs (``dmoerm label``)."""

LABEL_SOURCES = (
    JUDGE,
    "finegrained/relevance",
    "finegrained/factuality",
    "finegrained/completeness",
    "llmbar",
    "hh_rlhf/harmless",
)
"""Where a capability point's phase-2 labels can come from: ``judge``, or a bundled human-labelled set whose
labels :func:`dmoerm.labelling.human.human_capability_labels` maps onto the capability point:

* ``finegrained/<aspect>``: FineGrainedRLHF QA feedback, the annotators' relevance, factuality or completeness
  errors (the corrected answer beats the original on that aspect);
* ``llmbar``: LLMBar natural + adversarial, the gold instruction-following label;
* ``hh_rlhf/harmless``: Anthropic hh-rlhf harmless-base test, the human harmlessness preference.
"""


def _check_label_source(where: str, source: Any) -> None:
    if source not in LABEL_SOURCES:
        raise ValueError(
            f"{where}: label_source {source!r} is not a known label source; use one of "
            f"{', '.join(LABEL_SOURCES)}"
        )


NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MAX_NAME = 64


def _suggest(name: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_")
    if s and not s[0].isalpha():
        s = "x_" + s
    return s or "my_name"


def _check_name(where: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: missing or empty name; give a lower-case identifier such as 'empathy'")
    if not NAME_RE.match(name) or len(name) > _MAX_NAME:
        raise ValueError(
            f"{where}: {name!r} is not a lower-case identifier (a-z, 0-9, _; starting with a letter; at most "
            f"{_MAX_NAME} characters) — it names a LoRA adapter; use e.g. {_suggest(name)!r}"
        )


def _check_text(where: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{where}: {'must be a non-empty string' if not optional else 'must be a string or null'}"
        )


@dataclass(frozen=True)
class Capability:
    """One capability point of a category, e.g. roleplay's character consistency."""

    name: str
    """Identifier: lower-case letters, digits and underscores (it names a LoRA adapter)."""
    definition: str
    """One-line English definition, used in judge prompts."""
    definition_zh: str | None = None
    """Chinese definition, where given."""
    label_source: str = JUDGE
    """Where its phase-2 labels come from: ``judge`` (an LLM judge) or a bundled human set named in
    :data:`LABEL_SOURCES` (e.g. ``finegrained/factuality``, ``llmbar``, ``hh_rlhf/harmless``)."""

    def __post_init__(self) -> None:
        _check_name("capability.name", self.name)
        _check_text(f"capability {self.name!r}: definition", self.definition)
        _check_text(f"capability {self.name!r}: definition_zh", self.definition_zh, optional=True)
        _check_label_source(f"capability {self.name!r}", self.label_source)

    def to_dict(self) -> dict:
        """Plain dict for YAML/JSON (``definition_zh`` omitted when absent, ``label_source`` when ``judge``)."""
        d = {"name": self.name, "definition": self.definition}
        if self.definition_zh is not None:
            d["definition_zh"] = self.definition_zh
        if self.label_source != JUDGE:
            d["label_source"] = self.label_source
        return d


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

    def __post_init__(self) -> None:
        _check_name("category.name", self.name)
        _check_text(f"category {self.name!r}: description", self.description)
        _check_text(f"category {self.name!r}: description_zh", self.description_zh, optional=True)
        caps = tuple(self.capabilities) if isinstance(self.capabilities, (list, tuple)) else None
        if caps is None:
            raise ValueError(f"category {self.name!r}: capabilities must be a list")
        object.__setattr__(self, "capabilities", caps)
        if not caps:
            raise ValueError(
                f"category {self.name!r}: capabilities is empty; give at least one capability point "
                "(name + definition)"
            )
        seen: set[str] = set()
        for c in caps:
            if not isinstance(c, Capability):
                raise ValueError(f"category {self.name!r}: capabilities must be Capability objects")
            if c.name in seen:
                raise ValueError(
                    f"category {self.name!r}: capability {c.name!r} appears twice; capability names must be "
                    "unique within a category"
                )
            seen.add(c.name)

    @property
    def capability_names(self) -> tuple[str, ...]:
        """The capability points' names, in order."""
        return tuple(c.name for c in self.capabilities)

    def capability(self, name: str) -> Capability:
        """The capability point called ``name`` (KeyError naming the known ones otherwise)."""
        for c in self.capabilities:
            if c.name == name:
                return c
        raise KeyError(
            f"category {self.name!r} has no capability {name!r}; it has {', '.join(self.capability_names)}"
        )

    def label_sources(self) -> dict[str, str]:
        """Capability name -> its label source (``judge`` or a bundled human set), in taxonomy order."""
        return {c.name: c.label_source for c in self.capabilities}

    def to_dict(self) -> dict:
        """Plain dict for YAML/JSON."""
        d: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.description_zh is not None:
            d["description_zh"] = self.description_zh
        d["capabilities"] = [c.to_dict() for c in self.capabilities]
        return d


@dataclass(frozen=True)
class Taxonomy:
    """Categories with their capability points, plus mappings from source labels onto categories."""

    name: str
    categories: tuple[Category, ...]
    mappings: dict = field(default_factory=dict, compare=False, hash=False)
    """Source label -> category name, per source (e.g. ``{"autoj": {"roleplay": "roleplay", ...}}``)."""

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        cats = tuple(self.categories) if isinstance(self.categories, (list, tuple)) else None
        if cats is None:
            raise ValueError("categories: must be a list of categories")
        object.__setattr__(self, "categories", cats)
        if not cats:
            raise ValueError("categories: empty; a taxonomy needs at least one category")
        names: set[str] = set()
        for c in cats:
            if not isinstance(c, Category):
                raise ValueError("categories: must be Category objects")
            if c.name in names:
                raise ValueError(f"categories: {c.name!r} appears twice; category names must be unique")
            names.add(c.name)
        if not isinstance(self.mappings, Mapping):
            raise ValueError("mappings: must be a mapping of source -> {label: category or null}")
        for source, table in self.mappings.items():
            if not isinstance(source, str) or not source:
                raise ValueError(f"mappings: source key {source!r} must be a non-empty string")
            if not isinstance(table, Mapping):
                raise ValueError(f"mappings.{source}: must be a mapping of label -> category name or null")
            for label, target in table.items():
                if not isinstance(label, str):
                    raise ValueError(
                        f"mappings.{source}: label {label!r} must be a string (quote it in YAML)"
                    )
                if target is not None and target not in names:
                    raise ValueError(
                        f"mappings.{source}[{label!r}]: unknown category {target!r}; use one of "
                        f"{', '.join(sorted(names))}, or null to leave the label unmapped"
                    )

    @property
    def category_names(self) -> tuple[str, ...]:
        """The categories' names, in order (the router's class order)."""
        return tuple(c.name for c in self.categories)

    def category(self, name: str) -> Category:
        """The category called ``name`` (KeyError naming the known ones otherwise)."""
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(
            f"taxonomy {self.name!r} has no category {name!r}; it has {', '.join(self.category_names)}"
        )

    def pooled(self, name: str = "pooled") -> Taxonomy:
        """One category ``name`` holding every category's capability points (the first definition of a name
        wins): the inner model of the "without router" ablation (issue 5), one inner model for every task."""
        caps: dict[str, Capability] = {}
        for c in self.categories:
            for cap in c.capabilities:
                caps.setdefault(cap.name, cap)
        described = ", ".join(self.category_names)
        return Taxonomy(
            name=f"{self.name}_pooled",
            categories=(Category(name, f"every task ({described})", tuple(caps.values())),),
        )

    def _table(self, source: str) -> Mapping[str, str | None] | None:
        if source in self.mappings:
            return self.mappings[source]
        family = source.split("/", 1)[0]
        return self.mappings.get(family)

    def map_label(self, source: str, label: str | None) -> str | None:
        """The category a source's label maps to, or None.

        The source's table is ``mappings[source]``, else ``mappings[<part before the first '/'>]`` (so
        ``rmb`` covers ``rmb/pairwise_helpfulness``). A label matches exactly, else by its longest
        ``/``-separated prefix (``Helpfulness/Code/Documentation`` -> the entry for ``Helpfulness/Code``). A
        label that matches nothing but is itself a category name maps to itself; anything else to None.
        """
        return self.lookup(source, label)[1]

    def lookup(self, source: str, label: str | None) -> tuple[bool, str | None]:
        """``(matched, category)``: like :meth:`map_label`, plus whether an entry (possibly null) matched."""
        if label is None:
            return False, None
        table = self._table(source) or {}
        if label in table:
            return True, table[label]
        parts = label.split("/")
        for n in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:n])
            if prefix in table:
                return True, table[prefix]
        if label in self.category_names:
            return True, label
        return False, None

    def to_dict(self) -> dict:
        """Plain dict for YAML/JSON (the file format)."""
        return {
            "name": self.name,
            "categories": [c.to_dict() for c in self.categories],
            "mappings": {s: dict(t) for s, t in self.mappings.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Taxonomy:
        """Build and validate a taxonomy from the file format; ValueError names the field and the fix."""
        if not isinstance(data, Mapping):
            raise ValueError("taxonomy: expected a mapping with 'name', 'categories' and optional 'mappings'")
        unknown = set(data) - {"name", "categories", "mappings"}
        if unknown:
            raise ValueError(
                f"taxonomy: unknown key(s) {', '.join(sorted(map(str, unknown)))}; use name, categories, mappings"
            )
        if "categories" not in data:
            raise ValueError("categories: missing; give a list of categories")
        raw_cats = data["categories"]
        if not isinstance(raw_cats, list):
            raise ValueError("categories: must be a list of categories")
        cats = [_category_from_dict(c, f"categories[{i}]") for i, c in enumerate(raw_cats)]
        mappings = data.get("mappings") or {}
        return cls(name=data.get("name", ""), categories=tuple(cats), mappings=_plain(mappings))


def _plain(m: Any) -> Any:
    if isinstance(m, Mapping):
        return {k: _plain(v) for k, v in m.items()}
    return m


def _fields(d: Any, where: str, allowed: set[str], required: Iterable[str]) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping with {', '.join(sorted(allowed))}")
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(sorted(allowed))}"
        )
    for r in required:
        if r not in d:
            raise ValueError(f"{where}.{r}: missing")


def _wrap(where: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _category_from_dict(d: Any, where: str) -> Category:
    _fields(
        d,
        where,
        {"name", "description", "description_zh", "capabilities"},
        ("name", "description", "capabilities"),
    )
    raw_caps = d["capabilities"]
    if not isinstance(raw_caps, list):
        raise ValueError(f"{where}.capabilities: must be a list of capability points")
    caps = []
    for j, c in enumerate(raw_caps):
        w = f"{where}.capabilities[{j}]"
        _fields(c, w, {"name", "definition", "definition_zh", "label_source"}, ("name", "definition"))
        source = c.get("label_source", JUDGE)
        _check_label_source(f"{w} (category {d['name']!r}, capability {c['name']!r})", source)
        caps.append(_wrap(w, Capability, c["name"], c["definition"], c.get("definition_zh"), source))
    return _wrap(where, Category, d["name"], d["description"], tuple(caps), d.get("description_zh"))


def _read_text(path_or_preset: str | Path) -> tuple[str, str]:
    """(text, display name) of a taxonomy file or packaged preset."""
    p = Path(path_or_preset)
    if p.is_file():
        return p.read_text(encoding="utf-8"), str(p)
    name = str(path_or_preset)
    if name in PRESETS:
        res = resources.files("dmoerm").joinpath("presets", f"{name}.yaml")
        return res.read_text(encoding="utf-8"), f"preset {name!r}"
    raise FileNotFoundError(
        f"{name}: no such taxonomy file and no preset of that name; presets: {', '.join(PRESETS)}"
    )


def load_taxonomy(path_or_preset: str | Path) -> Taxonomy:
    """Read a taxonomy from a YAML/JSON file, or a packaged preset (``"paper"``, ``"default"``).

    A file path wins over a preset of the same name. Validation errors are ValueErrors naming the file, the
    field and the fix.
    """
    import yaml

    text, display = _read_text(path_or_preset)
    try:
        data = json.loads(text) if str(path_or_preset).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{display}: not valid YAML/JSON ({e})") from None
    try:
        return Taxonomy.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{display}: {e}") from None


def save_taxonomy(taxonomy: Taxonomy, path: str | Path) -> None:
    """Write a taxonomy as JSON (``.json``) or YAML (anything else); :func:`load_taxonomy` reads it back."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = taxonomy.to_dict()
    if p.suffix == ".json":
        p.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    else:
        p.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=110), encoding="utf-8")


def assign_categories(records: Iterable[_T], taxonomy: Taxonomy, source: str | None = None) -> list[_T]:
    """Map each record's source label (its ``category``) onto ``taxonomy`` with :meth:`Taxonomy.map_label`.

    The mapping table is chosen by ``source`` when given, else by each record's own ``source``. Returns new
    records (same type, same order) whose ``category`` is a taxonomy category name or None, with the original
    label kept in ``meta["source_label"]``. Records that map to nothing are kept with category None and
    counted in a log line: an INFO line for labels mapped to null on purpose or records with no label, a
    WARNING for labels the taxonomy has no entry for.
    """
    out: list[_T] = []
    to_null: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    no_label: Counter[str] = Counter()
    for rec in records:
        label = rec.category  # type: ignore[attr-defined]
        src = source if source is not None else rec.source  # type: ignore[attr-defined]
        matched, target = taxonomy.lookup(src, label)
        if label is None:
            no_label[src] += 1
        elif target is None:
            (to_null if matched else unknown)[f"{src}:{label}"] += 1
        meta = dict(rec.meta)  # type: ignore[attr-defined]
        meta.setdefault("source_label", label)
        out.append(dataclasses.replace(rec, category=target, meta=meta))  # type: ignore[type-var]

    def top(c: Counter[str]) -> str:
        return ", ".join(f"{k} ({n})" for k, n in c.most_common(5))

    if unknown:
        logger.warning(
            "taxonomy %r: %d of %d record(s) have a label with no mapping (category=None): %s",
            taxonomy.name,
            sum(unknown.values()),
            len(out),
            top(unknown),
        )
    if to_null or no_label:
        logger.info(
            "taxonomy %r: %d of %d record(s) left without a category (category=None): mapped to null: %s%s",
            taxonomy.name,
            sum(to_null.values()) + sum(no_label.values()),
            len(out),
            top(to_null) or "none",
            f"; no label: {top(no_label)}" if no_label else "",
        )
    return out
