"""Worker settings say what they do: `-k sync` is one request per worker at a time, as gunicorn documents it
(gunicorn alone would turn it into gthread with the proxy's 64 threads); and two proxies on one host do not
share a gunicorn control socket."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests


def test_k_sync_serves_one_request_per_worker_at_a_time(gunicorn, redis_url, upstream, tmp_path) -> None:
    home = tmp_path / "home"
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, workers=1, extra_args=("-k", "sync"),
                     env={"REDIS_URL": redis_url, "HOME": str(home), "XDG_RUNTIME_DIR": ""})
    proxy.wait_until_serving("/admin/health")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: requests.get(f"{proxy.url}/up/slow/400?n={i}", timeout=20), range(2)))
    first, second = sorted(seen.started for seen in upstream.log if seen.path.startswith("/slow/"))
    assert second - first >= 0.4  # the second reached the upstream only once the first was answered
    assert "-k sync: one thread per worker" in proxy.log()
    # No gunicorn control socket: its one path per user would be taken over by a second proxy on the host.
    assert not (home / ".gunicorn").exists()
