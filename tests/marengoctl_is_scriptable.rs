//! `marengoctl` from scripts: `generate` streams what `Complete` returns (also with the prompt
//! on stdin), `chat` without a terminal answers one line per turn followed by an empty line,
//! takes its slash commands and drops its oldest exchanges when the context is full,
//! `status` (also as JSON), `complete`, `tokenize` and `detokenize` report, and failures have
//! distinct exit codes. One daemon serves every part.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use marengo_client::Llm1Proxy;
use marengo_testkit::dbus::{Bus, Daemon, collect, connect, greedy, proxy, signals};
use marengo_testkit::scratch_dir;
use zbus::Connection;

fn marengoctl(address: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(marengo_testkit::binaries::marengoctl())
        .args(["--address", address])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting marengoctl");
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("writing marengoctl's stdin");
    drop(input);
    child.wait_with_output().expect("waiting for marengoctl")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "marengoctl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_chat_status_tokenize_and_exit_codes() {
    let dir = scratch_dir("marengoctl_is_scriptable");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;

    let (text, _) = llm
        .complete("Hello there", greedy(10))
        .await
        .expect("Complete");
    let args = ["generate", "--max-tokens", "10", "--temperature", "0"];
    let from_argument = stdout(&marengoctl(
        &bus.address,
        &[&args[..], &["Hello there"]].concat(),
        None,
    ));
    assert_eq!(from_argument, format!("{text}\n"));
    let from_stdin = stdout(&marengoctl(
        &bus.address,
        &[&args[..], &["-"]].concat(),
        Some("Hello there"),
    ));
    assert_eq!(from_stdin, from_argument);

    // Each stdin line is a turn; each answer is followed by an empty line. The first answer
    // is what a chat of that turn alone gives (greedy), the second follows it.
    let chat_args = ["chat", "--max-tokens", "6", "--temperature", "0"];
    let one_turn = stdout(&marengoctl(&bus.address, &chat_args, Some("Hi!\n")));
    assert!(one_turn.ends_with("\n\n"), "{one_turn:?}");
    let two_turns = stdout(&marengoctl(
        &bus.address,
        &chat_args,
        Some("Hi!\nWhat is your name?\n"),
    ));
    assert!(
        two_turns.starts_with(&one_turn),
        "{two_turns:?} vs {one_turn:?}"
    );
    assert!(
        two_turns.len() > one_turn.len() && two_turns.ends_with("\n\n"),
        "{two_turns:?}"
    );

    let status = stdout(&marengoctl(&bus.address, &["status"], None));
    let model = llm.model().await.expect("Model");
    assert!(
        status.contains(&model) && status.contains("context length"),
        "{status}"
    );

    let ids = llm.tokenize("Hello there").await.expect("Tokenize");
    let listed: Vec<String> = ids.iter().map(u32::to_string).collect();
    let tokenized = stdout(&marengoctl(
        &bus.address,
        &["tokenize", "Hello there"],
        None,
    ));
    assert_eq!(tokenized, format!("{}\n", listed.join(" ")));

    // Exit codes scripts can branch on.
    let refused = marengoctl(
        &bus.address,
        &["generate", "--temperature", "20", "x"],
        None,
    );
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("temperature"));
    let long_prompt =
        "word ".repeat(llm.context_length().await.expect("ContextLength") as usize + 8);
    let overflow = marengoctl(&bus.address, &["generate", "-"], Some(&long_prompt));
    assert_eq!(
        overflow.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&overflow.stderr)
    );
    let nobody = format!("unix:path={}", dir.join("no-bus-here").display());
    let unreachable = marengoctl(&nobody, &["status"], None);
    assert_eq!(
        unreachable.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );
    let usage = marengoctl(
        &bus.address,
        &["generate", "--max-tokens", "many", "x"],
        None,
    );
    assert_eq!(usage.status.code(), Some(2));

    chat_commands_and_sliding(&bus.address, &connection, &llm).await;
    status_json_complete_and_detokenize(&bus.address, &llm).await;
}

/// The greedy answer of `max_tokens` tokens to `messages`, streamed by the service itself.
async fn answer(
    connection: &Connection,
    llm: &Llm1Proxy<'_>,
    messages: &[(&str, &str)],
    max_tokens: u32,
) -> String {
    let mut stream = signals(connection).await;
    let request = llm.chat(messages, greedy(max_tokens)).await.expect("Chat");
    collect(&mut stream, &request).await.text
}

/// A scripted chat: /system, /set (taken, refused by the service, then taken), three long
/// turns of which two fit the context, /clear and a last turn continued on a second line. Every answer must be the one
/// the service gives to the conversation the client should have sent.
async fn chat_commands_and_sliding(address: &str, connection: &Connection, llm: &Llm1Proxy<'_>) {
    let context = llm.context_length().await.expect("ContextLength") as usize;
    let system = "You are a terse assistant.";
    let long: Vec<String> = ["apple", "river", "stone"]
        .iter()
        .map(|word| {
            format!("{word} ")
                .repeat(context * 2 / 5)
                .trim_end()
                .to_owned()
        })
        .collect();
    let mut counts = Vec::new();
    for turn in &long {
        counts.push(llm.tokenize(turn).await.expect("Tokenize").len());
    }
    assert!(
        counts.iter().sum::<usize>() > context
            && 2 * counts.iter().max().copied().unwrap_or(0) + 64 < context,
        "turns of {counts:?} tokens do not make two turns fit a context of {context} and three not"
    );
    // The tiny bundle's Mistral template refuses system messages: /system shows as the
    // template's refusal; removed again, the chat goes on.
    let refused = marengoctl(address, &["chat"], Some(&format!("/system {system}\nHi\n")));
    assert_eq!(refused.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("must alternate user/assistant"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let script = format!(
        "/system {system}\n/system\n/set max_tokens 4\n/set temperature 20\n/set temprature 0.5\n\
         /set temperature 0\n{}\n{}\n{}\n/clear\nHi \\\nthere!\n",
        long[0], long[1], long[2]
    );
    let output = marengoctl(address, &["chat"], Some(&script));
    let transcript = stdout(&output);
    let log = String::from_utf8_lossy(&output.stderr);

    let first = answer(connection, llm, &[("user", &long[0])], 4).await;
    let second = answer(
        connection,
        llm,
        &[
            ("user", &long[0]),
            ("assistant", &first),
            ("user", &long[1]),
        ],
        4,
    )
    .await;
    let third = answer(
        connection,
        llm,
        &[
            ("user", &long[1]),
            ("assistant", &second),
            ("user", &long[2]),
        ],
        4,
    )
    .await;
    let after_clear = answer(connection, llm, &[("user", "Hi \nthere!")], 4).await;
    assert_eq!(
        transcript,
        format!("{first}\n\n{second}\n\n{third}\n\n{after_clear}\n\n"),
        "stderr: {log}"
    );
    assert_eq!(
        log.matches("dropped the oldest exchange").count(),
        1,
        "{log}"
    );
    assert!(log.contains("option `temperature` is 20"), "{log}");
    assert!(log.contains("unknown option `temprature`"), "{log}");
}

async fn status_json_complete_and_detokenize(address: &str, llm: &Llm1Proxy<'_>) {
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&marengoctl(address, &["status", "--json"], None)))
            .expect("status --json prints JSON");
    assert_eq!(status["model"], llm.model().await.expect("Model").as_str());
    assert_eq!(
        status["context_length"],
        llm.context_length().await.expect("ContextLength")
    );

    let (text, _) = llm
        .complete("Once upon", greedy(8))
        .await
        .expect("Complete");
    let completed = stdout(&marengoctl(
        address,
        &["complete", "-n", "8", "-t", "0", "Once upon"],
        None,
    ));
    assert_eq!(completed, format!("{text}\n"));
    // After a generation the model is resident, and status says which.
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&marengoctl(address, &["status", "--json"], None)))
            .expect("status --json prints JSON");
    assert_eq!(status["state"], "idle", "{status}");
    assert_eq!(status["loaded_model"], status["model"], "{status}");

    let ids = llm.tokenize("Hello there").await.expect("Tokenize");
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let text = stdout(&marengoctl(
        address,
        &[&["detokenize"], &ids[..]].concat(),
        None,
    ));
    assert_eq!(text, "Hello there\n");
    let from_stdin = stdout(&marengoctl(
        address,
        &["detokenize", "-"],
        Some(&ids.join(" ")),
    ));
    assert_eq!(from_stdin, text);
    let refused = marengoctl(address, &["detokenize", "4000000000"], None);
    assert_eq!(refused.status.code(), Some(4));
}
