//! When its bus goes away (a session that ends, a system bus that restarts), marengod stops
//! with an error rather than serving nobody for ever: systemd's `Restart=on-failure` brings
//! it back on the new bus, and a daemon that D-Bus activated for a session does not outlive
//! the session.

use std::time::Duration;

use marengo_testkit::dbus::{Bus, Daemon, connect, greedy, next_signal, proxy, signals};
use marengo_testkit::scratch_dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_bus_mid_generation_ends_the_daemon_with_an_error() {
    let dir = scratch_dir("bus_loss_ends_the_daemon");
    let bus = Bus::session_like(&dir);
    let mut daemon = Daemon::start(&dir, &bus.address, &[]);

    let client = connect(&bus.address).await;
    let mut stream = signals(&client).await;
    let request = proxy(&client)
        .await
        .generate("A long story:", greedy(4000))
        .await
        .expect("Generate");
    let first = next_signal(&mut stream, Duration::from_secs(60)).await;
    assert_eq!(
        first.as_ref().map(|s| s.request()),
        Some(request.as_str()),
        "the generation is under way: {first:?}"
    );

    drop(bus);
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_exit(Duration::from_secs(10));
        (status, daemon.log_text())
    })
    .await
    .expect("waiting for marengod");
    let (status, log) = status;
    let status =
        status.unwrap_or_else(|| panic!("marengod still runs 10 s after its bus died:\n{log}"));
    assert!(!status.success(), "marengod exited with {status}:\n{log}");
    assert!(
        log.contains("closed the connection"),
        "the log does not say why marengod stopped:\n{log}"
    );
}
