"""beam-monolith: Monolith-style real-time recommendation training on Apache Beam and Flink.

Version pins (why each one is what it is) are explained in docs/version-pins.md.
"""
from setuptools import find_packages, setup

# One Beam version on both sides of the portable API: the Python SDK here and the Flink
# job server jar that flink/jobserver/pom.xml assembles (beam.version there).
BEAM_VERSION = "2.62.0"

INSTALL_REQUIRES = [
    f"apache-beam[gcp]=={BEAM_VERSION}",
    # The newest TensorFlow / TFT pair that resolves with Beam 2.62 (TFT >= 1.17 needs
    # tfx-bsl 1.17+ or protobuf >= 6, which Beam 2.62 refuses).
    "tensorflow==2.16.2",
    "tensorflow-transform==1.16.0",
    "tfx-bsl==1.16.1",
    "tensorflow-metadata==1.16.1",
    "keras==3.6.0",
    "numpy==1.26.4",
    "pandas==1.5.3",  # transforms.model (fast unique fids); the version tfx-bsl allows
    "numba==0.68.1",  # the table's kernels (ps/); supports numpy 1.26
    "fastavro==1.13.1",
    "PyYAML==6.0.4",
    "redis==5.3.1",
    "matplotlib==3.11.2",
    # Kafka client (librdkafka in its manylinux wheel): the Kafka sink, the tests' broker
    "confluent-kafka==2.16.1",
]

EXTRAS = {
    "test": ["pytest==9.2.0", "hypothesis==6.170.17"],
}

setup(
    name="beam-monolith",
    version="0.1.0",
    description="Collisionless embeddings, online joining and real-time training on Apache Beam / Flink",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["dataflow*", "transforms*", "ps*", "schemas*", "benchmarks*"]),
    package_data={"schemas": ["*.avsc", "configs/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
