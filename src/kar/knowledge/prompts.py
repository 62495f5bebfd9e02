"""Factorization prompts (KAR): the text an LLM sees for a user's preferences or an item's facts.

A dataset config holds the templates and the scenario's factor lists; this module only renders
them. The rendering reproduces the prompts of the released MovieLens-100K knowledge files
character for character, including their display form of catalogue titles
("Empire Strikes Back, The (1980)" -> "The Empire Strikes Back (1980)").
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kar.errors import ConfigError

# Catalogue titles move a leading article to the end ("Postino, Il (1994)"). The released prompts
# move it back only for these articles; "Boot, Das", "Bonheur, Le" and "Bewegte Mann, Der" stay
# as they are, and so do articles inside an alternative title in parentheses.
_FRONT_ARTICLES = ("The", "A", "An", "Il", "La", "Les", "L'")
_MOVED_ARTICLE = re.compile(
    r"^(?P<body>.+), (?P<article>" + "|".join(map(re.escape, _FRONT_ARTICLES)) + r") "
    r"(?P<year>\(\d{4}\))$"
)

GENDER_WORDS = {"M": "male", "F": "female"}

# Without templates, the user prompt's history ends where the analysis instruction begins.
DEFAULT_INSTRUCTION_START = "Analyze user's preferences"


def display_title(raw_title: str) -> str:
    """The title as prompts show it: a trailing article moved back to the front."""
    match = _MOVED_ARTICLE.match(raw_title)
    if match is None:
        return raw_title
    article = match["article"]
    separator = "" if article.endswith("'") else " "
    return f"{article}{separator}{match['body']} {match['year']}"


def join_factors(factors: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b, and c' (serial comma, as in the paper's prompts)."""
    if len(factors) <= 2:
        return " and ".join(factors)
    return ", ".join(factors[:-1]) + ", and " + factors[-1]


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class PromptTemplates:
    """Format strings for one scenario.

    `user` uses {history}, {factors} and any profile field (e.g. {gender} {age} {occupation});
    `item` uses {title} and {factors}; `history_entry` renders one rated item of the history
    with {title} and {rating} (entries are concatenated, so the entry carries its separator).
    """

    user: str
    item: str
    user_factors: list[str]
    item_factors: list[str]
    history_entry: str = '"{title}", {rating} stars; '

    def __post_init__(self) -> None:
        # (template name, template, required placeholders, allowed placeholders or None = any)
        checks = (
            ("user", self.user, {"history"}, None),
            ("item", self.item, {"title"}, {"title", "factors"}),
            ("history_entry", self.history_entry, {"title", "rating"}, {"title", "rating"}),
        )
        for name, template, required, allowed in checks:
            try:
                names = set(_fields(template))
            except ValueError as err:
                message = f"prompt template {name!r} is not a format string: {err}"
                raise ConfigError(message) from None
            if any(not n.isidentifier() for n in names):
                raise ConfigError(
                    f"prompt template {name!r} has an unnamed or dotted placeholder; use named "
                    f"fields like {{title}} (write literal braces as {{{{ }}}}): {template!r}"
                )
            if missing := required - names:
                raise ConfigError(
                    f"prompt template {name!r} lacks placeholder(s) {sorted(missing)}: {template!r}"
                )
            if allowed is not None and (unknown := names - allowed):
                raise ConfigError(
                    f"prompt template {name!r} has unknown placeholder(s) {sorted(unknown)}; "
                    f"allowed: {sorted(allowed)}"
                )
        for name, template, factors in (
            ("user", self.user, self.user_factors),
            ("item", self.item, self.item_factors),
        ):
            if "factors" in _fields(template) and not factors:
                raise ConfigError(
                    f"prompt template {name!r} uses {{factors}} but {name}_factors is empty"
                )

    def user_instruction_start(self) -> str:
        """The literal text right after {history} in the user template (where analysis begins)."""
        after = self.user.split("{history}", 1)[1]
        return next(iter(string.Formatter().parse(after)))[0]


@dataclass(frozen=True)
class PromptRequest:
    """One prompt to answer, identified by the dataset's raw id of the user or item."""

    kind: Literal["user", "item"]
    raw_id: str
    prompt: str


def render_user_prompt(
    t: PromptTemplates, profile: Mapping[str, object], history: Sequence[tuple[str, int]]
) -> str:
    """The user prompt: profile fields, the rated history [(raw title, rating)], the factors."""
    values = dict(profile)
    if "gender" in values:
        gender = values["gender"]
        values["gender"] = GENDER_WORDS.get(str(gender), gender)
    values["history"] = "".join(
        t.history_entry.format(title=display_title(title), rating=rating)
        for title, rating in history
    )
    values["factors"] = join_factors(t.user_factors)
    if missing := [name for name in _fields(t.user) if name not in values]:
        raise ConfigError(
            f"user prompt template needs profile field(s) {missing} but the profile has "
            f"{sorted(profile)}; fix the dataset's user template or its profile columns"
        )
    return t.user.format_map(values)


def render_item_prompt(t: PromptTemplates, raw_title: str) -> str:
    """The item prompt for a catalogue title."""
    return t.item.format(title=display_title(raw_title), factors=join_factors(t.item_factors))


def user_history_text(prompt: str, templates: PromptTemplates | None = None) -> str:
    """The history part of a user prompt (what precedes the analysis instruction).

    KAR encodes a user as this part + ". " + the LLM's answer. The instruction start comes from
    `templates` when given, else the paper's wording "Analyze user's preferences".
    """
    marker = templates.user_instruction_start() if templates else DEFAULT_INSTRUCTION_START
    position = prompt.rfind(marker) if marker else -1
    if position < 0:
        raise ConfigError(
            f"user prompt does not contain the analysis instruction {marker!r}, so its history "
            f"part is unknown; pass the dataset's PromptTemplates. Prompt starts: {prompt[:80]!r}"
        )
    return prompt[:position].rstrip().removesuffix(";").rstrip()
