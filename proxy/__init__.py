"""edge-proxy: a streaming HTTP/1.1 reverse proxy for the edge platform.

Gunicorn's master runs gevent workers that serve the WSGI app below and
stream each request to ``next-hop:80``. Importing ``proxy`` imports nothing
else: the master must stay light and urllib3 must wait for gevent's patching
in the worker, so each module is imported by whoever needs it.

Modules, by concern:

- Configuration: ``setting`` (the ``Setting`` declaration and its kinds of
  value), ``settings`` (environment variables), ``config`` (``proxy.toml``),
  ``cache_config`` (its ``[cache]`` table), ``config_docs`` (the generated
  configuration docs).
- Requests: ``app`` (the WSGI app: platform rules, forwarding, failures),
  ``headers`` (every header rule), ``extension`` (the user's middleware),
  ``request_body`` (the client's body), ``access`` (the access record).
- Next-hop: ``upstream`` (connections, the pool, the retry, what each failure
  means), ``http1`` (the sans-I/O answer reader), ``sockets`` (socket
  writes), ``tunnel`` (``Upgrade`` tunnels).
- Caching: ``cache`` (the WSGI cache layer), ``cache_policy`` (RFC 9111 rules,
  pure), ``cache_store`` (entry files and the SQLite index), ``ban`` (ban
  expressions).
- Processes: ``worker`` (the Gunicorn worker), ``balance`` (spreading
  connections over the workers), ``internals`` (the one door to private
  parts of Gunicorn, gevent and urllib3, checked at start-up).
- Logging: ``logs`` (formats, handlers, configuration), ``capture`` (stray
  output and uncaught exceptions as error records).
- Commands: ``hooks`` (the platform's hook scripts), ``demo`` (``make run``).
"""

__all__: list[str] = []
