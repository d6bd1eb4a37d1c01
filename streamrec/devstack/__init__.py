"""The local development stack: moto server, redis-server and PostgreSQL on loopback ports.

``streamrec dev up`` and the test fixtures start the same real servers through the launchers in this
package, so what a developer runs by hand is what the tests run. Nothing here does I/O at import time.

Modules: :mod:`~streamrec.devstack.process` (spawn, poll, stop: OS-level helpers),
:mod:`~streamrec.devstack.service` (the handle and launcher shapes), one module per server,
:mod:`~streamrec.devstack.provision` (streams, tables, buckets per region), :mod:`~streamrec.devstack.state`
(where the stack keeps its files) and :mod:`~streamrec.devstack.stack` (``up``/``status``/``down``).
"""
