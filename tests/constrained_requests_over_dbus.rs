//! Structured output through the service, on the tiny bundle (random weights, the Mistral
//! sentencepiece tokenizer with byte fallback): whatever the model would write, the text
//! matches its constraint (non-ASCII text included), through `Generate` and through `Chat`'s
//! template; a schema or
//! grammar that does not compile, or two constraints at once, is `InvalidOption` naming the
//! option; a stop string ends a constrained text as it ends any other; a constrained request
//! cancelled mid-stream ends with `cancelled`.

use std::collections::HashMap;
use std::time::Duration;

use marengo::dbus::Llm1Error;
use marengo_testkit::dbus::{
    Bus, Daemon, Signal, cancel_aside, collect, connect, greedy, next_signal, proxy, signals,
};
use marengo_testkit::scratch_dir;
use zbus::Variant;

const COLOURS: &str = r#"{"enum": ["red", "green", "blue"]}"#;

fn with(
    mut options: HashMap<&'static str, Variant<'static>>,
    constraint: &[(&'static str, &'static str)],
) -> HashMap<&'static str, Variant<'static>> {
    for &(key, value) in constraint {
        options.insert(key, Variant::from(value));
    }
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_hold_are_checked_before_queueing_and_cancel() {
    let dir = scratch_dir("constrained_requests_over_dbus");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);
    let connection = connect(&bus.address).await;
    let mut stream = signals(&connection).await;
    let llm = proxy(&connection).await;

    let refused: [(&str, &[(&'static str, &'static str)]); 4] = [
        ("json_schema", &[("json_schema", r#"{"type": "object""#)]),
        ("json_schema", &[("json_schema", r#"{"type": "strnig"}"#)]),
        (
            "grammar",
            &[("grammar", "start: item+\nitem: \"a\" | undefined_rule")],
        ),
        ("regex", &[("regex", "[a-z]+"), ("json_schema", COLOURS)]),
    ];
    for (option, constraint) in refused {
        match llm.generate("Hello", with(greedy(8), constraint)).await {
            Err(Llm1Error::InvalidOption(message)) => {
                assert!(message.contains(&format!("`{option}`")), "{message}")
            }
            other => panic!("{constraint:?}: expected InvalidOption, got {other:?}"),
        }
    }
    assert_eq!(llm.queue_length().await.expect("QueueLength"), 0);

    // Chat, through the template: one of the schema's values, as JSON, then the end.
    let request = llm
        .chat(
            &[("user", "Your favourite colour?")],
            with(greedy(16), &[("json_schema", COLOURS)]),
        )
        .await
        .expect("Chat");
    let answer = collect(&mut stream, &request).await;
    assert_eq!(answer.reason, "stop", "{answer:?}");
    assert!(
        ["\"red\"", "\"green\"", "\"blue\""].contains(&answer.text.as_str()),
        "{answer:?}"
    );
    let cost = f64::try_from(answer.stats["constraint_ms_per_token"].clone())
        .expect("constraint_ms_per_token is d");
    assert!(cost > 0.0, "{answer:?}");

    // Generate, sampled: the whole text matches the regex.
    let mut sampled = with(HashMap::new(), &[("regex", "(yes|no)!")]);
    sampled.insert("temperature", Variant::F64(1.0));
    sampled.insert("seed", Variant::U64(3));
    let request = llm.generate("Well?", sampled).await.expect("Generate");
    let answer = collect(&mut stream, &request).await;
    assert_eq!(answer.reason, "stop", "{answer:?}");
    assert!(
        ["yes!", "no!"].contains(&answer.text.as_str()),
        "{answer:?}"
    );

    // Characters outside ASCII: sentencepiece's `▁` and `<0xNN>` fallback bytes in the trie.
    let request = llm
        .generate(
            "Coffee:",
            with(greedy(32), &[("regex", "(café|naïve) ☕ (ok|non)")]),
        )
        .await
        .expect("Generate");
    let answer = collect(&mut stream, &request).await;
    assert_eq!(answer.reason, "stop", "{answer:?}");
    assert!(
        ["café ☕ ok", "café ☕ non", "naïve ☕ ok", "naïve ☕ non"]
            .contains(&answer.text.as_str()),
        "{answer:?}"
    );

    // A stop string within the constrained text ends it there, as it would unconstrained.
    let mut stopped = with(greedy(32), &[("regex", "(ab|cd) halt (x|y)")]);
    stopped.insert("stop", Variant::from(vec!["halt"]));
    let request = llm.generate("Say:", stopped).await.expect("Generate");
    let answer = collect(&mut stream, &request).await;
    assert_eq!(answer.reason, "stop", "{answer:?}");
    assert!(
        ["ab", "cd"].contains(&answer.text.trim_end()) && !answer.text.contains("halt"),
        "{answer:?}"
    );

    // Cancelled after its first piece, long before the regex could be complete.
    let long = with(greedy(3500), &[("regex", "[a-z]{3000}")]);
    let request = llm
        .generate("Once upon a time", long)
        .await
        .expect("Generate");
    let mut text = String::new();
    let mut cancel = None;
    let reason = loop {
        match next_signal(&mut stream, Duration::from_secs(120)).await {
            Some(Signal::Token { text: piece, .. }) => {
                if cancel.is_none() {
                    cancel = Some(cancel_aside(&llm, &request));
                }
                text.push_str(&piece);
            }
            Some(Signal::Finished { reason, .. }) => break reason,
            None => panic!("{request} never finished"),
        }
    };
    cancel
        .expect("a token came before the end")
        .await
        .expect("the cancel task")
        .expect("Cancel");
    assert_eq!(reason, "cancelled", "{text:?}");
    assert!(
        !text.is_empty() && text.len() < 3000 && text.bytes().all(|b| b.is_ascii_lowercase()),
        "{text:?}"
    );
}
