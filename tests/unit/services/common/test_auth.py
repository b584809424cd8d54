from __future__ import annotations

import pytest

from services.common.auth import KEY_PREFIX, generate_key, hash_key, key_id, parse_seed


def test_parse_seed() -> None:
    assert parse_seed(" projA:key1, projB:key:with:colons ,") == [
        ("projA", "key1"),
        ("projB", "key:with:colons"),
    ]


@pytest.mark.parametrize("spec", ["projA", ":key", "projA:", "a:b,c"])
def test_parse_seed_refuses(spec: str) -> None:
    with pytest.raises(ValueError, match="MANIAC_API_KEYS"):
        parse_seed(spec)


def test_generated_keys_are_random_and_prefixed() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith(KEY_PREFIX) and len(k) > 40 for k in keys)


def test_hash_is_salted_and_index_is_not_the_key() -> None:
    key = "secret-key"
    assert hash_key(key, b"salt-1") != hash_key(key, b"salt-2")
    assert key not in key_id(key)
    assert len(key_id(key)) == 16
