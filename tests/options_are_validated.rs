//! Every malformed option is refused with `org.marengo.Llm1.Error.InvalidOption` naming the
//! key, as sent by the real shell clients (`gdbus`, `busctl`) and by zbus; the integer widths
//! those clients send are accepted; a prompt over the context is `ContextOverflow`.

use std::collections::HashMap;
use std::process::Command;

use marengo::dbus::Llm1Error;
use marengo_testkit::dbus::{Bus, Daemon, connect, proxy};
use marengo_testkit::scratch_dir;
use zbus::Variant;

fn gdbus_generate(address: &str, options: &str) -> std::process::Output {
    Command::new("gdbus")
        .args(["call", "--address", address, "--dest", "org.marengo.Llm1"])
        .args([
            "--object-path",
            "/org/marengo/Llm1",
            "--method",
            "org.marengo.Llm1.Generate",
        ])
        .args(["Hello", options])
        .output()
        .expect("running gdbus")
}

fn busctl_generate(address: &str, options: &[&str]) -> std::process::Output {
    Command::new("busctl")
        .arg(format!("--address={address}"))
        .args([
            "call",
            "org.marengo.Llm1",
            "/org/marengo/Llm1",
            "org.marengo.Llm1",
        ])
        .args(["Generate", "sa{sv}", "Hello"])
        .arg((options.len() / 3).to_string())
        .args(options)
        .output()
        .expect("running busctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_options_are_refused_naming_the_key() {
    let dir = scratch_dir("options_are_validated");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);

    let refused_by_gdbus = [
        ("max_tokens", "{'max_tokens': <'8'>}"),
        ("max_tokens", "{'max_tokens': <8.0>}"),
        ("max_tokens", "{'max_tokens': <-1>}"),
        ("max_tokens", "{'max_tokens': <0>}"),
        ("top_k", "{'top_k': <true>}"),
        ("top_k", "{'top_k': <uint64 5000000000>}"),
        ("seed", "{'seed': <int64 -5>}"),
        ("temperature", "{'temperature': <'hot'>}"),
        ("temperature", "{'temperature': <11.0>}"),
        ("temperature", "{'temperature': <-0.5>}"),
        ("top_p", "{'top_p': <0.0>}"),
        ("min_p", "{'min_p': <1.5>}"),
        ("repeat_penalty", "{'repeat_penalty': <0.0>}"),
        ("stop", "{'stop': <'User:'>}"),
        ("stop", "{'stop': <['']>}"),
        ("stop", "{'stop': <[1, 2]>}"),
        ("tempreature", "{'tempreature': <0.5>}"),
    ];
    for (key, options) in refused_by_gdbus {
        let output = gdbus_generate(&bus.address, options);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{options} was accepted");
        assert!(
            stderr.contains("org.marengo.Llm1.Error.InvalidOption")
                && stderr.contains(&format!("`{key}`")),
            "{options}: {stderr}"
        );
    }

    for (key, options) in [
        ("max_tokens", &["max_tokens", "s", "8"][..]),
        ("temperature", &["temperature", "b", "true"][..]),
        ("stop", &["stop", "s", "x"][..]),
    ] {
        let output = busctl_generate(&bus.address, options);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "busctl {options:?} was accepted");
        assert!(
            stderr.contains(&format!("`{key}`")),
            "busctl {options:?}: {stderr}"
        );
    }

    // The widths shell users naturally send are accepted.
    let accepted = gdbus_generate(
        &bus.address,
        "{'max_tokens': <4>, 'temperature': <0>, 'seed': <7>}",
    );
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(String::from_utf8_lossy(&accepted.stdout).contains("/org/marengo/Llm1/request/"));
    let accepted = Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args([
            "call",
            "org.marengo.Llm1",
            "/org/marengo/Llm1",
            "org.marengo.Llm1",
        ])
        .args(["Generate", "sa{sv}", "Hello", "3"])
        .args([
            "max_tokens",
            "q",
            "4",
            "top_k",
            "u",
            "5",
            "stop",
            "as",
            "1",
            "User:",
        ])
        .output()
        .expect("running busctl");
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );

    // zbus: the error maps back to its variant, naming the key.
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;
    let refused = llm
        .generate("Hello", HashMap::from([("top_p", Variant::F64(1.5))]))
        .await;
    match refused {
        Err(Llm1Error::InvalidOption(message)) => assert!(message.contains("`top_p`"), "{message}"),
        other => panic!("top_p 1.5: expected InvalidOption, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_over_the_context_is_context_overflow() {
    let dir = scratch_dir("prompt_too_long");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;
    let context = llm.context_length().await.expect("ContextLength") as usize;
    let long_prompt = "word ".repeat(context + 16);
    assert!(llm.tokenize(&long_prompt).await.expect("Tokenize").len() > context);
    for result in [
        llm.generate(&long_prompt, HashMap::new()).await.map(|_| ()),
        llm.complete(&long_prompt, HashMap::new()).await.map(|_| ()),
    ] {
        match result {
            Err(Llm1Error::ContextOverflow(message)) => {
                assert!(message.contains(&context.to_string()), "{message}")
            }
            other => panic!("expected ContextOverflow, got {other:?}"),
        }
    }
}
