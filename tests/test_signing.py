"""Signed bundles: Ed25519 over the manifest (which pins every file); a runtime that trusts keys refuses unsigned and
wrongly signed bundles, one without trusted keys behaves as before."""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ovseg.errors import SegmenterError
from ovseg.runtime.bundle import signing
from ovseg.runtime.bundle.manifest import (
    MANIFEST,
    BundleError,
    atomic_bundle_dir,
    link_tree,
    read_manifest,
    write_manifest,
)
from ovseg.runtime.bundle.signing import SIGNATURE, new_key, sign_bundle

FRAME = np.zeros((48, 64, 3), np.uint8)


@pytest.fixture
def keys(tmp_path):
    (tmp_path / "keys").mkdir()
    return {name: new_key(tmp_path / "keys" / name) for name in ("a", "b")}


@pytest.fixture
def bundle(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "home"))
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_a_new_key_pair_is_private_and_never_overwritten(keys):
    private, public = keys["a"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(BundleError, match="never overwritten"):
        new_key(private)


def test_a_signed_bundle_loads_with_its_key_and_is_refused_with_another(bundle, keys):
    sign_bundle(bundle, keys["a"][0])
    assert (bundle / SIGNATURE).is_file()
    read_manifest(bundle, trusted=[keys["a"][1]])
    read_manifest(bundle, trusted=[keys["b"][1], keys["a"][1]])  # one trusted key is enough
    with pytest.raises(BundleError, match=r"not signed by a trusted key \(b\.pub\)"):
        read_manifest(bundle, trusted=[keys["b"][1]])


def test_an_unsigned_bundle_is_refused_only_where_keys_are_trusted(bundle, keys):
    read_manifest(bundle)  # no trusted keys: as before
    with pytest.raises(BundleError, match="is not signed and this machine trusts only signed bundles"):
        read_manifest(bundle, trusted=[keys["a"][1]])


def test_a_manifest_changed_after_signing_is_refused(bundle, keys):
    sign_bundle(bundle, keys["a"][0])
    doc = json.loads((bundle / MANIFEST).read_text())
    doc["clip"]["files"]["fp32"] = "clip_visual.fp16.onnx"  # every sha256 still matches
    (bundle / MANIFEST).write_text(json.dumps(doc))
    read_manifest(bundle)
    with pytest.raises(BundleError, match="or its manifest changed after signing"):
        read_manifest(bundle, trusted=[keys["a"][1]])


def test_a_file_changed_after_signing_is_refused_by_its_pinned_sha256(bundle, keys):
    sign_bundle(bundle, keys["a"][0])
    vocab = bundle / "vocabulary.txt"
    vocab.write_text(vocab.read_text().replace("person", "robot"))
    with pytest.raises(BundleError, match="does not match its sha256"):
        read_manifest(bundle, trusted=[keys["a"][1]])


def test_trusted_keys_from_the_environment_or_the_config_folder_guard_the_segmenter(
    bundle, keys, monkeypatch, tmp_path
):
    from ovseg.runtime.segmenter import Segmenter

    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(keys["a"][1]))
    with pytest.raises(SegmenterError, match="is not signed"):
        Segmenter.from_bundle(bundle)
    sign_bundle(bundle, keys["a"][0])
    with Segmenter.from_bundle(bundle) as seg:
        seg(FRAME)

    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV)
    folder = tmp_path / "home" / "trusted-keys"
    folder.mkdir(parents=True)
    shutil.copy(keys["b"][1], folder / "fleet.pub")
    with pytest.raises(SegmenterError, match=r"not signed by a trusted key \(fleet\.pub\)"):
        Segmenter.from_bundle(bundle)


def test_keys_as_openssl_writes_them_and_as_raw_base64(bundle, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    private, public = tmp_path / "ossl.pem", tmp_path / "ossl.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    sign_bundle(bundle, private)
    read_manifest(bundle, trusted=[public])

    from cryptography.hazmat.primitives import serialization

    raw = signing.load_key(public).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "raw.pub").write_text(base64.b64encode(raw).decode() + "\n")
    read_manifest(bundle, trusted=[tmp_path / "raw.pub"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is not an Ed25519 public key"),
        (b"not base64 at all!", "is not an Ed25519 public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "is not an Ed25519 public key"),
    ],
)
def test_a_bad_public_key_is_one_line(bundle, keys, tmp_path, content, message):
    sign_bundle(bundle, keys["a"][0])
    (tmp_path / "bad.pub").write_bytes(content)
    with pytest.raises(BundleError, match=message) as e:
        read_manifest(bundle, trusted=[tmp_path / "bad.pub"])
    assert "\n" not in str(e.value)


def test_a_corrupt_signature_file_is_refused(bundle, keys):
    sign_bundle(bundle, keys["a"][0])
    (bundle / SIGNATURE).write_bytes(b"\x00\xff garbage")
    with pytest.raises(BundleError, match="cannot be read as a signature"):
        read_manifest(bundle, trusted=[keys["a"][1]])


def test_rewriting_a_bundle_drops_its_signature_unless_a_key_signs_the_new_manifest(bundle, keys):
    """ovseg-calib and ovseg-build write a new manifest: the old signature would not match it."""
    assert signing.unsigned_after_rewrite(bundle, None) is None  # nothing to lose
    sign_bundle(bundle, keys["a"][0])
    manifest = read_manifest(bundle, trusted=[keys["a"][1]])
    note = signing.unsigned_after_rewrite(bundle, None)
    assert note is not None and "was signed and its new manifest is not" in note and "--sign KEY" in note
    assert signing.unsigned_after_rewrite(bundle, keys["a"][0]) is None
    with atomic_bundle_dir(bundle, force=True) as tmp:
        link_tree(bundle, tmp)
        write_manifest(tmp, manifest)
    assert not (bundle / SIGNATURE).exists()
    with pytest.raises(BundleError, match="is not signed"):
        read_manifest(bundle, trusted=[keys["a"][1]])
    manifest.profile = "rewritten"
    with atomic_bundle_dir(bundle, force=True) as tmp:
        link_tree(bundle, tmp)
        write_manifest(tmp, manifest, signing.load_private_key(keys["b"][0]))
    assert read_manifest(bundle, trusted=[keys["b"][1]]).profile == "rewritten"
    with pytest.raises(BundleError, match="not signed by a trusted key"):
        read_manifest(bundle, trusted=[keys["a"][1]])


def test_without_cryptography_trusted_keys_are_one_line_naming_the_extra(bundle, keys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric", None)
    with pytest.raises(BundleError, match=r"pip install 'ovseg\[sign\]'"):
        read_manifest(bundle, trusted=[keys["a"][1]])
    read_manifest(bundle)  # nothing trusted: cryptography is never imported


def test_ovseg_sign_signs_and_verifies(bundle, keys, capsys):
    assert signing.main(["--bundle", str(bundle), "--key", str(keys["a"][0])]) == 0
    assert signing.main(["--bundle", str(bundle), "--verify", "--trusted-key", str(keys["a"][1])]) == 0
    assert "signed by" in capsys.readouterr().err
    assert signing.main(["--bundle", str(bundle), "--verify", "--trusted-key", str(keys["b"][1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ovseg-sign: error: bundle" in err and "not signed by a trusted key" in err


def test_ovseg_sign_refuses_to_sign_a_bundle_that_does_not_verify(bundle, keys, capsys):
    (bundle / "vocabulary.txt").write_text("tampered\n")
    assert signing.main(["--bundle", str(bundle), "--key", str(keys["a"][0])]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    assert not (bundle / SIGNATURE).exists()


def test_ovseg_export_sign_writes_a_signed_bundle(tmp_path, keys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import _export

    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    out = _export(tmp_path / "signed", image_size=112, vocab="voc21", sign=keys["a"][0])
    read_manifest(out, trusted=[keys["a"][1]])
    with pytest.raises(BundleError, match="not signed by a trusted key"):
        read_manifest(out, trusted=[keys["b"][1]])


def test_ovseg_export_with_a_bad_key_fails_before_any_weights_load(tmp_path, capsys):
    from ovseg.export import cli

    (tmp_path / "bad.pem").write_text("not a key")
    argv = ["--out", str(tmp_path / "b"), "--sign", str(tmp_path / "bad.pem"), "--random-weights"]
    assert cli.main(argv) == 2
    assert "is not an unencrypted Ed25519 private key" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_ovseg_run_trusted_key_refuses_an_unsigned_bundle_in_one_line(bundle, keys, tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "frame.png"), FRAME)
    argv = [
        "-m",
        "ovseg.runtime.tools.run",
        "--bundle",
        str(bundle),
        "--image",
        str(tmp_path / "frame.png"),
        "--no-show",
    ]
    argv += ["--trusted-key", str(keys["a"][1])]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "error:" in line] == [
        f"ovseg-run: error: bundle {bundle} is not signed and this machine trusts only signed bundles: sign it on the "
        "workstation with `ovseg-sign --bundle DIR --key KEY` (or `ovseg-export --sign KEY`)"
    ]
    sign_bundle(bundle, keys["a"][0])
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
