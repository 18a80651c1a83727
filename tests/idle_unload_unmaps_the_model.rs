//! With `--idle-unload-secs`, the daemon unmaps the model's weights after that long without a
//! request, and maps them again for the next one.

use std::time::Duration;

use marengo_testkit::dbus::{Bus, Daemon, connect, greedy, proxy};
use marengo_testkit::scratch_dir;

fn weights_mapped(daemon: &Daemon) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", daemon.pid()))
        .expect("reading the daemon's memory maps")
        .lines()
        .any(|line| line.ends_with("/model.weights"))
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
        weights_mapped(&daemon),
        "the weights are not mapped while serving"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !weights_mapped(&daemon),
        "the weights are still mapped after 2.5 s idle"
    );
    // Properties do not need the model.
    assert!(llm.context_length().await.expect("ContextLength") > 0);
    assert!(!weights_mapped(&daemon));

    let (after, _) = llm
        .complete("Hello", greedy(6))
        .await
        .expect("Complete after unload");
    assert_eq!(after, before, "the reloaded model answers differently");
    assert!(weights_mapped(&daemon), "the weights were not mapped again");
}
