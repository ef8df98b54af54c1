"""Issue 22 item 10 on fakeredis: an import takes a credential partition only from an export sealed by its own
installation (or when told to trust the file, and then says so), and an export leaves out every entry whose query
carries a credential, saying which parameters."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import fakeredis
import pytest
from flask import Flask

from buddy import create_app
from buddy.archive import CREDENTIAL_PARAMS
from buddy.fingerprint import credentials_digest
from tests.support.processes import ROOT
from tests.support.raw_upstream import head
from tests.unit.test_warc import NOWHERE, OK, entries, exchange, run, store

ALICE = (("Authorization", "Bearer alice-key-0001"),)
TRUST = "--trust-credentials-from-file"


@pytest.fixture
def install() -> Iterator[Any]:
    """An app on a Redis (a FakeServer: a new one unless given) under a key prefix: one installation each."""
    made: list[Flask] = []

    def make(server: fakeredis.FakeServer | None = None, prefix: str = "buddy:",
             domain: dict[str, Any] | None = None) -> Flask:
        made.append(create_app({
            "domain_mappings": {"up": {"upstream": NOWHERE, **(domain or {})}}, "redis": {"prefix": prefix},
            "logging": {"enable_console": False},
        }, redis_client=fakeredis.FakeRedis(server=server or fakeredis.FakeServer()), environ={}))
        return made[-1]

    yield make
    for app in made:
        app.extensions["buddy"].shutdown()


def hit(app: Flask, path: str, headers: tuple[tuple[str, str], ...] = ()) -> bool:
    """Is the request answered from the cache? (Offline, so that a miss never leaves the process.)"""
    run(app, "offline", "on")
    return app.test_client().get(f"/up{path}", headers=list(headers)).headers.get("X-Cache") == "HIT"


def test_a_crafted_warc_that_plants_answers_for_a_victims_key_is_refused_unless_trusted(install, tmp_path) -> None:
    victim = credentials_digest(ALICE)  # unsalted: anyone who knows (or guesses) the key computes it
    crafted = tmp_path / "crafted.warc"
    crafted.write_bytes(
        exchange(f"{NOWHERE}/doc", OK, extra=(("WARC-Buddy-Credentials", victim), ("WARC-Buddy-Mapping", "up")))
        + exchange(f"{NOWHERE}/clear", OK, headers=dict(ALICE))  # the key itself in the file, as a recorder keeps it
        + exchange(f"{NOWHERE}/q?api_key=alice-key-0001", OK)  # a credential in the query keys the entry too
        + exchange(f"{NOWHERE}/public", OK))
    app = install()
    result = run(app, "import", str(crafted))
    assert result.exit_code == 0, result.output
    assert "imported 1 entries from 1 file; skipped 3:" in result.output  # was: imported 4
    assert ("  1 credentialed, with no seal of this installation: an older export or a file made by hand "
            f"(see {TRUST})") in result.output
    assert (f"  2 credentialed, with the credentials in the file: another tool's recording or a file made by hand "
            f"(see {TRUST})") in result.output
    assert not hit(app, "/doc", ALICE) and not hit(app, "/clear", ALICE) and not hit(app, "/q?api_key=alice-key-0001")
    assert hit(app, "/public")  # a record without credentials is not affected

    trusted = run(app, "import", TRUST, str(crafted))
    assert trusted.exit_code == 0 and "imported 3 entries from 1 file" in trusted.output, trusted.output
    assert f"trusted the file alone for the credentials of 3 of them ({TRUST}):" in trusted.output
    assert "  1 credentialed, with no seal of this installation: an older export or a file made by hand\n" in (
        trusted.output)
    assert hit(app, "/doc", ALICE) and hit(app, "/clear", ALICE) and hit(app, "/q?api_key=alice-key-0001")
    assert not hit(app, "/doc")  # still in alice's partition only


def credentialed_export(app: Flask, path: Path) -> None:
    store(app, "/mine", headers=ALICE)
    store(app, "/public")
    result = run(app, "export", "-o", str(path), "--include-credentialed")
    assert result.exit_code == 0 and "exported 2 entries" in result.output, result.output
    assert "1 of them keyed on credentials, sealed for this installation" in result.output


def test_an_export_is_trusted_for_credentials_by_its_own_installation_only(install, tmp_path) -> None:
    server = fakeredis.FakeServer()
    source, archive = install(server), tmp_path / "a.warc.gz"
    credentialed_export(source, archive)
    assert b"alice-key" not in archive.read_bytes()
    elsewhere = [install(), install(server, prefix="other:")]  # another Redis; the same Redis, another prefix
    for app in elsewhere:
        result = run(app, "import", str(archive))
        assert result.exit_code == 0 and "imported 1 entries" in result.output, result.output  # was: 2
        assert ("  1 credentialed, sealed by another installation: another Redis or key prefix "
                f"(see {TRUST})") in result.output
        assert not hit(app, "/mine", ALICE) and hit(app, "/public")
    trusted = run(elsewhere[0], "import", TRUST, str(archive))
    assert "imported 1 entries" in trusted.output and "credentials of 1 of them" in trusted.output, trusted.output
    assert hit(elsewhere[0], "/mine", ALICE)

    assert run(source, "clear-cache").exit_code == 0
    again = run(source, "import", str(archive))  # back into the installation that sealed it
    assert again.exit_code == 0 and "imported 2 entries from 1 file" in again.output, again.output
    assert "trusted" not in again.output and "skipped" not in again.output
    assert hit(source, "/mine", ALICE) and not hit(source, "/mine")


def test_a_seal_covers_the_whole_record_so_it_cannot_be_moved_to_another_credential(install, tmp_path) -> None:
    server = fakeredis.FakeServer()
    source, archive = install(server), tmp_path / "a.warc"
    credentialed_export(source, archive)
    data = archive.read_bytes()
    sealed = re.search(rb"WARC-Buddy-Credentials: ([0-9a-f]{64})", data)
    assert sealed is not None and b"WARC-Buddy-Seal: v1:" in data
    bob = credentials_digest((("Authorization", "Bearer bob-key-0002"),))
    altered = {
        "another credential": data.replace(sealed.group(1), bob.encode()),
        "another answer": data.replace(b"\r\n\r\n{}", b"\r\n\r\n[]"),  # the stored body of each entry
        "another URL": data.replace(b"/mine", b"/mind"),
    }
    for what, content in altered.items():
        assert content != data, what
        (tmp_path / "x.warc").write_bytes(content)
        target = install(server)  # the installation that sealed it, with an empty cache
        run(target, "clear-cache")
        result = run(target, "import", str(tmp_path / "x.warc"))
        assert result.exit_code == 1, (what, result.output)  # was 0 and the answer stored under bob's key
        assert "credentialed, with a seal that does not match the record: altered since its export" in (
            result.output), (what, result.output)
        assert not hit(target, "/mine", (("Authorization", "Bearer bob-key-0002"),))
        assert not hit(target, "/mind", ALICE)


def test_auth_and_sig_in_a_query_are_left_out_of_an_export_and_reported(install, tmp_path) -> None:
    app = install()
    store(app, "/a", "auth=firebase-secret")
    store(app, "/b", "x=1&sig=flickr-signature")
    store(app, "/c", "Signature=aws-v2-signature&AWSAccessKeyId=AKIA")
    store(app, "/d", "page=2")
    result = run(app, "export", "-o", str(tmp_path / "x.warc"))
    assert result.exit_code == 0 and "exported 1 entries" in result.output, result.output  # was 3
    assert "  3 an upstream credential in the query (never exported): auth, sig, signature" in result.output
    data = (tmp_path / "x.warc").read_bytes()
    assert b"page=2" in data and not re.search(rb"firebase-secret|flickr-signature|aws-v2-signature", data)


def test_a_mapping_declares_its_own_credential_parameters_besides_the_default_list(install, tmp_path) -> None:
    app = install(domain={"credential_params": ["Session_Id"]})
    store(app, "/a", "session_id=s-123")
    store(app, "/b", "api_key=k")
    store(app, "/c", "session=public")
    result = run(app, "export", "-o", str(tmp_path / "x.warc"))
    assert "exported 1 entries" in result.output, result.output
    assert "  2 an upstream credential in the query (never exported): api_key, session_id" in result.output
    assert b"s-123" not in (tmp_path / "x.warc").read_bytes()


def test_a_vary_on_a_credential_recorded_by_another_tool_is_refused_unless_trusted(install, tmp_path) -> None:
    answer = head(headers=[("Vary", "Authorization"), ("Content-Length", "2")]) + b"ok"
    (tmp_path / "x.warc").write_bytes(exchange(f"{NOWHERE}/acct", answer, headers=dict(ALICE)))
    app = install(domain={"share_across_credentials": True})  # keyed on the value through Vary alone
    assert "credentials in the file" in run(app, "import", str(tmp_path / "x.warc")).output
    assert entries(app) == {}
    assert "imported 1 entries" in run(app, "import", TRUST, str(tmp_path / "x.warc")).output
    assert hit(app, "/acct", ALICE) and not hit(app, "/acct")


def test_the_documented_default_list_of_credential_parameters_is_the_one_in_use() -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    listed = page.split("The default list:", 1)[1].split(".\n", 1)[0]
    assert sorted(re.findall(r"`([^`]+)`", listed)) == sorted(CREDENTIAL_PARAMS)
