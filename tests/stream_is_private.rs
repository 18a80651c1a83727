//! `Token` and `Finished` go to the caller alone: another connection that subscribes to every
//! signal of the interface receives none of them, and two concurrent clients each receive
//! only their own request's stream.

use std::time::Duration;

use marengo_testkit::dbus::{Bus, Daemon, collect, connect, greedy, next_signal, proxy, signals};
use marengo_testkit::scratch_dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_connection_with_a_match_rule_sees_no_token() {
    let dir = scratch_dir("stream_is_private");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);

    let snoop = connect(&bus.address).await;
    let mut snooped = signals(&snoop).await;

    let alice = connect(&bus.address).await;
    let bob = connect(&bus.address).await;
    let (mut alice_signals, mut bob_signals) = (signals(&alice).await, signals(&bob).await);
    let (alice_llm, bob_llm) = (proxy(&alice).await, proxy(&bob).await);
    let alice_request = alice_llm
        .generate("The capital of France is", greedy(24))
        .await
        .expect("Generate for alice");
    let bob_request = bob_llm
        .generate("Once upon a time", greedy(24))
        .await
        .expect("Generate for bob");
    assert_ne!(alice_request, bob_request);

    // `collect` fails on any signal of another request.
    let (alice_stream, bob_stream) = tokio::join!(
        collect(&mut alice_signals, &alice_request),
        collect(&mut bob_signals, &bob_request)
    );
    for stream in [&alice_stream, &bob_stream] {
        assert!(stream.tokens > 0, "no Token received: {stream:?}");
        // A Token is a piece of text: one or more tokens, never a broken character.
        let generated = stream.stat_u32("generated_tokens") as usize;
        assert!(stream.tokens <= generated && generated <= 24, "{stream:?}");
    }
    // Nothing more for alice or bob after their Finished: exactly one each.
    assert!(
        next_signal(&mut alice_signals, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert!(
        next_signal(&mut bob_signals, Duration::from_millis(300))
            .await
            .is_none()
    );
    // The snooping connection saw nothing of either stream.
    let leaked = next_signal(&mut snooped, Duration::from_millis(500)).await;
    assert!(leaked.is_none(), "a third connection received {leaked:?}");
}
