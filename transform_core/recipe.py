"""The YAML recipe: which tensors and activations to transform, and how.

A recipe (format version 1) looks like this::

    version: 1
    description: 4-bit stochastic weights, 8-bit biases
    seed: 0                       # optional; seeds every random transform
    families:                     # optional extra family rules: family -> name patterns
      decays: ["*.alpha", "*.beta"]
    params:                       # ordered; a later rule wins for a tensor two rules match
      - family: weights           # select by family, or by match: "glob" / match: "re:regex",
        transform: stochastic_rounding   # optionally narrowed by module: ClassName
        args: {num_levels: 15}
        optional: false           # a rule that matches nothing is an error unless optional
    activations:                  # optional: transforms of module outputs
      - module: Linear
        transform: deterministic_rounding
        args: {num_levels: 255}
    finetune:                     # optional: quantisation-aware fine-tuning
      epochs: 10                  # see transform_core.finetune for every key
    limits:                       # optional: integers the target accepts, per family
      weights: {signed: true, bits: 8}
    scale_groups:                 # optional: tensors whose range is computed together
      - name: neuron_inputs       # see transform_core.groups
        per: neuron
        members: [{family: weights}, {family: thresholds, sets_range: false}]

Name patterns (``match``, ``families``) are globs matched against the whole qualified name
(``*`` also matches dots; ``*.alpha`` also matches a top-level ``alpha``), or ``re:`` and a
regular expression that must match the whole name; see
:func:`transform_core.families.name_matches`. ``module`` is a glob on the class name.

Parsing is strict: unknown keys, duplicate keys, wrong types and out-of-range arguments are
errors, each a :class:`~transform_core.errors.RecipeError` that names the file, the line and the
key path (``params[0].args.num_levels``). Transform names and arguments are checked by
:mod:`transform_core.registry`.

Plain values follow YAML 1.2's core schema: ``-.5``, ``1e3`` and ``0x10`` are numbers, ``010`` is
10 (not octal 8), only ``true`` and ``false`` are booleans (``yes``, ``on`` and ``2024-01-31``
are text). Anchors, aliases and merge keys (``<<: *name``) are read.

Example:
    >>> recipe = parse_recipe('''
    ... version: 1
    ... params:
    ...   - family: weights
    ...     transform: stochastic_rounding
    ...     args: {num_levels: 15}
    ... ''')
    >>> rule = recipe.params[0]
    >>> rule.label, rule.selects("fc.weight", "weights", "Linear")
    ('params[0]', True)
    >>> recipe.bind(rule, "fc.weight")
    stochastic_rounding(num_levels=15)
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from transform_core.errors import RecipeError, did_you_mean
from transform_core.families import name_matches
from transform_core.registry import (
    Binding,
    BoundTransform,
    TransformSpec,
    derive_seed,
    get_transform,
    validate_args,
)

if TYPE_CHECKING:
    from transform_core.finetune_config import FinetuneConfig
    from transform_core.groups import ScaleGroup

__all__ = [
    "RECIPE_VERSION",
    "Recipe",
    "Rule",
    "builtin_recipe_text",
    "builtin_recipes",
    "load_recipe",
    "load_recipe_limits",
    "parse_recipe",
    "parse_recipe_limits",
]

RECIPE_VERSION = 1
"""The recipe format version this module reads."""

_REGEX_PREFIX = "re:"
_BUILTIN_PACKAGE = "recipes"
_MAX_VALUE_NODES = 100_000
_T = TypeVar("_T")

# Top-level keys. New sections (fine-tuning, hardware limits) get a parser here and a field on
# Recipe; anything not listed stays an error.
_TOP_KEYS = (
    "version",
    "description",
    "seed",
    "families",
    "params",
    "activations",
    "finetune",
    "limits",
    "scale_groups",
)
_LIMIT_KEYS = ("signed", "bits")
_MAX_LIMIT_BITS = 64
_RULE_KEYS = {
    "params": ("family", "match", "module", "transform", "args", "optional"),
    "activations": ("match", "module", "transform", "args", "optional"),
}


@dataclass(frozen=True)
class Rule:
    """One rule of a recipe's ``params`` or ``activations`` list.

    Attributes:
        section: ``"params"`` or ``"activations"``.
        index: Position in that list.
        transform: The transform to apply.
        args: Its checked arguments.
        family: For ``params``: the parameter family selected, or ``None``.
        match: A name pattern: a glob on qualified names, or ``"re:"`` and a regular
            expression (full match).
        module: A glob on the class name of the module owning the tensor (or producing the
            activation); narrows the selection.
        optional: If false, a rule that matches nothing is an error.
        line: The rule's line in the recipe file.
    """

    section: str
    index: int
    transform: TransformSpec
    args: dict[str, Any] = field(hash=False)
    family: str | None = None
    match: str | None = None
    module: str | None = None
    optional: bool = False
    line: int | None = None

    @property
    def label(self) -> str:
        """The rule's key path, such as ``params[0]``."""
        return f"{self.section}[{self.index}]"

    @property
    def selector(self) -> str:
        """The selection in words, for reports: ``family=weights, module=Linear``."""
        parts = [
            f"{name}={value}"
            for name, value in (
                ("family", self.family),
                ("match", self.match),
                ("module", self.module),
            )
            if value is not None
        ]
        return ", ".join(parts)

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.args.items())
        flag = ", optional" if self.optional else ""
        return f"<Rule {self.label}: {self.selector} -> {self.transform.name}({shown}){flag}>"

    def selects(self, name: str, family: str | None, module_class: str) -> bool:
        """Whether this rule selects a tensor (or, for activations, a module).

        Args:
            name: The qualified name (``encoder.fc.weight``, or the module name for activations).
            family: The tensor's parameter family, or ``None``.
            module_class: The class name of the owning module (``Linear``).

        Example:
            >>> rule = Rule("params", 0, get_transform("identity"), {}, match="re:.*\\\\.bias")
            >>> rule.selects("fc.bias", "biases", "Linear"), rule.selects("fc.weight", None, "Linear")
            (True, False)
        """
        if self.module is not None and not fnmatch.fnmatchcase(module_class, self.module):
            return False
        if self.family is not None and family != self.family:
            return False
        return self.match is None or name_matches(name, self.match)


@dataclass(frozen=True)
class Recipe:
    """A parsed and validated recipe.

    Attributes:
        version: The format version (always 1).
        description: One line saying what the recipe does.
        seed: The recipe seed for random transforms, or ``None``.
        families: Extra family rules: family name -> name patterns (globs or ``re:``).
        params: Parameter rules, in order; a later rule wins.
        activations: Activation rules, in order; a later rule wins.
        text: The recipe's YAML text.
        source: Where it came from: a file path, ``builtin:NAME`` or ``<string>``.
        finetune: The ``finetune:`` section, or ``None`` when there is none.
        limits: The ``limits:`` section: family -> ``(signed, bits)`` of the integers the
            target accepts; reports check every tensor of these families against it.
        scale_groups: The ``scale_groups:`` section (see :mod:`transform_core.groups`).
    """

    version: int
    description: str
    seed: int | None
    families: dict[str, tuple[str, ...]] = field(hash=False)
    params: tuple[Rule, ...]
    activations: tuple[Rule, ...]
    text: str = field(repr=False)
    source: str
    finetune: FinetuneConfig | None = field(default=None, hash=False)
    limits: dict[str, tuple[bool, int]] = field(default_factory=dict, hash=False)
    scale_groups: tuple[ScaleGroup, ...] = ()

    def family_rules(self) -> dict[str, str]:
        """Return the extra family rules as pattern -> family, as ``param_families`` takes them.

        Example:
            >>> parse_recipe(
            ...     'version: 1\\nfamilies: {decays: ["*.alpha"]}\\n'
            ...     'params: [{family: decays, transform: t_decay}]'
            ... ).family_rules()
            {'*.alpha': 'decays'}
        """
        return {
            pattern: family for family, patterns in self.families.items() for pattern in patterns
        }

    def rule_for(
        self, section: str, name: str, family: str | None, module_class: str
    ) -> Rule | None:
        """Return the rule of ``section`` that applies to ``name``: the last one selecting it.

        Args:
            section: ``"params"`` or ``"activations"``.
            name: Qualified tensor (or module) name.
            family: The tensor's family, or ``None``.
            module_class: The class name of the owning module.

        Returns:
            The winning rule, or ``None`` if no rule selects ``name``.
        """
        rules = self.params if section == "params" else self.activations
        for rule in reversed(rules):
            if rule.selects(name, family, module_class):
                return rule
        return None

    def bind(self, rule: Rule, tensor_name: str, seed: int | None = None) -> BoundTransform:
        """Bind ``rule``'s transform for one tensor.

        Random transforms get their own stream, seeded with
        ``derive_seed(seed, tensor_name)``.

        Args:
            rule: A rule of this recipe.
            tensor_name: The qualified name of the tensor (or module, for activations).
            seed: Overrides the recipe's seed; with neither, 0 is used.

        Returns:
            The bound transform.
        """
        base = seed if seed is not None else (self.seed if self.seed is not None else 0)
        derived = derive_seed(base, tensor_name) if rule.transform.uses_generator else None
        recipe = None if self.source.startswith("<") else self.source  # not a string given
        binding = Binding(tensor_name, rule.label, recipe, rule.line)
        return BoundTransform(rule.transform, dict(rule.args), seed=derived, binding=binding)


# YAML 1.2's core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), where PyYAML reads
# YAML 1.1: there ``010`` is octal 8, ``-.5`` and ``1e3`` are text, ``yes`` and ``off`` are
# booleans and ``2024-01-31`` is a date. The two number patterns do not overlap.
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_MERGE = re.compile(r"^(?:<<)$")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading plain values as YAML 1.2's core schema does.

    Example:
        >>> yaml.load("[1e-3, -.5, 010, 0o10, 0x10, +1, .inf, yes, On, 2024-01-31, ~, 1e3x]",
        ...           Loader=_RecipeLoader)
        [0.001, -0.5, 10, 8, 16, 1, inf, 'yes', 'On', '2024-01-31', None, '1e3x']
    """


# Only these resolvers: none of YAML 1.1's (timestamps, sexagesimal, ``=``) is inherited.
_RecipeLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789.")),
    (_MERGE_TAG, _MERGE, ["<"]),
):
    _RecipeLoader.add_implicit_resolver(_tag, _pattern, _first)


def _construct_int(constructor: Any, node: ScalarNode) -> int:
    """A YAML 1.2 integer: decimal (``010`` is 10), ``0o`` octal or ``0x`` hexadecimal."""
    text: str = constructor.construct_scalar(node)
    if not _INT.match(text):  # an explicit ``!!int`` tag on something else
        raise ConstructorError(None, None, f"'{text}' is not an integer", node.start_mark)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    try:
        return int(text if base == 10 else text[2:], base)
    except ValueError as exc:  # Python reads at most 4300 decimal digits
        raise ConstructorError(
            None,
            None,
            f"an integer of {len(text)} digits is too long; use a smaller value",
            node.start_mark,
        ) from exc


class _RecipeConstructor(SafeConstructor):
    """PyYAML's safe constructor, with YAML 1.2 integers."""


for _owner in (_RecipeLoader, _RecipeConstructor):
    _owner.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a value"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


class _Parser:
    """Walks the YAML node tree, so every error can name a line."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self._constructor = _RecipeConstructor()
        self._open: set[int] = set()
        self._merging: set[int] = set()
        self._built = 0

    def error(self, message: str, node: Node | None, key: str | None) -> RecipeError:
        line = None if node is None else node.start_mark.line + 1
        return RecipeError(message, path=self.source, key=key, line=line)

    def items(self, node: Node, key: str | None, what: str) -> dict[str, tuple[Node, Node]]:
        """Return a mapping node's entries, rejecting non-string and duplicate keys.

        A merge key (``<<: *name`` or ``<<: [*a, *b]``) adds the entries of those mappings
        that the mapping does not give itself (of a list, an earlier mapping wins), each with
        its own nodes, so that errors point at the line where a value is written.
        """
        if not isinstance(node, MappingNode):
            raise self.error(f"{what} must be a mapping, got {_kind(node)}", node, key)
        merged: dict[str, tuple[Node, Node]] = {}
        entries: dict[str, tuple[Node, Node]] = {}
        merge_key: Node | None = None
        self._merging.add(id(node))
        try:
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    if merge_key is not None:
                        first = merge_key.start_mark.line + 1
                        raise self.error(
                            f"duplicate key '<<' (first given on line {first}); keep one",
                            key_node,
                            _join(key, "<<"),
                        )
                    merge_key = key_node
                    merged = self._merged(value_node, _join(key, "<<"))
                    continue
                name = self.value(key_node, key)
                if not isinstance(name, str):
                    raise self.error(f"keys must be strings, got {_show(name)}", key_node, key)
                if name in entries:
                    first = entries[name][0].start_mark.line + 1
                    raise self.error(
                        f"duplicate key '{name}' (first given on line {first}); keep one",
                        key_node,
                        _join(key, name),
                    )
                entries[name] = (key_node, value_node)
        finally:
            self._merging.discard(id(node))
        return {**merged, **entries}

    def _merged(self, node: Node, key: str | None) -> dict[str, tuple[Node, Node]]:
        """The entries a merge key's value adds: of a mapping, or of a list of mappings."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        merged: dict[str, tuple[Node, Node]] = {}
        for i, source in reversed(list(enumerate(sources))):
            at = f"{key}[{i}]" if isinstance(node, SequenceNode) else key
            if not isinstance(source, MappingNode):
                raise self.error(
                    "a merge key (<<) takes a mapping (<<: *name) or a list of mappings, got "
                    f"{_show(self.value(source, at))}",
                    source,
                    at,
                )
            if id(source) in self._merging:
                raise self.error(
                    "a merge key (<<) refers to the mapping that holds it; recipe values "
                    "cannot be recursive",
                    source,
                    at,
                )
            self._count(len(source.value), source, at)
            merged.update(self.items(source, at, "a merged value"))
        return merged

    def _count(self, items: int, node: Node, key: str | None) -> None:
        self._built += items
        if self._built > _MAX_VALUE_NODES:
            # Aliases of aliases can expand a small file into billions of values.
            raise self.error(
                f"the recipe's values expand to more than {_MAX_VALUE_NODES} items "
                "(through YAML aliases?); write the values out plainly",
                node,
                key,
            )

    def check_keys(
        self, entries: dict[str, tuple[Node, Node]], allowed: tuple[str, ...], key: str | None
    ) -> None:
        for name, (key_node, _) in entries.items():
            if name not in allowed:
                raise self.error(
                    f"unknown key '{name}'{did_you_mean(name, allowed)}; "
                    f"expected one of {', '.join(allowed)}",
                    key_node,
                    _join(key, name),
                )

    def value(self, node: Node, key: str | None) -> Any:
        """Build the Python value of a node, rejecting duplicate keys at any depth."""
        if isinstance(node, (MappingNode, SequenceNode)):
            # An alias may point at a node that contains it; such a value never ends.
            if id(node) in self._open:
                raise self.error(
                    "a YAML alias (*name) refers to a value that contains it; "
                    "recipe values cannot be recursive",
                    node,
                    key,
                )
            self._count(len(node.value), node, key)
            self._open.add(id(node))
            try:
                if isinstance(node, MappingNode):
                    return {
                        name: self.value(value_node, _join(key, name))
                        for name, (_, value_node) in self.items(node, key, "a value").items()
                    }
                return [self.value(child, f"{key}[{i}]") for i, child in enumerate(node.value)]
            finally:
                self._open.discard(id(node))
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise self.error(f"cannot read this value: {problem}", node, key) from exc

    def string(self, node: Node, key: str, what: str) -> str:
        value = self.value(node, key)
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"must be {what}, got {_show(value)}", node, key)
        return value

    def boolean(self, node: Node, key: str) -> bool:
        value = self.value(node, key)
        if not isinstance(value, bool):
            raise self.error(f"must be true or false, got {_show(value)}", node, key)
        return value

    def pattern(self, node: Node, key: str) -> str:
        pattern = self.string(node, key, "a glob or 're:' and a regular expression")
        if pattern.startswith(_REGEX_PREFIX):
            try:
                re.compile(pattern[len(_REGEX_PREFIX) :])
            except re.error as exc:
                raise self.error(
                    f"bad regular expression '{pattern[len(_REGEX_PREFIX) :]}': {exc}; "
                    "fix it or drop the 're:' prefix to use a glob",
                    node,
                    key,
                ) from exc
        return pattern

    def parse(self) -> Recipe:
        return self._guarded(self._parse)

    def parse_limits(self) -> dict[str, tuple[bool, int]]:
        """Only the version and the ``limits:`` section: nothing the rules name is imported."""

        def limits() -> dict[str, tuple[bool, int]]:
            root, top = self._top()
            self.version(root, top)
            return self.limits(top["limits"][1]) if "limits" in top else {}

        return self._guarded(limits)

    def _guarded(self, parse: Callable[[], _T]) -> _T:
        try:
            return parse()
        except RecursionError:
            # PyYAML composes, and the checks walk, nested lists and mappings recursively.
            raise RecipeError(
                "is nested too deeply to read (lists or mappings inside one another hundreds "
                "of levels deep); a recipe needs a few levels: check the brackets",
                path=self.source,
            ) from None

    def _top(self) -> tuple[Node, dict[str, tuple[Node, Node]]]:
        """The root node and its entries."""
        try:
            root = yaml.compose(self.text, Loader=_RecipeLoader)
        except ReaderError as exc:
            line = self.text[: exc.position].count("\n") + 1
            raise RecipeError(
                f"holds the character #x{exc.character:04x}, which YAML does not allow "
                f"({exc.reason}); remove it, or check that this is a text file",
                path=self.source,
                line=line,
            ) from exc
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            detail = "; ".join(p for p in (exc.context, exc.problem) if p)
            raise RecipeError(
                f"invalid YAML: {detail}; check indentation, colons and quoting",
                path=self.source,
                line=None if mark is None else mark.line + 1,
            ) from exc
        except yaml.YAMLError as exc:
            raise RecipeError(f"invalid YAML: {exc}", path=self.source) from exc
        if root is None:
            raise RecipeError(
                "the recipe is empty; expected a mapping starting with 'version: 1'",
                path=self.source,
            )
        return root, self.items(root, None, "a recipe")

    def _parse(self) -> Recipe:
        root, top = self._top()
        version = self.version(root, top)
        self.check_keys(top, _TOP_KEYS, None)
        parsers: dict[str, Callable[[Node], Any]] = {
            "description": lambda n: self.string(n, "description", "a one-line description"),
            "seed": self.seed,
            "families": self.families,
            "params": lambda n: self.rules("params", n),
            "activations": lambda n: self.rules("activations", n),
            "finetune": self.finetune,
            "limits": self.limits,
            "scale_groups": self.scale_groups,
        }
        parsed = {name: parsers[name](top[name][1]) for name in parsers if name in top}
        params: tuple[Rule, ...] = parsed.get("params", ())
        activations: tuple[Rule, ...] = parsed.get("activations", ())
        if not params and not activations:
            raise self.error(
                "the recipe has no rules; add a 'params' or 'activations' list of rules",
                root,
                None,
            )
        return Recipe(
            version=version,
            description=parsed.get("description", ""),
            seed=parsed.get("seed"),
            families=parsed.get("families", {}),
            params=params,
            activations=activations,
            text=self.text,
            source=self.source,
            finetune=parsed.get("finetune"),
            limits=parsed.get("limits", {}),
            scale_groups=parsed.get("scale_groups", ()),
        )

    def version(self, root: Node, top: dict[str, tuple[Node, Node]]) -> int:
        # Checked before anything else: a newer recipe's keys would be wrong errors here.
        if "version" not in top:
            raise self.error(
                f"missing 'version'; start the recipe with 'version: {RECIPE_VERSION}'",
                root,
                None,
            )
        node = top["version"][1]
        value = self.value(node, "version")
        if value != RECIPE_VERSION or isinstance(value, bool) or not isinstance(value, int):
            raise self.error(
                f"unsupported recipe version {_show(value)}; this rockq reads "
                f"'version: {RECIPE_VERSION}' recipes",
                node,
                "version",
            )
        return RECIPE_VERSION

    def seed(self, node: Node) -> int:
        value = self.value(node, "seed")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, got {_show(value)}", node, "seed")
        return value

    def finetune(self, node: Node) -> FinetuneConfig:
        # Imported here: the training code needs torch's optimisers, parsing alone does not.
        from transform_core.finetune_config import parse_finetune_section

        return parse_finetune_section(self, node)

    def scale_groups(self, node: Node) -> tuple[ScaleGroup, ...]:
        # Imported here: groups.py builds on this module's rules and errors.
        from transform_core.groups import parse_scale_groups

        return parse_scale_groups(self, node)

    def limits(self, node: Node) -> dict[str, tuple[bool, int]]:
        """``limits: {family: {signed: bool, bits: int}}``: the integers a target accepts."""
        limits: dict[str, tuple[bool, int]] = {}
        for name, (_, value_node) in self.items(node, "limits", "'limits'").items():
            key = f"limits.{name}"
            entries = self.items(value_node, key, f"'{key}' ({{signed: true, bits: 8}})")
            self.check_keys(entries, _LIMIT_KEYS, key)
            for needed in _LIMIT_KEYS:
                if needed not in entries:
                    raise self.error(
                        f"missing '{needed}'; write the limit as {{signed: true, bits: 8}}",
                        value_node,
                        key,
                    )
            signed = self.boolean(entries["signed"][1], f"{key}.signed")
            bits_node = entries["bits"][1]
            bits = self.value(bits_node, f"{key}.bits")
            if (
                isinstance(bits, bool)
                or not isinstance(bits, int)
                or not 1 <= bits <= _MAX_LIMIT_BITS
            ):
                raise self.error(
                    f"must be a whole number of bits from 1 to {_MAX_LIMIT_BITS}, "
                    f"got {_show(bits)}",
                    bits_node,
                    f"{key}.bits",
                )
            limits[name] = (signed, bits)
        return limits

    def families(self, node: Node) -> dict[str, tuple[str, ...]]:
        families: dict[str, tuple[str, ...]] = {}
        owner: dict[str, str] = {}
        for name, (_, value_node) in self.items(node, "families", "'families'").items():
            key = f"families.{name}"
            if not isinstance(value_node, SequenceNode) or not value_node.value:
                raise self.error(
                    f"must be a non-empty list of name patterns, got "
                    f"{_show(self.value(value_node, key))}",
                    value_node,
                    key,
                )
            patterns = []
            for i, pattern_node in enumerate(value_node.value):
                pattern_key = f"{key}[{i}]"
                pattern = self.pattern(pattern_node, pattern_key)
                if pattern in owner:
                    raise self.error(
                        f"pattern '{pattern}' is already in family '{owner[pattern]}'; "
                        "a tensor belongs to one family",
                        pattern_node,
                        pattern_key,
                    )
                owner[pattern] = name
                patterns.append(pattern)
            families[name] = tuple(patterns)
        return families

    def rules(self, section: str, node: Node) -> tuple[Rule, ...]:
        if not isinstance(node, SequenceNode):
            raise self.error(
                f"must be a list of rules (each starting with '- '), got "
                f"{_show(self.value(node, section))}",
                node,
                section,
            )
        return tuple(self.rule(section, i, child) for i, child in enumerate(node.value))

    def rule(self, section: str, index: int, node: Node) -> Rule:
        label = f"{section}[{index}]"
        entries = self.items(node, label, "a rule")
        if section == "activations" and "family" in entries:
            raise self.error(
                "activation rules select modules by 'module' and/or 'match', not 'family'",
                entries["family"][0],
                f"{label}.family",
            )
        self.check_keys(entries, _RULE_KEYS[section], label)

        def get(name: str) -> Node | None:
            return entries[name][1] if name in entries else None

        family_node, match_node, module_node = get("family"), get("match"), get("module")
        if section == "params" and (family_node is None) == (match_node is None):
            found = "both" if family_node is not None else "neither"
            raise self.error(
                f"a params rule needs exactly one of 'family' or 'match', found {found}",
                node,
                label,
            )
        if section == "activations" and module_node is None and match_node is None:
            raise self.error(
                "an activations rule needs 'module' (a class name) and/or 'match' "
                "(a module name glob)",
                node,
                label,
            )
        family = (
            None
            if family_node is None
            else self.string(family_node, f"{label}.family", "a family name")
        )
        match = None if match_node is None else self.pattern(match_node, f"{label}.match")
        module = (
            None
            if module_node is None
            else self.string(module_node, f"{label}.module", "a module class name")
        )
        optional_node = get("optional")
        optional = (
            False if optional_node is None else self.boolean(optional_node, f"{label}.optional")
        )

        transform_node = get("transform")
        if transform_node is None:
            raise self.error("a rule needs 'transform: NAME'", node, label)
        name = self.string(transform_node, f"{label}.transform", "a transform name")
        try:
            spec = get_transform(name)
        except RecipeError as err:
            raise self.error(err.message, transform_node, f"{label}.transform") from err

        args_node = get("args")
        values: dict[str, Any] = {}
        arg_nodes: dict[str, tuple[Node, Node]] = {}
        if args_node is not None:
            arg_nodes = self.items(args_node, f"{label}.args", "'args'")
            values = {k: self.value(v, f"{label}.args.{k}") for k, (_, v) in arg_nodes.items()}
        try:
            args = validate_args(spec, values)
        except RecipeError as err:
            at: Node = args_node if args_node is not None else node
            if err.key is not None and err.key in arg_nodes:
                key_node, value_node = arg_nodes[err.key]
                at = key_node if err.message.startswith("unknown argument") else value_node
            raise self.error(err.message, at, _join(f"{label}.args", err.key)) from err
        return Rule(
            section=section,
            index=index,
            transform=spec,
            args=args,
            family=family,
            match=match,
            module=module,
            optional=optional,
            line=node.start_mark.line + 1,
        )


def _join(prefix: str | None, name: str | None) -> str | None:
    if name is None:
        return prefix
    return name if not prefix else f"{prefix}.{name}"


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe text.

    Args:
        text: The YAML text.
        source: Where it came from, used in error messages.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: For bad YAML, duplicate or unknown keys, a missing or unsupported
            version, a malformed rule, an unknown transform or bad arguments; the error names
            ``source``, the line and the key path.

    Example:
        >>> try:
        ...     parse_recipe("version: 2\\nparams: []", source="r.yaml")
        ... except RecipeError as err:
        ...     print(err)
        r.yaml:1: version: unsupported recipe version 2; this rockq reads 'version: 1' recipes
    """
    return _Parser(text, source).parse()


def parse_recipe_limits(text: str, source: str = "<string>") -> dict[str, tuple[bool, int]]:
    """Read only the ``limits:`` section of recipe text (after its version).

    For a recipe recorded in a file whose limits are all that is needed: the rules are not
    read, so a custom transform they name is never imported.

    Raises:
        RecipeError: As :func:`parse_recipe`, for the YAML, the version and the limits.

    Example:
        >>> text = "version: 1\\nparams: [{transform: 'nowhere.q:fn'}]\\nlimits: {weights: {signed: true, bits: 8}}"
        >>> parse_recipe_limits(text)
        {'weights': (True, 8)}
    """
    return _Parser(text, source).parse_limits()


def _builtin_files() -> dict[str, Any]:
    root = importlib.resources.files(_BUILTIN_PACKAGE)
    return {
        entry.name.removesuffix(".yaml"): entry
        for entry in root.iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    }


def builtin_recipes() -> dict[str, str]:
    """Return the built-in recipes as name -> description, sorted by name.

    Example:
        >>> sorted(builtin_recipes())
        ['int8', 'int8-act', 'qat4', 'ternary', 'xylo']
    """
    recipes: dict[str, str] = {}
    for name, entry in sorted(_builtin_files().items()):
        data = yaml.load(entry.read_text(encoding="utf-8"), Loader=_RecipeLoader)
        recipes[name] = str(data.get("description", "")) if isinstance(data, dict) else ""
    return recipes


def builtin_recipe_text(name: str) -> str:
    """Return the YAML text of a built-in recipe.

    Raises:
        RecipeError: If there is no built-in recipe called ``name``.
    """
    files = _builtin_files()
    if name not in files:
        raise RecipeError(
            f"no built-in recipe '{name}'{did_you_mean(name, files)}; "
            f"built-ins: {', '.join(sorted(files))}"
        )
    text: str = files[name].read_text(encoding="utf-8")
    return text


def load_recipe(ref: str | os.PathLike[str]) -> Recipe:
    """Load a recipe from a file, or a built-in recipe by name.

    ``ref`` is the path of an existing file or the name of a built-in recipe; a file wins when
    both exist. It is never read as inline YAML.

    Args:
        ref: A recipe file path or a built-in name (see :func:`builtin_recipes`).

    Returns:
        The validated recipe.

    Raises:
        RecipeError: If ``ref`` is neither an existing file nor a built-in name (listing the
            built-ins, with a suggestion), the file cannot be read or is not UTF-8, or the
            recipe is invalid.

    Example:
        >>> load_recipe("int8").params[0].transform.name
        'deterministic_rounding'
    """
    return parse_recipe(*_recipe_text(ref))


def load_recipe_limits(ref: str | os.PathLike[str]) -> dict[str, tuple[bool, int]]:
    """The ``limits:`` of a recipe file or built-in recipe, read as :func:`parse_recipe_limits`
    reads them: the rules are not read, so no custom transform is imported.

    Raises:
        RecipeError: As :func:`load_recipe`, for the file, the version and the limits.

    Example:
        >>> load_recipe_limits("xylo")["weights"]
        (True, 8)
    """
    return parse_recipe_limits(*_recipe_text(ref))


def _recipe_text(ref: str | os.PathLike[str]) -> tuple[str, str]:
    """The text of a recipe file or built-in recipe, and its source for messages."""
    path = Path(ref)
    if path.is_file():
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise RecipeError(
                f"cannot read the recipe file: {exc.strerror}", path=str(ref)
            ) from exc
        except UnicodeDecodeError as exc:
            raise RecipeError(
                f"the recipe file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "save it as UTF-8",
                path=str(ref),
            ) from exc
        return text, str(ref)
    name = str(ref)
    files = _builtin_files()
    if name in files:
        return builtin_recipe_text(name), f"builtin:{name}"
    builtins = ", ".join(sorted(files))
    if path.exists() and not path.is_dir():  # a pipe or a device: never read, it may not end
        raise RecipeError(
            f"'{name}' is not a regular file (a pipe or a device); give a YAML file path or "
            f"one of the built-ins: {builtins}"
        )
    what = "is a directory, not a recipe file" if path.is_dir() else "is not a recipe file"
    raise RecipeError(
        f"'{name}' {what} and not a built-in recipe{did_you_mean(name, files)}; "
        f"give a YAML file path or one of the built-ins: {builtins}"
    )
