"""Synthetic clickstream with a planted truth (see :mod:`streamrec.clickstream.truth`).

Per region, the stream is built column-wise with numpy and encoded lazily, record by record:

- human sessions: a few views (geometric), each view may lead to a click, then add_to_cart, then
  purchase of the same item; events a second to a minute apart; a user's sessions at least 30 minutes
  apart; items drawn ∝ exp(user·item/τ) × Zipf popularity among items already first-seen;
- bots: a burst at a high sustained rate, uniformly random items, schema-valid events;
- malformed records: a valid-looking event broken in one of the ways of :mod:`.malformed`;
- duplicates: the exact bytes of an earlier valid or bot record, sent again a moment later (a retry).

Records come out in time order per region; :func:`generate` merges the regions by time. Event JSON is
built from plain dicts with ``canonical_json`` (no pydantic model per event, for speed), so the tests
check that every non-malformed record passes ``parse_event``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.malformed import MALFORMED_REASONS, corrupt
from streamrec.clickstream.records import GeneratedRecord, RecordKind
from streamrec.clickstream.truth import BOT_USER_AGENT, DEVICES, RegionUsers, Truth, build_truth, rng_for
from streamrec.events import EVENT_TYPES, canonical_json

__all__ = ["GeneratedRecord", "GeneratorConfig", "generate", "generate_region"]

# The funnel: share of views clicked, of clicks added to cart, of carts purchased.
P_CLICK, P_CART, P_PURCHASE = 0.30, 0.30, 0.40
MEAN_VIEWS, MAX_VIEWS = 4.0, 40
# Time between consecutive events of a session: at least a second, about 20 s on average.
MIN_STEP_MS, MEAN_EXTRA_STEP_MS = 1_000, 19_000
SESSION_GAP_MS = 30 * 60 * 1000
# Share of human sessions whose events carry ip and user_agent (personal data the consumer hashes).
PII_SHARE = 0.3
REFERRERS: tuple[str | None, ...] = (
    None,
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://t.co/",
    "https://newsletter.example.com/",
)
_REFERRER_P = (0.4, 0.35, 0.08, 0.07, 0.10)
_BOT_TYPES_P = (0.75, 0.20, 0.05, 0.0)  # bots view and click, rarely add to cart, never buy
_KINDS: tuple[RecordKind, ...] = ("valid", "bot", "malformed", "duplicate")
_VALID, _BOT, _MALFORMED, _DUPLICATE = range(4)


@dataclass(frozen=True)
class _Sessions:
    session: np.ndarray  # per event: session index
    depth: np.ndarray  # per event: 0 view, 1 click, 2 add_to_cart, 3 purchase
    view: np.ndarray  # per event: index of the view it follows (its item)
    offset_ms: np.ndarray  # per event: ms since its session's first event
    duration_ms: np.ndarray  # per session


def _draw_sessions(rng: np.random.Generator, n_events: int) -> _Sessions:
    """Funnel-shaped sessions holding exactly ``n_events`` events (the last session is cut short)."""
    views_chunks, deepest_chunks, total = [], [], 0
    while total < n_events:
        views = np.minimum(rng.geometric(1 / MEAN_VIEWS, (n_events - total) // 5 + 16), MAX_VIEWS)
        v = int(views.sum())
        click = rng.random(v) < P_CLICK
        cart = click & (rng.random(v) < P_CART)
        buy = cart & (rng.random(v) < P_PURCHASE)
        deepest = click.astype(np.int64) + cart + buy
        views_chunks.append(views)
        deepest_chunks.append(deepest)
        total += v + int(deepest.sum())
    views, deepest = np.concatenate(views_chunks), np.concatenate(deepest_chunks)
    per_view = deepest + 1
    view = np.repeat(np.arange(len(deepest)), per_view)[:n_events]
    depth = np.arange(n_events) - (np.cumsum(per_view) - per_view)[view]
    session = np.repeat(np.arange(len(views)), views)[view]
    first = np.r_[True, session[1:] != session[:-1]]
    step = MIN_STEP_MS + rng.exponential(MEAN_EXTRA_STEP_MS, n_events).astype(np.int64)
    step[first] = 0
    elapsed = np.cumsum(step)
    offset = elapsed - elapsed[np.flatnonzero(first)][session]
    last = np.r_[first[1:], True]
    return _Sessions(session=session, depth=depth, view=view, offset_ms=offset, duration_ms=offset[last])


def _assign_users(
    rng: np.random.Generator, need_ms: np.ndarray, activity: np.ndarray, window_ms: int
) -> np.ndarray:
    """A user per session, ∝ activity, such that each user's sessions plus gaps fit in the window."""
    user = rng.choice(len(activity), size=len(need_ms), p=activity)
    load = np.bincount(user, weights=need_ms, minlength=len(activity))
    overloaded = np.flatnonzero(load > window_ms)
    if overloaded.size == 0:
        return user
    # Rare: a very active user cannot fit their sessions 30 minutes apart. Hand the surplus sessions to
    # the least-loaded users (a lazy min-heap; stale entries are refreshed when popped).
    heap = [(load[u], int(u)) for u in range(len(activity))]
    heapq.heapify(heap)
    for u in overloaded:
        sessions = list(np.flatnonzero(user == u))
        while load[u] > window_ms:
            s = sessions.pop()
            load[u] -= need_ms[s]
            while True:
                held, v = heapq.heappop(heap)
                if held == load[v]:
                    break
                heapq.heappush(heap, (load[v], v))
            if v == u or load[v] + need_ms[s] > window_ms:
                raise ValueError(
                    "too many events for the users and days: a user's sessions must be 30 minutes apart; "
                    "raise users_per_region or days, or lower events_per_region"
                )
            user[s] = v
            load[v] += need_ms[s]
            heapq.heappush(heap, (load[v], v))
    return user


def _session_starts(
    rng: np.random.Generator, user: np.ndarray, need_ms: np.ndarray, start_ms: int, window_ms: int
) -> np.ndarray:
    """Start times: per user, the sessions in random order, each followed by its duration plus the
    30-minute gap, with the user's spare time spread at uniform order statistics (so starts are as
    random as the gap rule allows and never run past the window)."""
    order = np.lexsort((rng.random(len(user)), user))
    u, need = user[order], need_ms[order]
    first = np.r_[True, u[1:] != u[:-1]]
    group = np.cumsum(first) - 1
    before = np.cumsum(need) - need
    before -= before[np.flatnonzero(first)][group]
    spare = window_ms - np.bincount(u, weights=need)[u]
    uniform = rng.random(len(u))
    spread = uniform[np.lexsort((uniform, group))] * spare
    starts = np.empty(len(user), dtype=np.int64)
    starts[order] = start_ms + (spread + before).astype(np.int64)
    return starts


class _Catalogue:
    """Items in first-seen order, so "items available at time t" is a prefix found by binary search."""

    def __init__(self, truth: Truth, temperature: float) -> None:
        self.order = np.argsort(truth.item_first_seen_ms, kind="stable")
        self.first_seen = truth.item_first_seen_ms[self.order]
        self.vectors = truth.item_vectors[self.order] / temperature
        self.log_popularity = np.log(truth.item_popularity[self.order])

    def available(self, ts_ms: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_seen, ts_ms, side="right")

    def sample_preferred(
        self, rng: np.random.Generator, users: RegionUsers, user: np.ndarray, ts_ms: np.ndarray
    ) -> np.ndarray:
        """Per (user, time): an item ∝ exp(user·item/τ) × popularity among items first-seen by then."""
        items = np.empty(len(user), dtype=np.int64)
        available = self.available(ts_ms)
        by_user = np.argsort(user, kind="stable")
        owners, bounds = np.unique(user[by_user], return_index=True)
        for u, idx in zip(owners, np.split(by_user, bounds[1:])):
            logits = self.vectors @ users.vectors[u] + self.log_popularity
            cum = np.cumsum(np.exp(logits - logits.max()))
            n = available[idx]
            # Inverse CDF over the available prefix; the clamp guards against float round-off.
            j = np.minimum(np.searchsorted(cum, rng.random(len(idx)) * cum[n - 1], side="right"), n - 1)
            items[idx] = self.order[j]
        return items

    def sample_uniform(self, rng: np.random.Generator, ts_ms: np.ndarray) -> np.ndarray:
        return self.order[(rng.random(len(ts_ms)) * self.available(ts_ms)).astype(np.int64)]


def _event_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Random (version 4) UUIDs drawn from the seeded generator, so they repeat with the seed."""
    raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    h = raw.tobytes().hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


def _iso_ms(ts_ms: np.ndarray) -> list[str]:
    """Vectorised ``streamrec.events.format_ts``."""
    return [s + "Z" for s in np.datetime_as_string(ts_ms.astype("datetime64[ms]"), unit="ms").tolist()]


def _session_ids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"s{x:016x}" for x in rng.integers(0, 2**63, n).tolist()]


@dataclass(frozen=True)
class _Events:
    """Events of one region, one array per field."""

    ts: np.ndarray  # epoch ms
    user: np.ndarray  # index into the region's users.user_ids + users.bot_ids
    item: np.ndarray
    etype: np.ndarray  # index into EVENT_TYPES
    session: np.ndarray  # index into the region's sessions
    referrer: np.ndarray  # index into REFERRERS (0: none)
    pii: np.ndarray  # carries ip and user_agent
    listing: np.ndarray  # the page a view happens on: 0 home, 1 search, 2 category
    sessions: int

    @staticmethod
    def concat(a: _Events, b: _Events) -> _Events:
        """``b`` after ``a``; b's session indices are moved past a's."""
        columns = ("ts", "user", "item", "etype", "referrer", "pii", "listing")
        joined = {c: np.concatenate([getattr(a, c), getattr(b, c)]) for c in columns}
        session = np.concatenate([a.session, a.sessions + b.session])
        return _Events(**joined, session=session, sessions=a.sessions + b.sessions)


def _human_events(
    rng: np.random.Generator, n: int, users: RegionUsers, catalogue: _Catalogue, start_ms: int, end_ms: int
) -> _Events:
    """Sessions → users → start times → items, for ``n`` events."""
    s = _draw_sessions(rng, n)
    need = s.duration_ms + SESSION_GAP_MS
    session_user = _assign_users(rng, need, users.activity, end_ms - start_ms)
    ts = _session_starts(rng, session_user, need, start_ms, end_ms - start_ms)[s.session] + s.offset_ms
    # Items are drawn per view; the click, cart and purchase after a view are of the same item.
    is_view = s.depth == 0
    view_item = np.zeros(int(s.view[-1]) + 1, dtype=np.int64)
    view_item[s.view[is_view]] = catalogue.sample_preferred(
        rng, users, session_user[s.session[is_view]], ts[is_view]
    )
    sessions = len(s.duration_ms)
    first_in_session = np.r_[True, s.session[1:] != s.session[:-1]]
    referrer = rng.choice(len(REFERRERS), sessions, p=_REFERRER_P)[s.session]
    return _Events(
        ts=ts,
        user=session_user[s.session],
        item=view_item[s.view],
        etype=s.depth,
        session=s.session,
        referrer=np.where(first_in_session, referrer, 0),  # external referrer on a session's entry only
        pii=(rng.random(sessions) < PII_SHARE)[s.session],
        listing=rng.integers(0, 3, n),
        sessions=sessions,
    )


def _bot_events(
    rng: np.random.Generator,
    n: int,
    config: GeneratorConfig,
    catalogue: _Catalogue,
    first_bot: int,
    start_ms: int,
    end_ms: int,
) -> _Events:
    """Each bot: one burst (one session) at its sustained rate somewhere in the window, uniform items."""
    window = end_ms - start_ms
    ts, bot = [], []
    for b, size in enumerate(len(a) for a in np.array_split(np.arange(n), config.bots_per_region)):
        # The configured rate, unless the burst would not fit the window.
        step = min(1000 / config.bot_rate_per_s, 0.9 * window / max(size, 1))
        begin = start_ms + rng.random() * (window - size * step)
        ts.append((begin + (np.arange(size) + 0.9 * rng.random(size)) * step).astype(np.int64))
        bot.append(np.full(size, b))
    bot_ts, bot_of = np.concatenate(ts), np.concatenate(bot)
    return _Events(
        ts=bot_ts,
        user=first_bot + bot_of,
        item=catalogue.sample_uniform(rng, bot_ts),
        etype=rng.choice(len(EVENT_TYPES), n, p=_BOT_TYPES_P),
        session=bot_of,
        referrer=np.zeros(n, np.int64),
        pii=np.ones(n, bool),
        listing=np.full(n, 2),
        sessions=config.bots_per_region,
    )


class _RegionStream:
    """One region's records: planned column-wise at construction, encoded one by one on iteration."""

    def __init__(self, config: GeneratorConfig, truth: Truth, region: str) -> None:
        self.truth, self.region = truth, region
        users = truth.regions[region]
        start, end = config.window
        start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
        self.future_from = end
        counts = config.counts_per_region()
        catalogue = _Catalogue(truth, config.temperature)

        # Humans first, then bots; each part has its own random stream (see truth.rng_for).
        humans = _human_events(
            rng_for(config, "sessions", region), counts["valid"], users, catalogue, start_ms, end_ms
        )
        bots = _bot_events(
            rng_for(config, "bots", region),
            counts["bot"],
            config,
            catalogue,
            len(users.user_ids),
            start_ms,
            end_ms,
        )
        events = _Events.concat(humans, bots)
        n_events, n_humans = len(events.ts), len(humans.ts)
        self.n_events = n_events

        # Malformed records are broken copies of random human events; duplicates re-send any event.
        frng = rng_for(config, "faults", region)
        n_bad, n_dup = counts["malformed"], counts["duplicate"]
        self.bad_template = frng.integers(0, n_humans, n_bad).tolist()
        reasons = frng.permutation(np.resize(np.arange(len(MALFORMED_REASONS)), n_bad))  # all, evenly
        self.bad_reason = [MALFORMED_REASONS[i] for i in reasons]
        self.bad_seed = frng.integers(0, 2**63, n_bad).tolist()
        dup_source = frng.integers(0, n_events, n_dup)
        retry_delay = frng.integers(200, 5_000, n_dup)

        # Plain lists from here on: indexing numpy arrays one scalar at a time is slow.
        idrng = rng_for(config, "ids", region)
        self.event_id = _event_ids(idrng, n_events + n_bad)  # the malformed records' ids come last
        self.session_id = _session_ids(idrng, events.sessions)
        self.ts_text = _iso_ms(events.ts)
        self.user = events.user.tolist()
        self.item = events.item.tolist()
        self.etype = events.etype.tolist()
        self.session = events.session.tolist()
        self.referrer = events.referrer.tolist()
        self.pii = events.pii.tolist()
        self.listing = events.listing.tolist()
        n_bots = len(users.bot_ids)
        self.user_ids = users.user_ids + users.bot_ids
        self.device = [DEVICES[d] for d in users.device.tolist()] + ["other"] * n_bots
        self.ip = users.ip + [f"198.18.{i % 256}.{(i * 37) % 254 + 1}" for i in range(n_bots)]
        self.user_agent = [users.user_agent(u) for u in range(len(users.user_ids))] + [
            BOT_USER_AGENT
        ] * n_bots
        self.item_category = [truth.categories[c] for c in truth.item_category.tolist()]
        self.item_price = truth.item_price.tolist()

        # The emission order: all records by time (a stable sort, so a duplicate follows its original).
        kind = np.concatenate(
            [
                np.where(np.arange(n_events) < n_humans, _VALID, _BOT),
                np.full(n_bad, _MALFORMED),
                np.full(n_dup, _DUPLICATE),
            ]
        )
        ref = np.concatenate([np.arange(n_events), np.arange(n_bad), dup_source])
        at = np.concatenate([events.ts, humans.ts[self.bad_template], events.ts[dup_source] + retry_delay])
        order = np.argsort(at, kind="stable")
        self.order = list(zip(at[order].tolist(), kind[order].tolist(), ref[order].tolist()))

    def _event(self, i: int, event_id: str) -> dict[str, Any]:
        item, u = self.item[i], self.user[i]
        etype = EVENT_TYPES[self.etype[i]]
        item_id = self.truth.item_ids[item]
        category = self.item_category[item]
        if etype == "view":
            page = ("/", "/search", f"/c/{category}")[self.listing[i]]
        else:
            page = "/checkout" if etype == "purchase" else f"/p/{item_id}"
        context: dict[str, Any] = {
            "device": self.device[u],
            "page": page,
            "price": self.item_price[item],
            "category": category,
        }
        if self.referrer[i]:
            context["referrer"] = REFERRERS[self.referrer[i]]
        if self.pii[i]:
            context["ip"], context["user_agent"] = self.ip[u], self.user_agent[u]
        return {
            "event_id": event_id,
            "user_id": self.user_ids[u],
            "session_id": self.session_id[self.session[i]],
            "item_id": item_id,
            "event_type": etype,
            "ts": self.ts_text[i],
            "region": self.region,
            "context": context,
        }

    def records(self) -> Iterator[tuple[int, GeneratedRecord]]:
        """(time ms, record) in time order."""
        region, n_events = self.region, self.n_events
        for at, kind, ref in self.order:
            if kind == _MALFORMED:
                template = self._event(self.bad_template[ref], self.event_id[n_events + ref])
                reason = self.bad_reason[ref]
                data, key = corrupt(
                    template, reason, random.Random(self.bad_seed[ref]), future_from=self.future_from
                )
                yield at, GeneratedRecord(region, key, data, "malformed", reason)
            else:
                # Encoding is a pure function of the event, so a duplicate re-encodes to the same bytes.
                data = canonical_json(self._event(ref, self.event_id[ref]))
                yield at, GeneratedRecord(region, self.user_ids[self.user[ref]], data, _KINDS[kind], None)


def generate_region(
    config: GeneratorConfig, region: str, truth: Truth | None = None
) -> Iterator[GeneratedRecord]:
    """One region's records in time order (identical to that region's share of :func:`generate`)."""
    config = config.resolved()
    if region not in config.regions:
        raise ValueError(f"region {region!r} is not in the config's regions {list(config.regions)}")
    stream = _RegionStream(config, truth or build_truth(config), region)
    return (record for _, record in stream.records())


def generate(config: GeneratorConfig, truth: Truth | None = None) -> Iterator[GeneratedRecord]:
    """All regions' records, merged in time order. Deterministic for a (resolved) config."""
    config = config.resolved()
    truth = truth or build_truth(config)
    streams = [
        ((at, r, record) for at, record in _RegionStream(config, truth, region).records())
        for r, region in enumerate(config.regions)
    ]
    # The region index breaks time ties, so records themselves are never compared.
    return (record for _, _, record in heapq.merge(*streams, key=lambda x: (x[0], x[1])))
