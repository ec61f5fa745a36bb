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
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control_plane.cli.common import CliError, add_client_options, api_call, read_file
from control_plane.security import keyset_change
from control_plane.security.files import write_private
from control_plane.security.keyset_change import KeySetChange, KeySetChangeError, RoleChange
from protocol.dsse import key_id, load_private_key, load_public_key
from protocol.exceptions import ProtocolError
from protocol.keyset import (
    ROLES,
    KeySet,
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


# Each role's options: (add, remove, threshold); the control plane role has no threshold option.
FLAGS = {
    "root": ("--add-root", "--remove-root", "--root-threshold"),
    "publishers": ("--add-publisher", "--revoke-publisher", "--threshold"),
    "controlPlane": ("--add-control-plane", "--remove-control-plane", ""),
}


def change_of(args: argparse.Namespace, members: dict[str, tuple[str, ...]]) -> KeySetChange:
    """The change the options ask for; keys to remove are resolved against ``members`` (each
    role's key ids now). Raises CliError naming the option."""
    given = {
        "root": (args.add_root, args.remove_root, args.root_threshold),
        "publishers": (args.add_publisher, args.revoke_publisher, args.threshold),
        "controlPlane": (args.add_control_plane, args.remove_control_plane, None),
    }
    roles = {}
    for name, (add, remove, threshold) in given.items():
        flags = FLAGS[name]
        roles[name] = RoleChange(
            add=tuple(_public(a, flags[0]) for a in add),
            remove=tuple(_resolve_id(r, members.get(name, ()), flags[1]) for r in remove),
            threshold=threshold,
        )
    return KeySetChange(roles=roles, expires_days=args.expires_days)


def next_version(current: KeySet | None, args: argparse.Namespace, signers: list) -> KeySet:
    """The key set ``args`` asks for, one version after ``current`` (None: version 1)."""
    publics = [k.public_key() for k in signers]
    if current is not None:
        members = {name: current.roles[name].keyids for name in ROLES}
    else:
        members = {"root": tuple(dict.fromkeys(key_id(k) for k in publics))}
    try:
        return keyset_change.next_version(
            current, change_of(args, members), publics, datetime.now(UTC)
        )
    except KeySetChangeError as exc:
        flag = {"add": 0, "remove": 1, "threshold": 2}.get(exc.what)
        where = FLAGS[exc.role][flag] if flag is not None and exc.role in FLAGS else ""
        if exc.value is not None:
            where = f"{where} {exc.value}"
        raise CliError(f"{where}: {exc}" if where else str(exc)) from None


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
