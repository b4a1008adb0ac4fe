"""WorkerSettings: IMGQ_* parsing, validation messages, overrides, masking."""

from __future__ import annotations

import dataclasses

import pytest

from imgq.shared.decode import DecodeLimits
from imgq.worker.settings import _LIMIT_FIELDS, _OTEL_VARS, _VARS, ENV_VARS, WorkerSettings


def test_defaults_without_environment() -> None:
    """With no IMGQ_* variables the documented defaults apply; results go to the broker."""
    s = WorkerSettings.from_env({})
    assert (s.broker_url, s.queue, s.concurrency, s.max_batch) == (
        "redis://127.0.0.1:6379/0", "imgq", 1, 32,
    )  # fmt: skip
    assert s.result_backend == s.broker_url
    assert s.max_wait_ms is None and s.drift_enabled and s.log_format == "json"
    assert s.decode_limits == DecodeLimits()


def test_environment_is_parsed_into_typed_fields(tmp_path) -> None:
    """Every kind of variable (URL, path, int, float, bool, limits) is parsed to its type."""
    env = {
        "IMGQ_BROKER_URL": "redis://:pw@queue:6379/1",
        "IMGQ_RESULT_BACKEND": "redis://results:6379/2",
        "IMGQ_MODEL": str(tmp_path),
        "IMGQ_MAX_BATCH": "8",
        "IMGQ_MAX_WAIT_MS": "2.5",
        "IMGQ_DRIFT": "off",
        "IMGQ_MAX_PIXELS": "1000000",
        "IMGQ_LEASE_TTL_S": "3",
        "IMGQ_INFER_BATCH": "4",
    }
    s = WorkerSettings.from_env(env)
    assert s.infer_batch == 4
    assert WorkerSettings.from_env({"IMGQ_INFER_BATCH": "Auto"}).infer_batch == 0
    assert s.result_backend == "redis://results:6379/2"
    assert s.model_dir == tmp_path
    assert (s.max_batch, s.max_wait_ms, s.drift_enabled, s.lease_ttl_s) == (8, 2.5, False, 3.0)
    assert s.decode_limits == DecodeLimits(max_pixels=1_000_000)


def test_overrides_win_and_none_is_ignored() -> None:
    """Command-line values override the environment; options not given (None) do not."""
    s = WorkerSettings.from_env(
        {"IMGQ_QUEUE": "env", "IMGQ_MAX_BATCH": "4"}, queue="cli", max_batch=None
    )
    assert (s.queue, s.max_batch) == ("cli", 4)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"IMGQ_MAX_BATCH": "lots"}, "IMGQ_MAX_BATCH='lots' is not an integer"),
        (
            {"IMGQ_MAX_BATCH": "0"},
            "max_batch (IMGQ_MAX_BATCH) must be an integer in 1..4096, got 0",
        ),
        ({"IMGQ_DEVICE": "tpu"}, "device (IMGQ_DEVICE) must be one of auto, cpu, cuda, got 'tpu'"),
        ({"IMGQ_INFER_BATCH": "big"}, "IMGQ_INFER_BATCH='big' is not an integer"),
        ({"IMGQ_DRIFT": "maybe"}, "IMGQ_DRIFT='maybe' is not a boolean"),
        ({"IMGQ_MAX_WAIT_MS": "-1"}, "max_wait_ms (IMGQ_MAX_WAIT_MS) must be a number in 0..5000"),
        ({"IMGQ_QUEUE": "a b"}, "queue (IMGQ_QUEUE) must be a non-empty name without spaces"),
        ({"IMGQ_LOG_FORMAT": "xml"}, "log_format (IMGQ_LOG_FORMAT) must be one of json, text"),
        (
            {"IMGQ_MODEL": "/no/such/bundle"},
            "model_dir (IMGQ_MODEL) /no/such/bundle is not a folder",
        ),
        (
            {"IMGQ_METRICS_PORT": "70000"},
            "metrics_port (IMGQ_METRICS_PORT) must be an integer in 0..65535",
        ),
        ({"IMGQ_MAX_ASPECT": "0.5"}, "max_aspect must be in 1.0..1000.0, got 0.5"),
    ],
)
def test_bad_values_name_the_variable_value_and_what_is_allowed(env, expected) -> None:
    """A bad value stops start-up with a message naming the variable, the value and the range."""
    with pytest.raises(ValueError) as info:
        WorkerSettings.from_env(env)
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    """Several bad values are listed together, so one restart fixes them all."""
    with pytest.raises(ValueError, match="concurrency.*threads"):
        WorkerSettings.from_env({"IMGQ_CONCURRENCY": "0", "IMGQ_THREADS": "0"})


def test_bad_url_is_refused_with_its_password_masked() -> None:
    """A non-Redis URL is refused; the message does not leak the password in it."""
    with pytest.raises(ValueError) as info:
        WorkerSettings.from_env({"IMGQ_BROKER_URL": "amqp://u:hunter2@rabbit//"})
    assert "must be a Redis URL" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_unknown_override_is_a_type_error() -> None:
    """A misspelt override names the known settings instead of being ignored."""
    with pytest.raises(TypeError, match="unknown settings \\['max_batches'\\]"):
        WorkerSettings.from_env({}, max_batches=3)


def test_describe_masks_passwords() -> None:
    """The settings printed at start-up carry no password."""
    s = WorkerSettings.from_env({"IMGQ_BROKER_URL": "rediss://user:s3cret@redis:6380/0"})
    described = s.describe()
    assert described["broker_url"] == "rediss://user:***@redis:6380/0"
    assert described["result_backend"] == "rediss://user:***@redis:6380/0"
    assert "s3cret" not in repr(described)


@pytest.mark.parametrize(
    ("provider", "max_wait_ms", "expected"),
    [
        ("CPUExecutionProvider", None, 0.0),
        ("CUDAExecutionProvider", None, 2.0),
        ("CPUExecutionProvider", 5.0, 5.0),
    ],
)
def test_wait_defaults_by_provider(provider, max_wait_ms, expected) -> None:
    """Waiting for a fuller batch is on by default only on CUDA; an explicit value always wins."""
    assert WorkerSettings(max_wait_ms=max_wait_ms).wait_ms_for(provider) == expected


def test_env_reference_covers_every_setting() -> None:
    """Every field has a variable, and the documented limit defaults are the real ones."""
    fields = {f.name for f in dataclasses.fields(WorkerSettings)} - {"decode_limits"}
    assert {v.field for v in _VARS + _OTEL_VARS} == fields | set(_LIMIT_FIELDS)
    assert set(ENV_VARS) == {v.env for v in _VARS}
    defaults = DecodeLimits()
    for var in _VARS:
        if var.field in _LIMIT_FIELDS:
            assert var.parse(var.default) == getattr(defaults, var.field), var.env


def test_otel_settings_are_read_and_checked() -> None:
    """The OTEL_* variables imgq reads; a value the SDK would ignore with a warning stops the
    worker at start, naming the variable and what is allowed."""
    off = WorkerSettings.from_env({})
    assert not off.tracing and off.traces_sampler == "parentbased_always_on"
    for var in _OTEL_VARS:  # the documented defaults are the real ones
        assert var.parse(var.default) == getattr(off, var.field), var.env
    assert not WorkerSettings.from_env({"OTEL_TRACES_EXPORTER": "none"}).tracing
    on = WorkerSettings.from_env({
        "OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01",
    })  # fmt: skip
    assert on.tracing and on.traces_exporters == ("otlp", "console")
    assert (on.traces_protocol, on.traces_sampler_arg) == ("grpc", 0.01)
    both = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert WorkerSettings.from_env(both).traces_protocol == "http/protobuf"
    disabled = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert not WorkerSettings.from_env(disabled).tracing
    for env, named in [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "PROTOCOL"),
    ]:
        with pytest.raises(ValueError, match=named):
            WorkerSettings.from_env(env)
