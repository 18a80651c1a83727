//! With `--idle-unload-secs`, the daemon unmaps the model's weights after that long without a
//! request, and maps them again for the next one.

use std::time::{Duration, Instant};

use marengo::dbus::Llm1Proxy;
use marengo_testkit::dbus::{
    Bus, Daemon, cancel_aside, collect, connect, greedy, next_signal, proxy, signals,
};
use marengo_testkit::scratch_dir;
use zbus::Connection;

fn weights_mapped(daemon: &Daemon) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", daemon.pid()))
        .expect("reading the daemon's memory maps")
        .lines()
        .any(|line| line.ends_with("/model.weights"))
}

/// Whether the weights are mapped while a request is being answered: read between its first
/// token and its end (it is cancelled then), so the idle limit cannot run out in between.
async fn mapped_while_generating(
    daemon: &Daemon,
    connection: &Connection,
    llm: &Llm1Proxy<'static>,
) -> bool {
    let mut stream = signals(connection).await;
    let request = llm
        .generate("A long story:", greedy(4000))
        .await
        .expect("Generate");
    let first = next_signal(&mut stream, Duration::from_secs(120)).await;
    assert_eq!(
        first.as_ref().map(|s| s.request()),
        Some(request.as_str()),
        "{first:?}"
    );
    let mapped = weights_mapped(daemon);
    let cancel = cancel_aside(llm, &request);
    let end = collect(&mut stream, &request).await;
    cancel.await.expect("the cancel task").expect("Cancel");
    assert_eq!(end.reason, "cancelled", "{end:?}");
    mapped
}

/// Waits for the idle unload. The idle limit is 1 s; the deadline only ends the wait for a
/// daemon that never unloads, and is wide for a loaded 2-core machine.
async fn wait_unmapped(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while weights_mapped(daemon) {
        assert!(
            Instant::now() < deadline,
            "the weights are still mapped after 120 s idle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_daemon_unmaps_and_maps_again_on_demand() {
    let dir = scratch_dir("idle_unload");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &["--idle-unload-secs", "1"]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;

    let (before, _) = llm.complete("Hello", greedy(6)).await.expect("Complete");
    assert!(
        mapped_while_generating(&daemon, &connection, &llm).await,
        "the weights are not mapped while serving"
    );
    wait_unmapped(&daemon).await;
    // Properties do not need the model.
    assert!(llm.context_length().await.expect("ContextLength") > 0);
    assert!(!weights_mapped(&daemon));

    let (after, _) = llm
        .complete("Hello", greedy(6))
        .await
        .expect("Complete after unload");
    assert_eq!(after, before, "the reloaded model answers differently");
    assert!(
        mapped_while_generating(&daemon, &connection, &llm).await,
        "the weights were not mapped again"
    );
}
