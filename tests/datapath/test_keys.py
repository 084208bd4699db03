import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from tasks.datapath.keys import (DEFAULT_KEY_PATH, KEY_ENV_VAR, Key, KeyFileError, KeyFilePermissionWarning,
                                 derive_seed, keyed_noise, load_key, load_or_create_key, resolve_key_path)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_private_hex_key(tmp_path):
    path = tmp_path / "secrets" / "nested" / "uunet.key"
    key, created = load_or_create_key(path)

    assert created
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert mode_of(path.parent.parent) == 0o700
    text = path.read_text()
    assert text.endswith("\n")
    assert len(text.strip()) == 64 and int(text, 16) >= 0
    assert bytes.fromhex(text.strip()) == key.secret
    assert key.path == path
    # No temporary file is left behind next to the key.
    assert sorted(p.name for p in path.parent.iterdir()) == ["uunet.key"]


def test_second_call_loads_the_same_key(tmp_path):
    path = tmp_path / "uunet.key"
    first, created_first = load_or_create_key(path)
    second, created_second = load_or_create_key(path)
    assert (created_first, created_second) == (True, False)
    assert second == first
    assert second.key_id == first.key_id


def test_concurrent_creators_agree_on_one_key(tmp_path):
    path = tmp_path / "keys" / "uunet.key"
    results = []
    barrier = threading.Barrier(8)

    def create():
        barrier.wait()
        results.append(load_or_create_key(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({key.secret for key, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert load_key(path).secret == results[0][0].secret


def test_fresh_keys_differ(tmp_path):
    a, _ = load_or_create_key(tmp_path / "a.key")
    b, _ = load_or_create_key(tmp_path / "b.key")
    assert a.secret != b.secret and a.key_id != b.key_id


def test_key_id_is_stable_and_repr_hides_secret():
    secret = bytes(range(32))
    key = Key(secret)
    assert key.key_id == Key(secret).key_id
    assert len(key.key_id) == 16 and int(key.key_id, 16) >= 0
    assert key.key_id != Key(bytes(range(1, 33))).key_id
    for shown in (repr(key), str(key)):
        assert secret.hex() not in shown
        assert repr(secret) not in shown
        assert key.key_id in shown
    # The fingerprint is not a plain prefix or hash of the secret.
    assert not secret.hex().startswith(key.key_id)


def test_short_secret_is_refused():
    with pytest.raises(ValueError):
        Key(b"\x00" * 31)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"abc123\n",
        b"zz" * 32 + b"\n",
        b"ab" * 33 + b"\n",
        b"ab" * 32 + b"\nab" * 32,
    ],
    ids=["empty", "short", "not-hex", "too-long", "two-keys"],
)
def test_malformed_key_file_raises_without_leaking(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as error:
        load_key(path)
    assert str(path) in str(error.value)
    if content:
        assert content.strip().decode() not in str(error.value)


def test_missing_key_file_raises(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_key(tmp_path / "absent.key")


def test_directory_is_not_a_key(tmp_path):
    with pytest.raises(KeyFileError):
        load_key(tmp_path)


def test_readable_by_others_warns(tmp_path):
    path = tmp_path / "uunet.key"
    key, _ = load_or_create_key(path)
    path.chmod(0o644)
    with pytest.warns(KeyFilePermissionWarning, match="chmod 600"):
        assert load_key(path) == key


def test_private_key_file_loads_without_warning(tmp_path, recwarn):
    path = tmp_path / "uunet.key"
    load_or_create_key(path)
    load_key(path)
    assert not [w for w in recwarn if issubclass(w.category, KeyFilePermissionWarning)]


def test_uppercase_hex_is_accepted(tmp_path):
    path = tmp_path / "upper.key"
    path.write_text("AB" * 32 + "\n")
    path.chmod(0o600)
    assert load_key(path).secret == b"\xab" * 32


def test_resolve_key_path_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV_VAR, raising=False)
    assert resolve_key_path(None) == DEFAULT_KEY_PATH
    monkeypatch.setenv(KEY_ENV_VAR, str(tmp_path / "env.key"))
    assert resolve_key_path(None) == tmp_path / "env.key"
    assert resolve_key_path(tmp_path / "flag.key") == tmp_path / "flag.key"
    assert resolve_key_path(str(tmp_path / "flag.key")) == tmp_path / "flag.key"


def test_env_var_key_loads(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV_VAR, os.fspath(tmp_path / "env.key"))
    key, created = load_or_create_key(resolve_key_path(None))
    assert created and key.path == tmp_path / "env.key"


KEY_A = Key(b"\x01" * 32)
KEY_B = Key(b"\x02" * 32)


def test_derive_seed_is_deterministic_and_64_bit():
    seed = derive_seed(KEY_A, "noise", "abc", 3)
    assert seed == derive_seed(Key(b"\x01" * 32), "noise", "abc", 3)
    assert 0 <= seed < 2**64


def test_derive_seed_encoding_is_unambiguous():
    seeds = {
        derive_seed(KEY_A, "ab", "c"),
        derive_seed(KEY_A, "a", "bc"),
        derive_seed(KEY_A, "abc"),
        derive_seed(KEY_A, 1),
        derive_seed(KEY_A, "1"),
        derive_seed(KEY_A),
        derive_seed(KEY_B, "ab", "c"),
    }
    assert len(seeds) == 7


def test_derive_seed_rejects_other_types():
    with pytest.raises(TypeError):
        derive_seed(KEY_A, 1.5)
    with pytest.raises(TypeError):
        derive_seed(KEY_A, True)


def test_keyed_noise_is_deterministic_uniform_float32():
    noise = keyed_noise(KEY_A, "video0", 4)
    assert noise.shape == (64, 64) and noise.dtype == np.float32
    assert noise.min() >= 0.0 and noise.max() < 1.0
    assert 0.45 < noise.mean() < 0.55
    np.testing.assert_array_equal(noise, keyed_noise(Key(b"\x01" * 32), "video0", 4))
    assert keyed_noise(KEY_A, "video0", 4, size=32).shape == (32, 32)


@pytest.mark.parametrize(
    "other",
    [(KEY_B, "video0", 4), (KEY_A, "video1", 4), (KEY_A, "video0", 5)],
    ids=["key", "video", "sequence"],
)
def test_keyed_noise_changes_with_each_part(other):
    base = keyed_noise(KEY_A, "video0", 4)
    changed = keyed_noise(*other)
    # Independent uniform fields: almost every value differs and they are uncorrelated.
    assert np.mean(base == changed) < 0.01
    assert abs(np.corrcoef(base.ravel(), changed.ravel())[0, 1]) < 0.1
