"""``modelfleet keys rotate`` and ``keys show``: the signed key set (protocol/keyset.py).

The root keys never leave the operator's machine: ``rotate`` fetches the newest key set,
applies the changes asked for, signs the next version with the root keys given and sends it;
the control plane only checks the signatures. The first version is made offline
(``--init --out``) and installed from the server's disk (``modelfleet server --keyset``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control_plane.cli.common import CliError, add_client_options, api_call, read_file
from control_plane.security.files import write_private
from protocol.dsse import key_id, load_private_key, load_public_key
from protocol.exceptions import ProtocolError
from protocol.keyset import (
    ROLES,
    KeySet,
    Role,
    next_keyset,
    open_first,
    sign_keyset,
)


def register(ksub: argparse._SubParsersAction) -> None:
    """Add ``keys rotate`` and ``keys show`` beside ``keys generate``."""
    r = ksub.add_parser(
        "rotate",
        help="sign and install the next key set version: add or revoke publisher, root and "
        "control plane keys, change the k-of-n threshold",
    )
    r.add_argument(
        "--root-key",
        type=Path,
        action="append",
        required=True,
        metavar="FILE",
        help="a root private key that signs (repeatable): enough of the current "
        "roots, and of the new ones when roots change",
    )
    r.add_argument("--add-publisher", action="append", default=[], metavar="PUB")
    r.add_argument("--revoke-publisher", action="append", default=[], metavar="PUB|KEYID")
    r.add_argument("--threshold", type=int, help="publisher signatures a bundle needs (k of n)")
    r.add_argument("--add-root", action="append", default=[], metavar="PUB")
    r.add_argument("--remove-root", action="append", default=[], metavar="PUB|KEYID")
    r.add_argument("--root-threshold", type=int, help="root signatures a key set needs")
    r.add_argument(
        "--add-control-plane",
        action="append",
        default=[],
        metavar="KEY",
        help="a control plane signing key (its .key or a .pub): agents accept "
        "desired states it signs",
    )
    r.add_argument("--remove-control-plane", action="append", default=[], metavar="PUB|KEYID")
    r.add_argument("--expires-days", type=float, default=365.0, help="(365)")
    r.add_argument(
        "--init",
        action="store_true",
        help="make version 1 offline (with --out), for modelfleet server --keyset",
    )
    r.add_argument("--out", type=Path, help="write the signed key set here instead of sending")
    add_client_options(r)
    r.set_defaults(func=cmd_keys_rotate)
    s = ksub.add_parser("show", help="the control plane's key set: version, roles, thresholds")
    add_client_options(s)
    s.set_defaults(func=cmd_keys_show)


def _public(arg: str, flag: str) -> Ed25519PublicKey:
    """A public key from a .pub file, or from a private key file (its public half)."""
    data = read_file(Path(arg), flag)
    try:
        if b"PRIVATE KEY" in data:
            return load_private_key(data).public_key()
        return load_public_key(data)
    except ProtocolError as exc:
        raise CliError(f"{flag} {arg}: {exc}") from None


def _resolve_id(arg: str, members: tuple[str, ...], flag: str) -> str:
    """A key id named by a key file, a full id or an unambiguous prefix of 8+ hex digits."""
    if Path(arg).is_file():
        kid = key_id(_public(arg, flag))
        if kid not in members:
            raise CliError(f"{flag} {arg}: key {kid[:16]} is not in that role")
        return kid
    match = [k for k in members if len(arg) >= 8 and k.startswith(arg.lower())]
    if len(match) != 1:
        raise CliError(
            f"{flag} {arg}: names {'no' if not match else 'more than one'} key of "
            "that role (give a key file or 8+ hex digits of its id)"
        )
    return match[0]


def _changed_role(
    role: Role,
    keys: dict[str, Ed25519PublicKey],
    add: list[str],
    remove: list[str],
    threshold: int | None,
    flags: tuple[str, str, str],
) -> Role:
    ids = list(role.keyids)
    for arg in remove:
        kid = _resolve_id(arg, tuple(ids), flags[1])
        ids.remove(kid)
    for arg in add:
        pub = _public(arg, flags[0])
        kid = key_id(pub)
        keys[kid] = pub
        if kid not in ids:
            ids.append(kid)
    t = threshold if threshold is not None else min(role.threshold, max(len(ids), 1))
    if not ids:
        raise CliError(f"{flags[1]}: the role would have no key left")
    if not 1 <= t <= len(ids):
        raise CliError(f"{flags[2]} {t}: must be between 1 and the role's {len(ids)} key(s)")
    return Role(tuple(ids), t)


def next_version(current: KeySet | None, args: argparse.Namespace, signers: list) -> KeySet:
    """The key set ``args`` asks for, one version after ``current`` (None: version 1)."""
    empty = Role((), 1)
    roles = dict(current.roles) if current else dict.fromkeys(ROLES, empty)
    keys: dict[str, Ed25519PublicKey] = dict(current.keys) if current else {}
    add_roots = list(args.add_root)
    if current is None:  # version 1: the signing root keys are the roots
        for k in signers:
            keys[key_id(k.public_key())] = k.public_key()
        roles["root"] = Role(tuple(dict.fromkeys(key_id(k.public_key()) for k in signers)), 1)
    new_roles = {
        "root": _changed_role(
            roles["root"],
            keys,
            add_roots,
            args.remove_root,
            args.root_threshold,
            ("--add-root", "--remove-root", "--root-threshold"),
        ),
        "publishers": _changed_role(
            roles["publishers"],
            keys,
            args.add_publisher,
            args.revoke_publisher,
            args.threshold,
            ("--add-publisher", "--revoke-publisher", "--threshold"),
        ),
        "controlPlane": _changed_role(
            roles["controlPlane"],
            keys,
            args.add_control_plane,
            args.remove_control_plane,
            None,
            ("--add-control-plane", "--remove-control-plane", ""),
        ),
    }
    used = {kid for r in new_roles.values() for kid in r.keyids}
    if args.expires_days <= 0:
        raise CliError("--expires-days must be > 0")
    return KeySet(
        version=(current.version if current else 0) + 1,
        expires_at=datetime.now(UTC).replace(microsecond=0) + timedelta(days=args.expires_days),
        keys={k: v for k, v in keys.items() if k in used},
        roles=new_roles,
    )


def _describe(ks: KeySet) -> str:
    lines = [f"key set version {ks.version}, expires {ks.summary()['expiresAt']}"]
    for name in ROLES:
        role = ks.roles[name]
        lines.append(
            f"  {name}: {role.threshold} of {len(role.keyids)}: "
            + ", ".join(k[:16] for k in role.keyids)
        )
    return "\n".join(lines)


async def _rotate(args: argparse.Namespace) -> int:
    signers = []
    for p in args.root_key:
        try:
            signers.append(load_private_key(read_file(p, "--root-key")))
        except ProtocolError as exc:
            raise CliError(f"--root-key {p}: {exc}") from None
    now = datetime.now(UTC)
    if args.init:
        if not args.out:
            raise CliError("--init makes the first version offline: give --out FILE")
        ks = next_version(None, args, signers)
        data = sign_keyset(ks, signers).to_bytes()
        try:
            open_first(data, now)
        except ProtocolError as exc:
            raise CliError(f"the root keys given do not sign this key set: {exc}") from None
        write_private(args.out, data, 0o644)
        print(f"wrote {args.out}\n{_describe(ks)}")
        return 0
    _, body = await api_call(args, "GET", "/keyset")
    if not body.get("envelope"):
        raise CliError(
            "the control plane has no key set yet: make version 1 with "
            "`modelfleet keys rotate --init --out keyset.json ...` and start the "
            "server with --keyset keyset.json"
        )
    try:
        current = open_first(body["envelope"].encode(), datetime.min.replace(tzinfo=UTC))
    except ProtocolError as exc:
        raise CliError(f"the control plane's key set does not verify: {exc}", 1) from None
    ks = next_version(current, args, signers)
    data = sign_keyset(ks, signers).to_bytes()
    try:
        next_keyset(current, data, now)
    except ProtocolError as exc:
        raise CliError(f"version {ks.version} would be refused: {exc}") from None
    if args.out:
        write_private(args.out, data, 0o644)
        print(f"wrote {args.out}\n{_describe(ks)}")
        return 0
    await api_call(args, "PUT", "/keyset", json_body=json.loads(data))
    print(f"installed {_describe(ks)}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Sign the next key set version and send it (or write it)."""
    return asyncio.run(_rotate(args))


def cmd_keys_show(args: argparse.Namespace) -> int:
    """Print the control plane's key set."""
    _, body = asyncio.run(api_call(args, "GET", "/keyset"))
    if args.json:
        print(json.dumps(body, indent=2))
    elif body.get("keyset") is None:
        print("no key set: publishers are trusted by the server's --trust-publisher files")
    else:
        ks = open_first(body["envelope"].encode(), datetime.min.replace(tzinfo=UTC))
        print(_describe(ks))
    return 0
