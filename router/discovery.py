"""Where the fleet's instances come from: a static list, Kubernetes, or self-registration.

Every source implements `Discovery` (`start(registry)` / `stop()`) and writes into the
`router.registry.InstanceRegistry`, touching only the instances it produced:

- `StaticDiscovery`: the `discovery.static` list of the router config.
- `KubernetesDiscovery`: EndpointSlices (discovery.k8s.io/v1) or Pods selected by label,
  through the official `kubernetes` client. It lists, then watches from the list's
  resourceVersion with bookmarks; a 410 Gone (history compacted while the watch was
  down) or any failure to resume means a re-list that is reconciled against what this
  source had (what disappeared is removed); it also re-lists every `resync_s`, and
  reconnects with exponential backoff. The client is blocking, so the list/watch loop
  runs on its own thread and hands events to the event loop, which alone touches the
  registry.
- `AdminRegistration`: instances that register themselves through the Admin gRPC
  service; each holds a lease it renews by heartbeat, and an expired lease removes it.
  Leases live in the state store, so any replica may receive the heartbeat.

`build_discovery(section, where)` builds the sources from the router config section
`discovery:`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from router.registry import InstanceRegistry
from router.state import InstanceRecord, cancel_and_wait
from tokenyard.config import ConfigError, check_keys, get

log = logging.getLogger(__name__)


class Discovery(ABC):
    """A source of instances; it owns (adds, updates, removes) only the ones it produced."""

    @abstractmethod
    async def start(self, registry: InstanceRegistry) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...


# ======================================================================================
# Static
# ======================================================================================


class StaticDiscovery(Discovery):
    def __init__(self, entries: list[InstanceRecord]) -> None:
        self.entries = [replace(e, source="static") for e in entries]

    async def start(self, registry: InstanceRegistry) -> None:
        """Upsert the configured instances; static instances the registry loaded from a
        shared store that the config no longer lists are removed (the replicas of one
        deployment share one config). An operator's drain or cordon stored earlier is kept."""
        wanted = {r.instance_id for r in self.entries}
        for record in registry.records():
            if record.source == "static" and record.instance_id not in wanted:
                registry.remove(record.instance_id)
        for record in self.entries:
            found = registry.find(record.instance_id)
            if found is not None and found[0].draining and not record.draining:
                record = replace(record, draining=True)
            if found is not None and found[0].cordon is not None:  # an operator's cordon stays too
                record = replace(record, cordon=found[0].cordon)
            registry.upsert(record)

    async def stop(self) -> None:
        return None


def _instance_id_from_url(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def parse_static_entries(raw: Any, where: str) -> list[InstanceRecord]:
    """`static: [{url, model, gpu, pool, tp, id, grpc, labels}]`."""
    if not isinstance(raw, list):
        raise ConfigError(where, f"expected a list of instances ({{url, model, ...}}), got {raw!r}")
    records: list[InstanceRecord] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        path = f"{where}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(path, f"expected a mapping with url and model, got {entry!r}")
        check_keys(entry, ("url", "model", "gpu", "pool", "tp", "id", "grpc", "labels"), path)
        url = get(entry, "url", str, path)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ConfigError(f"{path}.url", f"expected http://host:port, got {url!r}")
        gpu = get(entry, "gpu", str, path, default="unknown")
        labels = get(entry, "labels", dict, path, default={})
        record = InstanceRecord(
            instance_id=get(entry, "id", str, path, default=_instance_id_from_url(url)),
            url=url.rstrip("/"),
            model=get(entry, "model", str, path),
            gpu=gpu,
            pool=get(entry, "pool", str, path, default=gpu),
            tp=get(entry, "tp", int, path, default=1, minimum=1),
            grpc_address=get(entry, "grpc", str, path, default=None),
            labels={str(k): str(v) for k, v in labels.items()},
            source="static",
        )
        if record.instance_id in seen:
            raise ConfigError(f"{path}.id", f"duplicate instance id {record.instance_id!r}")
        seen.add(record.instance_id)
        records.append(record)
    return records


# ======================================================================================
# Kubernetes
# ======================================================================================

DEFAULT_MODEL_LABEL = "tokenyard.io/model"
DEFAULT_GPU_LABEL = "tokenyard.io/gpu"
DEFAULT_POOL_LABEL = "tokenyard.io/pool"
DEFAULT_TP_LABEL = "tokenyard.io/tp"


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    namespace: str = "default"
    label_selector: str = ""
    kind: str = "endpointslices"  # or "pods"
    port: int | None = None  # engine HTTP port; default: the slice's/pod's port named port_name
    port_name: str = "http"
    grpc_port: int | None = None  # Worker gRPC port; default: the port named "grpc", if any
    model_label: str = DEFAULT_MODEL_LABEL
    gpu_label: str = DEFAULT_GPU_LABEL
    pool_label: str = DEFAULT_POOL_LABEL
    tp_label: str = DEFAULT_TP_LABEL
    default_model: str | None = None  # when an object has no model label
    api_url: str | None = None  # API server; default: in-cluster config, then kubeconfig
    resync_s: float = 300.0
    watch_timeout_s: float = 240.0
    backoff_min_s: float = 0.2
    backoff_max_s: float = 30.0


def _resolve(done: asyncio.Future[None]) -> None:
    """Resolve `done` unless it already is (the loop runs this; the watch thread schedules it)."""
    if not done.done():
        done.set_result(None)


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _tp(labels: Mapping[str, str], key: str) -> int:
    try:
        return max(1, int(labels.get(key, "1")))
    except ValueError:
        return 1


def records_from_pod(pod: Mapping[str, Any], cfg: KubernetesSettings) -> dict[str, InstanceRecord]:
    """A Running pod with Ready=True is an instance; one with a deletionTimestamp that is
    still running is draining (it finishes its requests); anything else is none."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    ip = status.get("podIP")
    if status.get("phase") != "Running" or not ip:
        return {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    terminating = meta.get("deletionTimestamp") is not None
    if not ready and not terminating:
        return {}
    model = labels.get(cfg.model_label) or cfg.default_model
    if not model:
        log.warning("pod has no model label; ignored", extra={
            "pod": meta.get("name"), "namespace": meta.get("namespace"), "label": cfg.model_label})
        return {}
    port, grpc_port = cfg.port, cfg.grpc_port
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if port is None and p.get("name") == cfg.port_name:
                port = p.get("containerPort")
            if grpc_port is None and p.get("name") == "grpc":
                grpc_port = p.get("containerPort")
    port = port or 8000
    gpu = labels.get(cfg.gpu_label, "unknown")
    iid = f"{meta.get('namespace', cfg.namespace)}/{meta.get('name')}"
    return {iid: InstanceRecord(
        instance_id=iid, url=_url(ip, port), model=model, gpu=gpu,
        pool=labels.get(cfg.pool_label, gpu), tp=_tp(labels, cfg.tp_label),
        grpc_address=_hostport(ip, grpc_port) if grpc_port else None,
        labels=labels, source="kubernetes", draining=terminating)}


def records_from_endpoint_slice(eps: Mapping[str, Any], cfg: KubernetesSettings) -> dict[str, InstanceRecord]:
    """Endpoints with conditions.ready are instances; terminating but still serving ones
    are draining; the others are none. Model/GPU/pool come from the slice's labels
    (the EndpointSlice controller copies the Service's labels onto its slices)."""
    meta = eps.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    model = labels.get(cfg.model_label) or cfg.default_model
    if not model:
        log.warning("EndpointSlice has no model label; ignored", extra={
            "slice": meta.get("name"), "namespace": meta.get("namespace"), "label": cfg.model_label})
        return {}
    port, grpc_port = cfg.port, cfg.grpc_port
    ports = eps.get("ports") or []
    for p in ports:
        if port is None and p.get("name") == cfg.port_name:
            port = p.get("port")
        if grpc_port is None and p.get("name") == "grpc":
            grpc_port = p.get("port")
    if port is None and ports:
        port = ports[0].get("port")
    port = port or 8000
    namespace = meta.get("namespace", cfg.namespace)
    gpu = labels.get(cfg.gpu_label, "unknown")
    out: dict[str, InstanceRecord] = {}
    for endpoint in eps.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses:
            continue
        cond = endpoint.get("conditions") or {}
        # API semantics: ready and serving nil mean true; terminating nil means false.
        ready = cond.get("ready") is not False
        serving = cond.get("serving", ready) is not False
        terminating = cond.get("terminating") is True
        if terminating:
            if not serving:
                continue
            draining = True
        elif ready:
            draining = False
        else:
            continue
        ip = addresses[0]
        target = endpoint.get("targetRef") or {}
        iid = f"{namespace}/{target['name']}" if target.get("name") else f"{namespace}/{_hostport(ip, port)}"
        out[iid] = InstanceRecord(
            instance_id=iid, url=_url(ip, port), model=model, gpu=gpu,
            pool=labels.get(cfg.pool_label, gpu), tp=_tp(labels, cfg.tp_label),
            grpc_address=_hostport(ip, grpc_port) if grpc_port else None,
            labels=labels, source="kubernetes", draining=draining)
    return out


class KubernetesDiscovery(Discovery):
    """List + watch Pods or EndpointSlices (see the module docstring).

    `stats` counts lists, watches, 410s, bookmarks and errors; `resource_version` is the
    last one seen (bookmarks included). Both are for metrics and tests.
    """

    def __init__(self, settings: KubernetesSettings, *, configuration: Any = None) -> None:
        if settings.kind not in ("endpointslices", "pods"):
            raise ValueError(f"kind must be endpointslices or pods, got {settings.kind!r}")
        self.settings = settings
        self._configuration = configuration
        self._registry: InstanceRegistry | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stopping = threading.Event()
        self._watch: Any = None  # the kubernetes.watch.Watch in flight, to stop it
        self._thread_done: asyncio.Future[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._objects: dict[str, dict[str, InstanceRecord]] = {}  # object key -> its instances
        self._owned: dict[str, InstanceRecord] = {}  # what this source put in the registry
        self._synced = asyncio.Event()
        self.resource_version: str | None = None
        self.stats = {"lists": 0, "watches": 0, "gone": 0, "bookmarks": 0, "errors": 0, "events": 0}

    # -- asyncio side --------------------------------------------------------------------
    async def start(self, registry: InstanceRegistry, *, initial_sync_timeout_s: float = 10.0) -> None:
        """Start the list/watch thread; wait (bounded) for the first list to be applied."""
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self._consumer = asyncio.create_task(self._consume(), name="k8s-discovery-apply")
        # A thread of its own: the watch blocks for minutes and must not hold a slot of
        # the default executor that other code awaits on.
        done: asyncio.Future[None] = self._loop.create_future()
        self._thread_done = done

        def run() -> None:
            try:
                self._run_blocking()
            finally:
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # loop already closed
                    self._loop.call_soon_threadsafe(_resolve, done)

        threading.Thread(target=run, name=f"k8s-discovery-{self.settings.kind}", daemon=True).start()
        try:
            async with asyncio.timeout(initial_sync_timeout_s):
                await self._synced.wait()
        except TimeoutError:
            log.warning("Kubernetes discovery has not listed yet; continuing, it keeps retrying",
                        extra={"kind": self.settings.kind, "namespace": self.settings.namespace})

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread_done is not None:
            # Watch.stop() can only cut the socket once the watch response has arrived,
            # so a watch just being opened needs the stop repeated.
            for _ in range(200):
                w = self._watch
                if w is not None:
                    w.stop()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await asyncio.shield(self._thread_done)
                if self._thread_done.done():
                    break
        if self._consumer is not None:
            await cancel_and_wait(self._consumer)

    def _emit(self, kind: str, payload: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, payload))

    async def _consume(self) -> None:
        while True:
            kind, payload = await self._queue.get()
            try:
                self._apply(kind, payload)
            except Exception:
                log.exception("applying a Kubernetes event failed", extra={"event": kind})

    def _object_key(self, obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', self.settings.namespace)}/{meta.get('name')}"

    def _records_of(self, obj: Mapping[str, Any]) -> dict[str, InstanceRecord]:
        if self.settings.kind == "pods":
            return records_from_pod(obj, self.settings)
        return records_from_endpoint_slice(obj, self.settings)

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "sync":
            if not self._synced.is_set():
                self._adopt_stored_instances()
            self._objects = {self._object_key(o): self._records_of(o) for o in payload}
            self._synced.set()
        elif kind in ("ADDED", "MODIFIED"):
            self._objects[self._object_key(payload)] = self._records_of(payload)
        elif kind == "DELETED":
            self._objects.pop(self._object_key(payload), None)
        else:
            return
        self._reconcile()

    def _adopt_stored_instances(self) -> None:
        """Take ownership of Kubernetes instances of our namespace that the registry loaded
        from a shared store (written before a restart, or by another replica): the first
        list then removes the ones whose pods went away while no router was watching."""
        assert self._registry is not None
        prefix = f"{self.settings.namespace}/"
        for record in self._registry.records():
            if record.source == "kubernetes" and record.instance_id.startswith(prefix):
                self._owned.setdefault(record.instance_id, record)

    def _reconcile(self) -> None:
        """Make this source's instances in the registry equal the union of its objects'."""
        registry = self._registry
        assert registry is not None
        desired: dict[str, InstanceRecord] = {}
        for records in self._objects.values():
            desired.update(records)
        for iid in list(self._owned):
            if iid not in desired:
                del self._owned[iid]
                registry.remove(iid)
        for iid, record in desired.items():
            if self._owned.get(iid) != record:
                self._owned[iid] = record
                found = registry.find(iid)
                # Kubernetes only ever turns draining on (terminating); a drain an operator
                # set through Admin must survive the pod's later status updates.
                if found is not None and found[0].draining and not record.draining:
                    record = replace(record, draining=True)
                if found is not None and found[0].cordon is not None:  # Kubernetes knows no cordon
                    record = replace(record, cordon=found[0].cordon)
                registry.upsert(record)

    # -- the blocking list/watch loop (own thread) ----------------------------------------
    def _api(self) -> tuple[Any, Callable[..., Any]]:
        from kubernetes import client, config

        configuration = self._configuration
        if configuration is None:
            if self.settings.api_url:
                configuration = client.Configuration(host=self.settings.api_url)
            else:
                try:
                    config.load_incluster_config()  # type: ignore[no-untyped-call]  # kubernetes ships no annotations for this
                except config.ConfigException:
                    config.load_kube_config()  # type: ignore[no-untyped-call]  # kubernetes ships no annotations for this
                configuration = client.Configuration.get_default_copy()
            self._configuration = configuration
        api_client = client.ApiClient(configuration)
        if self.settings.kind == "pods":
            return api_client, client.CoreV1Api(api_client).list_namespaced_pod
        return api_client, client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when stopping."""
        return not self._stopping.wait(seconds)

    def _run_blocking(self) -> None:
        from kubernetes.client.exceptions import ApiException

        cfg = self.settings
        backoff_s = cfg.backoff_min_s
        rv: str | None = None
        next_resync = 0.0
        list_fn: Callable[..., Any] | None = None
        while not self._stopping.is_set():
            try:
                if list_fn is None:
                    _, list_fn = self._api()
                if rv is None or time.monotonic() >= next_resync:
                    rv = self._list(list_fn)
                    next_resync = time.monotonic() + cfg.resync_s
                opened = time.monotonic()
                rv = self._watch_once(list_fn, rv, next_resync)
                if time.monotonic() - opened < 1.0 and time.monotonic() < next_resync:
                    # A server that keeps closing watches at once must not be hammered.
                    if not self._sleep(backoff_s):
                        break
                    backoff_s = min(cfg.backoff_max_s, backoff_s * 2)
                else:
                    backoff_s = cfg.backoff_min_s
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    # History compacted past our resourceVersion: only a fresh list can
                    # tell what changed (deletions included) while we were not watching.
                    self.stats["gone"] += 1
                    log.info("watch expired (410 Gone); re-listing", extra={
                        "kind": cfg.kind, "resource_version": rv})
                    rv = None
                    continue
                self.stats["errors"] += 1
                log.warning("Kubernetes API error; retrying", extra={
                    "kind": cfg.kind, "status": exc.status, "reason": exc.reason, "backoff_s": backoff_s})
                rv = None if exc.status in (401, 403, 404) else rv
                if not self._sleep(backoff_s):
                    break
                backoff_s = min(cfg.backoff_max_s, backoff_s * 2)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                self.stats["errors"] += 1
                log.warning("Kubernetes watch failed; reconnecting", extra={
                    "kind": cfg.kind, "error": f"{type(exc).__name__}: {exc}", "backoff_s": backoff_s})
                if not self._sleep(backoff_s):
                    break
                backoff_s = min(cfg.backoff_max_s, backoff_s * 2)

    def _list(self, list_fn: Callable[..., Any]) -> str:
        cfg = self.settings
        resp = list_fn(cfg.namespace, label_selector=cfg.label_selector or None,
                       _preload_content=False, _request_timeout=(5, 30))
        try:
            if not 200 <= resp.status <= 299:
                from kubernetes.client.exceptions import ApiException

                raise ApiException(status=resp.status, reason=resp.data.decode(errors="replace")[:500])
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        rv = str(body["metadata"]["resourceVersion"])
        self.stats["lists"] += 1
        self.resource_version = rv
        self._emit("sync", body.get("items") or [])
        log.debug("listed", extra={"kind": cfg.kind, "count": len(body.get("items") or []), "resource_version": rv})
        return rv

    def _watch_once(self, list_fn: Callable[..., Any], rv: str, next_resync: float) -> str:
        from kubernetes import watch

        cfg = self.settings
        timeout_s = max(1, int(min(cfg.watch_timeout_s, next_resync - time.monotonic())))
        class RawWatch(watch.Watch):
            # Events stay JSON dicts: the client's model deserialization costs time and
            # fails on objects its models do not expect, which would repeat forever from
            # the same resourceVersion. The 410/ERROR handling is unchanged.
            def get_return_type(self, func: Any) -> None:
                return None

        w = RawWatch()  # type: ignore[no-untyped-call]  # kubernetes ships no annotations for this
        self._watch = w
        self.stats["watches"] += 1
        try:
            # timeout_seconds also turns off the client's own silent 410 retry: we
            # handle 410 ourselves, with a reconciling re-list.
            for event in w.stream(list_fn, cfg.namespace, label_selector=cfg.label_selector or None,
                                  resource_version=rv, allow_watch_bookmarks=True,
                                  timeout_seconds=timeout_s, _request_timeout=(5, timeout_s + 30)):  # type: ignore[no-untyped-call]  # kubernetes ships no annotations for this
                if self._stopping.is_set():
                    w.stop()  # type: ignore[no-untyped-call]  # kubernetes ships no annotations for this
                    break
                raw = event.get("raw_object") or {}
                new_rv = (raw.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                    self.resource_version = rv
                if event["type"] == "BOOKMARK":
                    self.stats["bookmarks"] += 1
                    continue
                self.stats["events"] += 1
                self._emit(event["type"], raw)
        finally:
            self._watch = None
        return rv


def parse_kubernetes(raw: Any, where: str) -> KubernetesSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping (namespace, label_selector, ...), got {raw!r}")
    allowed = ("namespace", "label_selector", "kind", "port", "port_name", "grpc_port", "model_label",
               "gpu_label", "pool_label", "tp_label", "default_model", "api_url", "resync_s",
               "watch_timeout_s")
    check_keys(raw, allowed, where)
    return KubernetesSettings(
        namespace=get(raw, "namespace", str, where, default="default"),
        label_selector=get(raw, "label_selector", str, where, default=""),
        kind=get(raw, "kind", str, where, default="endpointslices", choices=("endpointslices", "pods")),
        port=get(raw, "port", int, where, default=None, minimum=1),
        port_name=get(raw, "port_name", str, where, default="http"),
        grpc_port=get(raw, "grpc_port", int, where, default=None, minimum=1),
        model_label=get(raw, "model_label", str, where, default=DEFAULT_MODEL_LABEL),
        gpu_label=get(raw, "gpu_label", str, where, default=DEFAULT_GPU_LABEL),
        pool_label=get(raw, "pool_label", str, where, default=DEFAULT_POOL_LABEL),
        tp_label=get(raw, "tp_label", str, where, default=DEFAULT_TP_LABEL),
        default_model=get(raw, "default_model", str, where, default=None),
        api_url=get(raw, "api_url", str, where, default=None),
        resync_s=get(raw, "resync_s", float, where, default=300.0, minimum=1.0),
        watch_timeout_s=get(raw, "watch_timeout_s", float, where, default=240.0, minimum=1.0),
    )


# ======================================================================================
# Self-registration (Admin gRPC)
# ======================================================================================


class UnknownInstance(LookupError):
    """A heartbeat or deregistration names an instance that is not registered."""


class AdminRegistration(Discovery):
    """Leases for self-registered instances; `register` / `heartbeat` / `deregister` are
    called by the Admin gRPC servicer. A sweeper removes admin-sourced instances whose
    lease expired, in every replica (the lease is in the store; a local copy covers the
    moment between a local registration and its store write)."""

    def __init__(self, *, lease_ttl_s: float = 15.0, sweep_interval_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s!r}")
        self.lease_ttl_s = lease_ttl_s
        self.sweep_interval_s = sweep_interval_s or max(0.05, lease_ttl_s / 4)
        self._clock = clock
        self._local_expiry_s: dict[str, float] = {}
        self._registry: InstanceRegistry | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def registry(self) -> InstanceRegistry:
        if self._registry is None:
            raise RuntimeError("AdminRegistration is not started (start(registry) first)")
        return self._registry

    async def start(self, registry: InstanceRegistry) -> None:
        self._registry = registry
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="admin-lease-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)

    def lease_expiry_s(self, instance_id: str) -> float | None:
        """When this replica last saw the lease end (its clock; time.time by default)."""
        return self._local_expiry_s.get(instance_id)

    async def _renew(self, instance_id: str, ttl_s: float) -> None:
        self._local_expiry_s[instance_id] = self._clock() + ttl_s
        store = self.registry.store
        if store is not None:
            await store.renew_lease(instance_id, ttl_s)

    async def register(self, record: InstanceRecord, lease_ttl_s: float | None = None) -> float:
        """Add or update a self-registered instance; returns the lease TTL granted."""
        ttl_s = lease_ttl_s if lease_ttl_s and lease_ttl_s > 0 else self.lease_ttl_s
        record = replace(record, source="admin")
        # The lease first: another replica that sees the instance must also see its lease,
        # or its sweeper would remove the instance as expired.
        await self._renew(record.instance_id, ttl_s)
        self.registry.upsert(record)
        log.info("instance registered", extra={"instance": record.instance_id, "url": record.url,
                                               "model": record.model, "lease_ttl_s": ttl_s})
        return ttl_s

    async def heartbeat(self, instance_id: str, lease_ttl_s: float | None = None) -> float:
        """Renew a live lease; an expired or unknown one is UnknownInstance (the engine
        must register again: its registration may have been swept already)."""
        ttl_s = lease_ttl_s if lease_ttl_s and lease_ttl_s > 0 else self.lease_ttl_s
        store = self.registry.store
        if store is not None:
            # The store's lease is the truth: the registration may have come through
            # another replica, or expired there.
            alive = await store.renew_lease(instance_id, ttl_s, only_if_alive=True)
        else:
            alive = self._local_expiry_s.get(instance_id, 0.0) > self._clock()
        if not alive:
            raise UnknownInstance(f"instance {instance_id!r} has no live registration (lease expired "
                                  "or never registered): register it again")
        self._local_expiry_s[instance_id] = self._clock() + ttl_s
        return ttl_s

    async def deregister(self, instance_id: str) -> bool:
        self._local_expiry_s.pop(instance_id, None)
        found = self.registry.remove(instance_id)
        store = self.registry.store
        if store is not None:
            await store.drop_lease(instance_id)
        return found

    async def sweep(self) -> list[str]:
        """Remove admin-sourced instances with no live lease; returns their ids."""
        registry = self.registry
        now = self._clock()
        live = {iid for iid, expiry in self._local_expiry_s.items() if expiry > now}
        if registry.store is not None:
            live |= await registry.store.live_leases()
        expired = [r.instance_id for r in registry.records()
                   if r.source == "admin" and r.instance_id not in live]
        for iid in expired:
            if registry.remove(iid):
                log.warning("instance lease expired (no heartbeat); removed", extra={"instance": iid})
            self._local_expiry_s.pop(iid, None)
        for iid in [i for i, e in self._local_expiry_s.items() if e <= now]:
            del self._local_expiry_s[iid]
        return expired

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("lease sweep failed", extra={"error": str(exc)})


def parse_admin(raw: Any, where: str) -> AdminRegistration:
    if raw is None or raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping ({{lease_ttl_s}}), got {raw!r}")
    check_keys(raw, ("lease_ttl_s", "sweep_interval_s"), where)
    return AdminRegistration(
        lease_ttl_s=get(raw, "lease_ttl_s", float, where, default=15.0, minimum=0.1),
        sweep_interval_s=get(raw, "sweep_interval_s", float, where, default=None, minimum=0.01))


def build_discovery(section: Any, where: str) -> list[Discovery]:
    """The sources named in the router config's `discovery:` section, in order
    static, kubernetes, admin. An empty or missing section means no source."""
    if section is None:
        return []
    if not isinstance(section, Mapping):
        raise ConfigError(where, f"expected a mapping with static / kubernetes / admin, got {section!r}")
    check_keys(section, ("static", "kubernetes", "admin"), where)
    sources: list[Discovery] = []
    if section.get("static") is not None:
        sources.append(StaticDiscovery(parse_static_entries(section["static"], f"{where}.static")))
    if section.get("kubernetes") is not None:
        sources.append(KubernetesDiscovery(parse_kubernetes(section["kubernetes"], f"{where}.kubernetes")))
    if section.get("admin") not in (None, False):
        sources.append(parse_admin(section["admin"], f"{where}.admin"))
    return sources


# ======================================================================================
# Metrics
# ======================================================================================


class DiscoveryCollector:
    """Prometheus collector of membership and discovery health, computed at scrape time
    (nothing on the request path). Register it on the router's own registry:

        metrics.registry.register(DiscoveryCollector(registry, discoveries))
    """

    def __init__(self, registry: InstanceRegistry, discoveries: list[Discovery]) -> None:
        self.registry = registry
        self.discoveries = discoveries

    def describe(self) -> list[Any]:
        return []  # computed per scrape; nothing to pre-register

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        instances = GaugeMetricFamily(
            "tokenyard_discovery_instances", "Registered instances by source, pool and state "
            "(ready, draining, cordoned, unhealthy)", labels=["source", "pool", "state"])
        counts: dict[tuple[str, str, str], int] = {}
        for record in self.registry.records():
            found = self.registry.find(record.instance_id)
            if found is None:
                continue
            state = found[1]
            status = ("draining" if state.draining else "cordoned" if state.cordoned
                      else "ready" if state.healthy else "unhealthy")
            key = (record.source, record.pool, status)
            counts[key] = counts.get(key, 0) + 1
        for key, count in sorted(counts.items()):
            instances.add_metric(list(key), count)
        yield instances
        k8s = [d for d in self.discoveries if isinstance(d, KubernetesDiscovery)]
        if k8s:
            families = {name: CounterMetricFamily(f"tokenyard_discovery_kubernetes_{name}",
                                                  help_text, labels=["kind", "namespace"])
                        for name, help_text in (
                            ("lists", "Full lists of the watched objects"),
                            ("watches", "Watch requests opened"),
                            ("gone", "Watches that got 410 Gone and re-listed"),
                            ("bookmarks", "BOOKMARK events received"),
                            ("events", "Object events received"),
                            ("errors", "Failed lists or watches (retried with backoff)"))}
            for source in k8s:
                labels = [source.settings.kind, source.settings.namespace]
                for name, family in families.items():
                    family.add_metric(labels, source.stats[name])
            yield from families.values()
