"""The agent's state directory: identity and accepted state, atomic files, blobs, imports."""
