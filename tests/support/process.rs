//! The real `camserve serve` binary as a child process, for tests that need a real process (signals, its log).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::server::root;

/// The real `camserve serve` process, its port read from its "listening" log line.
pub struct Process {
    pub child: std::process::Child,
    pub base: String,
    /// Every line the process wrote to stderr (its log), so far.
    pub log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts the binary on the demo model with `server` settings and a batcher that holds a request for 600
    /// ms (so one is in flight when the signal comes), and waits until it is ready.
    pub async fn start(server: &str) -> Process {
        Process::start_logging(server, "info").await
    }

    /// As `start`, with `RUST_LOG=rust_log`.
    pub async fn start_logging(server: &str, rust_log: &str) -> Process {
        Process::start_with(server, rust_log, &[], &[]).await
    }

    /// As `start_logging`, with more command-line arguments after the config and more environment variables.
    pub async fn start_with(server: &str, rust_log: &str, args: &[&str], envs: &[(&str, &str)]) -> Process {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("camserve.toml");
        let models = root().join("models");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nbind = \"127.0.0.1:0\"\n{server}\n[runtime]\ndevice = \"cpu\"\nthreads = 1\n\
                 [batching]\nmax_wait_ms = 600\nmax_batch = 64\n\
                 [[models]]\nname = \"demo\"\npath = \"{}\"\nlabels = \"{}\"\n",
                models.join("demo.onnx").display(),
                models.join("demo.labels.txt").display()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_camserve"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                if let Some(k) = line.find("127.0.0.1:") {
                    let port: String = line[k + 10..].chars().take_while(|c| c.is_ascii_digit()).collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).expect("no `listening` line from camserve serve");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
                && r.status() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "camserve serve did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Process { child, base, log, _dir: dir }
    }

    pub fn sigterm(&self) {
        let st = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }

    /// Waits up to `limit` for the process to exit; its status and when it exited.
    pub async fn wait(&mut self, limit: Duration) -> (std::process::ExitStatus, Instant) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, Instant::now());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("camserve did not exit within {limit:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log so far, one string.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

