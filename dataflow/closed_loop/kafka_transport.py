"""The loop's logs as Kafka topics (``python -m dataflow.loop --transport kafka``):
:class:`KafkaTransport`, a broker of the loop's own and its three topics.

Serving writes the ``features`` topic, the simulator the ``actions`` topic (with watermark
marks: ``dataflow.serving.kafka_log``), the streaming join reads both and writes the
``examples`` topic (each example once, in order), and online training follows that. The
history before the run is a backfill: its logs are files, joined in one go as with
``--transport files``, and its examples go into the examples topic before the run's, in
the order the join writes (``produce_examples``).
"""
from __future__ import annotations

import logging
from typing import Optional

__all__ = ["KafkaTransport", "TOPICS"]

_LOG = logging.getLogger(__name__)

#: topic -> schema of its records
TOPICS = {"features": "feature_log", "actions": "action_log", "examples": "example"}


class KafkaTransport:
    """A Kafka broker (``dataflow.kafka.KafkaBroker``, in ``workdir``, emptied first) with
    the loop's topics; use it as a context manager: the broker is stopped however the loop
    ends.

    Args:
        workdir: the broker's folder.
        partitions: partitions of each topic. One writer per log and one training worker
            need no more here; with several, a partition that gets no record for a while
            still moves on with its writer's watermark marks.
    """

    def __init__(self, workdir: str, partitions: int = 1):
        self.workdir = workdir
        self.partitions = partitions
        self.broker = None

    def start(self) -> "KafkaTransport":
        """Starts the broker and creates the topics.

        Returns:
            self.
        """
        import shutil

        from dataflow.kafka import KafkaBroker
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.broker = KafkaBroker(workdir=self.workdir, partitions=self.partitions).start()
        for topic in TOPICS:
            self.broker.create_topic(topic, self.partitions)
        return self

    def stop(self) -> None:
        """Stops the broker (nothing if it is not running)."""
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> "KafkaTransport":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> Optional[int]:
        """The broker's process id (it leads a process group of its own)."""
        return self.broker.pid if self.broker is not None else None

    def url(self, topic: str) -> str:
        """``kafka://HOST:PORT/TOPIC`` of one of :data:`TOPICS`."""
        return f"kafka://{self.broker.bootstrap}/{topic}"

    def produce_examples(self, paths: list) -> int:
        """Writes example files into the examples topic in event-time order, each to the
        partition the join's writer would put it in (``transforms.kafka_sink``), so that the
        join's first example lands after them.

        Args:
            paths: example files (``transforms.example_log``).

        Returns:
            How many were written.

        Raises:
            RuntimeError: the broker did not take them all.
        """
        from confluent_kafka import Producer

        from transforms.example_log import read_examples_in_order
        from transforms.kafka_records import KafkaRecordCodec
        from transforms.kafka_sink import kafka_partition
        codec = KafkaRecordCodec("example")
        producer = Producer({"bootstrap.servers": self.broker.bootstrap,
                             "enable.idempotence": True, "acks": "all", "linger.ms": 20})
        failed, n = [], 0
        for example in read_examples_in_order(paths):
            key, value = codec.encode(example)
            while True:
                try:
                    producer.produce("examples", value, key, headers=codec.headers,
                                     partition=kafka_partition(key, self.partitions),
                                     timestamp=int(example["ts_ms"]),
                                     on_delivery=lambda e, m: failed.append(e) if e else None)
                    break
                except BufferError:
                    producer.poll(0.05)
            n += 1
        if producer.flush(60) or failed:
            raise RuntimeError(f"examples topic: {len(failed)} history examples were not "
                               f"delivered ({failed[:1]})")
        return n

    def end_logs(self) -> None:
        """Ends the features and actions topics (their writers are done): the join's input
        ends, every window closes."""
        from dataflow.serving.kafka_log import end_topic
        for topic in ("features", "actions"):
            end_topic(self.url(topic))

    def examples(self) -> int:
        """How many messages the examples topic holds (every one an example)."""
        from confluent_kafka import Consumer, TopicPartition
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap,
                             "group.id": "beam-monolith-loop"})
        try:
            total = 0
            for p in range(self.partitions):
                low, high = consumer.get_watermark_offsets(TopicPartition("examples", p),
                                                           timeout=10)
                total += high - low
            return total
        finally:
            consumer.close()

    def last_example_ts(self) -> Optional[int]:
        """The event time of the latest example in the examples topic (None: none yet)."""
        from transforms.kafka_source import last_record
        last = [last_record(self.broker.bootstrap, "examples", p, "example")
                for p in range(self.partitions)]
        return max((r["ts_ms"] for r in last if r is not None), default=None)
