"""`api-buddy` and `flask buddy` without processes: the CLI's shape, one source of gunicorn defaults, commands that
never start a Redis or make up a key, and start-up errors that name what to fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner
from gunicorn.app.wsgiapp import WSGIApplication

from buddy import create_app
from buddy.cli import main
from buddy.embedded import EmbeddedRedis, NotRunning, join_only
from buddy.serve import ProxyApplication, gunicorn_problem
from tests.support.processes import ROOT

CLEAN = {"BUDDY_CONFIG": None, "REDIS_URL": None, "BUDDY_DATA_DIR": None, "BUDDY_SECURE_KEY": None,
         "WEB_CONCURRENCY": None, "BUDDY_THREADS": None}  # unset while a command runs, restored after


def invoke(args: list[str], **env: str) -> Any:
    return CliRunner().invoke(main, args, env={**CLEAN, **env})


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict, dict]]:
    """Calls of buddy.serve.serve (config overrides, gunicorn flags) instead of a real gunicorn."""
    calls: list[tuple[dict, dict]] = []
    monkeypatch.setattr("buddy.serve.serve", lambda overrides, flags: calls.append((overrides, flags)))
    return calls


def test_api_buddy_without_a_command_serves_with_the_seeds_flags(served, tmp_path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text("{}")
    result = invoke(["--config", str(config), "--host", "0.0.0.0", "--port", "9000", "--log-level", "debug",
                     "--workers", "2", "--threads", "8"])
    assert result.exit_code == 0, result.output
    assert served == [({"server": {"host": "0.0.0.0", "port": 9000}, "logging": {"level": "DEBUG"}},
                       {"workers": 2, "threads": 8})]
    assert invoke([]).exit_code == 0 and served[-1] == ({}, {})


def test_serving_flags_with_a_command_are_refused_rather_than_ignored(served) -> None:
    result = invoke(["--port", "9000", "--workers", "2", "stats"])
    assert result.exit_code == 2 and "--port, --workers: only for serving" in result.output
    assert invoke(["stast"]).exit_code == 2  # a typo is an error, not a server
    assert served == []


def test_api_buddy_has_the_commands_of_flask_buddy() -> None:
    from buddy.cli import group

    listed = invoke(["--help"]).output
    assert set(group.commands) <= {line.split()[0] for line in listed.split("Commands:")[1].splitlines() if line}


def test_gunicorn_wsgi_app_and_api_buddy_run_with_the_same_gunicorn_settings(monkeypatch) -> None:
    for name in CLEAN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.argv", ["gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "wsgi:app"])
    clone = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").cfg
    installed = ProxyApplication({}, {}).cfg
    differ = {name for name, setting in clone.settings.items() if setting.value != installed.settings[name].value}
    assert differ == {"config", "default_proc_name", "on_starting", "when_ready", "on_exit", "post_fork"}
    for hook in ("on_starting", "when_ready", "on_exit"):  # the same hooks, bound to settings loaded alike
        assert clone.settings[hook].value.__func__ is installed.settings[hook].value.__func__
    assert installed.worker_class_str == "buddy.worker.DeadlineWorker" and installed.threads == 64
    assert installed.settings["config"].value is None  # it reads no gunicorn.conf.py, and its log names none


@pytest.mark.parametrize("version", ["23.0.0", "26.2.0", "28.0.0"])
def test_a_gunicorn_the_worker_was_not_built_for_stops_start_up_naming_the_range(monkeypatch, version) -> None:
    assert gunicorn_problem() is None  # the one this run installed from the lock
    monkeypatch.setattr("buddy.serve.metadata.version", lambda name: version if name == "gunicorn" else "0")
    with pytest.raises(SystemExit) as stopped:
        ProxyApplication({}, {})  # loads its settings, as `api-buddy` does before it serves
    assert stopped.value.code == 2
    problem = gunicorn_problem()
    assert problem is not None and f"gunicorn {version} is installed" in problem and "gunicorn>=27.0,<28" in problem


def test_a_command_never_starts_an_embedded_redis_nor_creates_its_folder(tmp_path) -> None:
    data_dir = tmp_path / "data"
    with join_only(), pytest.raises(NotRunning) as refused:
        EmbeddedRedis(data_dir).ensure()
    assert refused.value.data_dir == data_dir and not data_dir.exists()
    data_dir.mkdir()
    (data_dir / "redis.supervisor").touch()  # what a stopped proxy leaves: files, no server, no supervisor
    with join_only(), pytest.raises(NotRunning):
        EmbeddedRedis(data_dir).ensure()
    assert sorted(p.name for p in data_dir.iterdir()) == ["redis.supervisor"]


def test_key_prints_the_stored_key_and_never_makes_one_up(buddy_config) -> None:
    server = fakeredis.FakeServer()
    secured = {**buddy_config, "security": {"require_secure_key": True}}
    app = create_app(secured, redis_client=fakeredis.FakeRedis(server=server), environ={})
    try:
        refused = app.test_cli_runner().invoke(args=["buddy", "key"])
        assert refused.exit_code == 1 and "no access key to print" in refused.output
        assert fakeredis.FakeRedis(server=server).keys("*secure*") == []  # nothing generated
        fakeredis.FakeRedis(server=server).set(app.extensions["buddy"].secure_key.name, "the-proxys-own-key-1234")
        printed = app.test_cli_runner().invoke(args=["buddy", "key"])
        assert printed.exit_code == 0 and printed.output == "the-proxys-own-key-1234\n"
    finally:
        app.extensions["buddy"].shutdown()


def test_on_the_team_recipe_a_command_without_the_services_environment_makes_no_key(buddy_config) -> None:
    """The service has BUDDY_SECURE_KEY from its env file; an operator runs `stats`, `offline` and `key` without it."""
    server = fakeredis.FakeServer()
    secured = {**buddy_config, "security": {"require_secure_key": True}}
    service = create_app(secured, redis_client=fakeredis.FakeRedis(server=server),
                         environ={"BUDDY_SECURE_KEY": "the-services-own-key-123"})
    service.extensions["buddy"].serving()  # what each gunicorn worker does once it has loaded the app
    operator = create_app(secured, redis_client=fakeredis.FakeRedis(server=server), environ={})
    try:
        for args in (["buddy", "stats"], ["buddy", "offline"], ["buddy", "clear-cache"]):
            assert operator.test_cli_runner().invoke(args=args).exit_code == 0
        key = operator.test_cli_runner().invoke(args=["buddy", "key"])
        assert key.exit_code == 1 and "BUDDY_SECURE_KEY in the proxy's environment" in key.output
        assert "api-buddy-as-service key" in key.output
        assert fakeredis.FakeRedis(server=server).get(operator.extensions["buddy"].secure_key.name) is None
        with_env = create_app(secured, redis_client=fakeredis.FakeRedis(server=server),
                              environ={"BUDDY_SECURE_KEY": "the-services-own-key-123"})
        printed = with_env.test_cli_runner().invoke(args=["buddy", "key"]).output.strip()
        with_env.extensions["buddy"].shutdown()
        answer = service.test_client().get("/up/x", headers={"X-API-Buddy-Key": printed})
        assert answer.status_code == 200  # the key `key` prints is the one the serving proxy accepts
    finally:
        operator.extensions["buddy"].shutdown()
        service.extensions["buddy"].shutdown()


def test_a_proxy_that_requires_no_key_has_none_to_give(buddy_config, redis_url) -> None:
    from buddy import CachingProxy

    proxy = CachingProxy({**buddy_config, "redis": {"url": redis_url}})
    try:
        assert proxy.get_secure_key() is None
        assert proxy.buddy.redis.get(proxy.buddy.secure_key.name) is None  # none stored for later either
        said = proxy.app.test_cli_runner().invoke(args=["buddy", "key"])
        assert said.exit_code == 1 and "requires no access key" in said.output
    finally:
        proxy.stop()


@pytest.mark.parametrize("name", ["cfg.yaml", "cfg.yml", "cfg.ini"])
def test_an_unsupported_config_format_says_which_are_supported(tmp_path, name: str) -> None:
    config = tmp_path / name
    config.write_text("domain_mappings:\n  up:\n    upstream: https://example.org\n")
    result = invoke(["--config", str(config), "check-config"])
    assert result.exit_code == 1
    assert "the config file must be JSON (.json) or TOML (.toml)" in result.output and "not valid" not in result.output
    assert f"--config: {config}" in result.output and "BUDDY_CONFIG" not in result.output  # where the user named it


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("BUDDY_SECURE_KEY", "short", "BUDDY_SECURE_KEY: must be at least 16 characters"),
    ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL: must start with redis://, rediss:// or unix:// (one server), "
                  "redis+cluster:// or rediss+cluster:// (a Redis Cluster), redis+sentinel:// or rediss+sentinel://"),
])
def test_a_bad_environment_variable_is_named_as_such(tmp_path, variable: str, value: str, message: str) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"security": {"secure_key": "x" * 20}, "redis": {"url": "redis://127.0.0.1/0"}}))
    result = invoke(["--config", str(config), "check-config"], **{variable: value})
    assert result.exit_code == 1 and message in result.output
    assert "security.secure_key" not in result.output and "redis.url" not in result.output
    config.write_text(json.dumps({"security": {"secure_key": "short"}}))  # from the file: named by its path
    assert "security.secure_key: must be at least 16" in invoke(["--config", str(config), "check-config"]).output


def test_check_config_prints_the_same_config_the_same_way_every_run(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('[domain_mappings.up]\nupstream = "https://example.org"\n')
    printed = {subprocess.run([str(Path(sys.executable).parent / "api-buddy"), "--config", str(config), "check-config"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed},
                              check=True).stdout for seed in ("1", "2", "3")}
    assert len(printed) == 1 and '"authorization"' in printed.pop()  # sets (credential headers) in one order


def test_check_config_follows_config(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('[domain_mappings.up]\nupstream = "https://example.org"\n')
    result = invoke(["--config", str(config), "check-config"])
    assert result.exit_code == 0 and list(json.loads(result.stdout)["domain_mappings"]) == ["up"]


def test_check_config_reference_lists_every_setting_without_reading_the_config(tmp_path: Path) -> None:
    from buddy.settings.reference import reference

    broken = tmp_path / "cfg.toml"
    broken.write_text("[cache]\ndefault_ttl = 3600\n")  # the reference reads no config, so it cannot fail on one
    result = invoke(["check-config", "--reference"], BUDDY_CONFIG=str(broken))
    assert result.exit_code == 0 and result.output == reference()
    lines = result.output.splitlines()
    assert "| `cache.max_cache_response_size` | `10485760` | larger responses stream through uncached |" in lines
    assert "| `REDIS_URL` | `redis.url` |" in lines


FAKE_SYSTEMCTL = """#!/usr/bin/env python3
import json, sys
answers = json.load(open({answers!r}))
prop = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--property="))
print(answers.get(prop, ""))
"""


def test_the_deploy_recipe_runs_a_command_with_the_services_user_and_environment_file(tmp_path) -> None:
    """deploy/api-buddy-as-service, against the unit in deploy/ as `systemctl show` reports it (faked here: this
    machine runs no systemd): the command runs as a transient unit with the service's EnvironmentFile."""
    unit: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "reference-api-buddy.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit.setdefault(key, []).append(value)
    program = unit["ExecStart"][0].split()[0]
    env_file = unit["EnvironmentFile"][0]
    answers = {
        "ExecStart": f"{{ path={program} ; argv[]={unit['ExecStart'][0]} ; ignore_errors=no ; start_time=[n/a] }}",
        "User": unit["User"][0], "Group": unit["Group"][0], "Environment": " ".join(unit["Environment"]),
        "EnvironmentFiles": f"{env_file.lstrip('-')} (ignore_errors={'yes' if env_file.startswith('-') else 'no'})",
    }
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "systemctl").write_text(FAKE_SYSTEMCTL.format(answers=str(tmp_path / "answers.json")))
    (fakes / "systemd-run").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    result = subprocess.run([str(ROOT / "deploy" / "api-buddy-as-service"), "clear-cache", "wikidata"],
                            env={"PATH": f"{fakes}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert f"--property=EnvironmentFile={env_file}" in args  # the very file systemd gives the service
    assert "--uid=reference-api-buddy" in args and "--wait" in args and "--pipe" in args
    assert "--property=Environment=" + " ".join(unit["Environment"]) in args
    assert args[-3:] == [os.path.join(os.path.dirname(program), "api-buddy"), "clear-cache", "wikidata"]
