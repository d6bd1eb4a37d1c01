"""The planted ground truth behind the synthetic clickstream.

K latent topics, each a random unit vector. Every category belongs to one topic; every item has a
category, a latent vector near its topic's centre, a Zipf popularity weight, a price and a first-seen
time. Every human user has a sparse topic preference (Dirichlet) and a latent vector built from it.
The generator samples an item for a user with probability ∝ exp(user·item / τ) × popularity among the
items already seen, so a model trained on the stream can be checked against this file.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.clickstream.config import GeneratorConfig
from streamrec.events import format_ts

DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet", "app", "other")
_DEVICE_P = (0.45, 0.38, 0.05, 0.10, 0.02)
_CATEGORY_NAMES = (
    "electronics",
    "books",
    "home",
    "garden",
    "toys",
    "sports",
    "beauty",
    "fashion",
    "grocery",
    "music",
    "movies",
    "games",
    "office",
    "pets",
    "auto",
    "health",
    "baby",
    "tools",
    "jewelry",
    "outdoor",
)
_USER_AGENTS = {
    "desktop": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "mobile": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "tablet": "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "app": "ShopApp/4.12 (Android 14; Pixel 8)",
    "other": "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
}
BOT_USER_AGENT = "Mozilla/5.0 (compatible; PriceScraper/2.1; +http://scraper.example.net)"
# Documentation address ranges (RFC 5737): realistic-looking personal data that belongs to nobody.
_IP_PREFIXES = ("192.0.2.", "198.51.100.", "203.0.113.")
_MS_PER_DAY = 86_400_000
TRUTH_FORMAT = "streamrec-clickstream-truth/1"


def rng_for(config: GeneratorConfig, *parts: str) -> np.random.Generator:
    """An independent random stream per named part, so changing one part does not reshuffle the others."""
    keys = [zlib.crc32(p.encode()) for p in parts]
    return np.random.default_rng(np.random.SeedSequence([config.seed & 0xFFFFFFFF, *keys]))


def category_names(n: int) -> list[str]:
    base = len(_CATEGORY_NAMES)
    return [_CATEGORY_NAMES[i % base] + ("" if i < base else f"-{i // base + 1}") for i in range(n)]


def user_id(number: int) -> str:
    return f"u{number:06d}"


def item_id(number: int) -> str:
    return f"i{number:06d}"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass(frozen=True)
class RegionUsers:
    """A region's users: humans (with planted preferences) and bots (no preferences, uniform items)."""

    region: str
    user_ids: list[str]
    topic_preferences: np.ndarray  # (users, topics), rows sum to 1
    vectors: np.ndarray  # (users, latent_dim), unit length
    activity: np.ndarray  # (users,), sums to 1: share of the region's sessions
    device: np.ndarray  # (users,), index into DEVICES
    ip: list[str]
    bot_ids: list[str]

    @property
    def top_topic(self) -> np.ndarray:
        return self.topic_preferences.argmax(axis=1)

    def user_agent(self, index: int) -> str:
        return _USER_AGENTS[DEVICES[self.device[index]]]


@dataclass(frozen=True)
class Truth:
    topics: int
    categories: list[str]
    category_topic: np.ndarray  # (categories,)
    topic_centres: np.ndarray  # (topics, latent_dim)
    item_ids: list[str]
    item_category: np.ndarray  # (items,)
    item_vectors: np.ndarray  # (items, latent_dim), unit length
    item_popularity: np.ndarray  # (items,), Zipf weights summing to 1
    item_first_seen_ms: np.ndarray  # (items,) int64 epoch ms; never sampled before this
    item_price: np.ndarray  # (items,)
    regions: dict[str, RegionUsers]

    @property
    def item_topic(self) -> np.ndarray:
        return self.category_topic[self.item_category]


def build_truth(config: GeneratorConfig) -> Truth:
    """The latent world of a (resolved) config: deterministic for its seed."""
    config = config.resolved()
    start, end = config.window
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    rng = rng_for(config, "catalogue")
    k, d, n_items = config.topics, config.latent_dim, config.items

    centres = _unit(rng.standard_normal((k, d)))
    # Every topic gets a category when there are enough of them; the rest land on random topics.
    category_topic = np.concatenate(
        [rng.permutation(k)[: min(k, config.categories)], rng.integers(0, k, max(0, config.categories - k))]
    )
    item_category = rng.integers(0, config.categories, n_items)
    item_vectors = _unit(
        centres[category_topic[item_category]] + 0.35 * _unit(rng.standard_normal((n_items, d)))
    )
    # Popularity rank is independent of topic, so popularity and preference are separable signals.
    rank = rng.permutation(n_items)
    popularity = (rank + 1.0) ** -config.zipf_exponent
    popularity /= popularity.sum()
    is_new = rng.random(n_items) < config.new_item_share
    is_new[rank == 0] = False  # the most popular item is always there, so every moment has a catalogue
    first_seen = np.where(
        is_new,
        rng.integers(start_ms, end_ms, n_items),
        start_ms - rng.integers(1, 365 * _MS_PER_DAY, n_items),
    ).astype(np.int64)
    category_median = rng.uniform(5, 200, config.categories)
    price = np.round(np.exp(np.log(category_median[item_category]) + 0.5 * rng.standard_normal(n_items)), 2)

    regions = {}
    n_users, n_bots = config.users_per_region, config.bots_per_region
    for r, region in enumerate(config.regions):
        urng = rng_for(config, "users", region)
        prefs = urng.dirichlet(np.full(k, 0.2), n_users)
        vectors = _unit(prefs @ centres + 0.1 * urng.standard_normal((n_users, d)))
        activity = np.minimum(urng.lognormal(0.0, 1.0, n_users), 10.0)
        # Humans of region r are numbered in block r; all bots come after all humans.
        first_bot = len(config.regions) * n_users + r * n_bots
        regions[region] = RegionUsers(
            region=region,
            user_ids=[user_id(r * n_users + i) for i in range(n_users)],
            topic_preferences=prefs,
            vectors=vectors,
            activity=activity / activity.sum(),
            device=urng.choice(len(DEVICES), n_users, p=_DEVICE_P),
            ip=[
                f"{_IP_PREFIXES[a % 3]}{b}"
                for a, b in zip(urng.integers(0, 3, n_users), urng.integers(1, 255, n_users))
            ],
            bot_ids=[user_id(first_bot + i) for i in range(n_bots)],
        )
    return Truth(
        topics=k,
        categories=category_names(config.categories),
        category_topic=category_topic,
        topic_centres=centres,
        item_ids=[item_id(i) for i in range(n_items)],
        item_category=item_category,
        item_vectors=item_vectors,
        item_popularity=popularity,
        item_first_seen_ms=first_seen,
        item_price=price,
        regions=regions,
    )


def truth_to_dict(truth: Truth, config: GeneratorConfig) -> dict[str, Any]:
    items = [
        {
            "item_id": truth.item_ids[i],
            "category": truth.categories[truth.item_category[i]],
            "topic": int(truth.item_topic[i]),
            "popularity": float(truth.item_popularity[i]),
            "first_seen": format_ts(int(truth.item_first_seen_ms[i])),
            "price": float(truth.item_price[i]),
            "vector": [round(float(x), 6) for x in truth.item_vectors[i]],
        }
        for i in range(len(truth.item_ids))
    ]
    users: list[dict[str, Any]] = []
    for region, ru in truth.regions.items():
        top = ru.top_topic
        for i, uid in enumerate(ru.user_ids):
            users.append(
                {
                    "user_id": uid,
                    "region": region,
                    "bot": False,
                    "top_topic": int(top[i]),
                    "topic_preferences": [round(float(x), 6) for x in ru.topic_preferences[i]],
                    "vector": [round(float(x), 6) for x in ru.vectors[i]],
                }
            )
        users.extend({"user_id": uid, "region": region, "bot": True} for uid in ru.bot_ids)
    return {
        "format": TRUTH_FORMAT,
        "config": config.resolved().model_dump(mode="json"),
        "topics": truth.topics,
        "categories": [{"name": n, "topic": int(t)} for n, t in zip(truth.categories, truth.category_topic)],
        "items": items,
        "users": users,
    }


def write_truth(path: str | Path, config: GeneratorConfig, truth: Truth | None = None) -> Path:
    """Write the ground truth of a config as one JSON document (format ``streamrec-clickstream-truth/1``)."""
    config = config.resolved()
    truth = truth or build_truth(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(truth_to_dict(truth, config), separators=(",", ":")))
    return path
