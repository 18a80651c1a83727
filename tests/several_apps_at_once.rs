//! Several apps at once: requests from several clients are generated together (a short one
//! that arrives while a long one runs ends first, and each gets the text it gets alone), a
//! conversation keeps its KV cache slot while another client chats between its turns, and a
//! configuration whose KV caches cannot fit the memory budget is refused at start.

use std::process::Command;

use marengo_testkit::binaries::marengod;
use marengo_testkit::dbus::{Bus, Daemon, collect, connect, greedy, proxy, signals};
use marengo_testkit::{Kind, run_fails, scratch_dir, tiny_bundle};

const PROMPTS: [&str; 4] = [
    "A long story about the sea",
    "Short one",
    "Another short one",
    "The last of the four",
];
/// The first request's length: long enough that the others are asked for while it runs.
const LONG: u32 = 600;
const SHORT: u32 = 24;

fn max_tokens(index: usize) -> u32 {
    if index == 0 { LONG } else { SHORT }
}

/// Each prompt's greedy text, one request at a time.
async fn alone(address: &str) -> Vec<String> {
    let connection = connect(address).await;
    let mut stream = signals(&connection).await;
    let llm = proxy(&connection).await;
    let mut texts = Vec::new();
    for (index, prompt) in PROMPTS.iter().enumerate() {
        let request = llm
            .generate(prompt, greedy(max_tokens(index)))
            .await
            .expect("Generate");
        texts.push(collect(&mut stream, &request).await.text);
    }
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_served_together_and_each_gets_its_own_answer() {
    let dir = scratch_dir("several_apps_at_once_serial");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &["--parallel", "1"]);
    let expected = alone(&bus.address).await;
    drop(daemon);

    let dir = scratch_dir("several_apps_at_once_together");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &["--parallel", "4"]);
    let mut clients = Vec::new();
    for _ in PROMPTS {
        let connection = connect(&bus.address).await;
        let stream = signals(&connection).await;
        let llm = proxy(&connection).await;
        clients.push((connection, stream, llm));
    }
    let mut requests = Vec::new();
    for (index, (_, _, llm)) in clients.iter().enumerate() {
        requests.push(
            llm.generate(PROMPTS[index], greedy(max_tokens(index)))
                .await
                .expect("Generate"),
        );
    }
    let mut tasks = Vec::new();
    for ((connection, mut stream, _), request) in clients.into_iter().zip(requests) {
        tasks.push(tokio::spawn(async move {
            let streamed = collect(&mut stream, &request).await;
            drop(connection);
            (streamed, std::time::Instant::now())
        }));
    }
    let mut ends = Vec::new();
    for task in tasks {
        ends.push(task.await.expect("client task"));
    }
    for (index, ((streamed, _), expected)) in ends.iter().zip(&expected).enumerate() {
        assert_eq!(streamed.reason, "length", "request {index}");
        assert_eq!(
            &streamed.text,
            expected,
            "request {index}: together and alone differ; log:\n{}",
            daemon.log_text()
        );
    }
    // One at a time, the long request would end first.
    let long_end = ends[0].1;
    for (index, (_, end)) in ends.iter().enumerate().skip(1) {
        assert!(
            *end < long_end,
            "request {index} ended after the long one: not served together"
        );
    }
}

/// The prompt tokens a Chat turn found in the cache, and its answer.
async fn turn(
    llm: &marengo_client::Llm1Proxy<'static>,
    stream: &mut zbus::MessageStream,
    messages: &[(&str, &str)],
) -> (u32, u32, String) {
    let request = llm.chat(messages, greedy(12)).await.expect("Chat");
    let streamed = collect(stream, &request).await;
    (
        streamed.stat_u32("prompt_tokens"),
        streamed.stat_u32("reused_tokens"),
        streamed.text,
    )
}

/// Alice and Bob alternate turns; with a slot each, every second turn finds the whole first
/// turn in the cache. With one slot, each turn finds only what the other's left behind.
async fn alternate(parallel: &str) -> [(u32, u32); 2] {
    let dir = scratch_dir(&format!("several_apps_at_once_slots_{parallel}"));
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &["--parallel", parallel]);
    let (alice, bob) = (connect(&bus.address).await, connect(&bus.address).await);
    let (mut alice_stream, mut bob_stream) = (signals(&alice).await, signals(&bob).await);
    let (alice_llm, bob_llm) = (proxy(&alice).await, proxy(&bob).await);
    let alice_first = [("user", "Tell me about the mountains in the north")];
    let bob_first = [("user", "What should I cook tonight with rice")];
    let (alice_prompt, _, alice_answer) = turn(&alice_llm, &mut alice_stream, &alice_first).await;
    let (bob_prompt, _, bob_answer) = turn(&bob_llm, &mut bob_stream, &bob_first).await;
    let (_, alice_reused, _) = turn(
        &alice_llm,
        &mut alice_stream,
        &[
            alice_first[0],
            ("assistant", alice_answer.as_str()),
            ("user", "And the rivers?"),
        ],
    )
    .await;
    let (_, bob_reused, _) = turn(
        &bob_llm,
        &mut bob_stream,
        &[
            bob_first[0],
            ("assistant", bob_answer.as_str()),
            ("user", "Without onions"),
        ],
    )
    .await;
    [(alice_prompt, alice_reused), (bob_prompt, bob_reused)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_conversations_keep_their_slots() {
    for (first_prompt, reused) in alternate("4").await {
        assert!(
            reused >= first_prompt,
            "the second turn reused {reused} tokens, less than the first turn's prompt of {first_prompt}"
        );
    }
    for (first_prompt, reused) in alternate("1").await {
        assert!(
            reused < first_prompt,
            "with one slot, the other client's turn should have taken it ({reused} reused)"
        );
    }
}

#[test]
fn kv_caches_that_cannot_fit_are_refused_at_start() {
    let bundle = tiny_bundle(Kind::Fp8);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("bundle.json")).expect("manifest"))
            .expect("manifest parses");
    let arch = &manifest["architecture"];
    let field = |key: &str| arch[key].as_u64().unwrap_or_else(|| panic!("{key}"));
    let lane = 2
        * field("num_layers")
        * field("num_kv_heads")
        * field("head_dim")
        * 4
        * field("context_length");
    // Enough lanes to need more than 1 MiB.
    let parallel = ((1 << 20) / lane + 2).to_string();
    let dir = scratch_dir("several_apps_at_once_budget");
    let bus = Bus::session_like(&dir);
    let output = run_fails(
        Command::new(marengod())
            .args(["serve", "--address", &bus.address, "--bundle"])
            .arg(bundle)
            .args(["--parallel", &parallel, "--kv-memory-mib", "1"]),
    );
    assert!(
        output.contains(&format!("{parallel} parallel requests need"))
            && output.contains("budget of 1 MiB")
            && output.contains("kv_memory_mib"),
        "{output}"
    );
}
