"""Built-in tool-use domains. Each is a plugin written against the same `k2rl.env` API as a user's own."""
