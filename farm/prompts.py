"""Styles and wildcards: what turns the prompt a user wrote into the prompt the farm generates.

Why a module of its own: farm.manifest validates and expands a manifest; the two prompt features it now
offers each bring a vocabulary from outside the farm (A1111's ``styles.csv``, the dynamic-prompts wildcard
syntax) and files read from the operator's folders. Keeping them here keeps the manifest module about shape
and limits, and keeps every file this feature reads behind the one set of rules written below.

**Styles** are named presets: a prompt (with A1111's ``{prompt}`` placeholder where the user's prompt goes,
else appended after a comma), a negative prompt (combined the same way with the item's), and default
parameters that sit between the batch defaults and the item's own fields. Registries, later ones winning for
a name they share: the shipped ``farm/styles.yaml``; ``$FARM_HOME/styles.csv`` then
``$FARM_HOME/styles.yaml``; the manifest's ``styles_csv`` file then its ``styles:`` section.

**Wildcards** are expanded by the ``dynamicprompts`` library (``{red|green|blue}`` variants, ``__colors__``
word files); the farm only decides which files it may read and which seed picks a variant. A word file is
``<name>.txt`` in the ``wildcards/`` folder next to the manifest (a manifest run by the operator) or in
``$FARM_HOME/wildcards/`` (any manifest, uploaded ones included); names are checked before any path is built
and every file found is resolved and must stay inside its folder, so a name cannot reach another file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SHIPPED_STYLES",
    "Style",
    "StyleError",
    "WildcardError",
    "WildcardSource",
    "apply_styles",
    "combinations",
    "has_wildcards",
    "parse_styles_csv",
    "parse_styles_yaml",
    "pick",
    "wildcard_seed",
]

#: The registry packaged with the code.
SHIPPED_STYLES = Path(__file__).with_name("styles.yaml")
#: Where the user's prompt goes in a style's prompt (A1111's spelling).
PLACEHOLDER = "{prompt}"
#: Largest styles or wildcard file read, in bytes.
MAX_FILE_BYTES = 4 * 1024 * 1024
#: Most word files one manifest may read (nested wildcards included).
MAX_WILDCARD_FILES = 200
#: Parameters a style may set; the same names and meanings as the manifest's ``defaults``.
STYLE_PARAMS = ("candidates", "steps", "guidance", "size", "scheduler")

_STYLE_NAME = re.compile(r"[^\x00-\x1f]{1,80}")
# A wildcard name: parts of letters, digits, '_', '-' and '.', joined by '/', none hidden and none '..'.
_WILDCARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}){0,7}")
# What makes a prompt dynamic: a {..|..} variant or a __name__ wildcard. A prompt with neither is literal,
# so a brace in an existing prompt ("{x}") keeps meaning what it meant before wildcards existed.
_DYNAMIC = re.compile(r"\{[^{}]*\|[^{}]*\}|__[^_\s][^\s]*?__")


class StyleError(ValueError):
    """A styles file that cannot be read; the message names the file and the fix."""


class WildcardError(ValueError):
    """A wildcard the farm will not expand (unknown file, refused name, bad syntax); the message says why."""


@dataclass(frozen=True)
class Style:
    """One preset: prompt and negative prompt texts (``{prompt}`` placeholder optional) and parameters."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "shipped"


# ------------------------------------------------------------------------------------------------ styles


def _combine(style_text: str, text: str) -> str:
    """A1111's rule: the style's text with ``{prompt}`` replaced, else the two joined by a comma."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, text)
    parts = [part for part in (text.strip(), style_text.strip()) if part]
    return ", ".join(parts)


def apply_styles(prompt: str, negative: str, styles: Iterable[Style]) -> tuple[str, str]:
    """The prompt and negative prompt with each style applied in turn (the first style innermost)."""
    for style in styles:
        if style.prompt:
            prompt = _combine(style.prompt, prompt)
        if style.negative_prompt:
            negative = _combine(style.negative_prompt, negative)
    return prompt, negative


def parse_styles_csv(text: str, origin: str) -> dict[str, Style]:
    """A1111's ``styles.csv`` as it is: a header row naming ``name``, ``prompt`` and ``negative_prompt``
    (other columns ignored), one style per row; rows without a name (A1111's separators) are skipped."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "name" not in columns:
        raise StyleError(f"{origin}: expected a header row with name,prompt,negative_prompt; got {columns}")
    styles: dict[str, Style] = {}
    try:
        for row in reader:
            clean = {(k or "").strip(): (v or "") for k, v in row.items() if isinstance(v, str)}
            name = clean.get("name", "").strip()
            if not name:
                continue
            styles[name] = Style(name, clean.get("prompt", ""), clean.get("negative_prompt", ""), {}, origin)
    except csv.Error as exc:
        raise StyleError(f"{origin}: not a valid CSV file: {exc}") from None
    return styles


def parse_styles_yaml(text: str, origin: str, check: Any) -> dict[str, Style]:
    """A YAML styles file: a mapping of name -> the fields of a manifest's ``styles:`` entry.

    ``check`` validates one entry's mapping and returns it typed (farm.manifest passes its ``StyleDef``), so a
    file and a manifest accept exactly the same presets.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StyleError(f"{origin}: invalid YAML: {' '.join(str(exc).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StyleError(f"{origin}: expected a mapping of style name -> {{prompt, negative_prompt, ...}}")
    styles: dict[str, Style] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or _STYLE_NAME.fullmatch(name) is None:
            raise StyleError(f"{origin}: style name {name!r} must be 1 to 80 printable characters")
        try:
            styles[name] = check(name, entry, origin)
        except ValueError as exc:
            raise StyleError(f"{origin}: style {name!r}: {exc}") from None
    return styles


def read_text(path: Path) -> str | None:
    """A styles or wordlist file's text (UTF-8), None when it does not exist; StyleError when unreadable."""
    try:
        if not path.is_file():
            return None
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise StyleError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise StyleError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise StyleError(f"{path}: not UTF-8 text; save it as UTF-8") from None


# --------------------------------------------------------------------------------------------- wildcards


def has_wildcards(prompt: str) -> bool:
    """Whether ``prompt`` uses variants or word files (else it is taken literally, braces and all)."""
    return _DYNAMIC.search(prompt) is not None


@dataclass
class WildcardSource:
    """The folders word files are read from, first match winning, and the files read so far (name -> lines).

    Why the farm reads the files rather than pointing dynamicprompts at a folder: the library would glob and
    recurse in whatever folder it is given and quietly fall back to ``**/name``; here each name is checked,
    looked up in the allowed folders only, and a missing one is an error naming the file to create.
    """

    folders: tuple[Path, ...] = ()
    words: dict[str, list[str]] = field(default_factory=dict)

    def load(self, prompt: str) -> None:
        """Read every word file ``prompt`` needs, nested ones too; WildcardError for the first problem."""
        pending = list(_wildcard_names(prompt))
        while pending:
            name = pending.pop()
            if name in self.words:
                continue
            if len(self.words) >= MAX_WILDCARD_FILES:
                raise WildcardError(f"uses more than {MAX_WILDCARD_FILES} wildcard files")
            lines = self._read(name)
            self.words[name] = lines
            for line in lines:
                pending.extend(_wildcard_names(line))

    def _read(self, name: str) -> list[str]:
        if _WILDCARD_NAME.fullmatch(name) is None or ".." in name.split("/"):
            raise WildcardError(
                f"wildcard __{name[:80]}__ is not a plain name: use letters, digits, '_', '-' and '.', with "
                "'/' between folder names (no globs, no '..', no absolute paths)"
            )
        if not self.folders:
            raise WildcardError(
                f"wildcard __{name}__ needs a word file, and this manifest has no wildcard folder to read it "
                "from; put the words in $FARM_HOME/wildcards/" + name + ".txt, or write {a|b|c} instead"
            )
        for folder in self.folders:
            try:
                root = folder.resolve()
                path = (root / f"{name}.txt").resolve()
            except (OSError, RuntimeError):
                continue
            if not path.is_relative_to(root):
                raise WildcardError(f"wildcard __{name}__ points outside {folder}; it is refused")
            try:
                text = read_text(path)
            except StyleError as exc:
                raise WildcardError(str(exc)) from None
            if text is not None:
                lines = [ln.strip() for ln in text.splitlines()]
                words = [ln for ln in lines if ln and not ln.startswith("#")]
                if not words:
                    raise WildcardError(f"wildcard file {path} has no words; write one per line")
                return words
        tried = " or ".join(str(f / f"{name}.txt") for f in self.folders)
        raise WildcardError(f"wildcard __{name}__ has no word file; create {tried} with one word per line")

    def manager(self) -> Any:
        from dynamicprompts.wildcards import WildcardManager

        return WildcardManager(root_map={"": [dict(self.words)]})


def _commands(node: Any) -> Iterable[Any]:
    """Every command in a dynamicprompts parse tree, depth first."""
    yield node
    for child in _children(node):
        yield from _commands(child)


def _children(node: Any) -> list[Any]:
    from dynamicprompts.commands import SequenceCommand, VariantCommand, WrapCommand

    if isinstance(node, SequenceCommand):
        return list(node.tokens)
    if isinstance(node, VariantCommand):
        return [option.value for option in node.variants]
    if isinstance(node, WrapCommand):
        return [node.inner]
    return []


def _parse(prompt: str) -> Any:
    from dynamicprompts.parser.parse import parse

    try:
        return parse(prompt)
    except Exception as exc:  # pyparsing's errors, and whatever else a bad template raises
        raise WildcardError(f"cannot read the wildcard syntax: {' '.join(str(exc).split())}") from None


def _wildcard_names(prompt: str) -> list[str]:
    from dynamicprompts.commands import WildcardCommand

    if not has_wildcards(prompt):
        return []
    return [c.wildcard for c in _commands(_parse(prompt)) if isinstance(c, WildcardCommand)]


def contributions(prompt: str, source: WildcardSource) -> list[tuple[str, int]]:
    """What each top-level variant or word file of ``prompt`` multiplies a combinatorial expansion by, for the
    message that explains a count past the limit."""
    from dynamicprompts.commands import SequenceCommand, VariantCommand, WildcardCommand

    tree = _parse(prompt)
    tokens = tree.tokens if isinstance(tree, SequenceCommand) else [tree]
    out: list[tuple[str, int]] = []
    for token in tokens:
        if isinstance(token, VariantCommand):
            shown = "|".join(str(getattr(o.value, "literal", "...")) for o in token.variants)
            out.append((f"{{{shown[:40]}}}", len(token.variants)))
        elif isinstance(token, WildcardCommand):
            out.append((f"__{token.wildcard}__", len(source.words.get(token.wildcard, []))))
    return out


def combinations(prompt: str, source: WildcardSource, limit: int) -> list[str]:
    """Every prompt ``prompt`` expands to (combinatorial mode), at most ``limit`` of them."""
    from dynamicprompts.generators import CombinatorialPromptGenerator

    source.load(prompt)
    try:
        return CombinatorialPromptGenerator(source.manager()).generate(prompt, max_prompts=limit)
    except Exception as exc:
        raise WildcardError(f"cannot expand the wildcards: {' '.join(str(exc).split())}") from None


def pick(prompt: str, source: WildcardSource, seed: int) -> str:
    """One prompt ``prompt`` expands to, chosen by ``seed``: the same seed always picks the same words."""
    from dynamicprompts.generators import RandomPromptGenerator

    source.load(prompt)
    try:
        return RandomPromptGenerator(source.manager(), seed=seed).generate(prompt, 1)[0]
    except Exception as exc:
        raise WildcardError(f"cannot expand the wildcards: {' '.join(str(exc).split())}") from None


def wildcard_seed(seed: int, index: int) -> int:
    """The seed that picks item ``index``'s variants from the batch's (or the item's) seed; a hash so that
    neighbouring items do not pick in step."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, person=b"farm.wildcard").digest()
    return int.from_bytes(digest, "big") % 2**32
