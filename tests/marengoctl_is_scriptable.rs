//! `marengoctl` from scripts: `generate` streams what `Complete` returns (also with the prompt
//! on stdin), `chat` without a terminal answers one line per turn followed by an empty line,
//! `status` and `tokenize` report, and failures have distinct exit codes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use marengo_testkit::dbus::{Bus, Daemon, connect, greedy, proxy};
use marengo_testkit::scratch_dir;

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
}
