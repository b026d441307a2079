"""Real Python pools through the proxy (#22): psycopg_pool with and without
its `check`, SQLAlchemy's QueuePool with and without `pool_pre_ping`, and one
psycopg connection held for the whole run that uses a `SET` and prepared
statements. Each queries about 20 times a second, no retries, for the given
seconds; prints one JSON object: per client, the queries run, the failures
(first few messages) and the users it saw, in order.

    python pools.py 'host=127.0.0.1 port=PORT user=app dbname=postgres' SECONDS
"""

import json
import sys
import threading
import time

import psycopg
import sqlalchemy
from psycopg_pool import ConnectionPool

DSN, SECONDS = sys.argv[1], float(sys.argv[2])
PAUSE = 0.05
results = {}


def run(name, query):
    users, failures, queries = [], [], 0
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        queries += 1
        try:
            user = query()
            if not users or users[-1] != user:
                users.append(user)
        except Exception as e:  # every failure is what the test counts
            failures.append(f"{type(e).__name__}: {e}".strip())
        time.sleep(PAUSE)
    results[name] = {"queries": queries, "failed": len(failures), "failures": failures[:10], "users": users}


def psycopg_pool(check):
    kwargs = {"check": ConnectionPool.check_connection} if check else {}
    pool = ConnectionPool(DSN, min_size=4, max_size=4, open=True, **kwargs)

    def query():
        with pool.connection() as conn:
            return conn.execute("SELECT current_user").fetchone()[0]

    return pool, query


def sqlalchemy_pool(pre_ping):
    url = "postgresql+psycopg:///?" + "&".join(
        f"{k}={v}" for k, v in (p.split("=", 1) for p in DSN.split())
    )
    engine = sqlalchemy.create_engine(url, pool_size=4, pool_pre_ping=pre_ping)

    def query():
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT current_user")).scalar()

    return engine, query


def held():
    conn = psycopg.connect(DSN)
    conn.execute("SET statement_timeout = '7s'")
    conn.commit()

    def query():
        # A server-side prepared statement (prepare=True: from the first use).
        row = conn.execute(
            "SELECT current_user, current_setting('statement_timeout'), %s::int",
            (42,),
            prepare=True,
        ).fetchone()
        conn.commit()
        if row[1:] != ("7s", 42):
            raise AssertionError(f"the session's state was lost: {row[1:]}")
        return row[0]

    return conn, query


clients = {
    "psycopg_pool": psycopg_pool(False),
    "psycopg_pool check": psycopg_pool(True),
    "SQLAlchemy": sqlalchemy_pool(False),
    "SQLAlchemy pre_ping": sqlalchemy_pool(True),
    "psycopg held": held(),
}
threads = [threading.Thread(target=run, args=(name, q)) for name, (_, q) in clients.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
for owner, _ in clients.values():
    owner.close() if hasattr(owner, "close") else owner.dispose()
print(json.dumps(results))
