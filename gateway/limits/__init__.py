"""Rate limits and credits: policies, the GCRA decision, where its state lives, and the answers.

Owns: ``policy`` (the ``Policy`` record and its rules), ``gcra`` (the algorithm and the
in-process state), ``redis_state`` (the same algorithm in one Redis script, a turn's calls in one
round trip), ``gate`` (what the proxy asks: pass or refuse, and the headers to add), ``answers``
(the ``RateLimit`` fields and the 429 problem body). Must not: look keys up, touch the store or
forward anything; the identity a request resolved to carries the policies of its key and principal.
"""
