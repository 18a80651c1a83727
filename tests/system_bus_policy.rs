//! Under a system-like bus — Debian's own `system.conf` with the packaged policy file included
//! unchanged — only the service user may own `org.marengo.Llm1`, root and members of the group
//! `marengo` may call it, and any other user is refused with AccessDenied by the bus itself
//! (and `marengoctl` says so with exit code 3). A refused user's match rules see nothing of
//! an allowed user's stream.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use marengo_testkit::dbus::{Bus, Daemon};
use marengo_testkit::{repo_root, run, scratch_dir};

const SERVICE_USER: &str = "marengo";
const MEMBER: &str = "marengo-test-member";
const OUTSIDER: &str = "marengo-test-outsider";

fn exists(database: &str, name: &str) -> bool {
    Command::new("getent")
        .args([database, name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The users this test needs, made as the packaged sysusers.d snippet would (a system user
/// and group "marengo"), plus a member of that group and an outsider.
fn ensure_users() {
    if !exists("passwd", SERVICE_USER) {
        run(Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
            ])
            .args(["--shell", "/usr/sbin/nologin", SERVICE_USER]));
    }
    if !exists("passwd", MEMBER) {
        run(Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--groups",
                SERVICE_USER,
            ])
            .arg(MEMBER));
    }
    if !exists("passwd", OUTSIDER) {
        run(Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .arg(OUTSIDER));
    }
}

/// Debian's system bus config minus what only the real system bus may do (switch user, fork,
/// the launch helper, syslog, the system's own service and policy dirs), listening in `dir`
/// and including the packaged policy file unchanged.
fn system_like_config(dir: &Path) -> std::path::PathBuf {
    let policy_dir = dir.join("system.d");
    std::fs::create_dir_all(&policy_dir).expect("creating system.d");
    let policy = repo_root().join("packaging/dbus/org.marengo.Llm1.conf");
    std::fs::copy(&policy, policy_dir.join("org.marengo.Llm1.conf"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", policy.display()));
    let debian = std::fs::read_to_string("/usr/share/dbus-1/system.conf")
        .expect("Debian's /usr/share/dbus-1/system.conf (package dbus)");
    let dropped = [
        "<user>",
        "<fork/>",
        "<standard_system_servicedirs/>",
        "<servicehelper>",
        "<pidfile>",
        "<syslog/>",
        "<includedir>",
        "<include ignore_missing=\"yes\">",
    ];
    let socket = dir.join("system_bus_socket");
    let mut config = String::new();
    for line in debian.lines() {
        let trimmed = line.trim_start();
        if dropped.iter().any(|tag| trimmed.starts_with(tag)) {
            continue;
        }
        if trimmed.starts_with("<listen>") {
            config.push_str(&format!(
                "  <listen>unix:path={}</listen>\n",
                socket.display()
            ));
            continue;
        }
        if trimmed.starts_with("</busconfig>") {
            config.push_str(&format!(
                "  <includedir>{}</includedir>\n",
                policy_dir.display()
            ));
        }
        config.push_str(line);
        config.push('\n');
    }
    let path = dir.join("system-bus.conf");
    std::fs::write(&path, config).expect("writing the bus config");
    path
}

/// `gdbus call … Complete` as `user` (root when `None`).
fn complete_as(user: Option<&str>, address: &str) -> Output {
    let mut command = match user {
        Some(user) => {
            let mut setpriv = Command::new("setpriv");
            setpriv
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .args(["--init-groups", "--", "gdbus"]);
            setpriv
        }
        None => Command::new("gdbus"),
    };
    command
        .args(["call", "--address", address, "--dest", "org.marengo.Llm1"])
        .args([
            "--object-path",
            "/org/marengo/Llm1",
            "--method",
            "org.marengo.Llm1.Complete",
        ])
        .args(["Hello", "{'max_tokens': <4>, 'temperature': <0.0>}"])
        .output()
        .expect("running gdbus")
}

/// `gdbus monitor --dest org.marengo.Llm1` run as a user, its output read line by line.
struct Monitor {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Monitor {
    fn start(user: &str, address: &str) -> Monitor {
        let mut child = as_user(user)
            .args(["gdbus", "monitor", "--address", address])
            .args(["--dest", "org.marengo.Llm1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting gdbus monitor");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Monitor {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads the monitor's output until a line starts with `prefix`. The deadline only ends
    /// the wait for a monitor that hangs; it is not what the test checks.
    fn wait_for(&mut self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.starts_with(prefix);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("gdbus monitor did not say {prefix:?}: {}", self.report())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("waiting for gdbus monitor");
                    panic!("gdbus monitor ended ({status}): {}", self.report())
                }
            }
        }
    }

    /// Stops the monitor, which must still be running, and returns everything it printed.
    fn stop(mut self) -> String {
        if let Some(status) = self.child.try_wait().expect("waiting for gdbus monitor") {
            panic!("gdbus monitor died ({status}): {}", self.report());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    /// What the monitor printed and, once it has ended, its standard error.
    fn report(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        let mut stderr = String::new();
        if let Ok(Some(_)) = self.child.try_wait()
            && let Some(mut pipe) = self.child.stderr.take()
        {
            let _ = pipe.read_to_string(&mut stderr);
        }
        format!(
            "its output:\n{}\nits stderr:\n{stderr}",
            self.seen.join("\n")
        )
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn as_user(user: &str) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .args(["--init-groups", "--"]);
    command
}

#[test]
fn only_allowed_users_may_call_and_own() {
    assert_eq!(
        run(Command::new("id").arg("-u")).trim(),
        "0",
        "this test makes users and runs processes as them: run it as root (CI does)"
    );
    ensure_users();
    let dir = scratch_dir("system_bus_policy");
    let bus = Bus::start(&system_like_config(&dir), &dir);
    let mut daemon = Daemon::start_as(&dir, &bus.address, &[], Some(SERVICE_USER));

    // Allowed: root and the group's member.
    for user in [None, Some(MEMBER)] {
        let output = complete_as(user, &bus.address);
        assert!(
            output.status.success(),
            "{user:?} was refused: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("'generated_tokens'"));
    }

    // Refused by the bus: the outsider's call and its attempt to take the name.
    let output = complete_as(Some(OUTSIDER), &bus.address);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the outsider's call was allowed");
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{stderr}"
    );
    let output = as_user(OUTSIDER)
        .args([
            "gdbus",
            "call",
            "--address",
            &bus.address,
            "--dest",
            "org.freedesktop.DBus",
        ])
        .args(["--object-path", "/org/freedesktop/DBus"])
        .args([
            "--method",
            "org.freedesktop.DBus.RequestName",
            "org.marengo.Llm1",
            "4",
        ])
        .output()
        .expect("running gdbus");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{stderr}"
    );
    let output = as_user(OUTSIDER)
        .arg(marengo_testkit::binaries::marengoctl())
        .args(["--address", &bus.address, "status"])
        .output()
        .expect("running marengoctl");
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The outsider watches the service's signals while the member streams an answer. gdbus
    // subscribes to the service's signals before it asks for the name's owner, so once it
    // reports the owner its match rule is in place.
    let mut monitor = Monitor::start(OUTSIDER, &bus.address);
    monitor.wait_for("The name org.marengo.Llm1 is owned by");
    let answer = run(as_user(MEMBER)
        .arg(marengo_testkit::binaries::marengoctl())
        .args(["--address", &bus.address, "generate", "Hello there"])
        .args(["--max-tokens", "12", "--temperature", "0"]));
    assert!(!answer.trim().is_empty(), "the member got no text");
    // The bus hands a connection its messages in the order it routes them, and announces the
    // name's loss after everything the service sent before exiting: once the monitor reports
    // the owner gone, it has been given every signal of the stream it was allowed to see.
    let (status, _) = daemon.terminate();
    assert!(status.success(), "marengod exited with {status}");
    monitor.wait_for("The name org.marengo.Llm1 does not have an owner");
    let watched = monitor.stop();
    assert!(
        !watched.contains("org.marengo.Llm1.Token")
            && !watched.contains("org.marengo.Llm1.Finished"),
        "the outsider saw the member's stream:\n{watched}"
    );
}
