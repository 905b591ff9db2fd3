# Two commands: `make demo` and `make test`. Both set up what is missing, and only that:
#   .venv          the library with its pinned dependencies (setup.py)
#   .venv-flink    the apache-flink wheel, --no-deps: a Flink distribution for a local cluster
#   .cache/flink/  Beam's Flink job server jar, shaded by Maven from flink/jobserver/pom.xml
#   .cache/kafka/  Apache Kafka's broker jars, copied by Maven from kafka/pom.xml
#   system packages  Java 17 and Maven (to build the jar), redis-server (the tests' store):
#                  installed with apt-get when missing and run as root; otherwise make stops
#                  at once with the one command to run (scripts/system-packages.sh)
# A second run finds all of them in place and downloads nothing.

PYTHON        ?= python3
VENV          := .venv
PY            := $(VENV)/bin/python
FLINK_VENV    := .venv-flink
# The cluster's Flink minor version must equal the job server's (flink/jobserver/pom.xml).
FLINK_WHEEL_VERSION := 1.19.3
JOBSERVER_JAR := .cache/flink/beam-runners-flink-1.19-job-server-2.62.0.jar
# Keep in step with kafka/pom.xml and KAFKA_VERSION in dataflow/kafka.py.
KAFKA_VERSION := 4.1.1
KAFKA_LIBS    := .cache/kafka/$(KAFKA_VERSION)/libs
PYTEST_ARGS   ?=

.PHONY: demo test setup flink-dist flink-jobserver flink-kafka-jobserver kafka-dist system-packages redis-package clean peers loop

demo: $(VENV)/.installed
	$(PY) -m dataflow demo

# The closed loop (serving, simulated users, joins, online training, Redis) for 4 simulated
# hours after 4 of history (~6.5 min); prints and plots online serving AUC (out/loop/). LOOP_ARGS: more
# flags (LOOP_ARGS="--transport kafka": serving, the simulator and the join on Kafka topics).
LOOP_ARGS ?=
# With --transport kafka (the join as a streaming Flink job over topics) or --runner
# FlinkRunner, the broker's jars and the job server jar too.
LOOP_NEEDS := $(if $(findstring kafka,$(LOOP_ARGS)),$(KAFKA_LIBS)/.installed $(JOBSERVER_JAR),\
              $(if $(findstring Flink,$(LOOP_ARGS)),$(JOBSERVER_JAR)))
loop: redis-package $(VENV)/.installed $(LOOP_NEEDS)
	$(PY) -m dataflow.loop --out out/loop $(LOOP_ARGS)

test: system-packages $(VENV)/.installed $(FLINK_VENV)/.installed $(JOBSERVER_JAR) \
      $(KAFKA_LIBS)/.installed
	$(PY) -m pytest -p no:cacheprovider --durations=15 $(PYTEST_ARGS) tests

setup: system-packages $(VENV)/.installed $(FLINK_VENV)/.installed $(JOBSERVER_JAR) \
       $(KAFKA_LIBS)/.installed

# constraints.txt pins every transitive version that the tests passed with (pip freeze):
# installs are reproducible, and pip does not spend minutes resolving Beam's extras.
$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

flink-dist: $(FLINK_VENV)/.installed
$(FLINK_VENV)/.installed:
	test -x $(FLINK_VENV)/bin/python || $(PYTHON) -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/pip install -q --no-deps apache-flink==$(FLINK_WHEEL_VERSION) \
	    apache-flink-libraries==$(FLINK_WHEEL_VERSION)
	touch $@

flink-jobserver: $(JOBSERVER_JAR)
$(JOBSERVER_JAR): flink/jobserver/pom.xml
	@scripts/system-packages.sh java17 maven
	mvn -q -B -f flink/jobserver/pom.xml package
	mkdir -p $(dir $@)
	mv flink/jobserver/target/$(notdir $@) $@
	rm -rf flink/jobserver/target

# Issue #20 probe: the job server + KafkaIO + kafka-clients (also Beam's Java expansion
# service), beside the plain jar, never replacing it (benchmarks/kafka_xlang_probe.py).
KAFKA_JOBSERVER_JAR := .cache/flink-kafka/beam-runners-flink-1.19-kafka-job-server-2.62.0.jar
flink-kafka-jobserver: $(KAFKA_JOBSERVER_JAR)
$(KAFKA_JOBSERVER_JAR): flink/kafka-jobserver/pom.xml
	@scripts/system-packages.sh java17 maven
	mvn -q -B -f flink/kafka-jobserver/pom.xml package
	mkdir -p $(dir $@)
	mv flink/kafka-jobserver/target/$(notdir $@) $@
	rm -rf flink/kafka-jobserver/target

# The broker runs from these jars: java -cp '$(KAFKA_LIBS)/*' kafka.Kafka (dataflow/kafka.py).
kafka-dist: $(KAFKA_LIBS)/.installed
$(KAFKA_LIBS)/.installed: kafka/pom.xml
	@scripts/system-packages.sh java17 maven
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f kafka/pom.xml package -Dkafka.version=$(KAFKA_VERSION) \
	    -Dkafka.libs=$(abspath $(KAFKA_LIBS))
	touch $@

# river (numpy 2) for benchmarks.train --peers, apart from .venv (numpy 1.26 for TF 2.16)
peers: .venv-peers/.installed
.venv-peers/.installed:
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q river==0.26.1 fastavro==1.13.1
	touch $@

# What the tests need of the system: Java 17 and Maven (Flink, the job server jar), Redis.
system-packages:
	@scripts/system-packages.sh java17 maven redis
redis-package:
	@scripts/system-packages.sh redis

clean:
	rm -rf $(VENV) $(FLINK_VENV) .venv-peers .cache flink/jobserver/target kafka/target \
	    *.egg-info
