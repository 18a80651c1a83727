//! A soak of 1000 mixed requests from several clients at once: prompts and answers of random
//! lengths, some cancelled after their first token, some from clients that vanish without
//! waiting. Every request that is waited for ends exactly once, and the daemon's anonymous
//! memory after all of them is within 10 % of where it stood after the first 100: nothing
//! grows per request (slots, streams, queues, the heap).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use marengo_testkit::dbus::{
    Bus, Daemon, Signal, cancel_aside, connect, greedy, next_signal, proxy, signals,
};
use marengo_testkit::scratch_dir;
use zbus::zvariant::Variant;

const REQUESTS: usize = 1000;
const WARM: usize = 100;
const CLIENTS: usize = 6;

/// A fixed pseudo-random stream, so that a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const WORDS: [&str; 12] = [
    "river", "stone", "lamp", "quiet", "north", "seven", "bread", "window", "cloud", "paper",
    "green", "slow",
];

fn prompt(rng: &mut Lcg) -> String {
    let words = 1 + rng.below(60);
    (0..words)
        .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// One request of the mix; returns when the client is done with it.
async fn one(
    address: &str,
    rng: &mut Lcg,
    connection: &zbus::Connection,
    stream: &mut zbus::MessageStream,
) {
    let text = prompt(rng);
    let max_tokens = 1 + rng.below(12) as u32;
    match rng.below(10) {
        // A client that asks and vanishes: its own connection, dropped at once.
        0 => {
            let gone = connect(address).await;
            let llm = proxy(&gone).await;
            let mut options = greedy(max_tokens);
            options.insert("temperature", Variant::F64(0.7));
            llm.generate(&text, options).await.expect("Generate");
            drop(gone);
        }
        // Cancelled after its first token (or its end, if that comes first).
        1 | 2 => {
            let llm = proxy(connection).await;
            let request = llm.generate(&text, greedy(200)).await.expect("Generate");
            let mut cancel = None;
            loop {
                match next_signal(stream, Duration::from_secs(120)).await {
                    Some(Signal::Token { request: r, .. }) if r == request.as_str() => {
                        if cancel.is_none() {
                            // It may have ended by then: NotFound is fine.
                            cancel = Some(cancel_aside(&llm, &request));
                        }
                    }
                    Some(Signal::Finished {
                        request: r, reason, ..
                    }) => {
                        assert_eq!(r, request.as_str(), "another request's end");
                        assert!(
                            ["cancelled", "length", "stop"].contains(&reason.as_str()),
                            "{reason}"
                        );
                        break;
                    }
                    Some(other) => panic!("a signal of another request: {other:?}"),
                    None => panic!("no end for {request}"),
                }
            }
        }
        _ => {
            let llm = proxy(connection).await;
            let request = llm
                .generate(&text, greedy(max_tokens))
                .await
                .expect("Generate");
            let streamed = marengo_testkit::dbus::collect(stream, &request).await;
            assert!(streamed.stat_u32("generated_tokens") <= max_tokens);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_requests_leave_memory_where_it_was() {
    let dir = scratch_dir("soak_mixed_requests");
    let bus = Bus::session_like(&dir);
    let daemon = Arc::new(Daemon::start(&dir, &bus.address, &["--parallel", "4"]));
    let started = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let warm_anon = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (address, started, done, warm_anon, daemon) = (
            bus.address.clone(),
            Arc::clone(&started),
            Arc::clone(&done),
            Arc::clone(&warm_anon),
            Arc::clone(&daemon),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(0x50a4 + client as u64);
            let connection = connect(&address).await;
            let mut stream = signals(&connection).await;
            while started.fetch_add(1, Ordering::SeqCst) < REQUESTS {
                one(&address, &mut rng, &connection, &mut stream).await;
                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                if n == WARM {
                    warm_anon.store(daemon.memory_kib("RssAnon") as usize, Ordering::SeqCst);
                }
                if n % 100 == 0 {
                    println!("{n}: anon {} kB", daemon.memory_kib("RssAnon"));
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a client task");
    }
    // The vanished clients' last requests end within a token or so.
    let finished = || daemon.log_text().matches("request finished").count();
    for _ in 0..100 {
        if finished() >= REQUESTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm = warm_anon.load(Ordering::SeqCst) as u64;
    let end = daemon.memory_kib("RssAnon");
    assert!(warm > 0, "no figure after {WARM} requests");
    assert!(
        end * 10 <= warm * 11,
        "anonymous memory grew from {warm} kB after {WARM} requests to {end} kB after {REQUESTS}"
    );
    println!("anonymous memory: {warm} kB after {WARM} requests, {end} kB after {REQUESTS}");
    let log = daemon.log_text();
    assert_eq!(
        finished(),
        REQUESTS,
        "every request ends exactly once; log tail:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
}
