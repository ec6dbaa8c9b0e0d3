"""API keys and the per-client token bucket, without a server (the
transport-free pieces in service/auth.py and service/ratelimit.py)."""

from __future__ import annotations

import pytest

from service.auth import ApiKeyAuth, bearer_token, fingerprint, read_keys_file
from service.config import ConfigError, Settings, load_settings
from service.errors import RateLimited, Unauthenticated
from service.ratelimit import RateLimiter, grpc_peer_key, http_peer_key

ENV_KEY = "env-key-0123456789abcdef"
FILE_KEY = "file-key-fedcba9876543210"
OTHER_FILE_KEY = "file-key-second-000000000"


# ----- units -------------------------------------------------------------------
def test_keys_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team A\n{FILE_KEY}\n\n   {OTHER_FILE_KEY}  \n#{ENV_KEY}\n")
    assert read_keys_file(path) == [FILE_KEY, OTHER_FILE_KEY]


def test_keys_from_env_and_file_are_merged(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text(FILE_KEY + "\n")
    monkeypatch.setenv("QWEN_API_KEYS", f" {ENV_KEY} ,, other-env-key-0000000")
    settings = load_settings(["--api-keys-file", str(path)])
    assert settings.api_keys == [ENV_KEY, "other-env-key-0000000"]
    assert ENV_KEY not in repr(settings)  # keys stay out of logs and tracebacks
    auth = ApiKeyAuth.from_settings(settings)
    for key in (ENV_KEY, "other-env-key-0000000", FILE_KEY):
        assert auth.authenticate(f"Bearer {key}") == fingerprint(key)


def test_auth_is_off_without_keys_and_fails_closed_with_an_empty_source(tmp_path):
    assert ApiKeyAuth.from_settings(Settings()) is None
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n\n")
    with pytest.raises(ConfigError, match="no key"):
        ApiKeyAuth.from_settings(Settings(api_keys_file=str(empty)))
    with pytest.raises(ConfigError, match="cannot read api_keys_file"):
        ApiKeyAuth.from_settings(Settings(api_keys_file=str(tmp_path / "missing")))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {ENV_KEY}",
        f"Bearer {ENV_KEY}x",
        f"Bearer {ENV_KEY[:-1]}",
        ENV_KEY,
        "Bearer \x00",
    ],
)
def test_wrong_or_missing_keys_are_refused(header):
    auth = ApiKeyAuth([ENV_KEY, FILE_KEY])
    with pytest.raises(Unauthenticated):
        auth.authenticate(header)


def test_bearer_scheme_is_case_insensitive_and_spaces_are_trimmed():
    auth = ApiKeyAuth([ENV_KEY])
    assert auth.authenticate(f"bearer {ENV_KEY}") == auth.authenticate(f"  Bearer   {ENV_KEY} ")
    assert fingerprint(ENV_KEY).startswith("key-") and ENV_KEY not in fingerprint(ENV_KEY)


def test_token_bucket_refills_at_the_rate_and_reports_the_wait():
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("a") == pytest.approx(0.5)
    assert limiter.try_acquire("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert limiter.try_acquire("a") == 0.0
    with pytest.raises(RateLimited) as info:
        limiter.check("a")
    assert info.value.retry_after_seconds == pytest.approx(0.5)
    now[0] += 100
    assert [limiter.try_acquire("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]  # capped at burst


def test_token_bucket_memory_is_bounded():
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=100)
    for i in range(10_000):
        limiter.try_acquire(f"client-{i}")
    assert len(limiter) == 100


@pytest.mark.parametrize(
    "peer, host",
    [
        ("ipv4:127.0.0.1:51234", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:[2001:db8::7]:443", "ipv6:[2001:db8::7]"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_grpc_peer_key_drops_the_port(peer, host):
    assert grpc_peer_key(peer) == host


@pytest.mark.parametrize(
    "address, peer", [("127.0.0.1", "ipv4:127.0.0.1:5000"), ("2001:db8::7", "ipv6:[2001:db8::7]:443")]
)
def test_an_http_client_has_the_bucket_of_the_same_grpc_client(address, peer):
    assert http_peer_key(address) == grpc_peer_key(peer)


@pytest.mark.parametrize(
    "authorization, token",
    [
        ("Bearer k1", "k1"),
        ("bearer  k1 ", "k1"),
        ("Basic k1", None),
        ("Bearer", None),
        ("Bearer   ", None),
        (None, None),
    ],
)
def test_bearer_token(authorization, token):
    assert bearer_token(authorization) == token
