#!/usr/bin/env python3
"""Writes the hand-built starting inputs in fuzz/seeds/<target>/: call sequences for the
coordinator's APIs and a few statements, in each target's input format (see the target's
opening comment), so that a short run starts from inputs that reach deep code instead of
spending its time finding the framing. The protocol targets' seeds are recorded from real
sessions by tests/seeds.rs (the recorded_* files).

    python3 fuzz/seeds/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def field(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack("<H", len(b)) + b


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


# --- protobuf, only what the coordinator's messages use -------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_int(num, v):
    return varint(num << 3) + varint(v)


def pb_bytes(num, v):
    if isinstance(v, str):
        v = v.encode()
    return varint(num << 3 | 2) + varint(len(v)) + v


def table_locks(schema, table, keys):
    rows = b"".join(pb_bytes(3, b"".join(pb_bytes(1, v) for v in key)) for key in keys)
    return pb_bytes(1, schema) + pb_bytes(2, table) + rows


# --- tc_http: [op][route][path][query][body] ------------------------------------------
GET, POST, DELETE = 0, 1, 2
LAST_XID, NO_TOKEN = 0x20, 0x08


def http(op, route, path="", query="", body=""):
    return bytes([op, route]) + field(path) + field(query) + field(body)


begin = http(POST, 0, body=json.dumps({"timeout_ms": 500, "name": "fuzz"}))
write("tc_http", "begin_show_commit", begin
      + http(GET | LAST_XID, 1) + http(POST | LAST_XID, 2) + http(GET | LAST_XID, 1)
      + http(GET, 0, query="status=Committed&limit=5") + http(GET, 6, query="limit=10")
      + http(GET, 7) + http(GET, 8))
write("tc_http", "begin_rollback_retry_resolve", begin
      + http(POST | LAST_XID, 3) + http(POST | LAST_XID, 4) + http(POST | LAST_XID, 5)
      + http(POST | NO_TOKEN, 0) + http(DELETE, 0) + http(GET, 200, path="/v1/nothing"))

# --- tc_grpc: [method][flags][message] ------------------------------------------------
BEGIN, COMMIT, ROLLBACK, STATUS, REGISTER, REPORT, LOCKS, ATTACH = range(8)
XID, BRANCH = 1, 2


def grpc(method, flags, message, *stream):
    return bytes([method, flags | len(stream) << 4]) + field(message) + b"".join(field(m) for m in stream)


locks = pb_bytes(3, table_locks("app", "t", [[b"1"], [b"2"]]))
register = pb_bytes(1, "x") + pb_bytes(2, "db1") + locks + pb_int(5, 10)
hello = pb_bytes(1, pb_bytes(1, "rm-1") + pb_bytes(2, "db1"))
heartbeat = pb_bytes(3, pb_int(1, 1))
announce = pb_bytes(4, pb_bytes(1, "db2"))
begin = grpc(BEGIN, 0, pb_int(1, 300) + pb_bytes(2, "fuzz"))
xid = pb_bytes(1, "x")
write("tc_grpc", "register_report_commit", begin
      + grpc(REGISTER, XID, register) + grpc(LOCKS, XID, pb_bytes(1, "x") + pb_bytes(2, "db1") + locks)
      + grpc(REPORT, XID | BRANCH, xid + pb_int(2, 1) + pb_int(3, 2) + pb_bytes(4, "failed"))
      + grpc(COMMIT, XID, xid) + grpc(STATUS, XID, xid))
write("tc_grpc", "attach_then_rollback", begin
      + grpc(REGISTER, XID, register) + grpc(ATTACH, 0, hello, heartbeat, announce)
      + grpc(ROLLBACK, XID, xid) + grpc(STATUS, XID, xid))

# --- the SQL targets ------------------------------------------------------------------
STATEMENTS = [
    "START GLOBAL TRANSACTION",
    "JOIN GLOBAL TRANSACTION '1-42'",
    "COMMIT GLOBAL",
    "UPDATE account SET balance = balance - 10 WHERE id = 1",
    "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b') ON DUPLICATE KEY UPDATE v = VALUES(v)",
    "DELETE a FROM a JOIN b USING (id) WHERE b.x > ?",
    "REPLACE INTO t SET id = ?, v = ?",
    "SELECT * FROM t WHERE id IN (1, 2) FOR UPDATE; SELECT `we``ird` FROM `s`.`t` LOCK IN SHARE MODE",
    "SAVEPOINT `My``Point`",
    "BEGIN NOT ATOMIC DECLARE x INT; SELECT 1; END",
    "/* ferrata:xid=1-7 */ UPDATE t SET v = 'x\\'y' WHERE id = 3",
]
for i, sql in enumerate(STATEMENTS):
    write("classifier", f"statement_{i}", b"\x00" + sql.encode())
    write("statement_parser", f"statement_{i}", sql.encode() + b"\x001\x00'a'")
