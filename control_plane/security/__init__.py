"""Who may do what: API tokens, scopes, agent credentials, keys and the key set, audit, limits."""
