"""DTM's Python SDK (dtmcli, from PyPI, unchanged) against ferrata-tc: the programs of its
README (sagas, TCC, 2-phase messages), pointed at Ferrata's URL. Prints the gids it used as JSON; tests/dtm.rs checks what
became of them and which calls the service got.

usage: acceptance.py <dtm url, .../api/dtmsvr> <service base url>
"""

import json
import sys

from dtmcli import msg, saga, tcc, utils

dtm, svc = sys.argv[1], sys.argv[2]
out = {}


def transfer_saga(second_action):
    gid = utils.gen_gid(dtm)
    s = saga.Saga(dtm, gid)
    s.add({"amount": 30}, svc + "/ok/trans-out", svc + "/ok/trans-out-compensate")
    s.add({"amount": 30}, svc + second_action, svc + "/ok/trans-in-compensate")
    s.submit()
    return gid


out["saga"] = transfer_saga("/ok/trans-in")
out["failing_saga"] = transfer_saga("/no/trans-in")


def tcc_transfer(second_try):
    def branches(t):
        t.call_branch({"amount": 30}, svc + "/ok/try-out", svc + "/ok/confirm-out", svc + "/ok/cancel-out")
        t.call_branch({"amount": 30}, svc + second_try, svc + "/ok/confirm-in", svc + "/ok/cancel-in")

    gid = utils.gen_gid(dtm)
    # tcc_global_transaction answers the gid when it submitted, "" when it aborted.
    return gid, tcc.tcc_global_transaction(dtm, gid, branches)


gid, answered = tcc_transfer("/ok/try-in")
assert answered == gid, (gid, answered)
out["tcc"] = gid
gid, answered = tcc_transfer("/no/try-in")
assert answered == "", (gid, answered)
out["tcc_cancelled"] = gid



def transfer_msg(gid):
    m = msg.Msg(dtm, gid)
    m.add({"amount": 30}, svc + "/ok/msg-out")
    m.add({"amount": 30}, svc + "/ok/msg-in")
    return m


# A 2-phase message submitted at once.
gid = utils.gen_gid(dtm)
transfer_msg(gid).submit()
out["msg"] = gid

# DoAndSubmit: prepared, the local work done, submitted; and one whose local work fails
# for good, aborted.
gid = utils.gen_gid(dtm)
transfer_msg(gid).do_and_submit(svc + "/ok/query-prepared", lambda barrier: None)
out["msg_done"] = gid


def refuse(barrier):
    raise utils.DTMFailureError("insufficient funds")


gid = utils.gen_gid(dtm)
try:
    transfer_msg(gid).do_and_submit(svc + "/ok/query-prepared", refuse)
    raise AssertionError("the refusal was not raised")
except utils.DTMFailureError:
    pass
out["msg_aborted"] = gid

# Prepared, and the application gone before its submit: after timeout_to_fail the
# coordinator asks query_prepared, which says the local work committed.
gid = utils.gen_gid(dtm)
m = transfer_msg(gid)
m.trans_base.timeout_to_fail = 1
m.prepare(svc + "/ok/query-prepared")
out["msg_orphan"] = gid

print(json.dumps(out))
