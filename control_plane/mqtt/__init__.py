"""The control plane on MQTT: the bridge to the broker and the broker's credentials and ACLs."""
