"""Which container of a pod a request means, and its state: the checks every way into a
pod shares (the API server's `log`/`exec`, the node's API, `corral logs`/`exec`), with
kube-apiserver's and kubelet's wording."""

from __future__ import annotations

from typing import Any

from corral.api.objects import Pod


class PodAccessError(Exception):
    """The pod or container cannot be reached as asked; `code` is the HTTP status."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


def container_name(pod: Pod, name: str | None) -> str:
    """The container a request means: `name`, or the only one (init containers by name)."""
    names = [c.name for c in pod.spec.containers]
    inits = [c.name for c in pod.spec.init_containers]
    if not name:
        if len(names) > 1:
            raise PodAccessError(
                f"a container name must be specified for pod {pod.name}, "
                f"choose one of: [{' '.join(names)}]"
                + (f" or one of the init containers: [{' '.join(inits)}]" if inits else "")
            )
        return names[0]
    if name not in names + inits:
        raise PodAccessError(f"container {name} is not valid for pod {pod.name}")
    return name


def container_status(pod: Pod, container: str) -> Any:
    sts = [*pod.status.container_statuses, *pod.status.init_container_statuses]
    return next((c for c in sts if c.name == container), None)


def restarts(pod: Pod, container: str) -> int:
    st = container_status(pod, container)
    return st.restart_count if st else 0


def instance_changed(old: Pod, cur: Pod | None, container: str) -> bool:
    """Whether a follow of `old`'s container should end: the pod is gone or replaced,
    or the container stopped or restarted."""
    if cur is None or cur.metadata.uid != old.metadata.uid:
        return True
    st = container_status(cur, container)
    return st is None or "running" not in st.state or st.restart_count != restarts(old, container)
