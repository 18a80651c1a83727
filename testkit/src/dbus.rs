//! The daemon's tests on a private bus: a `dbus-daemon` started with the test's own config, the
//! real `marengod serve` on it (serving [`tiny_bundle`]`(Kind::Fp8)`), and a zbus client that
//! collects a request's stream.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use marengo_client::{BUS_NAME, Llm1Proxy};
use zbus::message::Type as MessageType;
use zbus::{
    Connection, MatchRule, MessageStream, ObjectPath, OwnedObjectPath, OwnedVariant, Variant,
};

use crate::binaries::marengod;
use crate::command::run;
use crate::tiny::{Kind, tiny_bundle};

/// A private message bus, killed when dropped.
pub struct Bus {
    pub address: String,
    pid: u32,
}

impl Bus {
    /// A session-like bus: anyone connected may own names and call, nobody may eavesdrop.
    pub fn session_like(dir: &Path) -> Bus {
        let config = dir.join("session-bus.conf");
        let socket = dir.join("bus.socket");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <!-- As Debian's session.conf, but nobody may eavesdrop. Without the receive rule the
         bus withholds NameAcquired, on which a client's name request waits. -->
    <allow send_destination="*" eavesdrop="false"/>
    <allow eavesdrop="false"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("writing the bus config");
        Bus::start(&config, dir)
    }

    /// Starts `dbus-daemon` on `config`; the address and pid come back on two pipes.
    pub fn start(config: &Path, dir: &Path) -> Bus {
        let address_file = dir.join("bus.address");
        let pid_file = dir.join("bus.pid");
        run(Command::new("sh").arg("-c").arg(format!(
            "exec dbus-daemon --config-file='{}' --fork --print-address=3 --print-pid=4 \
             3>'{}' 4>'{}'",
            config.display(),
            address_file.display(),
            pid_file.display()
        )));
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .trim()
                .to_owned()
        };
        Bus {
            address: read(&address_file),
            pid: read(&pid_file).parse().expect("dbus-daemon prints its pid"),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

/// A running `marengod serve`, killed when dropped. Its stderr (the log) is kept in a file.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `address` with `extra` arguments and waits for `READY=1` on a
    /// notification socket of the test's, as systemd would.
    pub fn start(dir: &Path, address: &str, extra: &[&str]) -> Daemon {
        Daemon::start_as(dir, address, extra, None)
    }

    /// Like [`Daemon::start`], as `user` (with its groups) when given.
    pub fn start_as(dir: &Path, address: &str, extra: &[&str], user: Option<&str>) -> Daemon {
        let bundle = tiny_bundle(Kind::Fp8).to_string_lossy().into_owned();
        Daemon::spawn(
            dir,
            address,
            &[&["--bundle", &bundle], extra].concat(),
            user,
        )
    }

    /// Like [`Daemon::start`], serving the models found in `models_dir` alone (no `--bundle`).
    pub fn start_with_models(
        dir: &Path,
        address: &str,
        models_dir: &Path,
        extra: &[&str],
    ) -> Daemon {
        let models_dir = models_dir.to_string_lossy().into_owned();
        Daemon::spawn(
            dir,
            address,
            &[&["--models-dir", &models_dir], extra].concat(),
            None,
        )
    }

    fn spawn(dir: &Path, address: &str, args: &[&str], user: Option<&str>) -> Daemon {
        let notify_path = dir.join("notify.socket");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("binding the notify socket");
        // Another user must be able to send to it.
        std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777))
            .expect("opening the notify socket to all");
        notify
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("setting a timeout");
        let log = dir.join("marengod.log");
        let mut command = match user {
            Some(user) => {
                let mut setpriv = Command::new("setpriv");
                setpriv
                    .arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .args(["--init-groups", "--"])
                    .arg(marengod());
                setpriv
            }
            None => Command::new(marengod()),
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(dir.join("no-config.toml"))
            .arg("--address")
            .arg(address)
            .args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("creating the log file"));
        std::fs::write(dir.join("no-config.toml"), "").expect("writing an empty config");
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let mut daemon = Daemon { child, log };
        let mut buffer = [0u8; 4096];
        loop {
            let n = match notify.recv(&mut buffer) {
                Ok(n) => n,
                Err(e) => panic!(
                    "no READY=1 from marengod ({e}); log:\n{}",
                    daemon.log_text()
                ),
            };
            if String::from_utf8_lossy(&buffer[..n])
                .lines()
                .any(|line| line == "READY=1")
            {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("marengod exited ({status}); log:\n{}", daemon.log_text());
            }
        }
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// A field of /proc/PID/status, in kB (VmRSS, VmHWM, RssAnon, RssFile).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the daemon's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Waits up to `within` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait().expect("waiting for marengod") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status and how long the exit took
    /// from the signal's delivery (`kill` has returned), not from starting `kill`, which on a
    /// busy machine can take a while of its own.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        run(Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string()));
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for marengod") {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "marengod still runs 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn connect(address: &str) -> Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connecting to the test bus")
}

pub async fn proxy(connection: &Connection) -> Llm1Proxy<'static> {
    Llm1Proxy::new(connection)
        .await
        .expect("creating the org.marengo.Llm1 proxy")
}

/// The `Token` and `Finished` signals this connection receives, in order.
pub async fn signals(connection: &Connection) -> MessageStream {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface(BUS_NAME)
        .build()
        .expect("a valid match rule");
    MessageStream::for_match_rule(rule, connection, None)
        .await
        .expect("adding the match rule")
}

/// A signal of `org.marengo.Llm1`, decoded.
#[derive(Debug, Clone)]
pub enum Signal {
    Token {
        request: String,
        text: String,
    },
    Finished {
        request: String,
        reason: String,
        stats: HashMap<String, OwnedVariant>,
    },
}

impl Signal {
    pub fn request(&self) -> &str {
        match self {
            Signal::Token { request, .. } | Signal::Finished { request, .. } => request,
        }
    }
}

/// The next signal of the stream, within `timeout`.
pub async fn next_signal(stream: &mut MessageStream, timeout: Duration) -> Option<Signal> {
    let message = tokio::time::timeout(timeout, stream.next()).await.ok()??;
    let message = message.expect("a well-formed message");
    let member = message.header().member().map(|m| m.to_string());
    let body = message.body();
    match member.as_deref() {
        Some("Token") => {
            let (request, text): (ObjectPath<'_>, String) =
                body.deserialize().expect("Token is (os)");
            Some(Signal::Token {
                request: request.to_string(),
                text,
            })
        }
        Some("Finished") => {
            let (request, reason, stats): (ObjectPath<'_>, String, HashMap<String, OwnedVariant>) =
                body.deserialize().expect("Finished is (osa{sv})");
            Some(Signal::Finished {
                request: request.to_string(),
                reason,
                stats,
            })
        }
        other => panic!("unexpected signal {other:?}"),
    }
}

/// Cancels `request` on a task of its own, so that the caller keeps reading its signals: a
/// signal stream nobody reads stops the connection's reader once its buffer is full, and
/// with it the call's reply. Await the handle once the request's `Finished` has come.
pub fn cancel_aside(
    llm: &Llm1Proxy<'static>,
    request: &OwnedObjectPath,
) -> tokio::task::JoinHandle<Result<(), marengo_client::Llm1Error>> {
    let (llm, request) = (llm.clone(), request.clone());
    tokio::spawn(async move { llm.cancel(&request.as_ref()).await })
}

/// The whole stream of one request: its text, its end, and how many `Finished` came.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub text: String,
    pub tokens: usize,
    pub reason: String,
    pub stats: HashMap<String, OwnedVariant>,
}

impl Streamed {
    pub fn stat_u32(&self, key: &str) -> u32 {
        u32::try_from(
            self.stats
                .get(key)
                .unwrap_or_else(|| panic!("no stat {key}"))
                .clone(),
        )
        .unwrap_or_else(|e| panic!("stat {key}: {e}"))
    }
}

/// Reads `stream` until `request`'s `Finished`, asserting that every signal on the way
/// belongs to it (this connection has no other request running).
pub async fn collect(stream: &mut MessageStream, request: &OwnedObjectPath) -> Streamed {
    let mut text = String::new();
    let mut tokens = 0;
    loop {
        let signal = next_signal(stream, Duration::from_secs(120))
            .await
            .unwrap_or_else(|| panic!("no Finished for {request} within 120 s"));
        assert_eq!(
            signal.request(),
            request.as_str(),
            "a signal of another request: {signal:?}"
        );
        match signal {
            Signal::Token { text: piece, .. } => {
                text.push_str(&piece);
                tokens += 1;
            }
            Signal::Finished { reason, stats, .. } => {
                return Streamed {
                    text,
                    tokens,
                    reason,
                    stats,
                };
            }
        }
    }
}

/// Options for a deterministic request: greedy, `max_tokens` tokens.
pub fn greedy(max_tokens: u32) -> HashMap<&'static str, Variant<'static>> {
    HashMap::from([
        ("temperature", Variant::F64(0.0)),
        ("max_tokens", Variant::U32(max_tokens)),
    ])
}
