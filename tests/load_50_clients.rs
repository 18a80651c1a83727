//! 50 concurrent clients, four requests each, some cancelled mid-stream and some constrained
//! to a JSON schema: every request gets exactly its own complete stream (the text `Complete`
//! gives for the same prompt and options, or a prefix of it when cancelled), one `Finished`
//! each, nothing lost or crossed, constrained texts are among the schema's values, and the
//! daemon's memory stays bounded. Prints the figures.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use marengo::dbus::Llm1Error;
use marengo_testkit::dbus::{Bus, Daemon, Signal, connect, greedy, next_signal, proxy, signals};
use marengo_testkit::scratch_dir;
use zbus::Variant;

const CLIENTS: usize = 50;
const REQUESTS_PER_CLIENT: usize = 4;
const PROMPTS: [&str; 4] = [
    "The weather today is",
    "In a distant galaxy",
    "My favourite recipe",
    "Rust is a language",
];
const LENGTHS: [u32; 2] = [8, 16];
/// The schema of the constrained requests, and every text it allows.
const SCHEMA: &str = r#"{"enum": ["red", "green", "blue"]}"#;
const SCHEMA_TEXTS: [&str; 3] = ["\"red\"", "\"green\"", "\"blue\""];

/// Greedy options, constrained to [`SCHEMA`] when `constrained`.
fn options(length: u32, constrained: bool) -> HashMap<&'static str, Variant<'static>> {
    let mut options = greedy(length);
    if constrained {
        options.insert("json_schema", Variant::from(SCHEMA));
    }
    options
}

/// What one request must produce, from `Complete` with the same prompt and options.
#[derive(Debug, Clone)]
struct Expected {
    text: String,
    reason: String,
}

async fn one_client(
    address: String,
    index: usize,
    expected: Arc<HashMap<(usize, u32, bool), Expected>>,
) -> (usize, usize) {
    let connection = connect(&address).await;
    let mut stream = signals(&connection).await;
    let llm = proxy(&connection).await;
    let (mut completed, mut cancelled) = (0, 0);
    for k in 0..REQUESTS_PER_CLIENT {
        let prompt = (index + k) % PROMPTS.len();
        let length = LENGTHS[(index / 2 + k) % LENGTHS.len()];
        let cancel = (index + k).is_multiple_of(5);
        let constrained = (index + k) % 3 == 1;
        let request = llm
            .generate(PROMPTS[prompt], options(length, constrained))
            .await
            .unwrap_or_else(|e| panic!("client {index} request {k}: {e}"));
        let mut text = String::new();
        let mut cancel_sent = false;
        let (reason, generated) = loop {
            let signal = next_signal(&mut stream, Duration::from_secs(300))
                .await
                .unwrap_or_else(|| panic!("client {index}: {request} never finished"));
            assert_eq!(
                signal.request(),
                request.as_str(),
                "client {index}: crossed stream"
            );
            match signal {
                Signal::Token { text: piece, .. } => {
                    text.push_str(&piece);
                    if cancel && !cancel_sent {
                        cancel_sent = true;
                        match llm.cancel(&request.as_ref()).await {
                            Ok(()) | Err(Llm1Error::NotFound(_)) => {}
                            Err(e) => panic!("client {index}: Cancel: {e}"),
                        }
                    }
                }
                Signal::Finished { reason, stats, .. } => {
                    let generated = u32::try_from(stats["generated_tokens"].clone())
                        .expect("generated_tokens is u");
                    break (reason, generated);
                }
            }
        };
        let want = &expected[&(prompt, length, constrained)];
        if reason == "cancelled" {
            assert!(
                cancel,
                "client {index}: {request} cancelled without a Cancel"
            );
            assert!(
                want.text.starts_with(&text),
                "client {index}: cancelled text is not a prefix"
            );
            assert!(generated <= length);
            cancelled += 1;
        } else {
            assert_eq!(
                text, want.text,
                "client {index}: {request} text differs from Complete"
            );
            assert_eq!(reason, want.reason, "client {index}: {request}");
            completed += 1;
        }
    }
    // Exactly one Finished per request: nothing more arrives.
    let extra = next_signal(&mut stream, Duration::from_millis(300)).await;
    assert!(
        extra.is_none(),
        "client {index}: signal after the last Finished: {extra:?}"
    );
    (completed, cancelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_each_get_exactly_their_own_streams() {
    let dir = scratch_dir("load_50_clients");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(
        &dir,
        &bus.address,
        &["--queue-capacity", "64", "--max-queued-per-client", "4"],
    );

    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;
    let mut expected = HashMap::new();
    for (p, prompt) in PROMPTS.iter().enumerate() {
        for length in LENGTHS {
            for constrained in [false, true] {
                let (text, stats) = llm
                    .complete(prompt, options(length, constrained))
                    .await
                    .expect("Complete");
                let reason = String::try_from(stats["reason"].clone()).expect("reason is s");
                if constrained {
                    assert_eq!(reason, "stop", "{prompt:?}: {text:?}");
                    assert!(
                        SCHEMA_TEXTS.contains(&text.as_str()),
                        "{prompt:?}: {text:?}"
                    );
                }
                expected.insert((p, length, constrained), Expected { text, reason });
            }
        }
    }
    let expected = Arc::new(expected);
    let baseline_kib = daemon.memory_kib("VmRSS");

    let pid = daemon.pid();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler_peak = Arc::clone(&peak);
    let sampler = tokio::spawn(async move {
        loop {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                sampler_peak.fetch_max(kib, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(one_client(bus.address.clone(), i, Arc::clone(&expected))))
        .collect();
    let (mut completed, mut cancelled) = (0, 0);
    for client in clients {
        let (c, x) = client.await.expect("a client task panicked");
        completed += c;
        cancelled += x;
    }
    let elapsed = start.elapsed();
    sampler.abort();
    let peak_kib = peak.load(Ordering::Relaxed).max(daemon.memory_kib("VmRSS"));

    assert_eq!(completed + cancelled, CLIENTS * REQUESTS_PER_CLIENT);
    assert!(cancelled > 0, "no request was cancelled mid-stream");
    assert_eq!(llm.queue_length().await.expect("QueueLength"), 0);
    println!(
        "load: {} clients x {} requests = {} requests ({completed} complete, {cancelled} \
         cancelled) in {:.2} s; daemon RSS {} MiB before, peak {} MiB, high-water {} MiB",
        CLIENTS,
        REQUESTS_PER_CLIENT,
        CLIENTS * REQUESTS_PER_CLIENT,
        elapsed.as_secs_f64(),
        baseline_kib / 1024,
        peak_kib / 1024,
        daemon.memory_kib("VmHWM") / 1024
    );
    // Bounded: 200 requests through 50 connections cost at most 64 MiB over the warm daemon.
    assert!(
        peak_kib < baseline_kib + 64 * 1024,
        "RSS grew from {baseline_kib} kB to {peak_kib} kB"
    );
}
