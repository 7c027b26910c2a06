//! `telemetry::init` as the services use it, configured by the standard `OTEL_*` variables.
//! `init` installs a process-wide subscriber and reads the environment, so each case runs in
//! a child process (this test executable, running one of the `child_*` tests) and the spans
//! it exports are received by a collector in the parent.

use std::hash::{BuildHasher, RandomState};
use std::process::Output;

use otlp_collector::{Collector, Kind};
use telemetry::LogFormat;
use tracing::Instrument;

const OTEL_VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_SCHEDULE_DELAY",
    "RUST_LOG",
];

/// Emits, inside a tokio runtime with ONE worker thread, a SERVER span `sampled-work` under
/// `SAMPLED_PARENT` with a child `inner`, and the same under `UNSAMPLED_PARENT`; then shuts
/// telemetry down from a task on that single worker (the hardest place for the grpc
/// exporter, whose connection task needs a worker to run).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child_emits_spans() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let telemetry = telemetry::init("child-default-name", LogFormat::Json).expect("telemetry::init");
        println!("exporting={}", telemetry.exporting());
        for (var, name) in [("SAMPLED_PARENT", "sampled-work"), ("UNSAMPLED_PARENT", "unsampled-work")] {
            let parent = std::env::var(var).expect("parent traceparent in the environment");
            let span = tracing::info_span!("work", otel.name = name, otel.kind = "server");
            telemetry::propagation::set_remote_parent(&span, Some(&parent), None);
            async {
                tracing::info_span!("inner").in_scope(|| tracing::info!(work = name, "inside"));
                tokio::task::yield_now().await;
            }
            .instrument(span)
            .await;
        }
        tokio::spawn(async move { telemetry.shutdown() }).await.expect("shutdown task");
    });
}

/// Calls `init` with no tokio runtime and prints the error (the grpc exporter needs one).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child_init_fails() {
    match telemetry::init("child", LogFormat::Text) {
        Ok(_) => panic!("init succeeded"),
        Err(e) => println!("init error: {e}"),
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes.div_ceil(8))
        .map(|_| format!("{:016x}", RandomState::new().hash_one(std::time::SystemTime::now())))
        .collect::<String>()[..bytes * 2]
        .to_owned()
}

struct Parents {
    trace: String,
    span: String,
    unsampled_trace: String,
}

impl Parents {
    fn new() -> Self {
        Self { trace: random_hex(16), span: random_hex(8), unsampled_trace: random_hex(16) }
    }

    fn envs(&self) -> [(&'static str, String); 2] {
        [
            ("SAMPLED_PARENT", format!("00-{}-{}-01", self.trace, self.span)),
            ("UNSAMPLED_PARENT", format!("00-{}-{}-00", self.unsampled_trace, random_hex(8))),
        ]
    }
}

async fn run_child(test: &str, envs: &[(&str, String)]) -> Output {
    let mut command = tokio::process::Command::new(std::env::current_exe().expect("test executable"));
    command.args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"]);
    for var in OTEL_VARIABLES {
        command.env_remove(var);
    }
    command.envs(envs.iter().map(|(k, v)| (k, v)));
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("child finished within 60 s")
        .expect("run child test");
    assert!(
        output.status.success(),
        "child `{test}` failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `child_emits_spans` exporting to `endpoint`. Everything it exported has arrived
/// when it exits: `Telemetry::shutdown` flushed it (the batch delay is set far beyond the
/// child's lifetime, so only the flush can have sent anything).
async fn export_from_child(protocol: &str, endpoint: String, service_name: Option<&str>) -> Parents {
    let parents = Parents::new();
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ];
    envs.extend(parents.envs());
    if let Some(name) = service_name {
        envs.push(("OTEL_SERVICE_NAME", name.to_owned()));
    }
    let output = run_child("child_emits_spans", &envs).await;
    assert!(String::from_utf8_lossy(&output.stdout).contains("exporting=true"));
    parents
}

/// The sampled parent's trace arrived with the right service, parent and kind; the
/// unsampled parent's trace did not arrive at all.
fn check_spans(spans: &[otlp_collector::CollectedSpan], parents: &Parents, service_name: &str) {
    let show = || spans.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    let work = spans
        .iter()
        .find(|s| s.name == "sampled-work")
        .unwrap_or_else(|| panic!("no `sampled-work` span in:\n{}", show()));
    assert_eq!(work.service_name, service_name);
    assert_eq!(work.trace_id, parents.trace, "the incoming trace id is kept");
    assert_eq!(work.parent_span_id, parents.span, "the incoming span is the parent");
    assert_eq!(work.kind, Kind::Server);
    let inner = spans
        .iter()
        .find(|s| s.name == "inner" && s.trace_id == parents.trace)
        .unwrap_or_else(|| panic!("no `inner` span in:\n{}", show()));
    assert_eq!(inner.parent_span_id, work.span_id);
    assert_eq!(inner.kind, Kind::Internal);
    assert!(
        spans.iter().all(|s| s.trace_id != parents.unsampled_trace),
        "spans of an unsampled parent were exported:\n{}",
        show()
    );
}

#[tokio::test]
async fn grpc_export_continues_the_incoming_trace_and_flushes_on_shutdown() {
    let collector = Collector::start().await.expect("collector");
    let parents = export_from_child("grpc", collector.grpc_endpoint(), Some("svc-grpc")).await;
    check_spans(&collector.spans(), &parents, "svc-grpc");
}

#[tokio::test]
async fn http_protobuf_export_works_and_the_default_service_name_applies() {
    let collector = Collector::start().await.expect("collector");
    let parents = export_from_child("http/protobuf", collector.http_endpoint(), None).await;
    check_spans(&collector.spans(), &parents, "child-default-name");
}

#[tokio::test]
async fn the_sampler_variable_is_respected() {
    let collector = Collector::start().await.expect("collector");
    let parents = Parents::new();
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint()),
        ("OTEL_TRACES_SAMPLER", "always_off".to_owned()),
    ];
    envs.extend(parents.envs());
    run_child("child_emits_spans", &envs).await;
    let spans = collector.spans();
    assert!(spans.is_empty(), "always_off exported {} spans", spans.len());
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_but_logs_still_carry_the_trace() {
    let parents = Parents::new();
    let output = run_child("child_emits_spans", &parents.envs()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("exporting=false"), "stdout:\n{stdout}");
    assert!(!stderr.to_lowercase().contains("error"), "errors without an endpoint:\n{stderr}");
    let line = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["work"] == "sampled-work")
        .unwrap_or_else(|| panic!("no JSON log line of the sampled work in:\n{stdout}"));
    assert_eq!(line["trace_id"], parents.trace.as_str(), "{line}");
}

#[tokio::test]
async fn grpc_without_a_tokio_runtime_is_an_error_not_a_panic() {
    let output =
        run_child("child_init_fails", &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317".to_owned())]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("init error: OTLP exporter: OTLP over grpc needs a tokio runtime"), "stdout:\n{stdout}");
}

#[tokio::test]
async fn an_unsupported_protocol_is_an_error() {
    let output = run_child(
        "child_init_fails",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318".to_owned()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("unsupported OTEL_EXPORTER_OTLP_PROTOCOL `http/json`"), "stdout:\n{stdout}");
}
