"""The agent's state directory: identity, keys, and what it has accepted and activated.

Layout (all files 0600, written atomically)::

    identity.json        agent id, server URL, credential, name, labels
    control-plane.pub    the key that signs this agent's desired state
    trusted/*.pub        publisher keys handed out at enrollment
    keyset.json          the newest signed key set accepted (when the fleet has one): it then
                         decides the publishers (k-of-n) and the control plane keys instead
    state.json           highest generation accepted, active versions, next metrics seq
    status-epoch         the epoch of this run's status reports (grows at every start)
    blobs/, manifests/   the local content-addressed store (agent/storage/blobs.py)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.exceptions import AgentConfigError
from agent.storage.statefile import read_json, write_atomic, write_json
from protocol.dsse import keyring, load_public_key
from protocol.exceptions import InvalidMessage, ProtocolError
from protocol.keyset import KeySet, open_first
from protocol.reports import MAX_ORDER


@dataclass(frozen=True)
class Identity:
    """Who this agent is and where its control plane lives."""

    agent_id: str
    server: str
    credential: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    mqtt: dict[str, str] | None = None  # url, username, password, prefix from enrollment


@dataclass
class PersistentState:
    """What must survive a restart."""

    highest_generation: int = 0
    desired_envelope: str | None = None  # the last accepted desired-state envelope
    active: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> version, digest
    # Rollback protection: per model, the highest version ever activated.
    highest_versions: dict[str, str] = field(default_factory=dict)
    # Per model, manifest digests activated, newest first (what pruning keeps).
    history: dict[str, list[str]] = field(default_factory=dict)


class StateDir:
    """Paths and typed access to the agent's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.identity_path = root / "identity.json"
        self.control_plane_key_path = root / "control-plane.pub"
        self.trusted_dir = root / "trusted"
        self.state_path = root / "state.json"
        self.keyset_path = root / "keyset.json"
        self.status_epoch_path = root / "status-epoch"

    def save_enrollment(
        self,
        identity: Identity,
        control_plane_key_pem: str,
        trusted_pems: list[str],
        keyset: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """Write what enrollment returned; raises AgentConfigError for a bad key or key set."""
        try:
            load_public_key(control_plane_key_pem.encode())
            keys = [load_public_key(p.encode()) for p in trusted_pems]
        except InvalidMessage as exc:
            raise AgentConfigError(f"enrollment returned a bad key: {exc}") from None
        if keyset is not None:
            try:
                open_first(keyset.encode(), now or datetime.now(UTC))
            except ProtocolError as exc:
                raise AgentConfigError(f"enrollment returned a bad key set: {exc}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        for i, (pem, _) in enumerate(zip(trusted_pems, keys, strict=True)):
            write_atomic(self.trusted_dir / f"publisher-{i}.pub", pem.encode())
        write_atomic(self.control_plane_key_path, control_plane_key_pem.encode())
        if keyset is not None:
            write_atomic(self.keyset_path, keyset.encode())
        write_json(self.identity_path, asdict(identity))

    def load_keyset(self) -> KeySet | None:
        """The key set accepted last (checked when it was accepted), or None when the fleet has
        none; raises AgentConfigError when the file is not a key set signed by its roots."""
        try:
            data = self.keyset_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AgentConfigError(f"{self.keyset_path}: {exc.strerror}") from None
        try:
            # It was current when accepted; expiry only matters for a version on offer.
            return open_first(data, datetime.min.replace(tzinfo=UTC))
        except ProtocolError as exc:
            raise AgentConfigError(f"{self.keyset_path}: {exc}") from None

    def save_keyset(self, envelope: bytes) -> None:
        """Keep the newest accepted key set."""
        write_atomic(self.keyset_path, envelope)

    def load_identity(self) -> Identity:
        """Read identity.json; raises AgentConfigError when the agent is not enrolled."""
        doc = read_json(self.identity_path)
        if doc is None:
            raise AgentConfigError(
                f"{self.identity_path} not found: run 'modelfleet agent enroll' first"
            )
        try:
            return Identity(**doc)
        except TypeError as exc:
            raise AgentConfigError(f"{self.identity_path} is malformed: {exc}") from None

    def control_plane_keys(self) -> dict[str, Ed25519PublicKey]:
        """The control plane's public key as a keyring; raises AgentConfigError."""
        try:
            return keyring([load_public_key(self.control_plane_key_path.read_bytes())])
        except (OSError, InvalidMessage) as exc:
            raise AgentConfigError(f"{self.control_plane_key_path}: {exc}") from None

    def trusted_publishers(self, extra: tuple[Path, ...] = ()) -> dict[str, Ed25519PublicKey]:
        """Publisher keys: from enrollment plus ``extra`` files; raises AgentConfigError."""
        paths = sorted(self.trusted_dir.glob("*.pub")) if self.trusted_dir.is_dir() else []
        keys = []
        for p in [*paths, *extra]:
            try:
                keys.append(load_public_key(p.read_bytes()))
            except (OSError, InvalidMessage) as exc:
                raise AgentConfigError(f"trusted publisher key {p}: {exc}") from None
        return keyring(keys)

    def publisher_trust(
        self, keyset: KeySet | None, extra: tuple[Path, ...] = ()
    ) -> tuple[dict[str, Ed25519PublicKey], int]:
        """(publisher keys, signatures a manifest needs): the key set's publishers role when
        the fleet has one, else enrollment's keys plus ``extra`` files, one signature each."""
        if keyset is None:
            return self.trusted_publishers(extra), 1
        return keyset.trusted("publishers"), keyset.threshold("publishers")

    def next_status_epoch(self, now_s: float) -> int:
        """The epoch of this run's status reports, kept before it is used (one fsync a start).

        It is above every epoch this directory handed out before, and at least the Unix time
        in seconds: a state directory put back from a backup still starts above the epochs
        its agent used since (with a clock that is right), and a clock set back does not
        matter (the stored epoch + 1 wins). A file that does not hold an epoch counts as 0.
        """
        try:
            previous = int(self.status_epoch_path.read_text())
        except FileNotFoundError:
            previous = 0
        except (OSError, ValueError, UnicodeDecodeError):
            previous = 0  # unreadable: the clock is the floor, as on a first start
        if not 0 <= previous < MAX_ORDER:
            previous = 0
        epoch = min(max(previous + 1, int(now_s)), MAX_ORDER)
        write_atomic(self.status_epoch_path, str(epoch).encode())
        return epoch

    def load_state(self) -> PersistentState:
        """Read state.json (defaults when absent); raises AgentConfigError when malformed."""
        doc: dict[str, Any] | None = read_json(self.state_path)
        if doc is None:
            return PersistentState()
        if not isinstance(doc, dict):
            raise AgentConfigError(f"{self.state_path} is malformed: not an object")
        known = set(PersistentState.__dataclass_fields__)
        try:
            # Fields this agent does not know (written by a newer one) are ignored.
            return PersistentState(**{k: v for k, v in doc.items() if k in known})
        except TypeError as exc:
            raise AgentConfigError(f"{self.state_path} is malformed: {exc}") from None

    def save_state(self, state: PersistentState) -> None:
        """Write state.json atomically."""
        write_json(self.state_path, asdict(state))
