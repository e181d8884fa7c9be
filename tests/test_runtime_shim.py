"""The container shim, both builds (native shim.c and shim.py): same behaviour, same records.

Each test runs real containers in a network namespace it makes and removes.
"""

from __future__ import annotations

import asyncio
import os
import signal

from corral.runtime import containers


async def launch(
    pod_dir: str, argv: list[str], name: str = "c"
) -> tuple[containers.ContainerRecord, asyncio.subprocess.Process]:
    hosts = os.path.join(pod_dir, "hosts")
    with open(hosts, "w") as f:
        f.write("10.9.8.7\tpodx\n")
    return await containers.launch(
        pod_dir,
        name,
        0,
        argv=argv,
        env={"FOO": "bar baz"},
        working_dir="/tmp",
        netns=os.path.join(pod_dir, "netns", "cni-test"),
        hostname="podx",
        binds=[(hosts, "/etc/hosts")],
        cgroups=[],
    )


async def test_runs_command_in_its_sandbox_and_records_exit(shim: str, pod_dir: str) -> None:
    rec, proc = await launch(
        pod_dir, ["sh", "-c", 'echo "$FOO|$(hostname)|$$|$(pwd)"; cat /etc/hosts; exit 3']
    )
    rc = await asyncio.wait_for(containers.wait_exit(rec, proc), 30)
    ex = containers.exit_info(pod_dir, "c", rec, rc)
    assert (ex.exit_code, ex.signal) == (3, 0)
    assert ex.finished_at >= ex.started_at
    out = containers.tail(rec.log, 10)
    # Env, hostname (own UTS ns), PID 1 (own PID ns), working dir, the pod's hosts file.
    assert "bar baz|podx|1|/tmp" in out
    assert "10.9.8.7\tpodx" in out


async def test_sigterm_reaches_pid1_and_missing_command_is_127(shim: str, pod_dir: str) -> None:
    rec, proc = await launch(
        pod_dir, ["sh", "-c", 'trap "exit 7" TERM; echo up; while :; do sleep 0.1; done']
    )
    for _ in range(600):  # the trap is set once it says so
        if "up" in containers.tail(rec.log, 1):
            break
        await asyncio.sleep(0.05)
    await containers.stop(rec, proc, grace=20)
    ex = containers.exit_info(pod_dir, "c", rec, proc.returncode)
    assert ex.exit_code == 7
    assert not rec.init_alive()

    rec, proc = await launch(pod_dir, ["no-such-command-xyz"], name="d")
    rc = await asyncio.wait_for(containers.wait_exit(rec, proc), 30)
    assert containers.exit_info(pod_dir, "d", rec, rc).exit_code == 127
    assert "cannot run" in containers.tail(rec.log, 5)


async def test_killed_container_records_the_signal(shim: str, pod_dir: str) -> None:
    rec, proc = await launch(pod_dir, ["sleep", "300"])
    os.kill(rec.init_pid, signal.SIGKILL)
    rc = await asyncio.wait_for(containers.wait_exit(rec, proc), 30)
    ex = containers.exit_info(pod_dir, "c", rec, rc)
    assert (ex.exit_code, ex.signal) == (137, signal.SIGKILL)
