"""Two aggregator hosts on one PostgreSQL, with real devices spread over both and one host killed mid-close.

Each host is its own gunicorn (``fedser-aggregator serve``) with its own instance folder and its own address:
as root, in its own network namespace joined by a veth pair (a real network host, 10.x.y.2); otherwise on a
second loopback address (127.0.0.2). Both get the one server key and admin token through configuration
(``FEDSER_SERVER_KEY_FILE``, ``FEDSER_ADMIN_TOKEN_FILE``). The devices are ``edge_sdk.device.Device`` with
the bundled model: they enroll on one host and pull manifests from the other; updates go to both while a
round closes; host A is SIGKILLed while its close has written the new version and not committed it (the
test hook in ``aggregator.service``).

What must hold: nothing lost (every update a device made is accepted, once), nothing counted twice (each
accepted update is in exactly one round; round and device counters equal the rows), the surviving host
completes the round (its result is exactly the mean of that round's deltas), and every device verifies every
manifest, from either host, with the one key it pinned at enrollment.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings

import numpy as np
import pytest

from edge_sdk.client import ServerClient
from edge_sdk.device import Device, TrainPolicy
from edge_sdk.errors import FedserError
from edge_sdk.manifest import SignedManifest
from edge_sdk.model import bundled_model_paths
from edge_sdk.signing import SigningKey
from edge_sdk.wire import UpdateEnvelope

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout"),
]

POLICY = TrainPolicy(min_examples=4, holdout_every=0, epochs=2, min_steps=20)
LABELS = ("angry", "happy", "neutral", "sad")
K = 4  # ROUND_MIN_UPDATES


def _clip(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(24000, dtype=np.float32) / 16000
    return (0.2 * np.sin(2 * np.pi * (110 + 23 * (seed % 17)) * t) + 0.02 * rng.normal(size=t.size)).astype(
        np.float32)


@pytest.fixture
def fleet(tmp_path):
    psycopg = pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")
    from tools.fleet_sim import POSTGRES_ADMIN_URL, Fleet, loopback_unavailable, netns_unavailable

    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}".strip())
    # FEDSER_MULTIHOST_LOOPBACK=1 runs the loopback set-up even as root (what a machine without root gets).
    prefer_netns = os.environ.get("FEDSER_MULTIHOST_LOOPBACK", "") in ("", "0")
    why_not_netns = netns_unavailable() if prefer_netns else "FEDSER_MULTIHOST_LOOPBACK is set"
    if why_not_netns and loopback_unavailable("127.0.0.2"):
        pytest.skip(f"no second host address: no network namespaces ({why_not_netns}) and "
                    f"{loopback_unavailable('127.0.0.2')}")
    # Posts queue behind the paused close until the kill, however slow the machine: the bounded wait (a 503 after
    # INTAKE_LOCK_TIMEOUT_SECONDS) has its own tests in tests/aggregator/test_round_lock_bounds.py.
    env = {"FEDSER_ROUND_MIN_UPDATES": str(K), "FEDSER_INTAKE_LOCK_TIMEOUT_SECONDS": "120"}
    fl = Fleet(tmp_path / "fleet", n_hosts=2, workers=2, env=env, prefer_netns=prefer_netns)
    # Host A's closes pause after writing the new version, before the commit (read once, at its first close).
    marker = tmp_path / "host-a-paused-before-commit"
    (tmp_path / "fleet" / "host0" / "instance").mkdir(parents=True)
    hooks = tmp_path / "fleet" / "host0" / "instance" / "test-hooks.json"
    hooks.write_text(json.dumps({"pause_before_close_commit": 120, "marker": str(marker)}))
    try:
        fl.start()
    except BaseException:
        fl.close()
        raise
    fl.marker, fl.hooks = marker, hooks
    if fl.mode != "netns":  # said in the summary (-ra): the weaker of the two set-ups ran
        warnings.warn(f"hosts on loopback addresses {[h.net.address for h in fl.hosts]}, not network namespaces: "
                      f"{fl.network.why_not_netns}", stacklevel=1)
    yield fl
    fl.close()


def _lock_waiters(fleet) -> int:
    """Backends of the test database waiting for a lock (requests queued behind the paused close)."""
    import psycopg

    from tools.fleet_sim import POSTGRES_ADMIN_URL

    name = fleet.database_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                            (name,)).fetchone()[0]


def _rows(fleet, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def _post_via(device: Device, host) -> dict:
    device.set_server_url(host.base_url)
    report = device.flush_outbox(base_delay=0.0)
    return {"accepted": report.accepted, "rejected": report.rejected, "error": report.error,
            "pending": report.still_pending}


def _manifest(device: Device, host, version: int) -> bytes:
    """Version ``version``'s signed manifest as ``host`` serves it to ``device`` (a device-signed GET)."""
    client = ServerClient(host.base_url, device_id=device.device_id, sign=device.key.sign)
    return client._request("GET", f"/manifest/{version}")[1]


def test_two_hosts_one_killed_mid_close_lose_nothing_and_count_nothing_twice(fleet, tmp_path):
    a, b = fleet.hosts
    assert a.net.address != b.net.address and a.instance != b.instance
    assert fleet.publish(a, *bundled_model_paths()) == 1
    server_key = SigningKey.load(fleet.shared["key_file"]).verify_key

    # Enroll on one host, then pull from the other: every device pins the one key, and both hosts' manifests
    # verify with it (the blobs a device fetches come from its enrollment host).
    devices: list[Device] = []
    for i in range(6):
        home, other = (a, b) if i % 2 == 0 else (b, a)
        dev = Device(tmp_path / f"dev{i}", train_policy=POLICY)
        dev.enroll(home.base_url, fleet.token(other), name=f"dev{i}")  # a token made on the other host
        assert dev.server_key == server_key and dev.model_version == 1
        dev.set_server_url(other.base_url)
        assert dev.pull_model() is False  # the same version 1 from the other host: nothing new, no error
        devices.append(dev)
    v1_head = {k: v.copy() for k, v in devices[0].global_head.items()}
    made = {}
    for i, dev in enumerate(devices):
        for j in range(5):
            dev.feedback(dev.classify(_clip(10 * i + j)).id, LABELS[(i + j) % 4])
        made[dev.device_id] = [dev.make_update()]
        assert made[dev.device_id][0] is not None

    # Three updates, alternating hosts: round 1 holds 3 of K=4.
    for dev, host in zip(devices[:3], (b, a, b), strict=True):
        out = _post_via(dev, host)
        assert len(out["accepted"]) == 1 and out["accepted"][0]["round_id"] == 1, out
    # The fourth, to host A, fills the round: A's worker aggregates, writes version 2, and pauses uncommitted.
    results: dict[int, dict] = {}

    def post(i, host):
        try:
            results[i] = _post_via(devices[i], host)
        except FedserError as exc:
            results[i] = {"exception": str(exc)}

    threads = [threading.Thread(target=post, args=(3, a), daemon=True)]
    threads[0].start()
    deadline = time.time() + 60
    while not fleet.marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert fleet.marker.exists(), "host A's close never reached the pause before its commit"
    assert fleet.marker.read_text() == "1"
    # While it is paused: one update to each host. Both queue behind the close's lock on round 1.
    for i, host in ((4, b), (5, a)):
        threads.append(threading.Thread(target=post, args=(i, host), daemon=True))
        threads[-1].start()
    deadline = time.time() + 30
    while _lock_waiters(fleet) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert _lock_waiters(fleet) == 2, "the two posts did not queue behind the paused close"
    assert _rows(fleet, "SELECT max(version) FROM model_versions")[0][0] == 1  # version 2 is not committed

    a.kill()  # SIGKILL to host A's master and workers, mid-close
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    # Host A's answers never came: both devices keep their update for a retry. Host B took device 4's (the
    # round's fifth, the first four being committed) and closed round 1 itself.
    assert results[3]["pending"] == 1 and results[5]["pending"] == 1, results
    closing = results[4]["accepted"]
    assert closing and closing[0]["round_id"] == 1 and closing[0]["round_closed"], results[4]
    assert closing[0]["published_version"] == 2
    assert _rows(fleet, "SELECT id, status, num_updates, published_version FROM rounds ORDER BY id") == [
        (1, "closed", 5, 2), (2, "open", 0, None)]

    # The retries go to the surviving host: device 3's was accepted before the kill (a duplicate now, counted
    # once); device 5's never was (accepted now, into round 2, one version stale).
    retry3 = _post_via(devices[3], b)
    assert retry3["accepted"][0]["duplicate"] is True and retry3["accepted"][0]["round_id"] == 1, retry3
    retry5 = _post_via(devices[5], b)
    assert retry5["accepted"][0]["round_id"] == 2 and not retry5["accepted"][0]["duplicate"], retry5

    # Version 2 is exactly the mean of round 1's five deltas (equal counts, FedAvg, server lr 1) on version 1:
    # what host A had written and not committed left nothing behind.
    for dev in devices:
        dev.set_server_url(b.base_url)
        assert dev.pull_model() is True and dev.model_version == 2
    round1 = [_envelope(devices[i]) for i in range(5)]
    for name, head in devices[0].global_head.items():
        expected = v1_head[name] + np.mean([e.deltas()[name] for e in round1], axis=0)
        np.testing.assert_allclose(head, expected, rtol=0, atol=1e-5)

    # Host A comes back (without the hook) and serves the same state; round 2 then closes on host A.
    fleet.hooks.unlink()
    fleet.start_host(a)
    assert fleet.status(a)["current_version"] == 2 and fleet.status(a)["open_round"]["updates"] == 1
    for i, host in ((0, a), (1, b), (2, a)):
        seq = devices[i].make_update()  # remade from the same answers on version 2
        assert seq is not None
        made[devices[i].device_id].append(seq)
        out = _post_via(devices[i], host)
        assert len(out["accepted"]) == 1 and out["accepted"][0]["round_id"] == 2, out
    assert out["accepted"][0]["round_closed"] and out["accepted"][0]["published_version"] == 3
    for i, dev in enumerate(devices):
        dev.set_server_url((a, b)[i % 2].base_url)
        assert dev.pull_model() is True and dev.model_version == 3

    # Every device verifies every version's manifest, from either host, with the key it pinned at enrollment.
    for dev in devices:
        for host in (a, b):
            for version in (1, 2, 3):
                assert SignedManifest.from_bytes(_manifest(dev, host, version), dev.server_key.verify)\
                    .manifest.version == version

    # Nothing lost: every update a device made was accepted, and the database holds exactly those.
    accepted = set()
    for dev in devices:
        items = {i.seq: i.state for i in dev.store.outbox_items()}
        assert items == {seq: "accepted" for seq in made[dev.device_id]}, (dev.device_id, items)
        accepted |= {(dev.device_id, seq) for seq in made[dev.device_id]}
    rows = _rows(fleet, "SELECT device_id, sequence, round_id FROM updates")
    assert {(d, s) for d, s, _ in rows} == accepted and len(rows) == len(accepted) == 9
    # Nothing counted twice: round and device counters equal the rows; versions 1-3, each published once.
    assert _rows(fleet, """SELECT r.id, r.status, r.num_updates, count(u.update_id), r.num_examples,
                                  coalesce(sum(u.num_examples), 0), r.published_version
                           FROM rounds r LEFT JOIN updates u ON u.round_id = r.id GROUP BY r.id ORDER BY r.id""") == [
        (1, "closed", 5, 5, 25, 25, 2), (2, "closed", 4, 4, 20, 20, 3), (3, "open", 0, 0, 0, 0, None)]
    assert _rows(fleet, """SELECT count(*) FROM devices d WHERE d.updates_accepted !=
                           (SELECT count(*) FROM updates u WHERE u.device_id = d.id)""") == [(0,)]
    assert _rows(fleet, "SELECT version, round_id FROM model_versions ORDER BY version") == [
        (1, None), (2, 1), (3, 2)]
    assert _rows(fleet, "SELECT count(*) FROM model_versions WHERE is_current") == [(1,)]
    assert fleet.status(b)["refusals"] == {}


def _envelope(device: Device) -> UpdateEnvelope:
    """The device's first update (the one of round 1), as it sent it."""
    item = min(device.store.outbox_items(), key=lambda i: i.seq)
    return UpdateEnvelope.from_bytes(item.envelope)[0]


def test_fleet_sim_small_run_over_two_hosts_counts_every_update_once(tmp_path):
    """tools.fleet_sim at a small scale: lightweight devices over both hosts, one host SIGKILLed half-way, every
    counter equal to the rows."""
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")
    from tools import fleet_sim

    try:
        fleet_sim.drop_postgres_database(fleet_sim.new_postgres_database())
    except Exception as exc:  # psycopg.OperationalError: no server
        pytest.skip(f"PostgreSQL not reachable at {fleet_sim.POSTGRES_ADMIN_URL}: {exc}")
    if fleet_sim.netns_unavailable() and fleet_sim.loopback_unavailable("127.0.0.2"):
        pytest.skip("no second host address (no network namespaces, no 127.0.0.2)")
    out = tmp_path / "report.json"
    assert fleet_sim.main(["--devices", "40", "--interval", "2", "--duration", "8", "--min-updates", "10",
                           "--concurrency", "8", "--kill-host-after", "4", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    m = report["measured"]
    assert report["enrollment"]["devices"] == 40 and report["enrollment"]["pinned_keys"] == 1
    assert all(n > 0 for n in m["per_host"].values()) and len(m["per_host"]) == 2, m["per_host"]
    # host1 answers nothing after its kill (but what was in flight as it died: at most the 8 concurrent posts)
    assert m["killed"]["host"] == "host1"
    assert 0 <= m["per_host"]["host1"] - m["killed"]["accepted_before"].get("host1", 0) <= 8
    assert m["per_host"]["host0"] > m["killed"]["accepted_before"]["host0"]  # the survivor went on
    assert m["rounds_closed"] >= 1 and m["manifest_verify_failures"] == 0
    assert set(m["refused"]) <= {"stale_base", "already_contributed"}, m["refused"]
    c = m["consistency"]
    assert c["rounds_whose_count_differs_from_rows"] == 0 and c["devices_whose_count_differs_from_rows"] == 0
    # every acceptance a device saw is a row; a post whose answer was lost (counted as an error) may be one too
    lost_answers = sum(n for kind, n in m["errors"].items() if kind.startswith("post:"))
    assert m["accepted"] <= c["updates_rows"] <= m["accepted"] + lost_answers, (c, m["errors"])


def test_capacity_model_arithmetic():
    from tools.fleet_sim import CapacityModel

    m = CapacityModel(devices=1000, interval_s=20, update_bytes=34064, hosts=2, per_host_intake=200, min_updates=200)
    assert m.offered == 50 and m.toast_chunks == 18
    # a round every P = 200 / accepted s; the share of syncs that find a new version: (20 / P)(1 - exp(-P / 20))
    period = 200 / m.accepted
    assert m.posting_share == pytest.approx((20 / period) * (1 - np.exp(-period / 20)), rel=1e-6)
    assert 0.85 < m.posting_share < 0.92
    big = CapacityModel(devices=10**6, interval_s=3600, update_bytes=34064, hosts=1, per_host_intake=200,
                        min_updates=1000)
    assert big.hosts_needed == 2 and big.accepted == 200  # 278 offered/s: one host saturates, two are needed


def test_namespaces_left_by_a_killed_run_are_removed_and_live_runs_are_left_alone():
    """A run killed before its finalizers (SIGKILL, a pytest timeout) leaves its namespaces behind; the next run
    removes those whose creating process is gone, and never one whose process still lives."""
    import subprocess
    import sys

    from tools import fleet_sim

    why = fleet_sim.netns_unavailable()
    if why:
        pytest.skip(f"no network namespaces: {why}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free (reuse within this test is vanishingly unlikely)
    tag = os.urandom(3).hex()
    stale, live = f"fedser-{dead.pid}-{tag}-0", f"fedser-{os.getpid()}-{tag}-1"
    for name in (stale, live):
        fleet_sim._ip("netns", "add", name)
    try:
        removed = fleet_sim.Network.remove_stale_namespaces()
        names = fleet_sim._ip("netns", "list").stdout
        assert stale in removed and stale not in names
        assert live not in removed and live in names
    finally:
        for name in (stale, live):
            fleet_sim._ip("netns", "del", name, check=False)
