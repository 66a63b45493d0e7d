#!/usr/bin/env python3
"""Peak memory of a report over a ledger of 1,000,000 journal entries.

Builds a ledger with the release binary's own schema (`training-credits
migrate`), fills it with N journal entries spread over 1,000 accounts, then
runs `training-credits report` for the transactions (CSV and XLSX) and
credits reports and prints each run's peak resident set size, as the kernel
measured it (getrusage of the waited child). SQLite always; PostgreSQL too
when `--postgres URL` names a server whose `postgres` database can create
another.

    cargo build --release && python3 bench/report_memory.py [--entries N] [--postgres postgres://postgres@127.0.0.1:5432/postgres]
"""

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time

BINARY = os.path.join(os.path.dirname(__file__), "..", "target", "release", "training-credits")
ACCOUNTS = 1000


def peak_kib(pid):
    """VmHWM of a running process: the peak resident set of its own program
    (reset at exec, so the forking Python's memory does not count)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run(args, env):
    """Runs the binary; returns (seconds, peak RSS in MiB). The peak is read
    every 5 ms while it runs; VmHWM only grows, so the last reading before
    exit is the peak of all but its last few milliseconds."""
    started = time.monotonic()
    child = subprocess.Popen([BINARY, *args], env={**os.environ, **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while child.poll() is None:
        peak = max(peak, peak_kib(child.pid))
        time.sleep(0.005)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {child.returncode}")
    return time.monotonic() - started, peak / 1024


def fill_sqlite(path, entries):
    db = sqlite3.connect(path)
    now = int(time.time() * 1_000_000)
    year = 365 * 86400 * 1_000_000
    db.executescript("BEGIN")
    db.executemany(
        "INSERT INTO accounts VALUES (?, ?, 'active', 'automatic', ?, ?, '{\"kind\":\"all\"}', NULL, NULL, ?)",
        [(f"acct-{a}", f"Account {a}", f"CODE-{a:06d}", f"CODE{a:06d}", now) for a in range(ACCOUNTS)])
    db.executemany("INSERT INTO owners VALUES (?, ?, 'Owner', 0)",
                   [(f"owner{a}@example.com", f"acct-{a}") for a in range(ACCOUNTS)])
    db.executemany(
        "INSERT INTO lots (account_id, purchase_id, credits, remaining, held, expired, purchased_at, expires_at, fingerprint)"
        " VALUES (?, ?, ?, ?, 0, 0, ?, ?, '')",
        [(f"acct-{a}", f"p-{a}", 100_000_000, 100_000_000 - (entries // ACCOUNTS) * 100, now, now + year)
         for a in range(ACCOUNTS)])
    db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1) "
        "INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id) "
        "SELECT ? + i, 'acct-' || (i % ?), 'redeem', 'p-' || (i % ?), 'req-' || i, -100, 0, 100000000 - 100 * (i / ?), "
        "'learner' || i || '@example.com', 'ev-' || i FROM n",
        (entries, now, ACCOUNTS, ACCOUNTS, ACCOUNTS))
    db.commit()
    db.close()


def fill_postgres(url, entries):
    year = "interval '1 year'"
    sql = f"""
BEGIN;
INSERT INTO accounts SELECT 'acct-' || a, 'Account ' || a, 'active', 'automatic', 'CODE-' || a, 'CODE' || a,
  '{{"kind":"all"}}', NULL, NULL, now() FROM generate_series(0, {ACCOUNTS - 1}) a;
INSERT INTO owners SELECT 'owner' || a || '@example.com', 'acct-' || a, 'Owner', 0 FROM generate_series(0, {ACCOUNTS - 1}) a;
INSERT INTO lots (account_id, purchase_id, credits, remaining, held, expired, purchased_at, expires_at, fingerprint)
  SELECT 'acct-' || a, 'p-' || a, 100000000, 100000000 - {entries // ACCOUNTS} * 100, 0, 0, now(), now() + {year}, ''
  FROM generate_series(0, {ACCOUNTS - 1}) a;
INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT now() + i * interval '1 microsecond', 'acct-' || (i % {ACCOUNTS}), 'redeem', 'p-' || (i % {ACCOUNTS}), 'req-' || i,
  -100, 0, 100000000 - 100 * (i / {ACCOUNTS}), 'learner' || i || '@example.com', 'ev-' || i
  FROM generate_series(0, {entries - 1}) i;
COMMIT;
"""
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url], input=sql, text=True, check=True,
                   stdout=subprocess.DEVNULL)


def measure(label, database_url, workdir):
    env = {"DATABASE_URL": database_url}
    rows = []
    for kind, fmt in [("transactions", "csv"), ("transactions", "xlsx"), ("credits", "csv")]:
        out = os.path.join(workdir, f"{label}-{kind}.{fmt}")
        seconds, peak = run(["report", kind, "--format", fmt, "--out", out], env)
        rows.append((label, kind, fmt, seconds, peak, os.path.getsize(out)))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--postgres", help="admin URL of a PostgreSQL server (its `postgres` database)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "ledger.db")
        url = f"sqlite://{path}"
        run(["migrate"], {"DATABASE_URL": url})
        fill_sqlite(path, args.entries)
        results += measure("sqlite", url, workdir)
        if args.postgres:
            name = f"tc_bench_{os.getpid()}"
            subprocess.run(["psql", "-q", args.postgres, "-c", f"CREATE DATABASE {name}"], check=True)
            try:
                pg_url = args.postgres.rsplit("/", 1)[0] + "/" + name
                run(["migrate"], {"DATABASE_URL": pg_url})
                fill_postgres(pg_url, args.entries)
                results += measure("postgres", pg_url, workdir)
            finally:
                subprocess.run(["psql", "-q", args.postgres, "-c", f"DROP DATABASE {name} WITH (FORCE)"], check=True)
    print(f"{'backend':<9} {'report':<13} {'format':<6} {'seconds':>8} {'peak RSS MiB':>13} {'file MiB':>9}")
    for label, kind, fmt, seconds, peak, size in results:
        print(f"{label:<9} {kind:<13} {fmt:<6} {seconds:>8.1f} {peak:>13.1f} {size / 2**20:>9.1f}")
    print(f"({args.entries:,} journal entries over {ACCOUNTS} accounts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
