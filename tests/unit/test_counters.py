"""The registry of counters and upstream outcomes (buddy.counters), on fakeredis: every declared counter shows on
every surface its declaration names, an undeclared one is refused, and every outcome is read without error."""
from __future__ import annotations

import logging
import re
from typing import Any

import fakeredis
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from buddy import counters
from buddy.counters import COLUMNS, COUNTERS, FAILURES, OUTCOMES, Counters, Section, Tally, Unit, outcome
from buddy.redis_keys import RedisKeys
from tests.unit.test_dashboard import figures

KEYS = RedisKeys("buddy:")


@pytest.fixture
def buddy_config(upstream: Any) -> dict[str, Any]:
    return {"domain_mappings": {"up": {"upstream": upstream.url}, "other": {"upstream": upstream.url + "/o"}},
            "logging": {"enable_console": False}}


def counted(fake_redis: fakeredis.FakeRedis) -> dict[str, dict[str, int]]:
    """Give every declared counter of both mappings a value of its own, straight into Redis."""
    values: dict[str, dict[str, int]] = {"up": {}, "other": {}}
    for i, counter in enumerate(COUNTERS):
        values["up"][counter.field] = 1000 + 37 * i
        values["other"][counter.field] = 3 + i
    for name, fields in values.items():
        fake_redis.hset(KEYS.stats(name), mapping=fields)
    return values


def test_the_declarations_hold_together() -> None:
    assert len({c.field for c in COUNTERS}) == len(COUNTERS)
    assert len({c.metric for c in COUNTERS}) == len(COUNTERS)
    for section in Section:
        names = [c.name for c in COUNTERS if c.section is section and c.name]
        assert len(names) == len(set(names)), section
    wholes = [c.whole for c in COUNTERS if c.whole]
    assert len(wholes) == len(set(wholes))
    for counter in COUNTERS:
        assert re.fullmatch(r"[a-z_]+", counter.field) and not counter.field.startswith("status")
        assert re.fullmatch(r"buddy_[a-z_]+", counter.metric) and not counter.metric.endswith("_total")
        assert counter.help.endswith(".") and counter.label
        if counter.column:  # the dashboard reads it from its section, per mapping
            assert counter.name, counter
        if counter.request or counter.total:
            assert counter.section is Section.CACHE, counter
    assert [c.field for c in COLUMNS[0].counters] == ["hits", "misses", "coalesced"]
    assert set(FAILURES) == {"timeout", "unreachable", "malformed"}


def test_every_declared_counter_appears_on_every_surface_it_names(app: Flask, client, fake_redis) -> None:
    values = counted(fake_redis)
    metrics = client.get("/admin/metrics").json
    for name in ("up", "other"):
        tally = Tally({field: n for field, n in values[name].items()})
        per_mapping = {Section.CACHE: metrics["cache"]["by_domain"][name],
                       Section.UPSTREAM: metrics["upstream"]["by_domain"][name],
                       Section.THROTTLING: metrics["throttling"][name]}
        for counter in COUNTERS:
            if counter.name:
                assert per_mapping[counter.section][counter.name] == tally.shown(counter), (name, counter.field)
        assert per_mapping[Section.CACHE]["requests"] == sum(tally[c] for c in COUNTERS if c.request)
    total = Tally.sum(Tally(v) for v in values.values())
    for counter in COUNTERS:
        if counter.whole:
            assert metrics["cache"][counter.whole] == total.shown(counter), counter.field
        if counter.section is Section.UPSTREAM and counter.name:
            assert metrics["upstream"]["overall"][counter.name] == total.shown(counter), counter.field

    text = client.get("/metrics").get_data(as_text=True)
    samples = {(s.name, s.labels.get("domain")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    helps = {family.name: family.documentation for family in text_string_to_metric_families(text)}
    for counter in COUNTERS:
        assert helps[counter.metric] == counter.help
        for name in ("up", "other"):
            expected = counter.shown(values[name][counter.field])
            assert samples[(f"{counter.metric}_total", name)] == pytest.approx(expected)

    shown = figures(client.get("/admin/panel").get_data(as_text=True))
    for column in COLUMNS:
        for counter in column.counters:
            for name in ("up", "other"):
                value = shown.values[(name, counter.name or "")]
                assert value is not None and float(value) == counter.shown(values[name][counter.field])

    stats = app.test_cli_runner().invoke(args=["buddy", "stats"])
    assert stats.exit_code == 0, stats.output
    summary = stats.output.split("in all: ", 1)[1].splitlines()
    assert len(summary) == len(COLUMNS)
    for line, column in zip(summary, COLUMNS):
        parts = line.strip().split(" · ")
        assert len(parts) == len(column.counters), line
        for part, counter in zip(parts, column.counters):
            assert part.endswith(f" {counter.label}"), (part, counter.label)
            if counter.unit is Unit.COUNT:
                assert part == f"{total[counter]} {counter.label}"


def test_per_minute_counters_reach_the_timeline(app: Flask, client) -> None:
    metrics = app.extensions["buddy"].service.metrics
    for i, counter in enumerate(counters.PER_MINUTE):
        metrics.count("up", counter, i + 2)
    metrics.flush()
    timeline = client.get("/admin/metrics").json["timeline"]
    for i, counter in enumerate(counters.PER_MINUTE):
        assert timeline["by_domain"]["up"][counter.field][-1] == i + 2
        assert timeline["total"][counter.field][-1] == i + 2


def test_a_counter_is_named_by_its_declaration_or_its_field_and_an_undeclared_one_is_refused(
    app: Flask, fake_redis, caplog
) -> None:
    metrics = app.extensions["buddy"].service.metrics
    metrics.count("up", Counters.HITS)
    metrics.count("up", "hits", 2)
    metrics.count_many("up", {Counters.BYTES_SAVED: 10, "ms_saved": 5, OUTCOMES["200"]: 1, "status:timeout": 1})
    for wrong in ("hit", "status", "", "upstream_requests:200"):
        with pytest.raises(counters.UndeclaredCounter):
            metrics.count("up", wrong)
    with pytest.raises(counters.UndeclaredCounter):  # nothing of a refused batch is counted
        metrics.count_many("up", {"hits": 1, "hitz": 1})
    with caplog.at_level(logging.ERROR, "buddy.metrics"):
        for odd in ("status:bogus", "status:600", "status:099", "status:2xx", "status:broken body", "status:"):
            metrics.count("up", odd)  # an outcome nobody declared: not counted, and not the request's failure
            metrics.count("up", odd)
    assert caplog.text.count("not declared") == 6  # once per outcome
    metrics.flush()
    assert {k.decode(): int(v) for k, v in fake_redis.hgetall(KEYS.stats("up")).items()} == {
        "hits": 3, "bytes_saved": 10, "ms_saved": 5, "status:200": 1, "status:timeout": 1}


@pytest.mark.parametrize("name, status, is_error, listed", [
    ("100", 100, False, False), ("200", 200, False, False), ("304", 304, False, False), ("404", 404, False, True),
    ("429", 429, True, True), ("499", 499, False, True), ("500", 500, True, True), ("503", 503, True, True),
    ("599", 599, True, True), *((kind, None, True, True) for kind in FAILURES),
])
def test_one_function_decides_what_is_an_error(name: str, status: int | None, is_error: bool, listed: bool) -> None:
    found = outcome(name)
    assert found is not None and found.status == status and found.field == f"status:{name}"
    assert (found.is_error, found.listed) == (is_error, listed)
    assert found.pushes_back == (status in (429, 503))


@pytest.mark.parametrize("name", ["99", "600", "099", "2000", "20", "²00", "2xx", " 200", "Timeout", "", None, 200])
def test_anything_else_is_no_outcome(name: Any) -> None:
    assert outcome(name) is None


def test_every_outcome_and_any_odd_field_is_read_by_every_surface(app: Flask, client, fake_redis) -> None:
    every = {kind.field: 1 for kind in OUTCOMES.values()}
    odd = {"status:bogus": 7, "status:broken body": 7, "retired_counter": 7, "status:": 7}
    fake_redis.hset(KEYS.stats("up"), mapping={**every, **odd, "upstream_requests": len(every), "hits": "many"})
    metrics = client.get("/admin/metrics")
    assert metrics.status_code == 200
    upstream = metrics.json["upstream"]["by_domain"]["up"]
    assert upstream["errors_by_status"] == {kind.name: 1 for kind in OUTCOMES.values() if kind.listed}
    errors = sum(kind.is_error for kind in OUTCOMES.values())
    assert upstream["error_rate"] == round(errors / len(every), 4) and errors == 100 + len(FAILURES) + 1
    assert metrics.json["cache"]["by_domain"]["up"]["hits"] == 0  # not a number: not counted
    prometheus = client.get("/metrics")
    assert prometheus.status_code == 200
    statuses = {s.labels["status"] for family in text_string_to_metric_families(prometheus.get_data(as_text=True))
                for s in family.samples if s.name == "buddy_upstream_responses_total"}
    assert statuses == set(OUTCOMES)
    assert client.get("/admin/").status_code == 200 and client.get("/admin/panel").status_code == 200
    stats = app.test_cli_runner().invoke(args=["buddy", "stats"])
    assert stats.exit_code == 0, stats.output
    assert app.extensions["buddy"].monitoring.counters()["up"] == {**every, "upstream_requests": len(every)}
