"""Databases of a test Redis: clients on one database each, emptied when opened and when closed, never database 0 (the session stack's jobs and API keys live there)."""

from __future__ import annotations


def redis_url(server, db: int) -> str:
    """The URL of database ``db`` of ``server`` (an ``aex.embedded_redis.EmbeddedRedis``)."""
    return f"{server.url}?db={db}"


class Databases:
    """Clients on databases of one Redis server: ``open(db)`` empties the database and returns a
    client on it; ``close()`` empties and closes every one opened."""

    def __init__(self, server):
        self.server = server
        self.clients = []

    def open(self, db: int):
        from jobs.queues import connect

        assert db != 0, "database 0 holds the session stack (service_stack): a test may not empty it"
        client = connect(redis_url(self.server, db))
        client.flushdb()
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.flushdb()
            client.close()
        self.clients.clear()
