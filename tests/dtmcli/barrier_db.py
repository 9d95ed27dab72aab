"""DTM's Python SDK (dtmcli, unchanged) running 2-phase messages with DTM's barrier in a
MariaDB database reached through ferrata-proxy (DoAndSubmitDB), against ferrata-tc: the
application serves query_prepared itself, answered by the SDK's barrier. Prints the gids it
used as JSON; tests/outbox.rs checks what became of them.

usage: barrier_db.py <dtm url, .../api/dtmsvr> <service base url> <mysql host> <port> <user> <password>
"""

import http.server
import json
import sys
import threading
import urllib.parse

import pymysql
from dtmcli import barrier, msg, utils

dtm, svc, host, port, user, password = sys.argv[1:7]
out = {}
asked = {}
# The SDK prints its SQL: all of that goes to stderr, the JSON alone to stdout.
result = sys.stdout
sys.stdout = sys.stderr


def connect():
    return pymysql.connect(host=host, port=int(port), user=user, password=password, database="test", autocommit=False)


class QueryPrepared(http.server.BaseHTTPRequestHandler):
    """The application's query_prepared: the SDK's barrier says whether the local
    transaction committed (SUCCESS) or never will (409 FAILURE)."""

    def do_GET(self):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
        gid = query.get("gid", "")
        try:
            barrier.BranchBarrier("msg", gid, "00", "msg").query_prepared(connect().cursor())
            status, body = 200, '{"dtm_result": "SUCCESS"}'
        except utils.DTMFailureError:
            status, body = 409, '{"dtm_result": "FAILURE"}'
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body.encode())
        asked.setdefault(gid, threading.Event()).set()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QueryPrepared)
threading.Thread(target=server.serve_forever, daemon=True).start()
query_prepared = "http://127.0.0.1:%d/query-prepared" % server.server_address[1]


def order_msg(gid, order):
    m = msg.Msg(dtm, gid)
    m.add({"order": order}, svc + "/ok/order-paid")
    return m


def insert_order(order):
    return lambda cursor: cursor.execute("INSERT INTO orders VALUES (%d, 30)" % order)


def refuse(cursor):
    cursor.execute("INSERT INTO orders VALUES (2, 30)")
    raise utils.DTMFailureError("insufficient funds")


# Prepared, the order and the barrier row committed in one local transaction, submitted.
gid = utils.gen_gid(dtm)
order_msg(gid, 1).do_and_submit_db(query_prepared, connect().cursor(), insert_order(1))
out["db_done"] = gid

# The local work refuses: rolled back, the message aborted.
gid = utils.gen_gid(dtm)
try:
    order_msg(gid, 2).do_and_submit_db(query_prepared, connect().cursor(), refuse)
    raise AssertionError("the refusal was not raised")
except utils.DTMFailureError:
    pass
out["db_refused"] = gid

# Prepared and committed locally, then the application gone before its submit: past
# timeout_to_fail the coordinator asks query_prepared, whose barrier row says committed.
gid = utils.gen_gid(dtm)
m = order_msg(gid, 3)
# Long enough for the local transaction to have inserted its barrier row first.
m.trans_base.timeout_to_fail = 3
m.prepare(query_prepared)
barrier.BranchBarrier("msg", gid, "00", "msg").call(connect().cursor(), insert_order(3))
out["db_orphan"] = gid

# Prepared, and the application gone before its local work: the barrier row says never.
gid = utils.gen_gid(dtm)
m = order_msg(gid, 4)
m.trans_base.timeout_to_fail = 1
m.prepare(query_prepared)
out["db_never"] = gid

# Answers query_prepared until the coordinator asked about both orphans.
for name in ("db_orphan", "db_never"):
    if not asked.setdefault(out[name], threading.Event()).wait(60):
        raise AssertionError("the coordinator never asked query_prepared about " + name)
print(json.dumps(out), file=result)
