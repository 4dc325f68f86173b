"""The domain core of ivcache: entries, policy, tenants and the cache service."""
