"""The chaos suite (`make chaos`, `python -m bench.chaos`): unblock as deployed — API replicas,
worker replicas, PostgreSQL and a Mosaic double, each its own process — under load while
replicas are killed, PostgreSQL restarts and Mosaic fails or loses its answers; then the
guarantees are checked from the database and the sandbox's call log. See docs/chaos.md.
"""
