"""The Ray Serve application: the registry's champion behind HTTP.

Each replica loads `models:/<name>@<alias>` pinned to a version and checks the alias every
`serve.poll_s`. When it moves (a promotion, `d2d rollback`), the replica loads the new
version beside the old one and swaps a single reference. A request is scored by the model
it started with, so none fails during a swap. Requests are checked against the model's
signature before they reach it: a bad one gets a 4xx JSON error naming the problem, never a
500. Scored rows go to the inference log through a queue; a background thread writes them.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' annotations (Request)
# as objects, not strings.
import asyncio
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from pipeline.config import Params
from pipeline.inference_log import InferenceLog
from pipeline.preprocess import check_matrix, check_rows, first_error
from pipeline.registry import resolve_alias
from pipeline.scoring import LoadedVersion, load_version

logger = logging.getLogger("ray.serve")

# The JSON values each input type accepts before preprocess.check_rows checks the values
# themselves (bool is not a number; a float for an integer column must be integral, as a
# client that sends a pandas frame read from the raw file has them)
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "long": (int, float), "integer": (int, float), "double": (int, float), "float": (int, float), "string": (str,),
    "boolean": (bool,),
}
_NUMBERS = ("long", "integer", "double", "float")
_INT64 = 2**63
_DOUBLE_MAX = float(np.finfo("float64").max)


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_constant(name: str) -> Any:
    raise RequestError(400, f"the body is not valid JSON: {name} is not a JSON number (send null for a missing value)")


def load_json(body: bytes) -> Any:
    """The body as JSON, bounded: NaN and Infinity (not JSON) are refused while parsing, and
    nesting too deep for the parser or an integer beyond Python's digit limit is a 4xx, not
    a crash. Numbers keep the C parser's speed: a hook per number cost a 256-row request
    half its time; their ranges are checked with the row (check_numbers)."""
    if not body.strip():
        raise RequestError(400, "empty body: send a JSON object (one row) or an array of row objects")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON: it nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, Python's 4300-digit limit for int()
        if "integer string conversion" not in str(e):
            raise RequestError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        raise RequestError(422, f"an integer in the body is out of range for any column ({str(e)[:80]})") from None


def _check_size(size: int, shown: str, limit: int) -> None:
    """413 when a body of `size` bytes (`shown` as the message tells it) is over serve.max_body_bytes."""
    if size > limit:
        raise RequestError(413, f"body of {shown} bytes; the limit is serve.max_body_bytes={limit}")


async def read_body(request: Any, limit: int) -> bytes:
    """The body, read as a stream and stopped at `limit` bytes (413): a chunked body has no
    Content-Length to check first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
        _check_size(int(declared), declared, limit)
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            _check_size(size, f"more than {limit}", limit)
            chunks.append(chunk)
    except ClientDisconnect:  # the client's problem: no answer reaches it, and the replica carries on
        raise RequestError(400, "the client disconnected before the whole body arrived") from None
    return b"".join(chunks)


def _check_id(rows: list[dict[str, Any]], id_spec: dict[str, Any]) -> None:
    name, kind = id_spec["name"], id_spec.get("type")
    accepts = {"long": (int,), "string": (str,)}.get(kind or "", (int, str))
    for i, row in enumerate(rows):
        value = row.get(name)
        if name in row and (type(value) not in accepts or (type(value) is int and not -_INT64 <= value < _INT64)):
            raise RequestError(422, f"row {i}: id column {name} must be {kind or 'an integer or a string'}, "
                                    f"got {type(row[name]).__name__} {_short(row[name])}")
    if kind is None and len({type(row[name]) for row in rows if name in row}) > 1:
        raise RequestError(422, f"id column {name}: every row's id must have the same type")


def parse_rows(body: bytes, spec: list[dict[str, Any]], id_spec: dict[str, Any] | None, max_rows: int) -> pd.DataFrame:
    """The request body (a JSON row object, or an array of them) as a frame with exactly the
    model's input columns, checked and typed, plus the id column when sent; RequestError otherwise."""
    return frame_from_rows(predict_rows(load_json(body)), spec, id_spec, max_rows)


def parse_invocation(body: bytes, spec: list[dict[str, Any]], id_spec: dict[str, Any] | None,
                     max_rows: int) -> pd.DataFrame:
    """An /invocations body (MLflow's scoring protocol) as parse_rows' frame, checked alike."""
    return frame_from_rows(mlflow_rows(load_json(body)), spec, id_spec, max_rows)


def predict_rows(data: Any) -> list[dict[str, Any]]:
    """/predict's JSON: one row object, or an array of them."""
    rows = [data] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RequestError(400, "expected a JSON object (one row) or an array of row objects")
    return rows


def _check_count(rows: list[dict[str, Any]], max_rows: int) -> None:
    """A request holds at least one row and at most serve.max_rows."""
    if not rows:
        raise RequestError(400, "no rows: the array is empty")
    if len(rows) > max_rows:
        raise RequestError(413, f"{len(rows)} rows in one request; the limit is serve.max_rows={max_rows}")


def frame_from_rows(rows: list[dict[str, Any]], spec: list[dict[str, Any]], id_spec: dict[str, Any] | None,
                    max_rows: int) -> pd.DataFrame:
    """Row objects (from /predict or any of /invocations' formats) as the frame the model
    takes: each value's JSON type, then preprocess.check_rows, the check every way in shares."""
    _check_count(rows, max_rows)
    names = [c["name"] for c in spec]
    id_column = id_spec["name"] if id_spec else None
    allowed = set(names) | ({id_column} if id_column else set())
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row]
        extra = [k for k in row if k not in allowed]
        if missing:
            raise RequestError(422, f"row {i}: missing column(s) {', '.join(missing[:5])}"
                                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            shown = ", ".join(str(k)[:40] for k in extra[:5])
            raise RequestError(422, f"row {i}: unknown column(s) {shown}; the model "
                                    f"takes {names[0]}..{names[-1]}" + (f" (and {id_column})" if id_column else ""))
    # Plain Python checks and typed arrays: for the small requests serving sees, this is an
    # order of magnitude faster than building a frame and inferring each column's type.
    for i, row in enumerate(rows):
        for c in spec:
            value = row[c["name"]]
            if value is not None and type(value) not in _ACCEPTS.get(c["type"], (type(value),)):
                raise RequestError(422, f"row {i}: column {c['name']} must be {c['type']}, got "
                                        f"{type(value).__name__} {_short(value)}")
    if id_spec:
        _check_id(rows, id_spec)
    numeric = [n for n, c in zip(names, spec) if c["type"] in _NUMBERS]
    try:
        if len(numeric) == len(names):  # None becomes NaN: the check decides where a null may be
            checked, errors = check_matrix(np.array([[row[n] for n in names] for row in rows], dtype="float64"), spec)
        else:
            frame = pd.DataFrame({n: np.array([row[n] for row in rows], dtype="float64" if n in numeric else "object")
                                  for n in names})
            checked, errors = check_rows(frame, spec)
    except OverflowError:  # an integer beyond a double's range (up to Python's 4300 digits)
        where = next(((i, n) for i, row in enumerate(rows) for n in numeric
                      if type(row[n]) is int and abs(row[n]) > _DOUBLE_MAX), None)
        if where is None:
            raise RequestError(422, "a number is out of range for a double") from None
        i, name = where
        raise RequestError(422, f"row {i}: column {name}: a {len(str(abs(rows[i][name])))}-digit integer is out of "
                                f"range for a double") from None
    problem = first_error(errors)
    if problem is not None:
        raise RequestError(422, f"row {problem[0]}: {problem[1]}")
    if id_column and any(id_column in row for row in rows):
        checked.insert(0, id_column, [row.get(id_column) for row in rows])
    return checked


def predict_body(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """/predict's rows: JSON (a row object or an array of them), or a multipart form whose
    file fields are images, one row each, named by their field (`image`)."""
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        return multipart_rows(body, content_type)
    return predict_rows(load_json(body))


class FormText(str):
    """A form field's value: text, which image_frame reads as the number a column takes."""


def multipart_rows(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """A multipart/form-data body (a browser's or `curl -F image=@cat.png -F site=north`'s
    upload) as row objects: one per file part (or part named `image`), {field name: the
    file's bytes}, each also holding the form's other fields as text (a manifest's extra
    columns, shared by the form's images). Parsed with the standard library's MIME parser
    (the email package), which a form is an instance of."""
    from email.parser import BytesParser
    from email.policy import HTTP

    from pipeline.preprocess import IMAGE_COLUMN

    if "boundary=" not in content_type:
        raise RequestError(400, "a multipart/form-data body needs a boundary in its Content-Type")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1", "replace")
                                                  + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise RequestError(400, "the multipart/form-data body has no parts")
    rows, fields = [], {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise RequestError(400, "a form part has no name: send the image as a file field named image")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or str(name) == IMAGE_COLUMN:
            rows.append({str(name): payload})
        else:
            fields[str(name)] = FormText(payload.decode("utf-8", errors="replace"))
    if not rows and not fields:
        raise RequestError(400, "the form has no parts: send the image as a file field named image")
    return [{**fields, **row} for row in rows] or [fields]


def form_values(rows: list[dict[str, Any]], spec: list[dict[str, Any]], id_spec: dict[str, Any] | None
                ) -> list[dict[str, Any]]:
    """Rows whose form text is read as the value its column takes: a number for a number
    ("" is a null), else the text. JSON values pass as they are, for frame_from_rows to check."""
    kinds = {c["name"]: c["type"] for c in spec} | ({id_spec["name"]: id_spec.get("type")} if id_spec else {})
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        for name, value in row.items():
            if not isinstance(value, FormText):
                continue
            kind, text = kinds.get(name), value.strip()
            try:
                row[name] = (str(value) if kind not in _NUMBERS else None if not text
                             else int(text) if kind in ("long", "integer") else float(text))
            except ValueError:
                raise RequestError(422, f"row {i}: column {name} must be {kind}, got form text {_short(str(value))}") from None
        out.append(row)
    return out


def image_frame(rows: list[dict[str, Any]], limits: tuple[int, int], id_spec: dict[str, Any] | None,
                max_rows: int, extras: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Rows of an image model ({"image": base64 text or uploaded bytes}, the `extras` columns
    the model also takes, and the id when sent) as its input frame, each image checked before
    it is batched with other requests' (pipeline.data.images.request_problem): 413 over the
    byte or pixel limits, 422 not an image; the extras are checked as a table's row is."""
    import base64
    import binascii

    from pipeline.data.images import request_problem
    from pipeline.preprocess import IMAGE_COLUMN

    _check_count(rows, max_rows)
    id_column = id_spec["name"] if id_spec else None
    extras = extras or []
    rows = form_values(rows, extras, id_spec)
    takes = [IMAGE_COLUMN, *(c["name"] for c in extras)]
    images = []
    for i, row in enumerate(rows):
        extra = [str(k)[:40] for k in row if k not in (*takes, id_column)]
        if IMAGE_COLUMN not in row:
            raise RequestError(422, f"row {i}: missing column {IMAGE_COLUMN} (the image, base64-encoded, or a file "
                                    f"field of a multipart form)")
        if extra:
            raise RequestError(422, f"row {i}: unknown column(s) {', '.join(extra[:5])}; the model takes "
                                    f"{', '.join(takes)}" + (f" (and {id_column})" if id_column else ""))
        value = row[IMAGE_COLUMN]
        if isinstance(value, str):
            if len(value) > limits[0] * 4 // 3 + 4:  # refused before decoding what would be over the limit
                raise RequestError(413, f"row {i}: image of {len(value):,} base64 characters, over the model's limit "
                                        f"of {limits[0]:,} bytes")
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(422, f"row {i}: image is not valid base64") from None
        elif not isinstance(value, bytes):
            raise RequestError(422, f"row {i}: image must be a base64 string, got {type(value).__name__} {_short(value)}")
        problem = request_problem(value, *limits)
        if problem is not None:
            raise RequestError(problem[0], f"row {i}: image: {problem[1]}")
        images.append(value)
    if extras:  # the id, and the extras as a table's columns are checked, with the image beside them
        rest = [{k: v for k, v in row.items() if k != IMAGE_COLUMN} for row in rows]
        frame = frame_from_rows(rest, extras, id_spec, max_rows)
        frame[IMAGE_COLUMN] = pd.Series(images, dtype=object, index=frame.index)
        return frame
    frame = pd.DataFrame({IMAGE_COLUMN: pd.Series(images, dtype=object)})
    if id_spec:
        _check_id(rows, id_spec)
        if any(id_column in row for row in rows):
            frame.insert(0, id_column, pd.Series([row.get(id_column) for row in rows], dtype=object))
    return frame


def logged_images(frame: pd.DataFrame) -> pd.DataFrame:
    """An image request's rows as the inference log keeps them: each image's hash and size."""
    from pipeline.data.images import logged_facts
    from pipeline.preprocess import IMAGE_COLUMN

    facts = pd.DataFrame([logged_facts(data) for data in frame[IMAGE_COLUMN]], index=frame.index)
    return pd.concat([frame.drop(columns=[IMAGE_COLUMN]), facts], axis=1)


def mlflow_rows(data: Any) -> list[dict[str, Any]]:
    """MLflow's scoring protocol (what `mlflow models serve` takes at /invocations) as row
    objects: exactly one of dataframe_split, dataframe_records, instances or inputs, and
    optional params. Only the reshaping is done here; MLflow's own parser builds a frame with
    pandas' inferred types, which loses what the checks need (a bool is not a 1, "7" not a 7)."""
    from mlflow.pyfunc.scoring_server import (DF_RECORDS, DF_SPLIT, REQUIRED_INPUT_FORMAT, SERVING_PARAMS_KEY,
                                              SUPPORTED_FORMATS)

    if not isinstance(data, dict):
        raise RequestError(400, f"{REQUIRED_INPUT_FORMAT}; got a JSON {type(data).__name__}")
    formats = [k for k in data if k in SUPPORTED_FORMATS]
    others = [k for k in data if k not in SUPPORTED_FORMATS and k != SERVING_PARAMS_KEY]
    if len(formats) != 1 or others:
        fields = ", ".join(_short(k) for k in data) or "none"
        raise RequestError(400, f"{REQUIRED_INPUT_FORMAT}; got the field(s) {fields}")
    key = formats[0]
    payload = data[key]
    if key == DF_SPLIT:
        if not isinstance(payload, dict) or not isinstance(payload.get("columns"), list) \
                or not isinstance(payload.get("data"), list):
            raise RequestError(400, f"{DF_SPLIT} must be an object with a list of columns and a list of data rows")
        columns = payload["columns"]
        if not all(isinstance(c, str) for c in columns) or len(set(columns)) != len(columns):
            raise RequestError(400, f"{DF_SPLIT}: columns must be distinct strings")
        if not all(isinstance(r, list) and len(r) == len(columns) for r in payload["data"]):
            raise RequestError(400, f"{DF_SPLIT}: every data row must be a list of {len(columns)} values, "
                                    "one per column")
        return [dict(zip(columns, r)) for r in payload["data"]]
    if key != DF_RECORDS and isinstance(payload, dict):  # columnar: {"column": [values...]}
        values = list(payload.values())
        if not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) > 1:
            raise RequestError(400, f"{key}: a columnar input must map each column to a list, all of one length")
        return [dict(zip(payload, r)) for r in zip(*values)]
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise RequestError(400, f"{key} must be a list of row objects (column: value)"
                                + ("" if key == DF_RECORDS else " or an object of columns"))
    return payload


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
class ServeSettings:
    """What a replica needs, as plain values: Ray ships them to replicas built in other
    processes, maybe on other nodes, as the deployment's init argument."""

    tracking_uri: str
    model_name: str
    alias: str
    poll_s: float
    max_batch_size: int
    batch_wait_timeout_s: float
    max_body_bytes: int
    max_rows: int
    id_column: str | None
    log_dir: str  # empty: no inference log
    log_flush_s: float
    log_max_queued_rows: int
    log_retention_days: int | None
    deployment: dict[str, Any]  # @serve.deployment's options: resources, replicas or autoscaling
    auth_token_env: str | None
    # read where `d2d serve` runs, and shipped with the app: the replicas may run on cluster
    # nodes that do not have the variable; kept out of the repr so that a log never shows it
    auth_token: str = field(repr=False)

    @classmethod
    def from_params(cls, params: Params, tracking_uri: str, root: Path) -> "ServeSettings":
        """The settings for `params`, with serve.log_dir resolved against the project `root`."""
        serve_params = params.serve
        deployment: dict[str, Any] = {"ray_actor_options": {"num_cpus": serve_params.cpus_per_replica,
                                                            **({"num_gpus": 1} if serve_params.use_gpu else {})},
                                      "max_ongoing_requests": max(2 * serve_params.max_batch_size, 16)}
        if serve_params.autoscaling is not None:
            deployment["autoscaling_config"] = serve_params.autoscaling.model_dump()
        else:
            deployment["num_replicas"] = serve_params.num_replicas
        token_env = serve_params.auth_token_env
        return cls(tracking_uri=tracking_uri, model_name=params.register_.model_name, alias=serve_params.alias,
                   poll_s=serve_params.poll_s, max_batch_size=serve_params.max_batch_size,
                   batch_wait_timeout_s=serve_params.batch_wait_timeout_s, max_body_bytes=serve_params.max_body_bytes,
                   max_rows=serve_params.max_rows, id_column=params.data.id_column,
                   log_dir=str((root / serve_params.log_dir).resolve()) if serve_params.log_dir else "",
                   log_flush_s=serve_params.log_flush_s, log_max_queued_rows=serve_params.log_max_queued_rows,
                   log_retention_days=serve_params.log_retention_days, deployment=deployment,
                   auth_token_env=token_env, auth_token=os.environ.get(token_env, "") if token_env else "")


def load_alias(name: str, alias: str, id_column: str | None) -> LoadedVersion:
    """The version the alias points at now, loaded."""
    target = resolve_alias(name, alias)
    if target is None:
        raise LookupError(f"models:/{name}@{alias} does not exist")
    version, tags = target
    return load_version(name, version, tags.get("d2d.data_md5"), id_column)


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


class ChampionServer:
    """A replica: scores requests with the version the alias points at, and swaps to the next
    one when the alias moves. Its HTTP routes are built on the replica, from its settings."""

    def __init__(self, settings: ServeSettings) -> None:
        import mlflow

        mlflow.set_tracking_uri(settings.tracking_uri)
        self.settings = settings
        self.name, self.alias = settings.model_name, settings.alias
        self.loaded = load_alias(self.name, self.alias, settings.id_column)
        self._score.set_max_batch_size(settings.max_batch_size)
        self._score.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.log = InferenceLog(Path(settings.log_dir), settings.log_flush_s, settings.log_max_queued_rows,
                                settings.log_retention_days) if settings.log_dir else None
        if not settings.auth_token:
            # open is the laptop default; say so where an operator looks
            unset = f"{settings.auth_token_env} is not set" if settings.auth_token_env else "serve.auth_token_env is null"
            logger.warning("no bearer token (%s): every route is open to whoever reaches this server", unset)
        self.stopping = threading.Event()
        threading.Thread(target=self._follow_alias, name="follow-alias", daemon=True).start()
        logger.info("serving %s version %s", self.name, self.loaded.version)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The HTTP routes (Ray Serve calls this on the replica after __init__): built here, not
        at import, so that the bearer check guarding them has this server's token."""
        api = FastAPI(title="d2d", description="the registry's champion, served by Ray Serve")
        bearer_auth(api, self.settings.auth_token)
        api.post("/predict")(self.predict)
        api.post("/invocations")(self.invocations)
        api.get("/health")(self.health)
        api.get("/metadata")(self.metadata)
        return api

    def _follow_alias(self) -> None:
        """Swap to the version the alias points at, whenever it moves; the new version is
        loaded beside the old one, then a single assignment swaps them."""
        while not self.stopping.wait(self.settings.poll_s):
            try:
                target = resolve_alias(self.name, self.alias)
                if target is not None and target[0] != self.loaded.version:
                    new = load_alias(self.name, self.alias, self.settings.id_column)
                    old, self.loaded = self.loaded.version, new
                    logger.info("%s@%s moved: version %s → %s", self.name, self.alias, old, new.version)
            except Exception as e:  # the registry unreachable: keep serving what is loaded
                logger.warning("could not check %s@%s: %s", self.name, self.alias, str(e).splitlines()[0])

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _score(self, frames: list[pd.DataFrame]) -> list[tuple[LoadedVersion, pd.DataFrame]]:
        loaded = self.loaded  # the whole batch is answered by one version
        names = loaded.names
        features = [f if list(f.columns) == names else f[names] for f in frames]
        raw = features[0] if len(features) == 1 else pd.concat(features, ignore_index=True)
        out = await asyncio.to_thread(loaded.predict, raw)
        bounds = [0, *pd.Series([len(f) for f in frames]).cumsum().tolist()]
        return [(loaded, out.iloc[a:b].reset_index(drop=True)) for a, b in zip(bounds, bounds[1:])]

    async def _answer(self, request: Request, rows_of: Any) -> tuple[LoadedVersion, pd.DataFrame, pd.DataFrame]:
        """Read, check, score and log one request; `rows_of` turns its JSON into row objects.
        Every refusal is a RequestError (4xx); the model's own ValueError (a version swapped
        in meanwhile checks the rows again) is a 422 too."""
        body = await read_body(request, self.settings.max_body_bytes)
        loaded = self.loaded
        rows = rows_of(body, request.headers.get("content-type", ""))
        limits = loaded.image_limits
        if limits is not None:
            frame = image_frame(rows, limits, loaded.id, self.settings.max_rows, loaded.extras)
        else:
            frame = frame_from_rows(rows, loaded.inputs, loaded.id, self.settings.max_rows)
        try:
            scored_by, out = await self._score(frame)
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        if self.log is not None:  # an image is logged as its hash and size, not its bytes
            self.log.add(logged_images(frame) if limits is not None else frame, out, scored_by.version)
        return scored_by, frame, out

    async def _guarded(self, request: Request, rows_of: Any, answer: Any, error: Any) -> Any:
        """A request problem is a 4xx naming it; anything else is logged and answered 500
        as JSON, and the replica stays up for the next request."""
        try:
            return answer(*await self._answer(request, rows_of))
        except RequestError as e:
            return JSONResponse(error(str(e), e.status), status_code=e.status)
        except Exception as e:  # a fault of the server, not of the request
            logger.exception("scoring failed")
            return JSONResponse(error(f"internal error: {type(e).__name__}", 500), status_code=500)

    async def predict(self, request: Request) -> Any:
        def answer(loaded: LoadedVersion, frame: pd.DataFrame, out: pd.DataFrame) -> dict[str, Any]:
            id_column = loaded.id["name"] if loaded.id else None
            return {"model_name": self.name, "model_version": loaded.version,
                    "predictions": responses(out, frame, loaded.version, id_column)}

        return await self._guarded(request, predict_body, answer, lambda message, status: {"error": message})

    async def invocations(self, request: Request) -> Any:
        """MLflow's scoring protocol, as `mlflow models serve` answers it, with the same
        checks, errors and inference log as /predict."""
        from mlflow.pyfunc.scoring_server import CONTENT_TYPE_JSON, predictions_to_json

        def answer(loaded: LoadedVersion, frame: pd.DataFrame, out: pd.DataFrame) -> Response:
            text = StringIO()
            predictions_to_json(out, text)
            return Response(text.getvalue(), media_type="application/json",
                            headers={"X-Model-Version": loaded.version})

        def error(message: str, status: int) -> dict[str, Any]:  # MLflow's error fields, and /predict's
            code = "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"
            return {"error_code": code, "message": message, "error": message}

        kind = request.headers.get("content-type", CONTENT_TYPE_JSON).split(";")[0].strip()
        if kind not in (CONTENT_TYPE_JSON, ""):  # MLflow's CSV and Parquet bodies are not taken here
            message = f"Content-Type {kind[:60]} is not supported here; send {CONTENT_TYPE_JSON}"
            return JSONResponse(error(message, 415), status_code=415)
        return await self._guarded(request, lambda body, _: mlflow_rows(load_json(body)), answer, error)

    async def health(self) -> dict[str, Any]:
        # the log's counters: rows dropped on a full queue and parts set aside are visible here
        return {"status": "ok", "model_version": self.loaded.version,
                "inference_log": self.log.stats() if self.log is not None else None}

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


def build_app(settings: ServeSettings) -> Any:
    """The Serve application: ChampionServer with the deployment options in `settings`, which
    travel to each replica as its init argument."""
    deployment = serve.deployment(serve.ingress()(ChampionServer), name="d2d-model", **settings.deployment)
    return deployment.bind(settings)
