"""The two-tower model (ray_apps.model): tower shapes and unit norms, the shared id table, users with
no history, the in-batch softmax loss (weights, log-Q, duplicate masking), and learning on a planted
dataset well enough to beat a most-popular baseline."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ray_apps.encoding import encode_examples, encode_items, encode_users, examples_table, item_counts
from ray_apps.model import (
    TwoTowerConfig,
    TwoTowerModel,
    _mean_pool,
    _mean_pool_ids,
    as_tensors,
    in_batch_logits,
    in_batch_softmax_loss,
    recall_at_k,
)
from streamrec.events import EVENT_WEIGHTS

pytestmark = pytest.mark.unit

TINY = TwoTowerConfig(
    id_buckets=512, category_buckets=32, pop_buckets=8, region_buckets=8, device_buckets=8,
    embedding_dim=16, feature_dim=4, item_hidden=(32,), user_hidden=(32,), output_dim=8, history_length=6,
    dropout=0.0,
)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> Iterator[None]:
    """Seeded and single-threaded: on a busy 2-core box two OpenMP threads can run 10x slower than one.

    Not torch.use_deterministic_algorithms: its first call imports torch._inductor (3-4 s here), and
    every op these tests run on CPU is deterministic already; the towers' parameters come from the
    config seed and the data order from explicit generators.
    """
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(config: TwoTowerConfig, size: int = 6, width: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = config.history_length if width is None else width

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high, shape, generator=g)

    batch = {
        "history": ints(config.id_buckets, size, width),
        "region": ints(config.region_buckets, size),
        "device": ints(config.device_buckets, size),
        "hour": ints(25, size),
        "item_id": torch.randperm(config.id_buckets - 1, generator=g)[:size] + 1,  # distinct positives
        "category": ints(config.category_buckets, size),
        "pop_bucket": ints(config.pop_buckets, size),
    }
    if config.user_buckets:
        batch["user_id"] = ints(config.user_buckets, size)
    return batch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """torch.testing.assert_close without its first-call cost (it imports torch._dynamo: about 2 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual, expected)


# --------------------------------------------------------------------------- config


def test_config_round_trips_through_json_and_rejects_unknown_keys() -> None:
    config = TINY.model_copy(update={"pooling": "attention", "user_buckets": 100})
    assert TwoTowerConfig.from_json(config.to_json()) == config
    assert TwoTowerConfig().id_buckets == 2**18 and TwoTowerConfig().output_dim == 64
    with pytest.raises(ValidationError, match="extra"):
        TwoTowerConfig.model_validate({"id_bucket": 10})
    with pytest.raises(ValidationError):
        TwoTowerConfig(pooling="max")
    with pytest.raises(ValidationError, match="user_buckets"):
        TwoTowerConfig(user_buckets=1)
    with pytest.raises(ValidationError, match="frozen"):
        TINY.seed = 3  # type: ignore[misc]


def test_parameters_depend_on_the_config_seed_only() -> None:
    torch.manual_seed(1)
    a = TwoTowerModel(TINY)
    torch.manual_seed(2)
    b = TwoTowerModel(TINY)
    c = TwoTowerModel(TINY.model_copy(update={"seed": 1}))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.item_id_embedding.weight, c.item_id_embedding.weight)


# --------------------------------------------------------------------------- towers


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("user_buckets", [0, 64])
def test_towers_return_unit_vectors_of_the_output_dim(pooling: str, user_buckets: int) -> None:
    config = TINY.model_copy(update={"pooling": pooling, "user_buckets": user_buckets})
    model = TwoTowerModel(config)
    batch = _batch(config)
    users, items = model.user_embeddings(batch), model.item_embeddings(batch)
    for vectors in (users, items):
        assert vectors.shape == (6, config.output_dim) and vectors.dtype == torch.float32
        assert_close(vectors.norm(dim=-1), torch.ones(6))
    loss = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.item_id_embedding.weight.grad is not None


def test_the_history_table_is_the_item_id_table() -> None:
    model = TwoTowerModel(TINY)
    assert model.history_embedding is model.item_id_embedding
    id_tables = [p for p in model.parameters() if p.shape[0] == TINY.id_buckets]
    assert len(id_tables) == 1
    # Behaviour, not just identity: changing one id's row moves both the item and a user who clicked it.
    batch = _batch(TINY)
    batch["history"][0, 0] = batch["item_id"][0]
    with torch.no_grad():
        users, items = model.user_embeddings(batch), model.item_embeddings(batch)
        model.item_id_embedding.weight[batch["item_id"][0]] += 1.0
        assert not torch.allclose(model.user_embeddings(batch)[0], users[0])
        assert not torch.allclose(model.item_embeddings(batch)[0], items[0])
        assert_close(model.item_embeddings(batch)[1:], items[1:])


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_padding_is_ignored_and_an_empty_history_falls_back_to_context(pooling: str) -> None:
    model = TwoTowerModel(TINY.model_copy(update={"pooling": pooling, "user_buckets": 64})).eval()
    batch = _batch(model.config, size=4)
    batch["history"][:, 3:] = 0  # three real clicks, then padding
    del batch["user_id"]  # a user seen only through recent clicks: no user id
    with torch.no_grad():
        users = model.user_embeddings(batch)
        wider = {**batch, "history": torch.cat([batch["history"], torch.zeros(4, 5, dtype=torch.long)], 1)}
        assert_close(model.user_embeddings(wider), users)
        empty = model.user_embeddings({**batch, "history": torch.zeros(4, 6, dtype=torch.long)})
        no_columns = model.user_embeddings({**batch, "history": torch.zeros(4, 0, dtype=torch.long)})
    assert torch.isfinite(empty).all()
    assert_close(empty.norm(dim=-1), torch.ones(4))
    assert_close(no_columns, empty)
    # Without history the vector is a function of context alone.
    same_context = {name: value[[0, 0]] for name, value in batch.items()}
    with torch.no_grad():
        pair = model.user_embeddings({**same_context, "history": torch.zeros(2, 6, dtype=torch.long)})
    assert_close(pair[0], pair[1])
    assert not torch.allclose(empty[0], empty[1])  # rows 0 and 1 have different contexts


# --------------------------------------------------------------------------- pooling from ids (embedding_bag)


def _gathered_user_vectors(model: TwoTowerModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The user tower the way it pooled before embedding_bag: vectors gathered into [B, N, D], masked."""
    history = batch["history"]
    return model.user_tower(model.history_embedding(history), history != 0, batch["region"], batch["device"],
                            batch["hour"], batch.get("user_id"))


def _histories_with_edge_cases(config: TwoTowerConfig) -> torch.Tensor:
    """Hashed ids of real item-id strings (9 names into the id table's buckets: with 8 buckets, 7 usable,
    some collide), with an empty history, padding inside a history (a null id keeps its place), a full
    row and one repeated item."""
    names = [f"item-{i:03d}" for i in range(40)]
    histories = [[], names[:3], [names[4], None, names[5]], names[:config.history_length], [names[7]] * 4,
                 names[10:12], [None, None]]
    encoded = encode_users(histories, "eu-west-1", "mobile", 9, config=config)
    return torch.as_tensor(encoded["history"])


@pytest.mark.parametrize("user_buckets", [0, 64])
def test_mean_pooling_by_embedding_bag_equals_the_masked_mean_of_gathered_vectors(user_buckets: int) -> None:
    config = TINY.model_copy(update={"id_buckets": 8, "user_buckets": user_buckets, "history_length": 6})
    model = TwoTowerModel(config).eval()
    history = _histories_with_edge_cases(config)
    assert (history == 0).all(dim=1).any() and ((history == 0) & (history.cumsum(1) > 0)).any()
    assert len(set(history[history > 0].tolist())) < 9, "hashed ids collide"
    table = model.item_id_embedding.weight
    with torch.no_grad():
        fused = _mean_pool_ids(history, table)
        gathered = _mean_pool(table[history], history != 0)
        assert fused.dtype == torch.float32
        assert_close(fused, gathered, tol=1e-6)
        assert torch.equal(fused[0], torch.zeros(config.embedding_dim)), "an empty history pools to zeros"
        assert torch.equal(fused[-1], torch.zeros(config.embedding_dim)), "so does a history of null ids"
        assert_close(fused[4], table[history[4, 0]], tol=1e-6)  # one item four times: that item
        # The whole tower, with and without user ids, against the gathered path.
        batch = _batch(config, size=len(history))
        batch["history"] = history
        assert_close(model.user_embeddings(batch), _gathered_user_vectors(model, batch), tol=1e-6)
        no_columns = {**batch, "history": torch.zeros(len(history), 0, dtype=torch.long)}
        assert_close(model.user_embeddings(no_columns), _gathered_user_vectors(model, no_columns), tol=1e-6)


def test_embedding_bag_pooling_gives_the_gathered_paths_gradients() -> None:
    """Training goes through the same function: the id table's gradient must match too, and the padding
    row must get none."""
    config = TINY.model_copy(update={"id_buckets": 8, "history_length": 6})
    history = _histories_with_edge_cases(config)
    grads = []
    for pool in ("fused", "gathered"):
        model = TwoTowerModel(config)
        table = model.item_id_embedding.weight
        if pool == "fused":
            pooled = _mean_pool_ids(history, table)
        else:
            pooled = _mean_pool(table[history], history != 0)
        weights = torch.arange(pooled.numel(), dtype=torch.float32).reshape(pooled.shape) / pooled.numel()
        (pooled * weights).sum().backward()
        grads.append(table.grad)
    assert_close(grads[0], grads[1], tol=1e-6)
    assert torch.equal(grads[0][0], torch.zeros(config.embedding_dim)), "padding row untouched"


def test_attention_pooling_is_unchanged_by_the_id_path() -> None:
    config = TINY.model_copy(update={"pooling": "attention", "user_buckets": 64})
    model = TwoTowerModel(config).eval()
    batch = _batch(config, size=7)
    batch["history"] = _histories_with_edge_cases(config)
    with torch.no_grad():
        assert torch.equal(model.user_embeddings(batch), _gathered_user_vectors(model, batch))


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_state_dict_keys_are_those_published_models_carry(pooling: str) -> None:
    """Pooling by ids adds no parameter: versions published before it load as they are."""
    model = TwoTowerModel(TINY.model_copy(update={"pooling": pooling, "user_buckets": 64}))
    common = ["item_id_embedding.weight", "item_tower.category_embedding.weight",
              "item_tower.popularity_embedding.weight", "item_tower.mlp.0.weight", "item_tower.mlp.0.bias",
              "item_tower.mlp.3.weight", "item_tower.mlp.3.bias"]
    user = ["user_tower.region_embedding.weight", "user_tower.device_embedding.weight",
            "user_tower.hour_embedding.weight", "user_tower.user_id_embedding.weight"]
    attention = ["user_tower.query_from_context.weight", "user_tower.query_from_context.bias",
                 "user_tower.key.weight"]
    mlp = ["user_tower.mlp.0.weight", "user_tower.mlp.0.bias", "user_tower.mlp.3.weight",
           "user_tower.mlp.3.bias"]
    expected = (common + ["user_tower.query"] + user + attention + mlp if pooling == "attention"
                else common + user + mlp)
    assert list(model.state_dict()) == expected
    again = TwoTowerModel(model.config)
    again.load_state_dict(model.state_dict())  # strict


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_bf16_autocast_keeps_float32_unit_outputs_and_a_finite_loss(pooling: str) -> None:
    model = TwoTowerModel(TINY.model_copy(update={"pooling": pooling}))
    batch = _batch(model.config)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        users, loss = model.user_embeddings(batch), model(batch)
    assert users.dtype == torch.float32 and loss.dtype == torch.float32
    assert_close(users.norm(dim=-1), torch.ones(6))
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_runs_on_cuda(pooling: str) -> None:
    model = TwoTowerModel(TINY.model_copy(update={"pooling": pooling})).to("cuda")
    batch = {name: value.to("cuda") for name, value in _batch(model.config).items()}
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and loss.device.type == "cuda"


# --------------------------------------------------------------------------- loss


def _vectors(size: int = 5, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    users, items = torch.randn(size, dim, generator=g), torch.randn(size, dim, generator=g)
    return unit(users, dim=-1), unit(items, dim=-1)


def test_loss_is_the_weighted_cross_entropy_of_the_diagonal() -> None:
    users, items = _vectors()
    ids = torch.arange(1, 6)
    loss = in_batch_softmax_loss(users, items, ids, temperature=0.1)
    expected = torch.nn.functional.cross_entropy(users @ items.T / 0.1, torch.arange(5))
    assert_close(loss, expected)
    assert torch.isfinite(loss)
    weight = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0])
    weighted = in_batch_softmax_loss(users, items, ids, temperature=0.1, weight=weight)
    per_example = torch.nn.functional.cross_entropy(users @ items.T / 0.1, torch.arange(5), reduction="none")
    assert_close(weighted, (weight * per_example).sum() / weight.sum())
    assert not torch.isclose(weighted, loss)
    # Only relative weights matter: the loss scale does not depend on the batch's event mix.
    tripled = in_batch_softmax_loss(users, items, ids, temperature=0.1, weight=weight * 3)
    assert_close(tripled, weighted)


def test_log_q_subtracts_each_candidates_log_probability_from_its_column() -> None:
    users, items = _vectors()
    ids = torch.arange(1, 6)
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    plain = in_batch_logits(users, items, ids, temperature=0.1)
    corrected = in_batch_logits(users, items, ids, temperature=0.1, log_q=log_q)
    assert_close(corrected, plain - log_q.unsqueeze(0))
    # A popular item (high q) is penalised less as a negative, so its own row's loss rises and rare ones fall.
    assert corrected[1, 0] - plain[1, 0] < corrected[1, 4] - plain[1, 4]


def test_in_batch_duplicates_of_the_positive_are_not_negatives() -> None:
    users, items = _vectors(size=4)
    ids = torch.tensor([7, 3, 7, 9])  # rows 0 and 2 have the same positive item
    logits = in_batch_logits(users, items, ids, temperature=0.1)
    assert logits[0, 2] == float("-inf") and logits[2, 0] == float("-inf")
    assert torch.isfinite(logits.diagonal()).all()
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[3]).all()
    loss = in_batch_softmax_loss(users, items, ids, temperature=0.1)
    assert torch.isfinite(loss)
    # Row 0's loss is exactly the softmax over its positive and the two true negatives (columns 1, 3).
    row0 = users[0] @ items[[0, 1, 3]].T / 0.1
    expected_row0 = torch.nn.functional.cross_entropy(row0.unsqueeze(0), torch.tensor([0]))
    per_example = torch.nn.functional.cross_entropy(logits, torch.arange(4), reduction="none")
    assert_close(per_example[0], expected_row0)


def test_model_forward_uses_weight_and_log_q_from_the_batch() -> None:
    model = TwoTowerModel(TINY).eval()
    batch = _batch(TINY)
    with torch.no_grad():
        plain = model(batch)
        weighted = model({**batch, "weight": torch.tensor([1.0, 8.0, 1.0, 1.0, 2.0, 4.0])})
        corrected = model({**batch, "log_q": torch.log(torch.linspace(0.05, 0.3, 6))})
    assert len({plain.item(), weighted.item(), corrected.item()}) == 3


# --------------------------------------------------------------------------- learning on planted data

N_ITEMS, N_CLUSTERS, N_USERS, SEQUENCE = 200, 5, 300, 12
PLANTED = TwoTowerConfig(
    id_buckets=4096, category_buckets=64, embedding_dim=32, feature_dim=8, item_hidden=(64,),
    user_hidden=(64,), output_dim=32, history_length=20, temperature=0.1, dropout=0.0,
)


def _planted() -> dict[str, Any]:
    """200 items in 5 clusters with Zipf(0.5) popularity inside each; each user clicks their own cluster
    90% of the time. Categories cut across clusters, so the model has to learn clusters from co-clicks;
    the flat-ish Zipf keeps a most-popular list from doing well by popularity alone."""
    rng = np.random.default_rng(7)
    per_cluster = N_ITEMS // N_CLUSTERS
    zipf = 1 / np.arange(1, per_cluster + 1) ** 0.5
    order = [rng.permutation(np.arange(c * per_cluster, (c + 1) * per_cluster)) for c in range(N_CLUSTERS)]
    sequences = np.empty((N_USERS, SEQUENCE), dtype=np.int64)
    for user in range(N_USERS):
        in_cluster = order[user % N_CLUSTERS][rng.choice(per_cluster, size=SEQUENCE, p=zipf / zipf.sum())]
        anywhere = rng.integers(N_ITEMS, size=SEQUENCE)
        sequences[user] = np.where(rng.random(SEQUENCE) < 0.9, in_cluster, anywhere)
    names = np.array([f"item-{i:03d}" for i in range(N_ITEMS)], dtype=object)
    categories = np.array([f"cat-{i % 7}" for i in range(N_ITEMS)], dtype=object)
    # Train on next-click examples from all but each user's last click; the last click is held out.
    users, steps = np.divmod(np.arange(N_USERS * (SEQUENCE - 2)), SEQUENCE - 2)
    steps += 1
    targets = sequences[users, steps]
    counts = np.bincount(targets, minlength=N_ITEMS)
    rank = np.empty(N_ITEMS, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(1, N_ITEMS + 1)
    size = len(targets)
    table = examples_table({
        "user_id": [f"user-{u}" for u in users],
        "history": [list(names[sequences[u, :s]]) for u, s in zip(users, steps, strict=True)],
        "item_id": names[targets], "category": categories[targets],
        "event_type": rng.choice(list(EVENT_WEIGHTS), size=size, p=[0.6, 0.25, 0.1, 0.05]),
        "device": rng.choice(["mobile", "desktop"], size=size), "hour": rng.integers(24, size=size).tolist(),
        "region": ["us-east-1"] * size, "item_pop_rank": rank[targets].tolist(),
    })
    return {"table": table, "names": names, "categories": categories, "rank": rank, "counts": counts,
            "held_out_history": [list(names[s[:-1]]) for s in sequences], "held_out": sequences[:, -1]}


@pytest.fixture(scope="module")
def planted() -> dict[str, Any]:
    return _planted()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_training_on_planted_preferences_beats_most_popular(planted: dict[str, Any], pooling: str) -> None:
    config = PLANTED.model_copy(update={"pooling": pooling})
    table = planted["table"]
    hashed_items = encode_items(table["item_id"], table["category"], None, config=config)["item_id"]
    assert len(np.unique(hashed_items)) >= 0.95 * N_ITEMS  # few hash collisions
    data = as_tensors(encode_examples(table, config, item_counts(hashed_items, config.id_buckets)))
    assert set(data) >= {"history", "item_id", "weight", "log_q"}
    model = TwoTowerModel(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    rows = len(data["item_id"])
    probe = [torch.randint(0, rows, (256,), generator=g) for _ in range(4)]

    def probe_loss() -> float:
        with torch.no_grad():
            return float(np.mean([model({k: v[i] for k, v in data.items()}).item() for i in probe]))

    before = probe_loss()
    for _ in range(200):
        index = torch.randint(0, rows, (128,), generator=g)
        loss = model({name: value[index] for name, value in data.items()})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = probe_loss()
    assert after < 0.75 * before, (before, after)

    model.eval()
    with torch.no_grad():
        items = model.item_embeddings(as_tensors(
            encode_items(planted["names"], planted["categories"], planted["rank"], config=config)))
        users = model.user_embeddings(as_tensors(
            encode_users(planted["held_out_history"], "us-east-1", "mobile", 12, config=config)))
    held_out = torch.as_tensor(planted["held_out"])
    model_recall = recall_at_k(users, items, held_out, k=10)
    most_popular = np.argsort(-planted["counts"], kind="stable")[:10]
    popular_recall = float(np.isin(planted["held_out"], most_popular).mean())
    # About 0.33 against 0.16 (the planted ceiling is about 0.40: 90% in-cluster x top-10 of 40 by Zipf).
    assert model_recall > max(1.5 * popular_recall, popular_recall + 0.1), (model_recall, popular_recall)


def test_recall_at_k_counts_targets_in_the_top_k() -> None:
    items = torch.eye(4)
    users = torch.tensor([[1.0, 0.5, 0, 0], [0, 0, 0, 1.0]])
    assert recall_at_k(users, items, torch.tensor([1, 3]), k=1) == 0.5
    assert recall_at_k(users, items, torch.tensor([1, 3]), k=2) == 1.0
