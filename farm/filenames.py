"""File names made from user text: a sanitiser safe on every file system, and the export name template.

Why its own module: an export (the winners zip) is unpacked on Linux, macOS and Windows alike, and its names
are made from prompts, which anyone submitting a manifest writes. A prompt may hold ``../``, a newline, a
Windows device name (``CON``), characters Windows refuses (``<>:"|?*``), an emoji, or run to hundreds of
characters; a name made of it must still be one harmless file name everywhere. ``safe_text`` makes a piece
of text safe to stand inside a name; ``safe_segment`` makes a whole path component safe;
``NameTemplate`` builds export paths from FARM_EXPORT_NAME (read and checked in farm.config); ``unique``
gives two winners that map to one name distinct names. Nothing here touches the disk.

The template is Python's format syntax over the fields in ``FIELDS``, with ``/`` separating folders:
``{batch}/{item:04d}-{prompt:40}-{seed}`` (the default, ``DEFAULT_EXPORT_NAME``). A number field takes any
format spec Python's ``format`` accepts for an int (``{item:04d}``); a text field takes only a width, which
cuts it to that many characters (``{prompt:40}``: Python would pad instead). Each field's text is sanitised
after its spec is applied, so no field can add a folder, and the extension (``.png``, ``.json`` for the
sidecar) is added by the caller. A bad template is refused when the settings are read.
"""

from __future__ import annotations

import difflib
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The default export name: the batch's folder, then item, prompt (first 40 characters) and seed.
DEFAULT_EXPORT_NAME = "{batch}/{item:04d}-{prompt:40}-{seed}"

#: Template fields -> what each holds (shown when a template names another).
FIELDS: dict[str, str] = {
    "batch": "the batch id",
    "batch_name": "the batch's name",
    "item": "the item's index in the batch (a number)",
    "candidate": "the candidate id",
    "index": "the candidate's index in its item (a number)",
    "prompt": "the item's prompt",
    "seed": "the candidate's seed (a number)",
    "model": "the model's name (a preset, a hub id, a folder's name)",
    "rank": "the winner's rank in its item (a number; 0 when unranked)",
}
#: The fields that hold numbers (they take an int format spec); the others hold text (they take a width).
NUMBER_FIELDS = frozenset({"item", "index", "seed", "rank"})

#: Characters Windows refuses in a name, and the path separators of every system.
RESERVED_CHARS = frozenset('<>:"/\\|?*')
#: Windows device names: refused as a name, with or without an extension, in any case.
RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{dev}{n}" for dev in ("com", "lpt") for n in (*"0123456789", "¹", "²", "³")}
)
#: Invisible characters that reorder or hide text (bidirectional overrides, byte order mark).
HIDDEN_CHARS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")
#: A path component's limit in UTF-8 bytes: 255 on ext4, APFS and NTFS (UTF-16 units, no fewer), less room
#: for a collision suffix (``-99``) and the longest extension the caller adds (``.json``).
MAX_SEGMENT_BYTES = 240
REPLACEMENT = "_"


class TemplateError(ValueError):
    """An export name template that cannot be used; the message says what is wrong and how to write it."""


def _is_glue(ch: str) -> bool:
    """Whether ``ch`` belongs to the character before it (a combining mark, a joiner, a variation selector),
    so that a cut must not fall just before it."""
    return (
        unicodedata.combining(ch) != 0
        or unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or ch == "\u200d"
        or "\ufe00" <= ch <= "\ufe0f"
        or "\U0001f3fb" <= ch <= "\U0001f3ff"  # skin tone modifiers
        or "\U000e0020" <= ch <= "\U000e007f"  # tag characters (subdivision flags)
    )


def cut(text: str, width: int) -> str:
    """The first ``width`` characters of ``text``, moved back so a cut never splits a character from the marks
    or joiners that belong to it (an accent, an emoji's skin tone or ZWJ sequence)."""
    if len(text) <= width:
        return text
    end = width
    while end > 0 and (_is_glue(text[end]) or text[end - 1] == "\u200d"):
        end -= 1
    return text[:end]


def _cut_bytes(text: str, limit: int) -> str:
    """``text`` cut by characters (as ``cut``) until its UTF-8 form fits ``limit`` bytes."""
    if len(text.encode("utf-8")) <= limit:
        return text
    width = len(text)
    while width > 0 and len(cut(text, width).encode("utf-8")) > limit:
        width -= 1
    return cut(text, width)


def safe_text(text: Any, width: int | None = None) -> str:
    """``text`` made safe to stand inside a file name on every file system, cut to ``width`` characters.

    NFC-normalised (one spelling of each accented letter, as macOS and the others compare names); control
    characters, line breaks, lone surrogates and invisible bidi controls become spaces, and runs of spaces
    one; path separators and the characters Windows refuses become ``_``; leading dots (a hidden file,
    ``..``) and spaces and trailing dots and spaces (which Windows drops) are removed. May be empty."""
    text = unicodedata.normalize("NFC", str(text))
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Zl", "Zp", "Cs") or ch in HIDDEN_CHARS or (ch.isspace() and ch != " "):
            out.append(" ")
        elif ch in RESERVED_CHARS:
            out.append(REPLACEMENT)
        else:
            out.append(ch)
    text = " ".join("".join(out).split()).lstrip(". ")
    if width is not None:
        text = cut(text, width)
    return text.rstrip(". ")


def safe_segment(text: Any) -> str:
    """One path component made safe everywhere: ``safe_text``, never empty (``_``), never a Windows device
    name (``CON`` -> ``CON_``, ``nul.txt`` -> ``nul_.txt``), at most ``MAX_SEGMENT_BYTES`` of UTF-8."""
    name = _cut_bytes(safe_text(text), MAX_SEGMENT_BYTES).rstrip(". ")
    if not name:
        return REPLACEMENT
    stem, dot, rest = name.partition(".")
    if stem.rstrip(" ").casefold() in RESERVED_NAMES:
        name = f"{stem.rstrip(' ')}{REPLACEMENT}{dot}{rest}"
    return name


@dataclass(frozen=True)
class _Part:
    literal: str
    field: str | None
    spec: str


class NameTemplate:
    """A checked export name template (module docstring); ``render`` gives a relative path without extension.

    Raises TemplateError on construction for an unknown field, a bad spec, a conversion, unbalanced braces, an
    absolute path, a ``..`` or empty folder, or a literal character some file system refuses."""

    def __init__(self, text: str) -> None:
        self.text = text
        body = text[:-4] if text.lower().endswith(".png") else text
        if not body.strip():
            raise TemplateError("it is empty")
        try:
            parsed = list(string.Formatter().parse(body))
        except ValueError as exc:
            raise TemplateError(
                f"it is not a format string ({exc}); write a literal brace as {{{{ or }}}}"
            ) from None
        self.parts: list[_Part] = []
        for literal, field, spec, conversion in parsed:
            self._check_literal(literal)
            if field is None:
                self.parts.append(_Part(literal, None, ""))
                continue
            self._check_field(field, spec or "", conversion)
            self.parts.append(_Part(literal, field, spec or ""))
        if not any(p.field for p in self.parts):
            raise TemplateError("it names no field, so every winner would get the same name")
        if body.startswith("/"):
            raise TemplateError("it starts with '/': names are relative to the export's root")
        for segment in self._segments_of_literals(body):
            if segment.strip() in ("", ".", ".."):
                raise TemplateError(f"it has an empty, '.' or '..' folder ({segment!r}) between its '/'")

    @staticmethod
    def _segments_of_literals(body: str) -> list[str]:
        """The template's ``/``-separated parts with every field replaced by a placeholder letter."""
        parsed = string.Formatter().parse(body)
        return "".join(lit + ("x" if field is not None else "") for lit, field, _s, _c in parsed).split("/")

    @staticmethod
    def _check_literal(literal: str) -> None:
        bad = sorted({ch for ch in literal if (ch in RESERVED_CHARS and ch != "/") or not ch.isprintable()})
        if bad:
            shown = ", ".join(repr(ch) for ch in bad)
            raise TemplateError(
                f"its text holds {shown}, which some file systems refuse; use '/' for folders"
            )

    @staticmethod
    def _check_field(field: str, spec: str, conversion: str | None) -> None:
        if field not in FIELDS:
            close = difflib.get_close_matches(field, FIELDS, n=1)
            guess = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise TemplateError(f"{{{field}}} is not a field{guess}")
        if conversion:
            raise TemplateError(f"{{{field}!{conversion}}}: conversions are not allowed; write {{{field}}}")
        if "{" in spec or "}" in spec:
            raise TemplateError(f"{{{field}:{spec}}}: a format spec cannot hold another field")
        if field in NUMBER_FIELDS:
            try:
                format(12345, spec)
            except ValueError as exc:
                raise TemplateError(
                    f"{{{field}:{spec}}}: {exc}; a number takes an int format spec such as {{{field}:04d}}"
                ) from None
        elif spec and not (spec.isdigit() and int(spec) > 0):
            raise TemplateError(
                f"{{{field}:{spec}}}: a text field takes only a width, the characters to keep, "
                f"such as {{{field}:40}}"
            )

    def render(self, values: Mapping[str, Any]) -> str:
        """The relative path (``/``-separated, no extension) for one winner's ``values`` (every field)."""
        pieces = []
        for part in self.parts:
            pieces.append(part.literal)
            if part.field is None:
                continue
            value = values[part.field]
            if part.field in NUMBER_FIELDS:
                # Sanitised after the spec, so not even a fill character ({seed:/>9}) can add a folder.
                pieces.append(safe_text(format(int(value or 0), part.spec)))
            else:
                # Cut after sanitising: the width counts the characters the name shows.
                width = int(part.spec) if part.spec else None
                pieces.append(safe_text("" if value is None else value, width))
        return "/".join(safe_segment(seg) for seg in "".join(pieces).split("/"))


def unique(stem: str, taken: set[str], extensions: tuple[str, ...] = (".png", ".json")) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... the first whose files (each extension) are not yet in ``taken``;
    its files are then added to ``taken``. Compared case-folded, as Windows and macOS compare names, so two
    winners never unpack onto one file there either."""
    candidate, n = stem, 1
    while any((candidate + ext).casefold() in taken for ext in extensions):
        n += 1
        candidate = f"{stem}-{n}"
    taken.update((candidate + ext).casefold() for ext in extensions)
    return candidate
