"""The modelfleet agent: sync desired state, verify and activate bundles, serve inference."""
