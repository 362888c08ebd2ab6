"""Strict, versioned checkpoint state of the guards.

Each stateful guard writes its state with a ``version`` (:meth:`StateSchema.dump`) and reads it back through
:meth:`StateSchema.load`, which refuses what it cannot vouch for: a key it does not know (a misspelt or foreign key),
a key missing from the state, a version newer than this package's. An older version is migrated step by step to the
current one. Version 0 is a state written before states carried versions (lightning_guard 0.x): its missing keys take
the values the loaders of that time assumed, and keys that 0.x wrote and no longer exist are dropped.

A subclass of a guard may add keys of its own to the state (``{**super().state_dict(), "mine": ...}``): the guard
loads with ``extra=True`` then, and leaves those keys to the subclass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_guard.errors import GuardStateError

__all__ = ["VERSION_KEY", "StateSchema"]

VERSION_KEY = "version"

Migration = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class StateSchema:
    """The keys of one guard's state, its version, and how older versions become this one.

    Attributes:
        owner: who the state belongs to, named in every error (``"GradientGuard"``).
        version: the version :meth:`dump` writes.
        keys: the keys every state of this version holds.
        optional: keys a state may hold (written only in some situations).
        legacy: for version 0 states, the value of each key such a state may lack.
        removed: keys that version 0 states may hold and this version no longer has (dropped by the migration).
        migrations: ``{v: f}`` turns a state of version ``v`` into one of ``v + 1`` (``0`` defaults to filling
            ``legacy``).
    """

    owner: str
    version: int
    keys: frozenset[str]
    optional: frozenset[str] = frozenset()
    legacy: Mapping[str, Any] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()
    migrations: Mapping[int, Migration] = field(default_factory=dict)

    def dump(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The state with its version."""
        return {VERSION_KEY: self.version, **state}

    def load(self, state: Mapping[str, Any], *, extra: bool = False) -> dict[str, Any]:
        """The state migrated to the current version and checked key by key (without the version).

        ``extra``: keys this schema does not know are allowed and kept (a subclass's own keys).
        """
        if not isinstance(state, Mapping):
            raise GuardStateError(f"{self.owner}: its checkpoint state must be a mapping, got {type(state).__name__}")
        out = dict(state)
        version = out.pop(VERSION_KEY, 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise GuardStateError(f"{self.owner}: checkpoint state version must be an int >= 0, got {version!r}")
        if version > self.version:
            raise GuardStateError(
                f"{self.owner}: the checkpoint's state is version {version}, written by a newer lightning_guard than "
                f"this one (which reads up to version {self.version}): upgrade lightning_guard to resume from it"
            )
        while version < self.version:
            out = self.migrations.get(version, self._fill_legacy if version == 0 else self._no_migration(version))(out)
            version += 1
        unknown = sorted(set(out) - self.keys - self.optional)
        if unknown and not extra:
            raise GuardStateError(
                f"{self.owner}: unknown key {unknown[0]!r} in its checkpoint state (version {self.version} holds "
                f"{sorted(self.keys | self.optional)}): a key no version of this guard wrote (a misspelt or edited "
                "state, or another guard's)"
            )
        missing = sorted(self.keys - set(out))
        if missing:
            raise GuardStateError(
                f"{self.owner}: key {missing[0]!r} is missing from its checkpoint state (version {self.version}): the "
                "checkpoint was not written by this guard, or was edited"
            )
        return out

    def _fill_legacy(self, state: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in state.items() if k not in self.removed}
        return {**copy.deepcopy(dict(self.legacy)), **kept}

    def _no_migration(self, version: int) -> Migration:
        def fail(state: dict[str, Any]) -> dict[str, Any]:
            raise GuardStateError(f"{self.owner}: no migration from checkpoint state version {version}")

        return fail
