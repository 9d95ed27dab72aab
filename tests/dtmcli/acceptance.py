"""DTM's Python SDK (dtmcli, from PyPI, unchanged) against ferrata-tc: the programs of its
README, pointed at Ferrata's URL. Prints the gids it used as JSON; tests/dtm.rs checks what
became of them and which calls the service got.

usage: acceptance.py <dtm url, .../api/dtmsvr> <service base url>
"""

import json
import sys

from dtmcli import saga, tcc, utils

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

print(json.dumps(out))
