"""Commands every pod has, for the tests that start processes inside pods.

A pod without an image sees the node's files minus the hidden ones (`/root`, `/home`,
the node's state) and with its own `/tmp`, `/var/tmp` and `/run`, so the venv running
the tests (`sys.executable`) may not exist in it: a checkout under `/root` or `/tmp`.
Pod commands use the node's interpreter and only its standard library. Commands run
on the host or in a node (`corral node-exec`) keep `sys.executable`.
"""

POD_PYTHON = "/usr/bin/python3"
