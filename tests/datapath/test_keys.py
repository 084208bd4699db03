"""Authority key pairs in openssl's formats, the per-video data key, its envelope and the fixed noise stream."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from tasks.datapath import keys
from tasks.datapath.keys import (DataKey, EnvelopeError, Key, KeyFileError, NotARecipientError, derive_seed,
                                 envelope_from_bytes, envelope_to_bytes, fixed_noise,
                                 load_private_key, load_public_key, public_keys_for_anonymize, unwrap_data_key,
                                 wrap_data_key, write_key_pair)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def pair(tmp_path, name="a", kem="x25519"):
    public = write_key_pair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub", kem)
    return public, load_private_key(tmp_path / f"{name}.key")


def test_a_new_pair_is_openssl_pem_private_0600_in_a_0700_folder(tmp_path):
    public = write_key_pair(tmp_path / "k" / "authority.key", tmp_path / "k" / "authority.pub")
    private_pem = (tmp_path / "k" / "authority.key").read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, as openssl genpkey writes it
    assert (tmp_path / "k" / "authority.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert mode_of(tmp_path / "k" / "authority.key") == 0o600
    assert mode_of(tmp_path / "k") == 0o700
    loaded = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(loaded, x25519.X25519PrivateKey)
    raw = loaded.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public.fingerprint == hashlib.sha256(b"uunet-authority-key-v1\x00" + raw).hexdigest()[:16]
    assert load_private_key(tmp_path / "k" / "authority.key").fingerprint == public.fingerprint


def test_an_existing_private_key_is_never_overwritten(tmp_path):
    write_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    before = (tmp_path / "a.key").read_bytes()
    with pytest.raises(KeyFileError, match="exists already"):
        write_key_pair(tmp_path / "a.key", tmp_path / "b.pub")
    assert (tmp_path / "a.key").read_bytes() == before


def test_keys_written_by_openssl_itself_load(tmp_path):
    openssl = "/usr/bin/openssl"
    if not os.path.exists(openssl):
        pytest.skip("no openssl binary on this machine")
    subprocess.run([openssl, "genpkey", "-algorithm", "X25519", "-out", str(tmp_path / "o.key")], check=True)
    subprocess.run([openssl, "pkey", "-in", str(tmp_path / "o.key"), "-pubout", "-out", str(tmp_path / "o.pub")],
                   check=True)
    assert load_private_key(tmp_path / "o.key").fingerprint == load_public_key(tmp_path / "o.pub").fingerprint


def test_each_recipient_unwraps_alone_and_a_stranger_is_named(tmp_path):
    (pub_a, priv_a), (pub_b, priv_b), (_, priv_c) = pair(tmp_path, "a"), pair(tmp_path, "b"), pair(tmp_path, "c")
    data_key = DataKey.generate()
    envelope = wrap_data_key(data_key, [pub_a, pub_b], "ab" * 32)
    assert unwrap_data_key(envelope, priv_a, "ab" * 32) == data_key
    assert unwrap_data_key(envelope, priv_b, "ab" * 32) == data_key
    with pytest.raises(NotARecipientError) as error:
        unwrap_data_key(envelope, priv_c, "ab" * 32)
    assert pub_a.fingerprint in str(error.value) and pub_b.fingerprint in str(error.value)
    assert priv_c.fingerprint in str(error.value)


def test_an_envelope_moved_to_another_video_or_damaged_does_not_open(tmp_path):
    public, private = pair(tmp_path)
    envelope = wrap_data_key(DataKey.generate(), [public], "ab" * 32)
    with pytest.raises(EnvelopeError, match="moved from another video"):
        unwrap_data_key(envelope, private, "cd" * 32)
    damaged = [keys.WrappedKey(w.fingerprint, w.kem, w.blob[:-1] + bytes([w.blob[-1] ^ 1])) for w in envelope]
    with pytest.raises(EnvelopeError):
        unwrap_data_key(damaged, private, "ab" * 32)


def test_the_post_quantum_hybrid_pair_round_trips(tmp_path):
    public, private = pair(tmp_path, "pq", kem="mlkem768-x25519")
    assert public.kem == private.kem == "mlkem768-x25519"
    assert (tmp_path / "pq.key").read_bytes().count(b"BEGIN PRIVATE KEY") == 2  # ML-KEM-768 + X25519
    data_key = DataKey.generate()
    envelope = envelope_from_bytes(envelope_to_bytes(wrap_data_key(data_key, [public], "ef" * 32)))
    assert unwrap_data_key(envelope, private, "ef" * 32) == data_key


def test_a_public_key_given_as_private_and_the_reverse_are_refused(tmp_path):
    write_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    with pytest.raises(KeyFileError, match="is a public key; reconstruct needs"):
        load_private_key(tmp_path / "a.pub")
    with pytest.raises(KeyFileError, match="is a private key. The anonymizer takes public keys only"):
        load_public_key(tmp_path / "a.key")


@pytest.mark.parametrize("content, message", [
    (b"", "not a key file"),
    (b"hello world\n", "not a key file"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a readable key file"),
    (b"ab" * 32 + b"\n", "symmetric key of the old format"),
])
def test_files_that_are_no_authority_key_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "k.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message):
        load_public_key(path)


def test_an_other_kind_of_key_is_named(tmp_path):
    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ed.pub").write_bytes(pem)
    with pytest.raises(KeyFileError, match="Ed25519Public key; authority keys are X25519"):
        load_public_key(tmp_path / "ed.pub")


def test_a_missing_file_and_a_folder_are_refused(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_private_key(tmp_path)


def test_a_private_key_readable_by_others_warns(tmp_path):
    write_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    os.chmod(tmp_path / "a.key", 0o644)
    with pytest.warns(keys.KeyFilePermissionWarning):
        load_private_key(tmp_path / "a.key")


def test_the_default_pair_is_made_once_and_then_only_the_public_key_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (created,), made = public_keys_for_anonymize(None)
    assert made and (tmp_path / ".keys/authority.key").is_file()
    # From now on the private key is never opened by the anonymizer: make it unreadable and see.
    os.chmod(tmp_path / ".keys/authority.key", 0)
    (again,), made = public_keys_for_anonymize(None)
    assert not made and again.fingerprint == created.fingerprint
    (tmp_path / ".keys/authority.pub").unlink()
    with pytest.raises(KeyFileError, match="authority.pub does not"):
        public_keys_for_anonymize(None)


def test_keys_survive_pickling_for_the_actors(tmp_path):
    import pickle

    public, private = pair(tmp_path)
    assert pickle.loads(pickle.dumps(public)).fingerprint == public.fingerprint
    envelope = wrap_data_key(DataKey(b"k" * 32), [public], "ab" * 32)
    assert unwrap_data_key(envelope, pickle.loads(pickle.dumps(private)), "ab" * 32) == DataKey(b"k" * 32)


def test_repr_never_shows_a_secret(tmp_path):
    public, private = pair(tmp_path)
    data_key = DataKey(b"s" * 32)
    assert "sss" not in repr(data_key) and "PRIVATE" not in repr(private)
    assert data_key.key_id == hashlib.sha256(b"uunet-key-id-v1\x00" + b"s" * 32).hexdigest()[:16]
    with pytest.raises(ValueError):
        Key(b"short")


def test_derived_keys_are_independent_and_deterministic():
    data_key = DataKey(bytes(range(32)))
    assert data_key.payload_key() == DataKey(bytes(range(32))).payload_key()
    secrets_ = {data_key.payload_key().secret, data_key.seal_key(), data_key.derive("noise/0")}
    assert len(secrets_) == 3 and data_key.secret not in secrets_


def test_noise_golden_values():
    """Pinned: an archive sealed today must draw the same noise after any upgrade."""
    noise = fixed_noise(b"\x00" * 32, 4)
    digest = hashlib.shake_256(b"uunet-noise-v1\x00" + b"\x00" * 32).digest(64)
    expected = [(int.from_bytes(digest[i:i + 4], "big") >> 8) / 2**24 for i in range(0, 64, 4)]
    assert noise.dtype == np.float32 and noise.shape == (4, 4)
    assert noise.ravel().tolist() == expected
    assert noise[0, :3].tolist() == [0.16603976488113403, 0.8507531881332397, 0.7888866066932678]


def test_noise_is_one_identity_per_sequence_and_uniform():
    data_key = DataKey(b"n" * 32)
    a, b = data_key.noise(0), data_key.noise(1)
    assert np.array_equal(a, data_key.noise(0)) and not np.array_equal(a, b)
    assert a.shape == (64, 64) and 0.0 <= a.min() and a.max() < 1.0
    assert abs(float(a.mean()) - 0.5) < 0.02
    assert not np.array_equal(DataKey(b"m" * 32).noise(0), a)


def test_derive_seed_encoding_is_unambiguous():
    key = Key(b"x" * 32)
    assert derive_seed(key, "ab", "c") != derive_seed(key, "a", "bc")
    assert derive_seed(key, 1) != derive_seed(key, "1")
    assert 0 <= derive_seed(key, "carriers", 360, 640) < 2**64
    with pytest.raises(TypeError):
        derive_seed(key, 1.5)
