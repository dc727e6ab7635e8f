"""The monitoring store: one record per scored image, alarm history and alarm state, through SQLAlchemy.

SQLite by default (a file, WAL journal, ``synchronous=FULL``: a committed transaction survives a ``kill
-9`` of the server and a power cut; ``sync="normal"``: it survives ``kill -9`` but not a machine crash),
PostgreSQL by URL (``postgresql://user@host/db``, through psycopg 3) — the same schema. The schema is
versioned: ``oodscope_schema_version`` holds the version of every migration applied, :data:`MIGRATIONS`
lists them in order and :meth:`Store.open` applies the missing ones (each in its own transaction, under
a lock: ``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL). A store written by a newer
oodscope (a version this one does not know) is refused rather than guessed at.

Tables (prefix ``oodscope_``):

* ``records`` — time, request id, item name, model name and fingerprint, content hash, score,
  p-value, decision, class, class probability, prediction set (JSON), error, latency, the monitor's
  online p-value and log-martingale after the image;
* ``images`` — the image bytes of a record, only when the service is told to keep them;
* ``models`` — each served model: fingerprint, name, alpha, model card (JSON), calibration scores
  (JSON), so that ``oodscope monitor`` needs nothing but the store;
* ``alarms`` — alarm history (raised / reset), with the statistic and threshold;
* ``monitor_state`` — the running test of each model (JSON), updated in the same transaction as the
  records it has seen;
* ``shift_scores`` — the stream scores that joined the test's reference bag, per model and epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

DEFAULT_STORE = "sqlite:///oodscope-store.db"
_ID = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()

schema_version = Table(
    "oodscope_schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", Double, nullable=False),
)

records = Table(
    "oodscope_records", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("time", Double, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("item", String(512), nullable=False),
    Column("model", String(128), nullable=False),
    Column("model_fingerprint", String(64), nullable=False),
    Column("content_hash", String(64)),
    Column("score", Double),
    Column("p_value", Double),
    Column("ood", Boolean),
    Column("predicted_class", String(256)),
    Column("class_probability", Double),
    Column("prediction_set", Text),
    Column("error", Text),
    Column("latency_ms", Double),
    Column("shift_p_value", Double),
    Column("shift_log_martingale", Double),
    Index("ix_oodscope_records_model_time", "model", "time"),
    Index("ix_oodscope_records_time", "time"),
    Index("ix_oodscope_records_request", "request_id"),
)

images = Table(
    "oodscope_images", metadata,
    Column("record_id", _ID, ForeignKey("oodscope_records.id", ondelete="CASCADE"), primary_key=True,
           autoincrement=False),
    Column("data", LargeBinary, nullable=False),
)

models = Table(
    "oodscope_models", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("alpha", Double),
    Column("first_seen", Double, nullable=False),
    Column("card", Text, nullable=False),
    Column("calibration_scores", Text),
)

alarms = Table(
    "oodscope_alarms", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("time", Double, nullable=False),
    Column("model", String(128), nullable=False),
    Column("model_fingerprint", String(64), nullable=False),
    Column("event", String(16), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("log_martingale", Double),
    Column("threshold", Double),
    Column("delta", Double),
    Column("n_observed", Integer),
    Column("record_id", _ID),
    Column("detail", Text),
    Index("ix_oodscope_alarms_model_time", "model", "time"),
)

monitor_state = Table(
    "oodscope_monitor_state", metadata,
    Column("model", String(128), primary_key=True),
    Column("model_fingerprint", String(64), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("updated", Double, nullable=False),
)

shift_scores = Table(
    "oodscope_shift_scores", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("model", String(128), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("score", Double, nullable=False),
    Column("content_hash", String(64)),
    Index("ix_oodscope_shift_scores_model_epoch", "model", "epoch"),
)


def _v1(conn: Connection) -> None:
    for table in (records, images, models):
        table.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    for table in (alarms, monitor_state, shift_scores):
        table.create(conn, checkfirst=True)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


#: Every schema change, in order; a store is at version N when migrations 1..N are applied.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "records, stored images, served models", _v1),
    Migration(2, "shift alarms: alarm history, monitor state, reference scores", _v2),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class StoreError(RuntimeError):
    """The store cannot be opened, migrated, read or written."""


def store_url(spec: str | Path) -> str:
    """A SQLAlchemy URL from ``spec``: a URL as it is (``postgresql://`` gets the psycopg 3 driver), or
    a path of a SQLite file."""
    text_spec = str(spec)
    if "://" not in text_spec:
        return f"sqlite:///{Path(text_spec).expanduser().resolve()}"
    scheme, rest = text_spec.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return text_spec


def redacted(url: str) -> str:
    """The URL without its password (for messages and /readyz)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return "<store>"


SYNC_MODES = ("full", "normal")


def _sqlite_setup(engine: Engine, sync: str = "full") -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - SQLAlchemy hook
        dbapi_connection.isolation_level = None  # transactions are begun by the hook below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={sync.upper()}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("oodscope_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class Store:
    """A connection to the monitoring store (thread-safe: a connection pool behind it)."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self.dialect = engine.dialect.name

    # ------------------------------------------------------------------ opening and migrations
    @classmethod
    def open(cls, spec: str | Path = DEFAULT_STORE, *, migrate: bool = True, target: int | None = None,
             sync: str = "full") -> Store:
        """Open (and by default create or upgrade) the store at ``spec`` (a URL or a SQLite path).

        ``sync`` (SQLite): ``"full"`` fsyncs every commit (a committed record survives ``kill -9`` and a power
        cut); ``"normal"`` leaves the WAL to the OS (it survives ``kill -9`` of the server — the OS keeps the
        written pages — but not a crash of the machine), for a lower commit latency.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        url = store_url(spec)
        try:
            if url.startswith("sqlite"):
                path = url.split("sqlite:///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                       pool_size=8, max_overflow=8)
                _sqlite_setup(engine, sync)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
            store = cls(url, engine)
            if migrate:
                store.migrate(target)
            else:
                store.check_version()
        except SQLAlchemyError as err:
            raise StoreError(f"cannot open the store {redacted(url)}: {_short(err)}") from None
        except ImportError as err:
            raise StoreError(f"cannot open the store {redacted(url)}: {err} (PostgreSQL needs psycopg: "
                             "pip install 'oodscope[serve]')") from None
        return store

    def _write(self):
        return self.engine.connect().execution_options(oodscope_write=True)

    def version(self) -> int:
        """The schema version of the store (0: empty)."""
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(schema_version.name):
                return 0
            return int(conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one())

    def check_version(self) -> int:
        found = self.version()
        if found > SCHEMA_VERSION:
            raise StoreError(f"the store {redacted(self.url)} has schema version {found}, newer than this oodscope "
                             f"knows ({SCHEMA_VERSION}): upgrade oodscope")
        return found

    def migrate(self, target: int | None = None) -> list[int]:
        """Apply the missing migrations (up to ``target``); returns the versions applied."""
        target = SCHEMA_VERSION if target is None else int(target)
        applied = []
        for migration in MIGRATIONS:
            if migration.version > target:
                break
            with self._write() as conn, conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(42424242)"))
                schema_version.create(conn, checkfirst=True)
                current = int(conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0)))
                              .scalar_one())
                if current > SCHEMA_VERSION:
                    raise StoreError(f"the store {redacted(self.url)} has schema version {current}, newer than "
                                     f"this oodscope knows ({SCHEMA_VERSION}): upgrade oodscope")
                if current >= migration.version:
                    continue
                migration.apply(conn)
                conn.execute(insert(schema_version).values(version=migration.version,
                                                           description=migration.description, applied_at=time.time()))
                applied.append(migration.version)
        return applied

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ writing
    def register_model(self, fingerprint: str, name: str, alpha: float | None, card: dict[str, Any],
                       calibration_scores: Sequence[float] | None) -> None:
        with self._write() as conn, conn.begin():
            found = conn.execute(select(models.c.fingerprint).where(models.c.fingerprint == fingerprint)).first()
            if found is None:
                conn.execute(insert(models).values(
                    fingerprint=fingerprint, name=name, alpha=alpha, first_seen=time.time(),
                    card=json.dumps(card, default=str),
                    calibration_scores=None if calibration_scores is None else json.dumps(list(calibration_scores))))

    def write_batch(self, rows: Sequence[dict[str, Any]], *, image_data: Sequence[bytes | None] = (),
                    shift_rows: Sequence[dict[str, Any]] = (), states: Sequence[dict[str, Any]] = (),
                    alarm_rows: Sequence[dict[str, Any]] = ()) -> list[int]:
        """One transaction: records (and their images), reference scores, monitor states, alarm events.

        Returns the record ids in the order of ``rows``. When this returns, the transaction is committed
        (and on SQLite fsynced): the records survive a crash of the server.
        """
        ids: list[int] = []
        with self._write() as conn, conn.begin():
            if rows:
                result = conn.execute(insert(records).returning(records.c.id, sort_by_parameter_order=True),
                                      list(rows))
                ids = [int(r[0]) for r in result]
            blobs = [{"record_id": i, "data": d} for i, d in zip(ids, image_data, strict=False) if d is not None]
            if blobs:
                conn.execute(insert(images), blobs)
            if shift_rows:
                conn.execute(insert(shift_scores), list(shift_rows))
            for alarm in alarm_rows:
                alarm = dict(alarm)
                index = alarm.pop("row_index", None)
                if index is not None and index < len(ids):
                    alarm["record_id"] = ids[index]
                conn.execute(insert(alarms).values(**alarm))
            for state in states:
                self._put_state(conn, **state)
        return ids

    def _put_state(self, conn: Connection, model: str, model_fingerprint: str, epoch: int,
                   state: dict[str, Any]) -> None:
        values = {"model_fingerprint": model_fingerprint, "epoch": epoch, "state": json.dumps(state),
                  "updated": time.time()}
        done = conn.execute(update(monitor_state).where(monitor_state.c.model == model).values(**values))
        if done.rowcount == 0:
            conn.execute(insert(monitor_state).values(model=model, **values))

    def reset_monitor(self, model: str, model_fingerprint: str, epoch: int, state: dict[str, Any],
                      alarm_row: dict[str, Any]) -> None:
        """A new test for ``model``: the state, the reset event; the old epoch's reference scores go."""
        with self._write() as conn, conn.begin():
            conn.execute(delete(shift_scores).where(shift_scores.c.model == model, shift_scores.c.epoch < epoch))
            conn.execute(insert(alarms).values(**alarm_row))
            self._put_state(conn, model, model_fingerprint, epoch, state)

    def prune(self, *, older_than: float | None = None, keep_records: int | None = None) -> int:
        """Retention: delete records older than ``older_than`` (epoch seconds) and beyond the newest
        ``keep_records``. Alarm history, monitor state and reference scores are kept."""
        deleted = 0
        with self._write() as conn, conn.begin():
            cutoff_id = None
            if keep_records is not None:
                row = conn.execute(select(records.c.id).order_by(records.c.id.desc()).offset(int(keep_records))
                                   .limit(1)).first()
                cutoff_id = None if row is None else int(row[0])
            conditions = []
            if older_than is not None:
                conditions.append(records.c.time < older_than)
            if cutoff_id is not None:
                conditions.append(records.c.id <= cutoff_id)
            for condition in conditions:
                doomed = select(records.c.id).where(condition).scalar_subquery()
                conn.execute(delete(images).where(images.c.record_id.in_(doomed)))
                deleted += conn.execute(delete(records).where(condition)).rowcount or 0
        return deleted

    # ------------------------------------------------------------------ reading
    def load_monitor(self, model: str) -> tuple[dict[str, Any] | None, list[float], list[bytes]]:
        """(saved state row, reference scores of its epoch, recent content digests), for a restart."""
        with self.engine.connect() as conn:
            row = conn.execute(select(monitor_state).where(monitor_state.c.model == model)).mappings().first()
            if row is None:
                return None, [], []
            state = json.loads(row["state"])
            state["_fingerprint"] = row["model_fingerprint"]
            picked = conn.execute(select(shift_scores.c.score, shift_scores.c.content_hash)
                                  .where(shift_scores.c.model == model, shift_scores.c.epoch == row["epoch"])
                                  .order_by(shift_scores.c.id)).all()
        scores = [float(r[0]) for r in picked]
        recent = [bytes.fromhex(r[1]) for r in picked[-10_000:] if r[1]]
        return state, scores, recent

    def count(self, model: str | None = None) -> int:
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(records)
            if model is not None:
                query = query.where(records.c.model == model)
            return int(conn.execute(query).scalar_one())

    def records_for(self, request_ids: Iterable[str]) -> list[dict[str, Any]]:
        wanted = list(request_ids)
        out: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                part = wanted[start:start + 500]
                out += [dict(r) for r in conn.execute(select(records).where(records.c.request_id.in_(part))
                                                      .order_by(records.c.id)).mappings()]
        return out

    def recent(self, *, model: str | None = None, limit: int = 20, flagged: bool | None = None) -> list[dict[str, Any]]:
        query = select(records).order_by(records.c.id.desc()).limit(int(limit))
        if model is not None:
            query = query.where(records.c.model == model)
        if flagged is not None:
            query = query.where(records.c.ood.is_(flagged))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def image(self, record_id: int) -> bytes | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(images.c.data).where(images.c.record_id == int(record_id))).first()
        return None if row is None else bytes(row[0])

    def served_models(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(models).order_by(models.c.first_seen)).mappings().all()
        out = []
        for r in rows:
            d = dict(r)
            d["card"] = json.loads(d["card"]) if d["card"] else None
            d["calibration_scores"] = json.loads(d["calibration_scores"]) if d["calibration_scores"] else None
            out.append(d)
        return out

    def alarm_history(self, model: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = select(alarms).order_by(alarms.c.id.desc()).limit(int(limit))
        if model is not None:
            query = query.where(alarms.c.model == model)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def monitor_states(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(monitor_state)).mappings().all()
        return [{**dict(r), "state": json.loads(r["state"])} for r in rows]

    def scores(self, model: str, *, since: float | None = None, limit: int = 5000) -> list[float]:
        """The newest ``limit`` scores of a model (since ``since``), oldest first."""
        query = (select(records.c.score).where(records.c.model == model, records.c.score.is_not(None))
                 .order_by(records.c.id.desc()).limit(int(limit)))
        if since is not None:
            query = query.where(records.c.time >= since)
        with self.engine.connect() as conn:
            return [float(r[0]) for r in conn.execute(query)][::-1]

    def ood_rate_series(self, model: str, bucket_seconds: float, *, since: float | None = None,
                        buckets: int = 48) -> list[dict[str, Any]]:
        """Images, flagged images and OOD rate per time bucket (newest ``buckets`` buckets)."""
        bucket = func.floor(records.c.time / float(bucket_seconds))
        query = (select(bucket.label("bucket"), func.count().label("n"),
                        func.sum(cast(records.c.ood, Integer)).label("flagged"))
                 .where(records.c.model == model, records.c.ood.is_not(None))
                 .group_by(bucket).order_by(bucket.desc()).limit(int(buckets)))
        if since is not None:
            query = query.where(records.c.time >= since)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = []
        for b, n, flagged in reversed(rows):
            flagged = int(flagged or 0)
            out.append({"start": float(b) * bucket_seconds, "n": int(n), "flagged": flagged,
                        "ood_rate": flagged / int(n) if n else None})
        return out

    def totals(self, model: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(func.count(), func.sum(cast(records.c.ood, Integer)),
                                      func.count(records.c.error), func.min(records.c.time), func.max(records.c.time))
                               .where(records.c.model == model)).first()
        n, flagged, errors, first, last = row
        return {"records": int(n or 0), "flagged": int(flagged or 0), "errors": int(errors or 0),
                "first": first, "last": last}

    def model_names(self) -> list[str]:
        with self.engine.connect() as conn:
            names = {r[0] for r in conn.execute(select(records.c.model).distinct())}
            names |= {r[0] for r in conn.execute(select(models.c.name).distinct())}
        return sorted(names)


def _short(err: BaseException) -> str:
    text_err = str(getattr(err, "orig", None) or err).strip().splitlines()
    return text_err[0] if text_err else type(err).__name__


__all__ = ["DEFAULT_STORE", "MIGRATIONS", "SCHEMA_VERSION", "Migration", "Store", "StoreError", "redacted",
           "store_url"]
