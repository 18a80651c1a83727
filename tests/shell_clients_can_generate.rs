//! The service works from a shell: `gdbus` and `busctl` call `Complete`, read the properties
//! and tokenize; their answers agree with a zbus client's, and a streamed `Generate` delivers
//! exactly the text `Complete` returns for the same prompt and options.

use std::process::Command;

use marengo_testkit::dbus::{Bus, Daemon, collect, connect, greedy, proxy, signals};
use marengo_testkit::{run, scratch_dir};

const PROMPT: &str = "The quick brown fox";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdbus_busctl_and_zbus_agree() {
    let dir = scratch_dir("shell_clients");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;

    let (text, stats) = llm.complete(PROMPT, greedy(12)).await.expect("Complete");
    let generated =
        u32::try_from(stats["generated_tokens"].clone()).expect("generated_tokens is u");
    let reason = String::try_from(stats["reason"].clone()).expect("reason is s");
    assert!((1..=12).contains(&generated), "{stats:?}");
    assert!(
        reason == "length" || (reason == "stop" && generated < 12),
        "{stats:?}"
    );
    assert!(!text.is_empty() || generated < 12);

    // The same call from busctl, whose JSON output is unambiguous to parse.
    let busctl = run(Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args([
            "--json=short",
            "call",
            "org.marengo.Llm1",
            "/org/marengo/Llm1",
        ])
        .args(["org.marengo.Llm1", "Complete", "sa{sv}", PROMPT])
        .args(["2", "max_tokens", "u", "12", "temperature", "d", "0"]));
    let reply: serde_json::Value = serde_json::from_str(&busctl).expect("busctl prints JSON");
    assert_eq!(reply["type"], "sa{sv}");
    assert_eq!(reply["data"][0].as_str(), Some(text.as_str()), "{busctl}");
    assert_eq!(reply["data"][1]["generated_tokens"]["data"], generated);

    // gdbus prints a GVariant text; the text's repr is there verbatim for plain ASCII, and
    // the stats say the same count.
    let gdbus = run(Command::new("gdbus")
        .args([
            "call",
            "--address",
            &bus.address,
            "--dest",
            "org.marengo.Llm1",
        ])
        .args([
            "--object-path",
            "/org/marengo/Llm1",
            "--method",
            "org.marengo.Llm1.Complete",
        ])
        .args([PROMPT, "{'max_tokens': <12>, 'temperature': <0.0>}"]));
    assert!(
        gdbus.contains(&format!("'generated_tokens': <uint32 {generated}>")),
        "{gdbus}"
    );

    // Generate streams the same text, piece by piece.
    let mut stream = signals(&connection).await;
    let request = llm.generate(PROMPT, greedy(12)).await.expect("Generate");
    let streamed = collect(&mut stream, &request).await;
    assert_eq!(streamed.text, text);
    assert_eq!(streamed.reason, reason);
    assert_eq!(streamed.stat_u32("generated_tokens"), generated);

    // Properties from busctl match zbus's.
    let context = llm.context_length().await.expect("ContextLength");
    let property = run(Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(["get-property", "org.marengo.Llm1", "/org/marengo/Llm1"])
        .args(["org.marengo.Llm1", "ContextLength"]));
    assert_eq!(property.trim(), format!("u {context}"));
    let model = llm.model().await.expect("Model");
    assert!(!model.is_empty());
    assert_eq!(
        llm.version().await.expect("Version"),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(llm.queue_length().await.expect("QueueLength"), 0);

    // Tokenize from gdbus equals zbus's, and Detokenize inverts it.
    let ids = llm.tokenize(PROMPT).await.expect("Tokenize");
    let gdbus_ids = run(Command::new("gdbus")
        .args([
            "call",
            "--address",
            &bus.address,
            "--dest",
            "org.marengo.Llm1",
        ])
        .args([
            "--object-path",
            "/org/marengo/Llm1",
            "--method",
            "org.marengo.Llm1.Tokenize",
        ])
        .arg(PROMPT));
    let listed: Vec<String> = ids.iter().map(u32::to_string).collect();
    assert!(
        gdbus_ids.contains(&listed.join(", ")),
        "{gdbus_ids} vs {ids:?}"
    );
    assert_eq!(llm.detokenize(&ids).await.expect("Detokenize"), PROMPT);
}
