//! A prompt far too long for the context is refused with `ContextOverflow` from its length,
//! before it is tokenized: tokenizing 10.8 MB took 11.6 s and 1.36 GB, and any local client can
//! send tens of megabytes. `Generate`, `Chat` and `Complete` alike.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use marengo::dbus::Llm1Error;
use marengo_testkit::dbus::{Bus, Daemon, connect, greedy, proxy};
use marengo_testkit::scratch_dir;

const PROMPT_BYTES: usize = 20 << 20;

fn check_refusal(what: &str, result: Result<(), Llm1Error>, took: Duration, context: u32) {
    println!("{what}: refused in {:.2} s", took.as_secs_f64());
    match result {
        Err(Llm1Error::ContextOverflow(message)) => {
            assert!(
                message.contains(&PROMPT_BYTES.to_string())
                    && message.contains(&context.to_string()),
                "{what}: the message does not say how long the prompt is and what fits: {message}"
            );
        }
        other => panic!("{what}: expected ContextOverflow, got {other:?}"),
    }
    // Tokenizing the whole prompt would take about 20 s; the bound is loose on purpose.
    assert!(
        took < Duration::from_secs(10),
        "{what}: the refusal took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_are_refused_without_being_tokenized() {
    let dir = scratch_dir("overlong_prompt");
    // dbus-daemon's own default max_message_size is 128 MiB (Debian's session.conf raises it
    // to 1 GB, its system.conf keeps the default): a 20 MB prompt reaches the daemon.
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &[]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;
    let context = llm.context_length().await.expect("ContextLength");

    let (answer, _) = llm.complete("Hello", greedy(4)).await.expect("Complete");
    let peak_before = daemon.memory_kib("VmHWM");
    let rss_before = daemon.memory_kib("VmRSS");

    let prompt = "All work and no play makes Jack a dull boy. ".repeat(PROMPT_BYTES / 44 + 1)
        [..PROMPT_BYTES]
        .to_owned();
    let start = Instant::now();
    let result = llm.complete(&prompt, HashMap::new()).await.map(drop);
    check_refusal("Complete", result, start.elapsed(), context);

    let start = Instant::now();
    let result = llm.generate(&prompt, HashMap::new()).await.map(drop);
    check_refusal("Generate", result, start.elapsed(), context);

    let start = Instant::now();
    let result = llm
        .chat(&[("user", prompt.as_str())], HashMap::new())
        .await
        .map(drop);
    let took = start.elapsed();
    println!("Chat: refused in {:.2} s", took.as_secs_f64());
    // The template adds its own text around the message: the prompt is a little longer.
    assert!(
        matches!(result, Err(Llm1Error::ContextOverflow(_))),
        "Chat: expected ContextOverflow, got {result:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "Chat: the refusal took {took:?}"
    );

    let peak = daemon.memory_kib("VmHWM");
    let rss = daemon.memory_kib("VmRSS");
    println!(
        "daemon memory: peak {peak_before} → {peak} kB, resident {rss_before} → {rss} kB \
         (tokenizing 10.8 MB whole peaked at 1.36 GB and left 894 MB resident)"
    );
    assert!(
        peak < peak_before + 400 * 1024,
        "the daemon's peak grew by {} MB",
        (peak - peak_before) / 1024
    );
    assert!(
        rss < rss_before + 100 * 1024,
        "the daemon keeps {} MB more after the refusals",
        rss.saturating_sub(rss_before) / 1024
    );

    let (again, _) = llm.complete("Hello", greedy(4)).await.expect("Complete");
    assert_eq!(
        again, answer,
        "the daemon answers differently after the refusals"
    );
}
