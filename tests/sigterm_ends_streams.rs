//! SIGTERM mid-generation: the running stream and the waiting ones end with reason
//! `shutdown`, each client gets its `Finished`, and the daemon exits cleanly at once, without
//! finishing them.

use std::time::Duration;

use marengo_testkit::dbus::{Bus, Daemon, collect, connect, greedy, next_signal, proxy, signals};
use marengo_testkit::scratch_dir;

/// How long the daemon may take to exit after SIGTERM (see where it is checked).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_running_and_waiting_streams_with_shutdown() {
    let dir = scratch_dir("sigterm_ends_streams");
    let bus = Bus::session_like(&dir);
    // One request at a time, so that the second one waits: both kinds must end.
    let mut daemon = Daemon::start(&dir, &bus.address, &["--parallel", "1"]);

    let alice = connect(&bus.address).await;
    let bob = connect(&bus.address).await;
    let (mut alice_signals, mut bob_signals) = (signals(&alice).await, signals(&bob).await);
    let (alice_llm, bob_llm) = (proxy(&alice).await, proxy(&bob).await);
    let running = alice_llm
        .generate("A long story:", greedy(4000))
        .await
        .expect("Generate");
    let waiting = bob_llm
        .generate("Another one:", greedy(4000))
        .await
        .expect("Generate (queued)");

    // Alice's stream is under way before the signal.
    let first = next_signal(&mut alice_signals, Duration::from_secs(60)).await;
    assert_eq!(
        first.as_ref().map(|s| s.request()),
        Some(running.as_str()),
        "{first:?}"
    );

    let (status, took) = tokio::task::spawn_blocking(move || {
        let ended = daemon.terminate();
        (ended, daemon)
    })
    .await
    .map(|(ended, _daemon)| ended)
    .expect("terminating marengod");
    assert!(status.success(), "marengod exited with {status}");
    // A clean exit takes milliseconds (measured from the signal's delivery). The bound is wide
    // for a loaded 2-core machine and still below the 25 s a D-Bus call waits for its reply,
    // the usual way a shutdown hangs; that the streams were not finished first is what the
    // token counts below check.
    assert!(
        took < SHUTDOWN_BOUND,
        "marengod took {took:?} to exit after SIGTERM"
    );

    let alice_end = collect(&mut alice_signals, &running).await;
    assert_eq!(alice_end.reason, "shutdown", "{alice_end:?}");
    assert!(alice_end.stat_u32("generated_tokens") < 4000);
    let bob_end = collect(&mut bob_signals, &waiting).await;
    assert_eq!(bob_end.reason, "shutdown", "{bob_end:?}");
    assert_eq!(bob_end.tokens, 0);
}
