"""Factorization prompts: rendering reproduces the released ML-100K prompts exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from kar.knowledge.prompts import (
    PromptTemplates,
    display_title,
    join_factors,
    render_item_prompt,
    render_user_prompt,
    user_history_text,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def templates() -> PromptTemplates:
    """The ML-100K templates exactly as the project's dataset config holds them."""
    prompts = OmegaConf.load(ROOT / "conf" / "dataset" / "ml-100k.yaml").prompts
    return PromptTemplates(**OmegaConf.to_container(prompts))


@pytest.fixture(scope="module")
def ml100k(data_dir: Path) -> dict:
    root = data_dir / "ml-100k"
    items = pd.read_csv(
        root / "u.item", sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False
    )
    users = pd.read_csv(
        root / "u.user", sep="|", header=None, dtype=str,
        names=["user", "age", "gender", "occupation", "zip"],
    )  # fmt: skip
    ratings = pd.read_csv(
        root / "u.data", sep="\t", header=None, names=["user", "item", "rating", "ts"],
        dtype={"user": str, "item": str, "rating": int, "ts": int},
    )  # fmt: skip
    knowledge = root / "knowledge"
    return {
        "titles": dict(zip(items[0], items[1], strict=True)),
        "users": users,
        # Time order; a stable sort keeps ties in file order, as the released prefixes do.
        "ratings": ratings.sort_values("ts", kind="stable"),
        "begin_index": json.loads((knowledge / "begin_index.json").read_text()),
        "user_klg": json.loads((knowledge / "user.klg").read_text()),
        "item_klg": json.loads((knowledge / "item.klg").read_text()),
    }


def test_all_943_user_prompts_reproduced(templates: PromptTemplates, ml100k: dict) -> None:
    by_user = dict(tuple(ml100k["ratings"].groupby("user", sort=False)))
    mismatched = []
    for user in ml100k["users"].itertuples():
        prefix = by_user[user.user].head(ml100k["begin_index"][user.user])
        history = [
            (ml100k["titles"][item], rating)
            for item, rating in zip(prefix["item"], prefix["rating"], strict=True)
        ]
        profile = {"gender": user.gender, "age": user.age, "occupation": user.occupation}
        if (
            render_user_prompt(templates, profile, history)
            != ml100k["user_klg"][user.user]["prompt"]
        ):
            mismatched.append(user.user)
    assert len(ml100k["users"]) == len(ml100k["user_klg"]) == 943
    assert mismatched == []


def test_all_1682_item_prompts_reproduced(templates: PromptTemplates, ml100k: dict) -> None:
    mismatched = [
        raw_id
        for raw_id, title in ml100k["titles"].items()
        if render_item_prompt(templates, title) != ml100k["item_klg"][raw_id]["prompt"]
    ]
    assert len(ml100k["titles"]) == len(ml100k["item_klg"]) == 1682
    assert mismatched == []


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("Empire Strikes Back, The (1980)", "The Empire Strikes Back (1980)"),
        ("Fish Called Wanda, A (1988)", "A Fish Called Wanda (1988)"),
        ("American in Paris, An (1951)", "An American in Paris (1951)"),
        ("Postino, Il (1994)", "Il Postino (1994)"),
        ("Promesse, La (1996)", "La Promesse (1996)"),
        ("Misérables, Les (1995)", "Les Misérables (1995)"),
        ("Enfer, L' (1994)", "L'Enfer (1994)"),
        ("Good, The Bad and The Ugly, The (1966)", "The Good, The Bad and The Ugly (1966)"),
        # Left alone by the released prompts:
        ("Boot, Das (1981)", "Boot, Das (1981)"),
        ("Bonheur, Le (1965)", "Bonheur, Le (1965)"),
        ("Blue Angel, The (Blaue Engel, Der) (1930)", "Blue Angel, The (Blaue Engel, Der) (1930)"),
        ("Paris, Texas (1984)", "Paris, Texas (1984)"),
        ("Two Friends (1986) ", "Two Friends (1986) "),
        ("unknown", "unknown"),
    ],
)
def test_display_title(raw: str, shown: str) -> None:
    assert display_title(raw) == shown


def test_join_factors() -> None:
    assert join_factors(["genre"]) == "genre"
    assert join_factors(["genre", "author"]) == "genre and author"
    assert join_factors(["genre", "author", "theme"]) == "genre, author, and theme"


def test_user_history_text(templates: PromptTemplates, ml100k: dict) -> None:
    prompt = ml100k["user_klg"]["1"]["prompt"]
    history = user_history_text(prompt)
    assert history == user_history_text(prompt, templates)
    assert history.startswith("Given a male user who is aged 24 and whose occupation is technician")
    assert history.endswith('"Mars Attacks! (1996)", 5 stars')
    assert prompt.startswith(history + "; Analyze user's preferences")
    with pytest.raises(ValueError, match="analysis instruction"):
        user_history_text("Introduce movie Toy Story (1995).")


def test_missing_profile_field_is_named(templates: PromptTemplates) -> None:
    with pytest.raises(ValueError, match=r"\['occupation'\]"):
        render_user_prompt(templates, {"gender": "F", "age": 30}, [("Toy Story (1995)", 4)])


@pytest.mark.parametrize(
    ("user", "item", "message"),
    [
        ("Given {gender} user.", "Introduce {title}.", "lacks placeholder"),
        ("{history} of {gender}", "Introduce {name}.", "lacks placeholder"),
        ("{history} of {gender}", "Introduce {title} by {director}.", "unknown placeholder"),
        ("{history} of {}", "Introduce {title}.", "unnamed"),
        ("{history} of {gender", "Introduce {title}.", "not a format string"),
    ],
)
def test_bad_templates_fail_at_construction(user: str, item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptTemplates(user=user, item=item, user_factors=["genre"], item_factors=["genre"])


def test_factors_placeholder_needs_factors() -> None:
    with pytest.raises(ValueError, match="user_factors is empty"):
        PromptTemplates(
            user="{history} ({factors})", item="{title}", user_factors=[], item_factors=[]
        )
