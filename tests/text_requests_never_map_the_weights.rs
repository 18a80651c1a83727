//! What needs only the text side — `Tokenize`, `Detokenize`, the properties, `marengoctl
//! status [--json]`, `marengoctl tokenize` and `marengoctl detokenize` — is answered after an
//! idle unload without mapping the model's weights again.

use std::process::Command;
use std::time::{Duration, Instant};

use marengo_testkit::dbus::{Bus, Daemon, connect, greedy, proxy};
use marengo_testkit::scratch_dir;

fn weights_mapped(daemon: &Daemon) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", daemon.pid()))
        .expect("reading the daemon's memory maps")
        .lines()
        .any(|line| line.ends_with("/model.weights"))
}

fn marengoctl(address: &str, args: &[&str]) -> String {
    let output = Command::new(marengo_testkit::binaries::marengoctl())
        .args(["--address", address])
        .args(args)
        .output()
        .expect("running marengoctl");
    assert!(
        output.status.success(),
        "marengoctl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("marengoctl prints UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_properties_and_status_after_an_idle_unload() {
    let dir = scratch_dir("text_requests");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &["--idle-unload-secs", "1"]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;

    let tokens_before = llm.tokenize("hello world").await.expect("Tokenize");
    llm.complete("Hello", greedy(2)).await.expect("Complete");
    assert!(weights_mapped(&daemon), "the weights are not mapped");
    // The limit is 1 s; the unload itself is not what this test checks, so it waits long.
    let waiting = Instant::now();
    while weights_mapped(&daemon) {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "the weights are still mapped 60 s after the last request; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tokens = llm.tokenize("hello world").await.expect("Tokenize");
    assert_eq!(tokens, tokens_before);
    let text = llm.detokenize(&tokens).await.expect("Detokenize");
    assert_eq!(text, "hello world");
    assert!(!llm.model().await.expect("Model").is_empty());
    assert!(llm.context_length().await.expect("ContextLength") > 0);
    assert!(
        llm.quantization()
            .await
            .expect("Quantization")
            .starts_with("fp8")
    );
    assert_eq!(llm.queue_length().await.expect("QueueLength"), 0);
    assert!(!llm.version().await.expect("Version").is_empty());
    let status = marengoctl(&bus.address, &["status"]);
    assert!(status.contains("context length"), "{status}");
    let listed = marengoctl(&bus.address, &["tokenize", "hello world"]);
    let expected: Vec<String> = tokens_before.iter().map(u32::to_string).collect();
    assert_eq!(listed, format!("{}\n", expected.join(" ")));
    let json = marengoctl(&bus.address, &["status", "--json"]);
    assert!(json.contains("\"context_length\""), "{json}");
    let ids: Vec<&str> = expected.iter().map(String::as_str).collect();
    let detokenized = marengoctl(&bus.address, &[&["detokenize"], &ids[..]].concat());
    assert_eq!(detokenized, "hello world\n");

    assert!(
        !weights_mapped(&daemon),
        "answering from the text side mapped the weights again"
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches("model loaded").count(),
        1,
        "the model was loaded again; log:\n{log}"
    );
}
