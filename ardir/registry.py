"""One registry idiom for everything ardir builds by name: methods, models, attacks and data sets.

:data:`ardir.methods.METHODS`, :data:`ardir.models.MODELS`, :data:`ardir.data.DATASETS` and
:data:`ardir.evaluation.attacks.ATTACKS` are each a :class:`Registry`, a mapping of names to entries (a class, a
constructor or a plain object)::

    @METHODS.register                       # under cls.name (else __name__); or @METHODS.register("name")
    class Mine(Method):
        name = "mine"

    METHODS.list(); METHODS.arguments("mine"); METHODS.create("mine", eps=4 / 255); METHODS.lookup("MINE")

An entry registered with a ``pattern`` answers to every name the regex matches in full (the attack grammar's
``register("pgd", spec, pattern=r"pgd-?(\\d+)")``), and :meth:`Registry.create` calls it with the match first.
An unknown name is an :class:`UnknownName` (a ``ValueError`` and a ``KeyError``) listing the known names and the
closest (:meth:`Registry.lookup`; :meth:`Registry.get` returns a default instead, as ``dict.get``). ``register``
refuses a taken name unless ``override=True`` or the entry is the same definition again (same module and
qualified name: a re-run notebook cell): two plugins claiming one name is a bug to report, not to resolve
silently. Item assignment, ``REGISTRY[name] = entry``, replaces as for a dict.
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import MutableMapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple


class UnknownName(ValueError, KeyError):
    """A name no registry entry answers to; the message lists the closest known names."""
    __str__ = ValueError.__str__  # KeyError's would print the message in quotes


def _redefinition(old: Any, new: Any) -> bool:
    """``new`` is ``old`` defined again (a re-run notebook cell, a reloaded module): the same module and qualified
    name. It replaces the old entry rather than being refused as a second claim on the name."""
    qualname = getattr(new, "__qualname__", None)
    return qualname is not None and (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == \
        (getattr(new, "__module__", None), qualname)


class Registry(MutableMapping):
    """Named entries of one ``kind``. ``argument`` is how errors call the name (``method='ardri' is not a known
    method``); ``normalize`` maps a user's spelling to a name (``str.lower``); ``hint`` follows the kind in errors;
    ``signature(entry)`` overrides the parameters :meth:`arguments` reports (and :meth:`create` accepts)."""

    def __init__(self, kind: str, argument: str = "name", normalize: Callable[[str], str] = lambda s: s,
                 hint: str = "", signature: Optional[Callable[[Any], Sequence[inspect.Parameter]]] = None):
        self.kind, self.argument, self.normalize, self.hint = kind, argument, normalize, hint
        self._signature = signature
        self._entries: Dict[str, Any] = {}
        self._patterns: Dict[str, Tuple[re.Pattern, Tuple[str, ...]]] = {}
        self._aliases: Dict[str, str] = {}

    def register(self, name: Any = None, entry: Any = None, *, pattern: Optional[str] = None,
                 examples: Sequence[str] = (), aliases: Sequence[str] = (), override: bool = False):
        """Add ``entry`` under ``name`` and return it; without ``entry``, a decorator (``@R.register`` names the
        entry by its ``name`` attribute or ``__name__``, ``@R.register("name")`` explicitly). ``pattern``: the
        entry answers to every name the regex matches in full (``examples`` are such names, for errors);
        ``aliases``: other names for it. A taken name is refused unless ``override=True``."""
        if name is not None and not isinstance(name, str):  # @R.register on the entry itself
            return self.register(None, name, pattern=pattern, examples=examples, aliases=aliases, override=override)
        if entry is None:
            return lambda e: self.register(name, e, pattern=pattern, examples=examples, aliases=aliases,
                                           override=override)
        name = name or (entry.name if isinstance(getattr(entry, "name", None), str) else entry.__name__)
        taken = [n for n in (name, *aliases) if (n in self._entries or n in self._aliases)
                 and not _redefinition(self._entries.get(self._aliases.get(n, n)), entry)]
        if taken and not override:
            raise ValueError(f"{self.kind} {taken[0]!r} is already registered; pass override=True to replace it")
        self._entries[name] = entry
        if pattern is not None:
            self._patterns[name] = (re.compile(pattern), tuple(examples) or (name,))
        self._aliases.update(dict.fromkeys(aliases, name))
        return entry

    def match(self, text: str) -> Tuple[str, Optional[re.Match]]:
        """The name ``text`` stands for (normalised, an alias resolved, else the first pattern that matches in
        registration order) and the regex match (``None`` for a plain name); :class:`UnknownName` otherwise."""
        if not isinstance(text, str):
            article = "an" if self.kind[:1] in "aeiou" else "a"
            raise TypeError(f"{self.argument}={text!r} must be {article} {self.kind} name "
                            f"({', '.join(self.choices())}), got {type(text).__name__}")
        key = self.normalize(text)
        key = self._aliases.get(key, key)
        if key in self._entries and key not in self._patterns:
            return key, None
        for name, (regex, _) in self._patterns.items():
            found = regex.fullmatch(key)
            if found:
                return name, found
        raise self._unknown(text)

    def lookup(self, name: str):
        """The entry ``name`` stands for (see :meth:`match`): :class:`UnknownName` (or ``TypeError`` for a
        non-string) naming the closest known names when none does."""
        return self._entries[self.match(name)[0]]

    def get(self, name: Any, default: Any = None):
        """As :meth:`lookup`, but ``default`` instead of an error (``dict.get``'s contract, which the registries
        kept when they were plain dicts)."""
        try:
            return self.lookup(name)
        except (UnknownName, TypeError):
            return default

    def copy(self) -> Dict[str, Any]:
        """The entries as a plain dict, by registered name."""
        return dict(self._entries)

    def create(self, name: str, *args, **kwargs):
        """Call the entry ``name`` stands for (a pattern's entry gets the regex match first); a keyword the entry
        does not accept is a ``TypeError`` naming the valid ones and the closest."""
        key, found = self.match(name)
        valid = self.arguments(key)
        if not any(p.kind == p.VAR_KEYWORD for p in self._parameters(key)):
            unknown = [k for k in kwargs if k not in valid]
            if unknown:
                close = {k: difflib.get_close_matches(k, valid, n=3, cutoff=0.6) for k in unknown}
                hint = "".join(f"did you mean {' or '.join(map(repr, c))} for {k!r}? " for k, c in close.items() if c)
                raise TypeError(f"unknown argument(s) {unknown} for {self.kind} {key!r}; {hint}it accepts: "
                                f"{', '.join(valid)}")
        return self._entries[key](*((found,) if found else ()), *args, **kwargs)

    def arguments(self, name: str) -> Dict[str, Any]:
        """``{keyword: default}`` the entry ``name`` (a registered name) accepts; ``inspect.Parameter.empty`` marks
        a required one. An entry that is not callable (a data set's spec) accepts none; a parameter whose name
        starts with ``_`` is the entry's own (a lambda's bound loop variable), not an argument."""
        return {p.name: p.default for p in self._parameters(name)
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not p.name.startswith("_")}

    def _parameters(self, name: str) -> List[inspect.Parameter]:
        entry = self[name]
        if self._signature is not None:
            return list(self._signature(entry))
        return list(inspect.signature(entry).parameters.values()) if callable(entry) else []

    def list(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def choices(self) -> List[str]:
        """What a user may type: the plain names, a pattern's examples, then the aliases (for errors)."""
        return [*(t for n in self._entries for t in (self._patterns[n][1] if n in self._patterns else (n,))),
                *self._aliases]

    def _unknown(self, text: str) -> UnknownName:
        choices = self.choices()
        close = difflib.get_close_matches(self.normalize(str(text)), choices, n=5, cutoff=0.4)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        shown = ", ".join(map(repr, choices[:30])) + (", ..." if len(choices) > 30 else "")
        return UnknownName(f"{self.argument}={text!r} is not a known {self.kind}{self.hint}; {hint}valid: {shown}")

    # The mapping protocol, by exact registered name: METHODS["ard"], "ard" in METHODS, sorted(METHODS).
    def __getitem__(self, name: str):
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self._unknown(name) from None

    def __setitem__(self, name: str, entry) -> None:
        self.register(name, entry, override=True)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._patterns.pop(name, None)
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
