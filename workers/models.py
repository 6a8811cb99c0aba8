"""Workers keep no rows of their own: their state lives in Redis (heartbeats, leases)."""
