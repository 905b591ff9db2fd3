"""``ReadExampleBatches``: the example log → ``ExampleBatch`` es in event-time order, the
training section's reader (bounded, or following a folder as its periods land), and the
:class:`Pacing` that keeps it in step with the PS on Flink.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.example_batch import ExampleBatch
from transforms.example_log import example_periods, followed_pattern
from transforms.flink_placement import placed_names
from transforms.tail import NO_END  # the end of a followed folder's range: none


@dataclasses.dataclass(frozen=True)
class Pacing:
    """How the example reader keeps pace with the PS on a runner whose stages run
    concurrently and hand output downstream only when a bundle ends (Flink's portable
    runner).

    The reader ends its bundle (checkpoints itself) at least every ``checkpoint_s`` of wall
    time and as soon as its batches span more than ``max_staleness_s`` of event time, so
    gradients reach the PS while it reads; before it reads on, it waits until every PS
    publisher in ``store_url`` has applied gradients up to ``max_staleness_s`` before its
    last batch (:class:`PSCatchUp`; at most ``timeout_s``). ``max_staleness_s=0``: one batch
    per bundle, each scored with the parameters learned from every earlier one, as on the
    fused DirectRunner; negative: never wait. Make one with
    :meth:`transforms.train.TrainOnline.pacing`, which knows the store and the publishers.

    Args:
        checkpoint_s: the longest a reader bundle lasts, wall-clock seconds (> 0).
        max_staleness_s: how far (event time) the PS may trail the reader; negative: any.
        timeout_s: the longest wait for the PS, seconds (>= 0).
        store_url: the ParameterStore whose publishers the reader waits for (None: no wait).
        publishers: publisher keys that must exist in the store's sync records.

    >>> Pacing(max_staleness_s=0.0, store_url="memory://x", publishers=("dense",)).gate() is None
    False
    """

    checkpoint_s: float = 0.05
    max_staleness_s: float = 0.0
    timeout_s: float = 30.0
    store_url: Optional[str] = None
    publishers: tuple = ()

    def __post_init__(self):
        if not self.checkpoint_s > 0:
            raise ValueError(f"Pacing.checkpoint_s must be > 0, got {self.checkpoint_s}")
        if not self.timeout_s >= 0:
            raise ValueError(f"Pacing.timeout_s must be >= 0, got {self.timeout_s}")
        object.__setattr__(self, "publishers", tuple(self.publishers))

    def gate(self) -> "PSCatchUp | None":
        """The wait before each resumption (None: no store, or a negative staleness)."""
        if self.store_url is None or self.max_staleness_s < 0:
            return None
        return PSCatchUp(self.store_url, self.max_staleness_s, self.timeout_s, self.publishers)


class ReadExampleBatches(beam.PTransform):
    """Example log files → ``ExampleBatch`` es of ``batch_size``, in event-time order.

    The files are grouped by event-time period (the example log's ``PERIOD-…`` names; any
    other name is a period of its own, in name order); each period's files are merged by
    ``ts_ms``, so training sees the stream in the order it happened and a batch is scored
    with what the PS learned from every earlier batch (DESIGN §4b: no GroupByKey between
    reader and PS). A period's last batch may be short.

    ``follow=True`` (online training) watches the folder or glob instead: it reads the
    periods there, then lists it again every ``poll_interval_s`` for new ones, until
    ``stop_timestamp`` (wall clock, seconds; default never) or, with ``stop_when_exists``,
    until that path exists (the writer creates it after its last file landed; every file
    that landed before it is read first), with the output watermark at the event time read. A period is read once all its shards (``-of-N``) are there; files
    must land in time order (a period sorting before one already read is skipped, counted
    as ``reader.late_files``).

    With ``num_workers`` W above 1 there are W readers, reader k reading the shard files
    ``s`` of every period with ``s % W == k`` (the join's ``--shards_per_period`` splits a
    period by request id: make it a multiple of W), each in event-time order; on a keyed
    runner of ``subtasks`` parallel subtasks (Flink) reader k runs on subtask ``k % subtasks``
    (:mod:`transforms.flink_placement`), and a worker after it in the same subtask. A job
    resumed from a savepoint must have the same W and subtasks.

    The reader is a splittable DoFn over (period, batch) positions.

    Args:
        pattern: the example log: a glob, or (``follow``) a folder.
        batch_size: the largest batch (a batch never spans two periods).
        dense_dim: dense inputs per example.
        pacing: how the reader keeps pace with the PS where stages run concurrently
            (:class:`Pacing`; what differs by runner). None on a runner that fuses the
            reader, worker and PS into one stage (the DirectRunner): the PS then applies a
            batch before the worker sees the next, and the FnApiRunner would treat every
            self-checkpoint as a new run of the stage, firing end-of-input timers each time.
            On Flink, :meth:`transforms.train.TrainOnline.pacing`.
        follow: online training: follow the folder as its periods land.
        poll_interval_s, stop_timestamp, stop_when_exists: following only (above).
        num_workers: data-parallel readers (above).
        subtasks: the parallelism of the runner's keyed operators (Flink's ``--parallelism``),
            so that readers land on distinct subtasks; None elsewhere.

    Returns:
        (``expand``) a PCollection of :class:`ExampleBatch`, timestamped by their largest
        event time.

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> _ = write_avro(f"{folder.name}/20240101T000000Z-00000-of-00001-a.avro", "example", [
    ...     {"request_id": f"r{i}", "ts_ms": 1000 * i, "user_id": "u", "item_id": "i",
    ...      "fids": [i], "dense": [0.5], "label": i % 2} for i in range(5)])
    >>> with beam.Pipeline() as p:
    ...     batches = p | ReadExampleBatches(f"{folder.name}/*.avro", batch_size=2, dense_dim=1)
    ...     _ = assert_that(batches | beam.Map(lambda b: b.ts_ms.tolist()),
    ...                     equal_to([[0, 1000], [2000, 3000], [4000]]))
    >>> folder.cleanup()
    """

    def __init__(self, pattern: str, batch_size: int, dense_dim: int,
                 pacing: "Pacing | None" = None, follow: bool = False,
                 poll_interval_s: float = 5.0, stop_timestamp: float | None = None,
                 stop_when_exists: str | None = None, num_workers: int = 1,
                 subtasks: int | None = None):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"ReadExampleBatches.batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 1:
            raise ValueError(f"ReadExampleBatches.num_workers must be >= 1, got {num_workers}")
        if subtasks is not None and int(subtasks) < 1:
            raise ValueError(f"ReadExampleBatches.subtasks must be >= 1, got {subtasks}")
        self.num_workers = int(num_workers)
        self.subtasks = int(subtasks) if subtasks is not None else None
        self.pattern = followed_pattern(pattern) if follow else pattern
        self.batch_size = int(batch_size)
        self.dense_dim = int(dense_dim)
        self.gate = pacing.gate() if pacing is not None else None
        self.checkpoint_s = pacing.checkpoint_s if pacing is not None else None
        self.follow = follow
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp
        self.stop_when_exists = stop_when_exists

    def expand(self, pbegin):
        read = (_TailBatchesFn(self.batch_size, self.dense_dim, self.checkpoint_s, self.gate,
                               self.poll_interval_s, self.stop_timestamp,
                               self.stop_when_exists) if self.follow else
                _ReadBatchesFn(self.batch_size, self.dense_dim, self.checkpoint_s, self.gate))
        return (pbegin
                | "Start" >> beam.Create(reader_elements(self.pattern, self.num_workers,
                                                         self.subtasks), reshuffle=False)
                | "ReadInOrder" >> beam.ParDo(read))


_PART = "\x1freader-of-"  # reader element: PATTERN + _PART + "W#k.salt" (W > 1)


def reader_elements(pattern: str, num_workers: int = 1, subtasks: int | None = None) -> list:
    """The elements of :class:`ReadExampleBatches`' readers: the pattern itself for one
    reader (as in every savepoint before there were more); for W, the pattern tagged with
    reader k of W, named to land on subtask ``k % subtasks``.

    >>> reader_elements("ex/*.avro")
    ['ex/*.avro']
    >>> [_split_element(e) for e in reader_elements("ex/*.avro", 2, 2)]
    [('ex/*.avro', (0, 2)), ('ex/*.avro', (1, 2))]
    """
    if num_workers == 1:
        return [pattern]
    return placed_names(f"{pattern}{_PART}{num_workers}", num_workers, subtasks)


def _split_element(element: str) -> tuple:
    """A reader element → (pattern, (reader k, of W) or None)."""
    pattern, tag, part = element.partition(_PART)
    if not tag:
        return element, None
    of, _, k = part.partition("#")
    return pattern, (int(k.partition(".")[0]), int(of))


_BATCHES_PER_PERIOD = 1 << 32  # restriction offset = period * this + batch within the period
_FOLLOW_SPAN = 1 << 24  # following: offset = period start (epoch s) * this + batch (< 2**62)
# What a following reader's restriction offsets mean, named in savepoint manifests: a job
# must not resume offsets of another meaning (dataflow.train checks).
FOLLOW_POSITIONS = "period-start-s*2^24+batch"


class _PeriodRange(RestrictionProvider):
    """Restriction: the (period, batch) positions still to read. Never split: order matters."""

    def initial_restriction(self, element):
        pattern, _ = _split_element(element)
        return OffsetRange(0, len(example_periods(pattern)) * _BATCHES_PER_PERIOD)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, pattern, restriction):
        return max(1, restriction.size() // _BATCHES_PER_PERIOD)

    def split(self, pattern, restriction):
        yield restriction


class _FollowRange(_PeriodRange):
    """The positions of a followed folder: no end until the reader claims ``NO_END``."""

    def initial_restriction(self, pattern):
        return OffsetRange(0, NO_END)

    def restriction_size(self, pattern, restriction):
        return 1  # the backlog is unknown until the folder is listed

    def truncate(self, pattern, restriction):
        return None  # on drain, stop reading


class PSCatchUp:
    """Bounded staleness between the reader and the PS (stale-synchronous training).

    Before the reader resumes after a checkpoint, it waits until every PS publisher in the
    store has applied gradients up to ``max_staleness_s`` (event time) before the last batch
    it emitted. On the DirectRunner the worker and PS are fused, so this passes at once; on
    Flink the stages run concurrently and a stage's output moves on only when its bundle
    ends, so without it the reader runs ahead and the worker scores with ever older
    parameters. Waits at most ``timeout_s``, then goes on (counted). Made by
    :meth:`Pacing.gate`.

    Args:
        store_url: the ParameterStore the PS publishes to.
        max_staleness_s: how far (event time) the PS may trail the reader.
        timeout_s: the longest wait, seconds.
        publishers: publisher keys that must be in the store's sync records (a PS that is
            not up yet is behind).

    >>> from ps.store import open_store
    >>> open_store("memory://catch-up-doc").set_sync("dense", {"ts_ms": 5_000})
    >>> gate = PSCatchUp("memory://catch-up-doc", max_staleness_s=1.0, timeout_s=0.05)
    >>> gate.wait(6_000)  # the PS has applied up to 5 s: no wait
    >>> gate.wait(9_000)  # 3 s behind: waits 0.05 s, then reads on (logged and counted)
    """

    # The store is polled at growing intervals up to POLL_MAX_S: the PS is seen at most that
    # late (a store read per poll; docs/scaling.md measures the choice).
    POLL_FIRST_S = 0.001
    POLL_MAX_S = 0.004

    def __init__(self, store_url: str, max_staleness_s: float, timeout_s: float,
                 publishers: tuple = ()):
        self.store_url = store_url
        self.publishers = tuple(publishers)  # those that must exist (a PS not yet up is behind)
        self.max_staleness_ms = int(max_staleness_s * 1000)
        self.timeout_s = timeout_s
        self.waits = Metrics.distribution("reader", "ps_catch_up_wait_ms")
        self.timeouts = Metrics.counter("reader", "ps_catch_up_timeouts")
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def wait(self, emitted_ts_ms: int) -> None:
        """Returns once every publisher has applied gradients up to ``max_staleness_s``
        before ``emitted_ts_ms`` (the event time of the reader's last batch), or after
        ``timeout_s``."""
        if self._store is None:
            from ps.store import open_store
            self._store = open_store(self.store_url, num_shards=None)
        due = emitted_ts_ms - self.max_staleness_ms
        start = time.monotonic()
        delay = self.POLL_FIRST_S
        while True:
            info = self._store.sync_info()
            keys = set(self.publishers) | {k for k in info
                                           if k == "dense" or k.startswith("sparse/")}
            behind = sorted(k for k in keys if info.get(k, {}).get("ts_ms", -1) < due)
            if not behind:
                break
            if time.monotonic() - start > self.timeout_s:
                self.timeouts.inc()
                _LOG.warning("PS publishers %s still behind %d after %.0fs; reading on",
                             behind, due, self.timeout_s)
                break
            time.sleep(delay)
            delay = min(2 * delay, self.POLL_MAX_S)
        self.waits.update(int(1000 * (time.monotonic() - start)))


_LOG = logging.getLogger(__name__)


class _ReadBatchesFn(beam.DoFn):
    """pattern → its periods' ``ExampleBatch`` es, in order (bounded)."""

    def __init__(self, batch_size: int, dense_dim: int, checkpoint_s: float | None, gate=None):
        self.batch_size = batch_size
        self.dense_dim = dense_dim
        self.checkpoint_s = checkpoint_s
        self.gate = gate
        self.late_files = Metrics.counter("reader", "late_files")
        # Flink's fixed cost per reader bundle, and how many batches share it
        self.resume_gap = Metrics.distribution("reader", "resume_gap_ms")
        self.bundle_batches = Metrics.distribution("reader", "batches_per_bundle")

    def setup(self):
        self._deferred_at = None  # wall clock when the last bundle deferred its remainder
        self._emitted_ts = None
        self._periods = None  # (pattern, [[path, ...], ...]) as last listed
        # The period being read: (pattern, period, its examples as columns). A resumed
        # restriction in the same period (Flink hands the residual back to the same
        # instance) slices on from it instead of decoding the period's files again.
        self._cursor = None

    def teardown(self):
        self._close_cursor()

    def _close_cursor(self):
        self._cursor = None

    def _list(self, pattern: str, period: int) -> list:
        """The periods of ``pattern``, listed again only when ``period`` is past the last."""
        if self._periods is None or self._periods[0] != pattern or \
                period >= len(self._periods[1]):
            path, part = _split_element(pattern)
            self._periods = (pattern, example_periods(path, part=part))
        return self._periods[1]

    def _period(self, pattern: str, period: int, paths: list) -> ExampleBatch:
        """The examples of one period in event-time order, decoded once."""
        from transforms.example_columns import read_example_columns
        if self._cursor is None or self._cursor[:2] != (pattern, period):
            self._cursor = (pattern, period, read_example_columns(paths, self.dense_dim))
        return self._cursor[2]

    def process(self, pattern, tracker=beam.DoFn.RestrictionParam(_PeriodRange())):
        yield from self._read(pattern, tracker)

    def _listed_all(self, tracker, marked: bool) -> None:
        """Every batch listed is read: a bounded read is done."""
        tracker.try_claim(tracker.current_restriction().stop)  # finishes the range

    def _read(self, pattern, tracker, watermark=None, marked: bool = False):
        """Claims and emits batches from the restriction's start, until a checkpoint or a
        split stops it, or to the end of what is listed: then :meth:`_listed_all`."""
        from transforms.example_batch import slice_batch
        if self._deferred_at is not None:
            self.resume_gap.update(int(1000 * (time.monotonic() - self._deferred_at)))
            self._deferred_at = None
        if self.gate is not None and self._emitted_ts is not None:
            self.gate.wait(self._emitted_ts)
        started = time.monotonic()
        first_ts = None
        emitted = 0
        position = tracker.current_restriction().start
        while True:
            located = self._locate(pattern, position)
            if located is None:
                self._listed_all(tracker, marked)
                return
            paths, base, done = located
            if not paths:  # a period of none of this reader's shards
                position = base + self._span
                continue
            examples = self._period(pattern, base, paths)
            n = len(examples)
            while done * self.batch_size < n:
                if not tracker.try_claim(base + done):
                    return
                batch = slice_batch(examples, done * self.batch_size,
                                    min(n, (done + 1) * self.batch_size))
                self._emitted_ts = int(batch.ts_ms.max())
                yield _timestamped(batch)
                if watermark is not None:
                    _advance_watermark(watermark, self._emitted_ts)
                done += 1
                emitted += 1
                first_ts = self._emitted_ts if first_ts is None else first_ts
                if self.checkpoint_s is not None and (
                        time.monotonic() - started > self.checkpoint_s or
                        (self.gate is not None and
                         self._emitted_ts - first_ts >= self.gate.max_staleness_ms)):
                    # Bundles end as the log is read (class docstring); the next call
                    # slices on from the period kept in the cursor.
                    tracker.defer_remainder()
                    self.bundle_batches.update(emitted)
                    self._deferred_at = time.monotonic()
                    return
            self._close_cursor()
            position = base + self._span

    _span = _BATCHES_PER_PERIOD

    def _locate(self, pattern: str, position: int):
        """(files of the period at ``position``, the position of its first batch, batches of
        it done), or None past the last period listed. Position = period index * span +
        batch: the listing of a bounded read is fixed."""
        period, done = divmod(position, self._span)
        periods = self._list(pattern, period)
        if period >= len(periods):
            return None
        return periods[period], period * self._span, done


class _TailBatchesFn(_ReadBatchesFn):
    """pattern → the batches of its periods as they land (unbounded, event-time watermark)."""

    def __init__(self, batch_size, dense_dim, checkpoint_s, gate, poll_interval_s: float,
                 stop_timestamp: float | None, stop_when_exists: str | None = None):
        super().__init__(batch_size, dense_dim, checkpoint_s, gate)
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp
        self.stop_when_exists = stop_when_exists

    @beam.DoFn.unbounded_per_element()
    def process(self, pattern, tracker=beam.DoFn.RestrictionParam(_FollowRange()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        # Looked for before reading: _read ends on a fresh listing, made after this, so
        # every file that landed before the marker is read.
        marked = bool(self.stop_when_exists) and FileSystems.exists(self.stop_when_exists)
        yield from self._read(pattern, tracker, watermark, marked)

    def _listed_all(self, tracker, marked: bool) -> None:
        """Every batch listed is read: the restriction is done once the stream is over
        (``marked``: the end marker existed before this read), else resumed after a poll
        interval."""
        if marked or (self.stop_timestamp is not None and time.time() >= self.stop_timestamp):
            tracker.try_claim(NO_END)  # past the range: the restriction is done
        else:
            tracker.defer_remainder(Duration.of(self.poll_interval_s))

    # A followed folder gains files, and one may land late, sorting before a period already
    # read: so a position names its period by start time, never by its index in a listing
    # (which a late file would shift, and a restore would list anew).
    _span = _FOLLOW_SPAN

    def _locate(self, pattern: str, position: int):
        import bisect
        start_s, done = divmod(position, self._span)
        for _ in range(2):  # the cached listing, then a fresh one if it has nothing at or after
            starts, periods = self._listing(pattern, start_s)
            i = bisect.bisect_left(starts, start_s)
            if i < len(starts):
                return periods[i], starts[i] * self._span, done if starts[i] == start_s else 0
            self._periods = None
        return None

    def _listing(self, pattern: str, start_s: int) -> tuple:
        """(start seconds, files) of the complete periods, in time order; listed again when
        asked to (start times parsed once per listing: ``_locate`` runs every resumption)."""
        if self._periods is None or self._periods[0] != pattern:
            path, part = _split_element(pattern)
            listed = example_periods(path, complete_only=True, keyed=True,
                                     from_key=time.strftime("%Y%m%dT%H%M%SZ",
                                                            time.gmtime(start_s)), part=part)
            named = [(_period_start_s(k), k, p) for k, p in listed]
            if any(s is None for s, _, _ in named):
                self._warn_unnamed([k for s, k, _ in named if s is None])
                named = [n for n in named if n[0] is not None]
            seen = getattr(self, "_seen_keys", None)
            if seen is not None:
                late = [p for s, k, paths in named if k not in seen and s < start_s
                        for p in paths]
                if late:
                    self.late_files.inc(len(late))
                    _LOG.warning("skipping %d example files that landed after a later "
                                 "period was read: %s", len(late), late[:3])
            self._seen_keys = {k for _, k, _ in named}
            self._periods = (pattern, ([s for s, _, _ in named], [p for _, _, p in named]))
        return self._periods[1]

    def _warn_unnamed(self, names) -> None:
        if not getattr(self, "_warned_unnamed", False):
            self._warned_unnamed = True
            _LOG.warning("a followed example log is read by period (dataflow.join's "
                         "PERIOD-SHARD-of-N names); skipping %d other files: %s",
                         len(names), names[:3])


def _period_start_s(key: str):
    """Epoch seconds of an example-log period key (``20240101T130000Z``), None for others."""
    import calendar
    try:
        return calendar.timegm(time.strptime(key, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None


def _advance_watermark(watermark, ts_ms: int) -> None:
    event_time = Timestamp(micros=ts_ms * 1000)
    current = watermark.current_watermark()
    if current is None or event_time > current:
        watermark.set_watermark(event_time)


def _timestamped(batch):
    return TimestampedValue(batch, int(batch.ts_ms.max()) / 1000.0)
