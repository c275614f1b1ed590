"""The moderation policy: category names, their meaning, and the policy version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_POLICY_DIR = Path(__file__).resolve().parent / "policies"


@dataclass(frozen=True)
class Category:
    name: str
    title: str
    description: str


@dataclass(frozen=True)
class Policy:
    version: str
    categories: dict[str, Category]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.categories)


def load_policy(policy_dir: Path = DEFAULT_POLICY_DIR) -> Policy:
    raw = yaml.safe_load((Path(policy_dir) / "policy.yaml").read_text(encoding="utf-8"))
    categories = {
        name: Category(name=name, title=spec["title"], description=spec["description"])
        for name, spec in raw["categories"].items()
    }
    return Policy(version=str(raw["version"]), categories=categories)
