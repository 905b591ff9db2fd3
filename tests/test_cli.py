"""The command lines are quiet by default (our progress lines and results, no library noise),
show everything with --verbose, and document every default in --help; importing the library
changes no logging or warnings state."""
from __future__ import annotations

import glob
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"Warning|WARNING|tensorflow/|external/local_|oneDNN|cuda")

# every command line (with a subcommand: one of its subcommands)
CLIS = ["dataflow", "dataflow.train", "dataflow.join", "dataflow.smoke", "dataflow.analyze",
        "dataflow.demo", "dataflow.loop", "dataflow.serve", "dataflow.simulate",
        "dataflow.data synth", "dataflow.data movielens", "dataflow.data table",
        "dataflow.flink start", "dataflow.kafka start", "dataflow.kafka topics",
        "benchmarks.gap", "benchmarks.join", "benchmarks.kafka", "benchmarks.model",
        "benchmarks.preprocess",
        "benchmarks.serve", "benchmarks.serve_ab", "benchmarks.store", "benchmarks.table",
        "benchmarks.train",
        "benchmarks.experiments sync"]


def run(args, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


def option_help(text: str, flag: str) -> str:
    """The help of ``flag`` in argparse's --help output, on one line."""
    m = re.search(rf"^  {flag}\b.*?(?=^  -|^\S|\Z)", text, re.M | re.S)
    assert m, f"{flag} not in the help"
    return " ".join(m.group(0).split())


@pytest.mark.parametrize("prog", ["dataflow train", "dataflow.train"])
def test_train_help_names_the_mode_and_every_default_without_warnings(prog):
    from transforms.scores import SCORE_COLUMNS
    done = run([*prog.split(), "--help"])
    assert done.returncode == 0, done.stderr
    assert noise(done.stdout + done.stderr) == [] and done.stderr == ""
    assert done.stdout.startswith(f"usage: python -m {prog} {{backfill,online}} "
                                  "--input INPUT --config CONFIG [options]")
    assert "(default: 256)" in option_help(done.stdout, "--batch_size")
    for flag, default in [("--model", "deepfm"), ("--optimizer", "adagrad"),
                          ("--learning_rate", "0.05"), ("--num_shards", "2"),
                          ("--direct_num_workers", "1")]:
        assert f"(default: {default})" in option_help(done.stdout, flag)
    assert "out/train/MODE-YYYYmmdd-HHMMSS" in option_help(done.stdout, "--metrics_dir")
    scores = option_help(done.stdout, "--scores_out")
    assert all(key in scores for key in SCORE_COLUMNS), scores  # the .npz file's keys
    assert "--verbose" in done.stdout and "--metrics_out" in done.stdout


def test_join_help_names_its_required_flags_and_defaults():
    from transforms.joiner import DEFAULT_JOIN_WINDOW_S, POSITIVE_ACTIONS
    done = run(["dataflow.join", "--help"])
    assert done.returncode == 0, done.stderr
    assert noise(done.stdout + done.stderr) == []
    assert done.stdout.startswith("usage: python -m dataflow.join --features FEATURES "
                                  "--actions ACTIONS --out OUT [options]")
    assert f"(default: {DEFAULT_JOIN_WINDOW_S})" in option_help(done.stdout, "--join_window_s")
    assert f"(default: {','.join(sorted(POSITIVE_ACTIONS))})" in option_help(
        done.stdout, "--positive_actions")


@pytest.mark.parametrize("command", CLIS)
def test_every_cli_helps_quietly_with_defaults_and_verbose(command):
    done = run([*command.split(), "--help"])
    assert done.returncode == 0, done.stderr
    assert noise(done.stdout + done.stderr) == [], command
    if command != "dataflow":  # the list of pipelines
        assert "(default" in done.stdout and "--verbose" in done.stdout


def test_loop_help_shows_defaults_of_options_without_help_text():
    done = run(["dataflow.loop", "--help"])
    assert "(default: 128)" in option_help(done.stdout, "--batch_size")
    assert "(default: 300.0)" in option_help(done.stdout, "--join_window_s")
    # an option whose help gives its default is not given a second one
    assert option_help(done.stdout, "--store").count("default") == 1


def test_importing_the_library_changes_no_global_state():
    """Only the entry points set up output (dataflow.cli.setup): a library import adds no
    handler or filter to another package's logger, no warnings filter, and patches nothing
    of Beam's (transforms.state_cache is an explicit call), nor the interpreter's recursion
    limit, thread stack size or garbage collector."""
    script = textwrap.dedent("""
        import gc, importlib, logging, os, pkgutil, sys, threading, warnings
        import apache_beam, numpy, tensorflow, fastavro  # their own import-time effects first
        from apache_beam.runners.worker import statecache
        interpreter = lambda: (statecache.get_deep_size, sys.getrecursionlimit(),
                               threading.stack_size(), gc.isenabled(), gc.get_freeze_count())
        interpreter_before = interpreter()
        loggers = lambda: {n: l for n, l in logging.Logger.manager.loggerDict.items()
                           if isinstance(l, logging.Logger)} | {"root": logging.getLogger()}
        state = lambda: ({n: (list(l.handlers), list(l.filters), l.level)
                          for n, l in loggers().items()},
                         list(warnings.filters), os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
        before = state()
        names = []
        for pkg in ("schemas", "ps", "transforms", "dataflow", "benchmarks"):
            names.append(pkg)
            names += [m.name for m in pkgutil.walk_packages(
                importlib.import_module(pkg).__path__, pkg + ".")]
        for name in names:
            if name != "benchmarks.river_peer":  # needs `make peers`
                importlib.import_module(name)
        after = state()
        ours = ("schemas", "ps", "transforms", "dataflow", "benchmarks")
        changed = [n for n, s in after[0].items() if not n.startswith(ours)
                   and s != before[0].get(n, ([], [], logging.NOTSET))]
        print("imported", len(names))
        print("loggers changed:", changed)
        print("warnings filters changed:", after[1] != before[1])
        print("TF_CPP_MIN_LOG_LEVEL changed:", after[2] != before[2])
        print("interpreter changed:", interpreter() != interpreter_before)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loggers changed: []" in done.stdout, done.stdout
    assert "warnings filters changed: False" in done.stdout
    assert "TF_CPP_MIN_LOG_LEVEL changed: False" in done.stdout
    assert "interpreter changed: False" in done.stdout
    assert int(done.stdout.split("imported ")[1].split()[0]) > 40


def _beam_complaints(records) -> list[str]:
    """What Beam logged about our code: warnings, and type hints it could not read."""
    return [r.getMessage() for r in records if r.name.startswith("apache_beam") and (
        r.levelno >= logging.WARNING or "Converting string literal" in r.getMessage())]


@pytest.mark.parametrize("mode", ["backfill", "online"])
def test_building_the_training_pipeline_draws_no_beam_warning(tmp_path, caplog, mode):
    """Stateful DoFns get deterministic key coders, every process method returns an
    iterable, no annotation is a string Beam reads as Any (scores and model export on)."""
    import apache_beam as beam

    from dataflow import train
    from dataflow.options import pipeline_options
    options = pipeline_options([
        f"--input={tmp_path}/examples/*.avro", "--config=synthetic", "--model=fm",
        f"--metrics_dir={tmp_path}/m", f"--scores_out={tmp_path}/scores",
        f"--model_dir={tmp_path}/models", f"--store=memory://build-{mode}",
        *(["--streaming"] if mode == "online" else [])], train.TrainOptions)
    caplog.set_level(logging.INFO)
    train.build(beam.Pipeline(options=options), options.view_as(train.TrainOptions), mode)
    assert _beam_complaints(caplog.records) == []


def test_building_the_join_draws_no_beam_warning(tmp_path, caplog):
    import apache_beam as beam

    from dataflow import join
    from dataflow.options import pipeline_options
    options = pipeline_options([f"--features={tmp_path}/f/*.avro", "--config=synthetic",
                                f"--actions={tmp_path}/a/*.avro", f"--out={tmp_path}/out"],
                               join.JoinOptions)
    caplog.set_level(logging.INFO)
    join.build(beam.Pipeline(options=options), options.view_as(join.JoinOptions))
    assert _beam_complaints(caplog.records) == []


def _smoke_input(tmp_path) -> str:
    from schemas import write_avro
    write_avro(str(tmp_path / "events.avro"), "smoke_event",
               [{"request_id": f"r{i}", "user": f"u{i % 3}", "ts_ms": i * 1000, "value": 1.0}
                for i in range(50)])
    return str(tmp_path / "events.avro")


def test_a_run_draws_no_beam_warning_about_our_flags(tmp_path, caplog):
    """Beam's DirectRunner calls our flags "invalid overrides" (it knows only Beam's): a run
    says nothing of it."""
    from dataflow import smoke
    caplog.set_level(logging.INFO)
    smoke.main([f"--input={_smoke_input(tmp_path)}", f"--out={tmp_path}/out/b"])
    assert _beam_complaints(caplog.records) == []
    assert glob.glob(f"{tmp_path}/out/b*.jsonl")


def test_a_cli_run_is_quiet_and_verbose_shows_the_libraries(tmp_path):
    flags = [f"--input={_smoke_input(tmp_path)}", f"--out={tmp_path}/out/b"]
    quiet = run(["dataflow", "smoke", *flags])
    assert quiet.returncode == 0, quiet.stderr
    assert [line.split(" ", 1)[1] for line in quiet.stderr.splitlines()] == [
        f"smoke: bucket summaries in {tmp_path}/out/b*.jsonl"], \
        quiet.stderr  # our one result line: no library lines, no counters
    verbose = run(["dataflow.smoke", *flags, "--verbose"])
    assert verbose.returncode == 0, verbose.stderr
    assert "INFO apache_beam" in verbose.stderr and "FutureWarning" in verbose.stderr
    assert "DEBUG dataflow.job: pipeline finished: {" in verbose.stderr  # every counter


@pytest.mark.slow
def test_train_cli_is_quiet_and_each_run_gets_its_own_metrics_folder(tmp_path, example_log):
    """TensorFlow's start-up lines and Beam's notes stay out of a training run's output;
    without --metrics_dir each run writes into a new folder, named at start and end."""
    argv = ["dataflow.train", "backfill", f"--input={example_log['files'][0]}",
            "--config=synthetic", "--model=lr", f"--store=memory://cli-{tmp_path.name}"]
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert noise(done.stdout + done.stderr) == [], done.stderr
    folders = glob.glob(str(tmp_path / "out" / "train" / "backfill-*"))
    assert len(folders) == 1 and os.path.exists(
        os.path.join(folders[0], "online-backfill-totals.json"))
    named = [line for line in done.stderr.splitlines()
             if os.path.relpath(folders[0], tmp_path) in line]
    assert len(named) == 2 and "online AUC" in named[1], done.stderr
    again = run(argv, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(glob.glob(str(tmp_path / "out" / "train" / "backfill-*"))) == 2
