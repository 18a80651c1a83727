//! The queue is bounded (overall and per client: past either bound a request is refused with
//! `Busy`), fair (clients take turns, so one client's many requests do not starve another's
//! one), and a request can be cancelled only by its owner.

use std::collections::HashMap;
use std::time::Duration;

use marengo::dbus::Llm1Error;
use marengo_testkit::dbus::{Bus, Daemon, Signal, connect, greedy, next_signal, proxy, signals};
use marengo_testkit::scratch_dir;
use zbus::OwnedObjectPath;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_past_the_bounds_and_clients_take_turns() {
    let dir = scratch_dir("queue_is_bounded_and_fair");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(
        &dir,
        &bus.address,
        // The deprecated spelling of --queue-capacity, so that the alias stays covered. One
        // request runs at a time, so that the others wait in the queue this test is about.
        &[
            "--queue-length",
            "4",
            "--max-queued-per-client",
            "3",
            "--parallel",
            "1",
        ],
    );
    let alice = connect(&bus.address).await;
    let bob = connect(&bus.address).await;
    let carol = connect(&bus.address).await;
    let mut observed_stream = signals(&alice).await;
    let mut bob_signals = signals(&bob).await;
    let (alice_llm, bob_llm, carol_llm) =
        (proxy(&alice).await, proxy(&bob).await, proxy(&carol).await);

    // Alice's first request runs (long); three more wait: her share.
    let a1 = alice_llm.generate("One", greedy(4000)).await.expect("a1");
    let first = next_signal(&mut observed_stream, Duration::from_secs(60)).await;
    assert_eq!(first.as_ref().map(|s| s.request()), Some(a1.as_str()));
    // Alice's signals are read all along: a stream nobody reads stops the connection's
    // reader once its buffer is full, and with it the replies to her calls below.
    let (alice_signals, mut observed) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = observed_stream;
    tokio::spawn(async move {
        while let Some(signal) = next_signal(&mut stream, Duration::from_secs(3600)).await {
            if alice_signals.send(signal).is_err() {
                break;
            }
        }
    });
    let mut alice_waiting: Vec<OwnedObjectPath> = Vec::new();
    for prompt in ["Two", "Three", "Four"] {
        alice_waiting.push(
            alice_llm
                .generate(prompt, greedy(6))
                .await
                .expect("alice waiting"),
        );
    }
    match alice_llm.generate("Five", greedy(6)).await {
        Err(Llm1Error::Busy(message)) => assert!(message.contains("this client"), "{message}"),
        other => panic!("alice's 5th request: expected Busy, got {other:?}"),
    }
    // Bob's one request fills the queue; Carol is refused.
    let b1 = bob_llm.generate("Bob", greedy(6)).await.expect("b1");
    match carol_llm.generate("Carol", greedy(6)).await {
        Err(Llm1Error::Busy(message)) => assert!(message.contains("queue is full"), "{message}"),
        other => panic!("carol's request: expected Busy, got {other:?}"),
    }
    assert_eq!(alice_llm.queue_length().await.expect("QueueLength"), 5);

    // Only the owner may cancel; unknown handles are NotFound.
    match bob_llm.cancel(&a1.as_ref()).await {
        Err(Llm1Error::AccessDenied(_)) => {}
        other => panic!("bob cancelling alice's request: expected AccessDenied, got {other:?}"),
    }
    let unknown = OwnedObjectPath::try_from("/org/marengo/Llm1/request/999999").expect("a path");
    assert!(matches!(
        alice_llm.cancel(&unknown.as_ref()).await,
        Err(Llm1Error::NotFound(_))
    ));
    alice_llm
        .cancel(&a1.as_ref())
        .await
        .expect("alice cancels her own request");

    // Every request ends; a1 as cancelled.
    let mut alice_reasons: HashMap<String, String> = HashMap::new();
    while alice_reasons.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(60), observed.recv())
            .await
            .ok()
            .flatten()
        {
            Some(Signal::Finished {
                request, reason, ..
            }) => {
                alice_reasons.insert(request, reason);
            }
            Some(Signal::Token { .. }) => {}
            None => panic!(
                "alice's requests did not all finish ({alice_reasons:?}); log:\n{}",
                daemon.log_text()
            ),
        }
    }
    assert_eq!(alice_reasons[a1.as_str()], "cancelled");
    loop {
        match next_signal(&mut bob_signals, Duration::from_secs(60)).await {
            Some(Signal::Finished { request, .. }) => {
                assert_eq!(request, b1.as_str());
                break;
            }
            Some(Signal::Token { .. }) => {}
            None => panic!("bob's request did not finish"),
        }
    }

    // The worker's log gives the order of service: a1 was running; then a2 (alice's turn
    // came first), b1, a3, a4 — bob's single request right after alice's next one.
    let log = daemon.log_text();
    let served: Vec<String> = log
        .lines()
        .filter(|line| line.contains("request finished"))
        .filter_map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("request="))
                .map(|id| format!("/org/marengo/Llm1/request/{id}"))
        })
        .collect();
    let expected: Vec<String> = [
        &a1,
        &alice_waiting[0],
        &b1,
        &alice_waiting[1],
        &alice_waiting[2],
    ]
    .iter()
    .map(|path| path.to_string())
    .collect();
    assert_eq!(served, expected, "log:\n{log}");
}
