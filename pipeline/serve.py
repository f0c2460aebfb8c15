"""The Ray Serve application: the registry's champion behind HTTP.

Each replica loads `models:/<name>@<alias>` pinned to a version and checks the alias every
`serve.poll_s`. When it moves (a promotion, `d2d rollback`), the replica loads the new
version beside the old one and swaps a single reference. A request is scored by the model
it started with, so none fails during a swap. Requests are checked against the model's
signature before they reach it: a bad one gets a 4xx JSON error naming the problem, never a
500. Scored rows go to the inference log through a queue; a background thread writes them.
"""

# No `from __future__ import annotations`: Ray ships the deployment class to the replicas by
# value, and FastAPI must see the handlers' annotations (Request) as objects, not strings.
import asyncio
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline.inference_log import InferenceLog

logger = logging.getLogger("ray.serve")

# MLflow's column types: the JSON values each accepts (bool is not a number here) and the
# numpy type the model is fed
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "long": (int,), "integer": (int,), "double": (int, float), "float": (int, float), "string": (str,), "boolean": (bool,),
}
_NUMPY = {"long": "int64", "integer": "int32", "double": "float64", "float": "float32", "string": "object",
          "boolean": "bool"}


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def input_columns(model: Any) -> list[tuple[str, str]]:
    """(name, MLflow type) for each input of a pyfunc's signature."""
    declared = model.metadata.get_input_schema()
    if declared is None:
        raise ValueError("the model has no input signature; log it with one to serve it")
    return [(c.name, str(c.type.name if hasattr(c.type, "name") else c.type)) for c in declared.inputs]


def parse_rows(body: bytes, columns: list[tuple[str, str]], id_column: str | None, max_rows: int) -> pd.DataFrame:
    """The request body (a JSON row object, or an array of them) as a frame with exactly the
    signature's columns and types, plus the id column when sent; RequestError otherwise."""
    if not body.strip():
        raise RequestError(400, "empty body: send a JSON object (one row) or an array of row objects")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    rows = [data] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RequestError(400, "expected a JSON object (one row) or an array of row objects")
    if not rows:
        raise RequestError(400, "no rows: the array is empty")
    if len(rows) > max_rows:
        raise RequestError(413, f"{len(rows)} rows in one request; the limit is serve.max_rows={max_rows}")
    names = [n for n, _ in columns]
    allowed = set(names) | ({id_column} if id_column else set())
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row]
        extra = [k for k in row if k not in allowed]
        if missing:
            raise RequestError(422, f"row {i}: missing column(s) {', '.join(missing[:5])}"
                                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            raise RequestError(422, f"row {i}: unknown column(s) {', '.join(map(str, extra[:5]))}; the model takes "
                                    f"{names[0]}..{names[-1]}" + (f" (and {id_column})" if id_column else ""))
    # Plain Python checks and one typed array: for the small requests serving sees, this is
    # an order of magnitude faster than building a frame and inferring each column's type.
    for i, row in enumerate(rows):
        for name, kind in columns:
            value = row[name]
            if value is None:
                raise RequestError(422, f"row {i}: column {name} is null")
            if type(value) not in _ACCEPTS.get(kind, (type(value),)):
                raise RequestError(422, f"row {i}: column {name} must be {kind}, got {type(value).__name__} {value!r}")
    dtypes = {_NUMPY.get(kind, "object") for _, kind in columns}
    if len(dtypes) == 1:
        frame = pd.DataFrame(np.array([[row[n] for n in names] for row in rows], dtype=dtypes.pop()), columns=names)
    else:
        frame = pd.DataFrame({n: np.array([row[n] for row in rows], dtype=_NUMPY.get(k, "object")) for n, k in columns})
    if id_column and any(id_column in row for row in rows):
        frame.insert(0, id_column, [row.get(id_column) for row in rows])
    return frame


def responses(out: pd.DataFrame, frame: pd.DataFrame, version: str, id_column: str | None) -> list[dict[str, Any]]:
    """One JSON object per row: the label, its probability and each class's, and the version."""
    probs = [c for c in out.columns if c.startswith("prob_")]
    rows = []
    for i, r in enumerate(out.to_dict("records")):
        row: dict[str, Any] = {"model_version": version}
        if id_column and id_column in frame:
            row[id_column] = frame[id_column].iloc[i].item() if hasattr(frame[id_column].iloc[i], "item") else frame[id_column].iloc[i]
        if "prediction" in r:
            row["prediction"] = float(r["prediction"])
        else:
            label = r["label"]
            row["label"] = label.item() if hasattr(label, "item") else label
            row["probability"] = float(r["probability"])
            row["probabilities"] = {c.removeprefix("prob_"): float(r[c]) for c in probs}
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Loaded:
    version: str
    model: Any
    columns: list[tuple[str, str]]
    types: dict[str, Any]  # the numpy dtype each input column is cast to
    data_md5: str | None
    inner: Any  # the python model inside the pyfunc, or None

    def predict(self, raw: pd.DataFrame) -> pd.DataFrame:
        """Rows parse_rows already checked against this signature: the python model is called
        directly, as MLflow's schema enforcement would repeat those checks (half the time of
        a 1-row prediction)."""
        if self.inner is None:
            return self.model.predict(raw.astype(self.types))
        # parse_rows built this signature's numpy types; a request checked against the version
        # before a swap may carry the old one's, so cast only then (a full cast costs ~1 ms)
        if any(raw.dtypes[name] != dtype for name, dtype in self.types.items()):
            raw = raw.astype(self.types)
        return self.inner.predict(None, raw)


def load_version(name: str, alias: str) -> Loaded:
    """The version the alias points at now, loaded."""
    import mlflow

    from pipeline.registry import resolve_alias

    found = resolve_alias(name, alias)
    if found is None:
        raise LookupError(f"models:/{name}@{alias} does not exist")
    version, tags = found
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    types = {c.name: c.type.to_numpy() for c in model.metadata.get_input_schema().inputs}
    try:
        inner = model.unwrap_python_model()
    except Exception:  # a model of another flavor: MLflow's own predict path
        inner = None
    return Loaded(version, model, input_columns(model), types, tags.get("d2d.data_md5"), inner)


def settings(params: Any, tracking_uri: str, root: Path) -> dict[str, Any]:
    """What the replicas need, as plain values: they are built in other processes."""
    serve = params.serve
    deployment: dict[str, Any] = {"ray_actor_options": {"num_cpus": serve.cpus_per_replica,
                                                        **({"num_gpus": 1} if serve.use_gpu else {})},
                                  "max_ongoing_requests": max(2 * serve.max_batch_size, 16)}
    if serve.autoscaling is not None:
        deployment["autoscaling_config"] = serve.autoscaling.model_dump()
    else:
        deployment["num_replicas"] = serve.num_replicas
    return {"tracking_uri": tracking_uri, "model_name": params.register_.model_name, "alias": serve.alias,
            "poll_s": serve.poll_s, "max_batch_size": serve.max_batch_size,
            "batch_wait_timeout_s": serve.batch_wait_timeout_s, "max_body_bytes": serve.max_body_bytes,
            "max_rows": serve.max_rows, "id_column": params.data.id_column,
            "log_dir": str((root / serve.log_dir).resolve()) if serve.log_dir else "",
            "log_flush_s": serve.log_flush_s, "log_max_queued_rows": serve.log_max_queued_rows,
            "log_retention_days": serve.log_retention_days, "deployment": deployment,
            # read here, where `d2d serve` runs, and shipped with the app: the replicas may run
            # on cluster nodes that do not have the variable
            "auth_token_env": serve.auth_token_env,
            "auth_token": os.environ.get(serve.auth_token_env, "") if serve.auth_token_env else ""}


# A load balancer or Kubernetes probes this without credentials (as Prefect's server leaves
# /api/health open); it tells no more than that the server is up, which version it serves
# and the inference log's counters.
OPEN_PATHS = frozenset({"/health"})


def bearer_auth(api: FastAPI, token: str) -> None:
    """Every route of `api` (those added later too) answers 401 unless the request carries
    `Authorization: Bearer <token>`; GET /health stays open. An empty token: nothing to check."""
    if not token:
        return
    expected = token.encode()

    @api.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        # the app's own path (not the URL, which a Host header can bend)
        path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))
        if request.method in ("GET", "HEAD") and path in OPEN_PATHS:
            return await call_next(request)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return JSONResponse({"error": "unauthorized: send the header `Authorization: Bearer <token>` with the "
                                          "token from the variable named by serve.auth_token_env"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def build_app(settings: dict[str, Any]) -> Any:
    """The Serve application for `settings` (plain values, so they travel to the replicas)."""
    from ray import serve

    from pipeline.registry import resolve_alias

    api = FastAPI(title="d2d", description="the registry's champion, served by Ray Serve")
    bearer_auth(api, settings["auth_token"])

    @serve.deployment(name="d2d-model", **settings["deployment"])
    @serve.ingress(api)
    class ChampionServer:
        def __init__(self) -> None:
            import mlflow

            mlflow.set_tracking_uri(settings["tracking_uri"])
            self.name, self.alias = settings["model_name"], settings["alias"]
            self.loaded = load_version(self.name, self.alias)
            self._score.set_max_batch_size(settings["max_batch_size"])
            self._score.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
            self.log = InferenceLog(Path(settings["log_dir"]), settings["log_flush_s"], settings["log_max_queued_rows"],
                                    settings["log_retention_days"]) if settings["log_dir"] else None
            if not settings["auth_token"]:
                # open is the laptop default; say so where an operator looks
                unset = f"{settings['auth_token_env']} is not set" if settings["auth_token_env"] else "serve.auth_token_env is null"
                logger.warning("no bearer token (%s): every route is open to whoever reaches this server", unset)
            self.stopping = threading.Event()
            threading.Thread(target=self._follow_alias, name="follow-alias", daemon=True).start()
            logger.info("serving %s version %s", self.name, self.loaded.version)

        def _follow_alias(self) -> None:
            """Swap to the version the alias points at, whenever it moves; the new version is
            loaded beside the old one, then a single assignment swaps them."""
            while not self.stopping.wait(settings["poll_s"]):
                try:
                    found = resolve_alias(self.name, self.alias)
                    if found is not None and found[0] != self.loaded.version:
                        new = load_version(self.name, self.alias)
                        old, self.loaded = self.loaded.version, new
                        logger.info("%s@%s moved: version %s → %s", self.name, self.alias, old, new.version)
                except Exception as e:  # the registry unreachable: keep serving what is loaded
                    logger.warning("could not check %s@%s: %s", self.name, self.alias, str(e).splitlines()[0])

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
        async def _score(self, frames: list[pd.DataFrame]) -> list[tuple[Loaded, pd.DataFrame]]:
            loaded = self.loaded  # the whole batch is answered by one version
            names = [n for n, _ in loaded.columns]
            features = [f if list(f.columns) == names else f[names] for f in frames]
            raw = features[0] if len(features) == 1 else pd.concat(features, ignore_index=True)
            out = await asyncio.to_thread(loaded.predict, raw)
            bounds = [0, *pd.Series([len(f) for f in frames]).cumsum().tolist()]
            return [(loaded, out.iloc[a:b].reset_index(drop=True)) for a, b in zip(bounds, bounds[1:])]

        @api.post("/predict")
        async def predict(self, request: Request) -> Any:
            try:
                declared = int(request.headers.get("content-length") or 0)
                if declared > settings["max_body_bytes"]:
                    raise RequestError(413, f"body of {declared} bytes; the limit is serve.max_body_bytes="
                                            f"{settings['max_body_bytes']}")
                body = await request.body()
                if len(body) > settings["max_body_bytes"]:
                    raise RequestError(413, f"body of {len(body)} bytes; the limit is serve.max_body_bytes="
                                            f"{settings['max_body_bytes']}")
                frame = parse_rows(body, self.loaded.columns, settings["id_column"], settings["max_rows"])
            except RequestError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            loaded, out = await self._score(frame)
            if self.log is not None:
                self.log.add(frame, out, loaded.version)
            return {"model_name": self.name, "model_version": loaded.version,
                    "predictions": responses(out, frame, loaded.version, settings["id_column"])}

        @api.get("/health")
        async def health(self) -> dict[str, Any]:
            # the log's counters: rows dropped on a full queue and parts set aside are visible here
            return {"status": "ok", "model_version": self.loaded.version,
                    "inference_log": self.log.stats() if self.log is not None else None}

        @api.get("/metadata")
        async def metadata(self) -> dict[str, Any]:
            signature = self.loaded.model.metadata.signature
            return {"model_name": self.name, "alias": self.alias, "model_version": self.loaded.version,
                    "data_version": self.loaded.data_md5,
                    "signature": {"inputs": json.loads(signature.inputs.to_json()),
                                  "outputs": json.loads(signature.outputs.to_json()) if signature.outputs else None}}

        def __del__(self) -> None:  # Serve's graceful shutdown: write what is queued
            if getattr(self, "stopping", None) is not None:
                self.stopping.set()
            if getattr(self, "log", None) is not None:
                self.log.close()

    return ChampionServer.bind()
