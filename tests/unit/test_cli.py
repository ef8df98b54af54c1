"""`api-buddy` and `flask buddy` without processes: the CLI's shape, one source of gunicorn defaults, commands that
never start a Redis or make up a key, and start-up errors that name what to fix."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner
from gunicorn.app.wsgiapp import WSGIApplication

from buddy import create_app
from buddy.cli import main
from buddy.embedded import EmbeddedRedis, NotRunning, join_only
from buddy.serve import ProxyApplication
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
    app = create_app(buddy_config, redis_client=fakeredis.FakeRedis(server=server), environ={})
    try:
        refused = app.test_cli_runner().invoke(args=["buddy", "key"])
        assert refused.exit_code == 1 and "no access key to print" in refused.output
        assert fakeredis.FakeRedis(server=server).keys("*secure*") == []  # nothing generated
        fakeredis.FakeRedis(server=server).set(app.extensions["buddy"].secure_key.name, "the-proxys-own-key-1234")
        printed = app.test_cli_runner().invoke(args=["buddy", "key"])
        assert printed.exit_code == 0 and printed.output == "the-proxys-own-key-1234\n"
    finally:
        app.extensions["buddy"].shutdown()


@pytest.mark.parametrize("name", ["cfg.yaml", "cfg.yml", "cfg.ini"])
def test_an_unsupported_config_format_says_which_are_supported(tmp_path, name: str) -> None:
    config = tmp_path / name
    config.write_text("domain_mappings:\n  up:\n    upstream: https://example.org\n")
    result = invoke(["--config", str(config), "check-config"])
    assert result.exit_code == 1
    assert "the config file must be JSON (.json) or TOML (.toml)" in result.output and "not valid" not in result.output


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("BUDDY_SECURE_KEY", "short", "BUDDY_SECURE_KEY: must be at least 16 characters"),
    ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL: must start with redis://, rediss:// or unix://"),
])
def test_a_bad_environment_variable_is_named_as_such(tmp_path, variable: str, value: str, message: str) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"security": {"secure_key": "x" * 20}, "redis": {"url": "redis://127.0.0.1/0"}}))
    result = invoke(["--config", str(config), "check-config"], **{variable: value})
    assert result.exit_code == 1 and message in result.output
    assert "security.secure_key" not in result.output and "redis.url" not in result.output
    config.write_text(json.dumps({"security": {"secure_key": "short"}}))  # from the file: named by its path
    assert "security.secure_key: must be at least 16" in invoke(["--config", str(config), "check-config"]).output


def test_check_config_follows_config(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text('[domain_mappings.up]\nupstream = "https://example.org"\n')
    result = invoke(["--config", str(config), "check-config"])
    assert result.exit_code == 0 and list(json.loads(result.stdout)["domain_mappings"]) == ["up"]


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
