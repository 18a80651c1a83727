//! A client that leaves the bus mid-stream has its requests cancelled — the running one
//! before its next token, the waiting ones at once — and the next client is served.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use marengo_testkit::dbus::{Bus, Daemon, collect, connect, greedy, next_signal, proxy, signals};
use marengo_testkit::scratch_dir;

/// Lines of the daemon's log for finished requests with this reason.
fn finished_with(log: &str, reason: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            line.contains("request finished") && line.contains(&format!("reason={reason}"))
        })
        .map(str::to_owned)
        .collect()
}

fn generated_tokens(line: &str) -> usize {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("generated_tokens="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generated_tokens in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_is_cancelled_and_the_next_is_served() {
    let dir = scratch_dir("client_disconnect_cancels");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &[]);

    // A real client process, killed once its answer is streaming.
    let mut client = Command::new(marengo_testkit::binaries::marengoctl())
        .args([
            "--address",
            &bus.address,
            "generate",
            "Tell me a very long story",
        ])
        .args(["--max-tokens", "4000", "--temperature", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting marengoctl");
    let mut first = [0u8; 1];
    client
        .stdout
        .as_mut()
        .expect("piped stdout")
        .read_exact(&mut first)
        .expect("marengoctl streams some text");
    client.kill().expect("killing marengoctl");
    client.wait().expect("reaping marengoctl");

    // The next client is served at once, not after the 4000 tokens.
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;
    let served = Instant::now();
    let (_, stats) = llm
        .complete("Hello", greedy(4))
        .await
        .expect("Complete after the kill");
    assert!(served.elapsed() < Duration::from_secs(20));
    // Four greedy tokens of gibberish, no end of sequence among them.
    assert_eq!(
        String::try_from(stats["reason"].clone()).expect("the reason is a string"),
        "length"
    );

    let log = daemon.log_text();
    let disconnected = finished_with(&log, "disconnected");
    assert_eq!(disconnected.len(), 1, "log:\n{log}");
    assert!(
        generated_tokens(&disconnected[0]) < 4000,
        "{}",
        disconnected[0]
    );

    // A zbus client with one running and two waiting requests closes its connection: all
    // three end as disconnected, and a request after them runs.
    let leaving = connect(&bus.address).await;
    let mut leaving_signals = signals(&leaving).await;
    let leaving_llm = proxy(&leaving).await;
    let running = leaving_llm
        .generate("Count to a thousand", greedy(4000))
        .await
        .expect("Generate");
    for _ in 0..2 {
        leaving_llm
            .generate("And again", greedy(4000))
            .await
            .expect("Generate (queued)");
    }
    let signal = next_signal(&mut leaving_signals, Duration::from_secs(60)).await;
    assert_eq!(signal.as_ref().map(|s| s.request()), Some(running.as_str()));
    drop(leaving_signals);
    drop(leaving_llm);
    leaving.graceful_shutdown().await;

    let mut after = signals(&connection).await;
    let request = llm
        .generate("Hello again", greedy(4))
        .await
        .expect("Generate after the leave");
    let streamed = collect(&mut after, &request).await;
    assert!(
        streamed.reason == "length" || streamed.reason == "stop",
        "{streamed:?}"
    );
    let log = daemon.log_text();
    assert_eq!(finished_with(&log, "disconnected").len(), 4, "log:\n{log}");
}
