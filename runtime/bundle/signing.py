"""ovseg-sign: Ed25519 signatures over a bundle's manifest, which pins every file by sha256.

    ovseg-sign --new-key KEY                       # KEY (private, mode 600) and KEY.pub (public), PEM
    ovseg-sign --bundle DIR --key KEY              # writes DIR/manifest.json.sig
    ovseg-sign --bundle DIR --verify --trusted-key KEY.pub

A runtime that trusts public keys (``--trusted-key``, $OVSEG_TRUSTED_KEYS, or files in $OVSEG_HOME/trusted-keys/)
refuses a bundle that is unsigned or not signed by one of them; with none configured nothing is checked. Keys are
PEM files or one line of base64 (the raw 32 bytes). Needs the ``cryptography`` package (``pip install 'ovseg[sign]'``),
imported only when a key is used.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ovseg.constants import ovseg_home
from ovseg.errors import one_line

from .integrity import BundleError

PROG = "ovseg-sign"
SIGNATURE = "manifest.json.sig"  # base64 of the 64-byte signature over manifest.json's bytes, beside it
TRUSTED_KEYS_ENV = "OVSEG_TRUSTED_KEYS"  # public key files or folders of them, separated by os.pathsep
KEY_SUFFIXES = (".pub", ".pem")  # what counts as a key in a folder of trusted keys


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError(
            "signed bundles need the cryptography package: pip install 'ovseg[sign]' (or unset the trusted keys)"
        ) from None
    return ed25519


def load_private_key(path: Path):
    """An Ed25519 private key (load_key)."""
    return load_key(path, private=True)


def load_key(path: Path, private: bool = False):
    """An Ed25519 public key: PEM (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes) or base64 of 32 bytes; with
    ``private`` a private key: PEM (PKCS#8, as `openssl genpkey -algorithm ed25519` writes) or base64 of 32 bytes."""
    ed25519 = _ed25519()
    from cryptography.hazmat.primitives import serialization

    kind = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    what = "an unencrypted Ed25519 private key" if private else "an Ed25519 public key"
    try:
        data = path.expanduser().read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read key {path}: {e.strerror or e}") from None
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
        else:
            raw = base64.b64decode(data.strip(), validate=True)
            key = kind.from_private_bytes(raw) if private else kind.from_public_bytes(raw)
    except (ValueError, TypeError) as e:  # binascii.Error is a ValueError
        raise BundleError(f"{path} is not {what} ({one_line(e)})") from None
    if not isinstance(key, kind):
        raise BundleError(f"{path} is a {type(key).__name__}, not {what}")
    return key


def configured_key_files(given: Sequence[Path] | None = None) -> list[Path]:
    """The trusted public keys: ``given`` (--trusted-key), else $OVSEG_TRUSTED_KEYS, else $OVSEG_HOME/trusted-keys/.
    A folder stands for the .pub and .pem files in it. Empty: no key is trusted, and bundles are not checked."""
    from_env = [p for p in os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if p]
    home = ovseg_home() / "trusted-keys"
    files: list[Path] = []
    for entry in (Path(e).expanduser() for e in given or from_env or ([home] if home.is_dir() else [])):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix in KEY_SUFFIXES and p.is_file())
            if not found:
                raise BundleError(f"trusted-key folder {entry} holds no .pub or .pem key: add one, or remove it")
            files += found
        else:
            files.append(entry)
    return files


def verify_bundle(bundle_dir: Path, key_files: Sequence[Path]) -> Path:
    """The key file whose key signed ``bundle_dir``'s manifest; a BundleError when none did."""
    from cryptography.exceptions import InvalidSignature

    keys = [(path, load_key(path)) for path in key_files]
    sig_path = bundle_dir / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(
            f"bundle {bundle_dir} is not signed and this machine trusts only signed bundles: sign it on the "
            f"workstation with `{PROG} --bundle DIR --key KEY` (or `ovseg-export --sign KEY`)"
        )
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
        manifest = (bundle_dir / "manifest.json").read_bytes()
    except (OSError, ValueError) as e:  # binascii.Error is a ValueError
        raise BundleError(f"{sig_path} cannot be read as a signature ({one_line(e)})") from None
    for path, key in keys:
        try:
            key.verify(signature, manifest)
            return path
        except InvalidSignature:
            continue
    names = ", ".join(p.name for p in key_files)
    raise BundleError(
        f"bundle {bundle_dir} is not signed by a trusted key ({names}), or its manifest changed after signing: "
        f"refusing it; sign it again with a trusted key (`{PROG} --bundle DIR --key KEY`)"
    )


def sign_dir(bundle_dir: Path, key) -> Path:
    """Write the signature of ``bundle_dir``'s manifest.json beside it (temporary name, then one rename)."""
    signature = key.sign((bundle_dir / "manifest.json").read_bytes())
    out = bundle_dir / SIGNATURE
    tmp = bundle_dir / f".{SIGNATURE}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(base64.b64encode(signature) + b"\n")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def sign_bundle(bundle_dir: Path, key_path: Path) -> Path:
    """Verify ``bundle_dir`` (every file against the manifest), then sign its manifest with the key at ``key_path``."""
    from .manifest import read_manifest

    key = load_private_key(key_path)
    read_manifest(bundle_dir, trusted=())
    return sign_dir(bundle_dir, key)


def new_key(path: Path) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair: ``path`` (private PEM, mode 600, never overwritten) and ``path``.pub (public PEM)."""
    ed25519 = _ed25519()
    from cryptography.hazmat.primitives import serialization

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = path.with_name(path.name + ".pub")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BundleError(f"{path} exists: a key is never overwritten; pick another path") from None
    except OSError as e:
        raise BundleError(f"cannot write {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub.write_bytes(public)
    return path, pub


def add_trusted_key_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--trusted-key KEY.pub, repeatable, as ovseg-run and ovseg-sign take it; ``what`` says what the keys do."""
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="KEY.pub",
        help=f"{what} (repeatable; default ${TRUSTED_KEYS_ENV}, else the keys in $OVSEG_HOME/trusted-keys/; "
        "docs/reliability.md)",
    )


def add_sign_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--sign KEY, as every command that writes a manifest takes it; ``what`` says what is signed."""
    p.add_argument(
        "--sign",
        type=Path,
        metavar="KEY",
        help=f"sign {what} with this Ed25519 private key (docs/reliability.md; needs ovseg[sign])",
    )


def unsigned_after_rewrite(bundle_dir: Path, key_path: Path | None) -> str | None:
    """Asked before a command rewrites ``bundle_dir``'s manifest: the line to print after it when the bundle was signed
    and no key signs the new manifest (runtimes that trust keys refuse it until it is signed again)."""
    if key_path is not None or not (bundle_dir / SIGNATURE).is_file():
        return None
    return (
        f"{bundle_dir} was signed and its new manifest is not: machines that trust keys refuse it until it is signed "
        f"again (`{PROG} --bundle {bundle_dir} --key KEY`, or --sign KEY here)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, metavar="DIR", help="the bundle to sign or verify")
    p.add_argument("--key", type=Path, metavar="KEY", help="private key to sign with (keep it off robots)")
    p.add_argument("--verify", action="store_true", help="check the bundle's signature against the trusted keys")
    add_trusted_key_argument(p, "check the signature with these Ed25519 public keys")
    p.add_argument("--new-key", type=Path, metavar="KEY", help="write a new key pair: KEY (private) and KEY.pub")
    return p


def main(argv: list[str] | None = None) -> int:
    from ovseg.cli import run_cli, say

    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.key, args.new_key, args.verify))) != 1:
        parser.error("give one of --new-key KEY, --bundle DIR --key KEY, --bundle DIR --verify")
    if (args.key or args.verify) and args.bundle is None:
        parser.error("--key and --verify need --bundle DIR")

    def body() -> int:
        if args.new_key:
            private, public = new_key(args.new_key)
            say(PROG, f"wrote {private} (private: keep it on the signing machine) and {public} (give it to robots)")
        elif args.key:
            say(PROG, f"signed: wrote {sign_bundle(args.bundle, args.key)}")
        else:
            from .manifest import read_manifest

            files = configured_key_files(args.trusted_key)
            if not files:
                raise BundleError(
                    f"no trusted key to verify with: pass --trusted-key KEY.pub or set ${TRUSTED_KEYS_ENV}"
                )
            read_manifest(args.bundle, trusted=files)
            say(PROG, f"{args.bundle}: signed by {verify_bundle(args.bundle, files)}, every file matches its manifest")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
