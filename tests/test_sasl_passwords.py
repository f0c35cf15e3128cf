"""Password hashes of the built-in SASL file: our SHA-crypt against OpenSSL's,
bcrypt/argon2 round trips, and Dovecot's doveadm in both directions."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from postwell.sasl.passwords import (HashError, check_hash, hash_password, sha_crypt,
                                     split_scheme, verify_password)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed")
@pytest.mark.parametrize("flag,prefix", [("-6", "$6$"), ("-5", "$5$")])
@pytest.mark.parametrize("password", ["secret", "x" * 80, "pässwörd"])
def test_sha_crypt_matches_openssl(flag, prefix, password):
    for salt in ("saltsalt", "abcdefghijklmnop"):
        out = subprocess.run(["openssl", "passwd", flag, "-salt", salt, "-stdin"],
                             input=password.encode() + b"\n", capture_output=True, timeout=20,
                             check=True).stdout.decode().strip()
        assert sha_crypt(password.encode(), f"{prefix}{salt}") == out


def test_sha_crypt_rounds_known_vector():
    # From the SHA-crypt specification's test vectors.
    assert sha_crypt(b"Hello world!", "$6$rounds=10000$saltstringsaltstring") == (
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8v"
        "OuZeHBy/YTBmSK6H9qs/y3RnOaw5v.")
    assert sha_crypt(b"Hello world!", "$5$saltstring") == (
        "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5")


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "PLAIN", "BLF-CRYPT",
                                    "ARGON2ID", "ARGON2I"])
def test_round_trip(scheme):
    if scheme == "BLF-CRYPT":
        pytest.importorskip("bcrypt")
    if scheme.startswith("ARGON2"):
        pytest.importorskip("argon2")
    stored = hash_password("correct horse", scheme)
    assert stored.startswith("{" + scheme + "}")
    assert check_hash(stored) is None
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horsf")


def test_schemes_and_errors():
    assert split_scheme("{bcrypt}$2y$05$abc") == ("BLF-CRYPT", "$2y$05$abc")
    assert split_scheme("$6$abc$def")[0] == "SHA512-CRYPT"
    assert check_hash("{MD5-CRYPT}$1$x") == "unknown password scheme MD5-CRYPT"
    with pytest.raises(HashError):
        verify_password("{MD5-CRYPT}$1$x", "a")
    with pytest.raises(HashError):
        hash_password("a", "ROT13")


DOVEADM = shutil.which("doveadm")


@pytest.mark.skipif(DOVEADM is None, reason="Dovecot (dovecot-core) not installed")
@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID"])
def test_dovecot_interop(scheme, tmp_path):
    if scheme == "BLF-CRYPT":
        pytest.importorskip("bcrypt")
    if scheme == "ARGON2ID":
        pytest.importorskip("argon2")
    conf = tmp_path / "dovecot.conf"
    conf.write_text(f"base_dir = {tmp_path}\n")
    ours = hash_password("s3cret", scheme)
    r = subprocess.run([DOVEADM, "-c", str(conf), "pw", "-t", ours, "-p", "s3cret"],
                       capture_output=True, timeout=60)
    assert b"(verified)" in r.stdout, r.stderr
    theirs = subprocess.run([DOVEADM, "-c", str(conf), "pw", "-s", scheme, "-p", "s3cret"],
                            capture_output=True, timeout=60, check=True).stdout.decode().strip()
    assert verify_password(theirs, "s3cret") and not verify_password(theirs, "s3creT")
