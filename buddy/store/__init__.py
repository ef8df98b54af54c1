"""Redis-backed stores: the response cache now; limiter, fill lock and metrics build on the same guard."""
