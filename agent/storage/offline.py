"""Air-gapped installs: a signed bundle carried to the box by hand.

``modelfleet agent import`` verifies the bundle exactly as a download is verified (the agent's
trusted publishers, every digest), puts its files in the local store, and pins it in
``imported.json``; the daemon serves pinned versions of models its desired state does not name,
and reports them when it next reaches the control plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.exceptions import UpdateError
from agent.storage.blobs import LocalStore
from agent.storage.state import StateDir
from agent.storage.statefile import read_json, write_json
from protocol.bundle import BundleReader
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, verify
from protocol.exceptions import ProtocolError

IMPORTED = "imported.json"


def imported(state_dir: Path) -> dict[str, dict[str, str]]:
    """Pinned versions: model name -> {version, manifestDigest}."""
    doc: Any = read_json(state_dir / IMPORTED, {})
    return doc if isinstance(doc, dict) else {}


def import_bundle(state_dir: Path, bundle: Path, extra_trust: tuple[Path, ...]) -> tuple[str, str]:
    """Verify and install a bundle; return (name, version).

    Raises UpdateError (or AgentConfigError for an unusable state dir or key).
    """
    dirs = StateDir(state_dir)
    dirs.load_identity()  # an agent must be enrolled here: its keys decide what is trusted
    # The fleet's key set decides when there is one, as for versions the control plane names.
    trusted, threshold = dirs.publisher_trust(dirs.load_keyset(), extra_trust)
    store = LocalStore(state_dir)
    try:
        # Streamed: the signature first, then each file into the store as it is hashed.
        with bundle.open("rb") as f, BundleReader(f) as reader:
            b = reader.head
            verify(b.envelope, trusted, MANIFEST_PAYLOAD_TYPE, threshold)
            for entry, chunks in reader.files():
                if store.has_blob(entry.digest):
                    for _ in chunks:  # checked all the same
                        pass
                    continue
                part = store.partial_path(entry.digest)
                try:
                    with part.open("wb") as out:
                        for chunk in chunks:
                            out.write(chunk)
                except ProtocolError:
                    part.unlink(missing_ok=True)
                    raise
                store.commit_partial(entry.digest, entry.size)
    except OSError as exc:
        raise UpdateError(f"{bundle}: {exc.strerror}") from None
    except ProtocolError as exc:
        raise UpdateError(f"{bundle} refused: {exc}") from None
    store.save_manifest(b.manifest_digest, b.envelope.to_bytes())
    pins = imported(state_dir)
    pins[b.manifest.name] = {"version": b.manifest.version, "manifestDigest": b.manifest_digest}
    write_json(state_dir / IMPORTED, pins)
    return b.manifest.name, b.manifest.version
