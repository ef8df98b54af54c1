"""The seed's embedded API: `CachingProxy(config).start(blocking=False)` serves from a thread of the caller."""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Mapping

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, get_sockaddr, make_server, select_address_family

from buddy import Buddy, create_app
from buddy.access import exposure_warning
from buddy.hosts import describe
from buddy.monitoring import MonitoringManager

log = logging.getLogger("buddy")


class _Handler(WSGIRequestHandler):
    """HTTP/1.1, so that a streamed body is chunked and a client can tell one that was cut off; werkzeug
    still answers `Connection: close`, one request per connection, so no keep-alive thread outlives stop().

    Nothing is printed to the host program's stderr: no access line per request (the proxy's counters say what
    it did, as under gunicorn), and werkzeug's other lines go to the proxy's log, errors as errors."""

    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log(self, type: str, message: str, *args: Any) -> None:
        log.log(logging.ERROR if type == "error" else logging.DEBUG, "http server: " + message, *args)


class CachingProxy:
    """A whole proxy inside a Python program, on the embedded Redis unless `redis.url` (or REDIS_URL) says otherwise.

        proxy = CachingProxy({"domain_mappings": {"conceptnet": {"upstream": "https://api.conceptnet.io"}}})
        proxy.start(blocking=False)
        ...  # http://127.0.0.1:8080/conceptnet/c/en/dog
        proxy.stop()
    """

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.app = create_app(config)
        self.buddy: Buddy = self.app.extensions["buddy"]
        self.buddy.serving()
        if self.buddy.embedded is not None:
            self.buddy.embedded.supervise()  # a thread of this process restarts it if it dies, until stop()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        server = self.buddy.settings.server
        return f"http://{server.host}:{server.port}"

    def start(self, blocking: bool = False) -> None:
        """Serve on `server.host:server.port`; with blocking=False from a background thread, else until stop().

        Raises OSError when the address is taken, RuntimeError when already started or stopped.
        """
        if self._stopped:
            raise RuntimeError("this CachingProxy was stopped; create a new one to serve again")
        if self._server is not None:
            raise RuntimeError(f"this CachingProxy is already serving on {self.url}")
        server = self.buddy.settings.server
        warning = exposure_warning([f"{server.host}:{server.port}"], self.buddy.access.required)
        if warning:
            log.warning(warning)
        host, port = server.host, server.port
        family = select_address_family(host, port)
        try:  # bound here: werkzeug would print a taken port to stderr and exit, which the host program must not
            listener = socket.create_server(get_sockaddr(host, port, family), family=family)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            self._server = make_server(host, port, self.app, threaded=True, request_handler=_Handler,
                                       fd=listener.fileno())
        finally:
            listener.close()  # the server holds its own copy of the socket
        log.info("%s", describe(self.buddy.settings))
        if blocking:
            try:
                self._server.serve_forever()
            finally:
                self.stop()
            return
        self._thread = threading.Thread(target=self._server.serve_forever, name="buddy-server", daemon=True)
        self._thread.start()
        log.info("reference-api-buddy serving on %s", self.url)

    def stop(self) -> None:
        """Stop serving and leave nothing running: no thread of ours, no embedded redis-server we started."""
        if self._stopped:
            return
        self._stopped = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # returns once serve_forever() has ended, in whichever thread it ran
            if self._thread is not None:
                self._thread.join(10)
            server.server_close()
        self.buddy.shutdown()

    def get_secure_key(self) -> str | None:
        """The access key clients must send; None when the proxy requires none (and none is made up for it)."""
        if not self.buddy.settings.security.require_secure_key:
            return self.buddy.settings.security.secure_key
        return self.buddy.secure_key.get()

    def get_metrics(self) -> dict[str, Any]:
        self.buddy.service.metrics.flush()  # this process's latest counts first
        return self.buddy.monitoring.get_all()

    def clear_cache(self, domain: str | None = None) -> int:
        """Remove the cached responses of one domain, or of all; returns how many went."""
        if domain is not None and domain not in self.buddy.settings.domains:
            raise ValueError(f"'{domain}' is not a configured domain: {sorted(self.buddy.settings.domains)}")
        domains = [domain] if domain else list(self.buddy.settings.domains)
        return sum(self.buddy.service.cache.clear(name) for name in domains)

    def get_monitoring_manager(self) -> MonitoringManager:
        self.buddy.service.metrics.flush()
        return self.buddy.monitoring

    def __enter__(self) -> "CachingProxy":
        self.start(blocking=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
