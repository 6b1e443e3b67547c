"""Pure-JAX memory environments and dm_env adapters."""
