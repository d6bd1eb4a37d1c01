"""Feature encoding (ray_apps.encoding): stable hashing with a reserved padding index, most-recent-N
histories, context and popularity buckets, event weights, log-Q, and whole batches in every input form
Ray Data hands over (Arrow, numpy, pandas, Python lists)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ray_apps.encoding import (
    EXAMPLE_SCHEMA,
    ITEM_KEYS,
    USER_KEYS,
    EncodingParams,
    encode_examples,
    encoded_row_bytes,
    encode_histories,
    encode_items,
    encode_users,
    event_weights,
    examples_table,
    hash_ids,
    hour_index,
    item_counts,
    log_q,
    popularity_bucket,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Config:
    """The table sizes encoding reads (ray_apps.model.TwoTowerConfig has them too; this keeps torch out)."""

    id_buckets: int = 1000
    category_buckets: int = 50
    pop_buckets: int = 24
    user_buckets: int = 500
    region_buckets: int = 64
    device_buckets: int = 16
    history_length: int = 3


SMALL = Config()

# Computed once with HASH_KEY "streamrec:ids:v1". If these change, every trained model's embedding rows
# point at different ids: bump HASH_SCHEME, do not edit the numbers.
STABLE_IDS = ["sku_1001", "u-42", "électronique", "a"]
STABLE_2_18 = [171438, 251446, 121562, 148364]
STABLE_1000 = [258, 319, 224, 890]


# --------------------------------------------------------------------------- hashing


def test_hash_values_are_the_recorded_ones() -> None:
    assert hash_ids(STABLE_IDS, 2**18).tolist() == STABLE_2_18
    assert hash_ids(STABLE_IDS, 1000).tolist() == STABLE_1000


def test_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "import json; from ray_apps.encoding import hash_ids; " \
           f"print(json.dumps(hash_ids({STABLE_IDS!r}, 2**18).tolist()))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    assert json.loads(done.stdout) == STABLE_2_18


@pytest.mark.parametrize("buckets", [2, 3, 17, 2**18])
def test_real_ids_never_hash_to_padding_and_stay_in_range(buckets: int) -> None:
    ids = [f"item-{i}" for i in range(20_000)]
    out = hash_ids(ids, buckets)
    assert out.dtype == np.int64
    assert out.min() >= 1 and out.max() <= buckets - 1


def test_null_and_empty_ids_are_padding() -> None:
    assert hash_ids(["x", None, "", "x"], 100).tolist()[1:3] == [0, 0]
    assert hash_ids(pd.Series(["x", np.nan]), 100)[1] == 0


def test_hash_is_independent_of_input_form_and_batch_composition() -> None:
    expected = hash_ids(STABLE_IDS, 1000)
    chunked = pa.chunked_array([pa.array(STABLE_IDS[:1]), pa.array(STABLE_IDS[1:])])
    assert hash_ids(chunked, 1000).tolist() == expected.tolist()
    assert hash_ids(np.array(STABLE_IDS, dtype=object), 1000).tolist() == expected.tolist()
    assert hash_ids(pa.array(STABLE_IDS, type=pa.large_string()), 1000).tolist() == expected.tolist()
    # Dictionary encoding is per batch: the same id must not depend on what else is in the batch.
    assert hash_ids(["zzz", "a", "a", "sku_1001"], 1000).tolist()[1:] == [890, 890, 258]
    assert hash_ids("a", 1000).tolist() == [890]
    dictionary = pa.array(["a", "zzz", None]).dictionary_encode()  # e.g. Parquet read_dictionary columns
    assert hash_ids(dictionary, 1000).tolist() == [890, *hash_ids("zzz", 1000), 0]
    assert hash_ids(pa.array([42]), 1000).tolist() == hash_ids(["42"], 1000).tolist()
    assert hash_ids([], 1000).shape == (0,)


def test_buckets_below_two_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        hash_ids(["a"], 1)


# --------------------------------------------------------------------------- histories


def test_history_keeps_the_most_recent_n_in_order_and_pads_after() -> None:
    histories = [["a", "b", "c", "d", "e"], ["x"], [], None, ["p", "q", "r"]]
    ids, lengths = encode_histories(histories, 3, 1000)
    h = {s: int(hash_ids(s, 1000)[0]) for s in "abcdexpqr"}
    assert ids.dtype == np.int64 and ids.shape == (5, 3)
    assert ids.tolist() == [
        [h["c"], h["d"], h["e"]],
        [h["x"], 0, 0],
        [0, 0, 0],
        [0, 0, 0],
        [h["p"], h["q"], h["r"]],
    ]
    assert lengths.tolist() == [3, 1, 0, 0, 3]


def test_history_from_every_input_form_agrees() -> None:
    histories = [["a", "b", "c", "d"], [], None, ["e", None, "f"]]
    expected, expected_len = encode_histories(histories, 3, 1000)
    arrow = pa.array([["zz"]] + histories, type=pa.list_(pa.string())).slice(1)  # offsets not from zero
    as_numpy = np.array([None if h is None else np.array(h, dtype=object) for h in histories], dtype=object)
    for form in (arrow, pa.chunked_array([arrow.slice(0, 2), arrow.slice(2)]), as_numpy,
                 pd.Series(histories, dtype=object), pa.array(histories, type=pa.large_list(pa.string()))):
        ids, lengths = encode_histories(form, 3, 1000)
        assert ids.tolist() == expected.tolist()
        assert lengths.tolist() == expected_len.tolist()
    # A null inside a list keeps its place and becomes padding (masked by the model).
    assert expected[3].tolist() == [int(hash_ids("e", 1000)[0]), 0, int(hash_ids("f", 1000)[0])]


def test_history_of_an_empty_batch() -> None:
    ids, lengths = encode_histories(pa.array([], type=pa.list_(pa.string())), 5, 100)
    assert ids.shape == (0, 5) and lengths.shape == (0,)


# --------------------------------------------------------------------------- context, popularity, weights


def test_hour_index_reserves_zero_for_unknown() -> None:
    assert hour_index([0, 23, None, 24, -1]).tolist() == [1, 24, 0, 0, 0]
    assert hour_index(pa.array([5, None], type=pa.int32())).tolist() == [6, 0]
    assert hour_index(pd.array([7, None], dtype="Int32")).tolist() == [8, 0]
    assert hour_index(13, size=3).tolist() == [14, 14, 14]


@pytest.mark.parametrize(("rank", "bucket"), [
    (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (1023, 10), (1024, 11), (10**9, 15),
    (None, 0), (0, 0), (-5, 0),
])
def test_popularity_bucket_is_log2_of_rank(rank: int | None, bucket: int) -> None:
    assert popularity_bucket(pa.array([rank], type=pa.int64()), pop_buckets=16).tolist() == [bucket]


def test_event_weights_come_from_the_column_or_the_event_type() -> None:
    types = ["view", "click", "add_to_cart", "purchase", "unknown", None]
    assert event_weights(types).tolist() == [1, 2, 4, 8, 1, 1]
    given = pa.array([3.0, None, None, None, 0.5, None])
    assert event_weights(types, given).tolist() == [3, 2, 4, 8, 0.5, 1]
    assert event_weights(types).dtype == np.float32


# --------------------------------------------------------------------------- log-Q


def test_log_q_is_the_log_share_of_each_item() -> None:
    ids = np.array([1, 1, 1, 2, 5, 5])
    counts = item_counts(ids, 8)
    assert counts.tolist() == [0, 3, 1, 0, 0, 2, 0, 0]
    got = log_q(np.array([1, 2, 5, 7]), counts)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.log([3 / 6, 1 / 6, 2 / 6, 1 / 6]), rtol=1e-6)  # unseen counts as 1
    # Shards count separately and add up to the same table.
    assert (item_counts(ids[:2], 8) + item_counts(ids[2:], 8)).tolist() == counts.tolist()
    with pytest.raises(ValueError, match="all zero"):
        log_q(ids, np.zeros(8))


# --------------------------------------------------------------------------- whole batches


def _examples() -> dict[str, list[Any]]:
    ts = datetime(2026, 11, 26, 8, tzinfo=UTC)
    return {
        "user_id": ["u1", "u2", "u3"],
        "history": [["a", "b", "c", "d"], [], ["a"]],
        "item_id": ["b", "a", "z"],
        "category": ["shoes", "hats", None],
        "event_type": ["view", "purchase", "click"],
        "weight": [1.0, 8.0, None],
        "ts": [ts, ts, ts],
        "device": ["mobile", "desktop", None],
        "hour": [8, 23, None],
        "region": ["us-east-1", "us-east-1", "us-east-1"],
        "item_pop_rank": [1, 5, None],
    }


def test_encode_examples_lays_out_the_model_batch() -> None:
    table = examples_table(_examples())
    assert table.schema == EXAMPLE_SCHEMA
    out = encode_examples(table, SMALL)
    assert set(out) == {*USER_KEYS, *ITEM_KEYS, "user_id", "weight"}
    for name, value in out.items():
        assert len(value) == 3, name
        assert value.dtype == (np.float32 if name == "weight" else np.int64), name
    assert out["history"].shape == (3, SMALL.history_length)
    assert out["history_len"].tolist() == [3, 0, 1]
    assert out["history"][0].tolist() == hash_ids(["b", "c", "d"], SMALL.id_buckets).tolist()
    assert out["item_id"].tolist() == hash_ids(["b", "a", "z"], SMALL.id_buckets).tolist()
    assert out["user_id"].tolist() == hash_ids(["u1", "u2", "u3"], SMALL.user_buckets).tolist()
    assert out["category"][2] == 0 and out["device"][2] == 0
    assert out["hour"].tolist() == [9, 24, 0]
    assert out["pop_bucket"].tolist() == [1, 3, 0]
    assert out["weight"].tolist() == [1, 8, 2]  # the null weight falls back to "click"


def test_encode_examples_accepts_every_ray_data_batch_format() -> None:
    table = examples_table(_examples())
    expected = encode_examples(table, SMALL)
    as_numpy = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    for batch in (table.to_batches()[0], as_numpy, table.to_pandas()):
        got = encode_examples(batch, SMALL)
        assert set(got) == set(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_encode_examples_adds_log_q_and_skips_user_ids_when_off() -> None:
    config = dataclasses.replace(SMALL, user_buckets=0)
    table = examples_table(_examples()).drop_columns(["user_id", "weight"])
    counts = item_counts(hash_ids(["a", "a", "b", "z"], config.id_buckets), config.id_buckets)
    out = encode_examples(table, config, counts)
    assert "user_id" not in out
    np.testing.assert_allclose(out["log_q"], np.log([1 / 4, 2 / 4, 1 / 4]), rtol=1e-6)
    assert out["weight"].tolist() == [1, 8, 2]


def test_encoding_params_encode_exactly_like_the_config_they_copy() -> None:
    """Ray Data's encode tasks get EncodingParams (no torch import), the serving path a model config."""
    from ray_apps.model import TwoTowerConfig

    config = TwoTowerConfig(user_buckets=64, history_length=4)
    params = EncodingParams.of(config)
    table = examples_table(_examples())
    counts = item_counts(hash_ids(["a", "b", "z"], config.id_buckets), config.id_buckets)
    expected, got = encode_examples(table, config, counts), encode_examples(table, params, counts)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize(("history_length", "user_buckets", "log_q", "size"), [
    (50, 0, True, 50 * 8 + 7 * 8 + 4 + 4),  # the default: history, 7 int64 indices, weight, log-Q
    (50, 0, False, 50 * 8 + 7 * 8 + 4),
    (4, 64, True, 4 * 8 + 8 * 8 + 4 + 4),  # + user_id
])
def test_encoded_row_bytes_is_what_an_encoded_batch_holds(history_length: int, user_buckets: int, log_q: bool,
                                                          size: int) -> None:
    config = dataclasses.replace(SMALL, history_length=history_length, user_buckets=user_buckets)
    assert encoded_row_bytes(config, log_q=log_q) == size
    counts = np.ones(config.id_buckets, np.int64) if log_q else None
    table = examples_table(_examples())
    if not user_buckets:
        table = table.drop_columns(["user_id"])
    out = encode_examples(table, config, counts)
    assert sum(a.nbytes for a in out.values()) == size * table.num_rows


def test_encode_examples_names_a_missing_column() -> None:
    table = examples_table(_examples()).drop_columns(["region"])
    with pytest.raises(KeyError, match="'region'"):
        encode_examples(table, SMALL)


def test_encode_users_for_serving_broadcasts_context() -> None:
    out = encode_users([["a", "b"], []], "eu-west-1", "mobile", 14, config=SMALL)
    assert out["history_len"].tolist() == [2, 0]
    assert out["region"].tolist() == hash_ids(["eu-west-1"] * 2, SMALL.region_buckets).tolist()
    assert out["hour"].tolist() == [15, 15]
    assert out["user_id"].tolist() == [0, 0]  # no user id given: the unknown user
    with pytest.raises(ValueError, match="2 values for 3 rows"):
        encode_users([[], [], []], ["a", "b"], "mobile", 1, config=SMALL)


def test_encode_items_for_the_item_table() -> None:
    out = encode_items(["a", "b"], ["hats", "hats"], [1, None], config=SMALL)
    assert list(out) == list(ITEM_KEYS)
    assert out["item_id"].tolist() == hash_ids(["a", "b"], SMALL.id_buckets).tolist()
    assert out["category"][0] == out["category"][1] != 0
    assert out["pop_bucket"].tolist() == [1, 0]
