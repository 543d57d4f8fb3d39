//! Starting this test binary under mpirun, as a normal `cargo test` does, and reading the result.

pub mod checks;

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How an mpirun job ended.
pub struct Outcome {
    /// mpirun's exit status; `None` if it did not start or was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// stdout then stderr of mpirun and every rank (or why mpirun did not start).
    pub text: String,
    /// Wall time until it ended.
    pub elapsed: Duration,
}

impl Outcome {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs this very binary as `np` ranks with `args`, one compute thread per rank, and kills the
/// job if it outlives `timeout` (then `status` is `None` and `text` says so).
pub fn mpirun(np: usize, args: &[&str], timeout: Duration) -> Outcome {
    let start = Instant::now();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return failed(start, format!("current_exe: {e}")),
    };
    let mut cmd = Command::new("mpirun");
    cmd.arg("-np")
        .arg(np.to_string())
        // Two ranks on a small machine (CI has 2 cores), as root in CI's container.
        .args(["--oversubscribe", "--allow-run-as-root"])
        .args(["-x", "RAYON_NUM_THREADS=1", "-x", "CANDLE_NUM_THREADS=1"])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return failed(
                start,
                format!("cannot start mpirun ({e}): install openmpi-bin (see .ci/run)"),
            )
        }
    };
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > timeout => {
                stop(&mut child);
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break None,
        }
    };
    let elapsed = start.elapsed();
    let mut text = out.join().unwrap_or_default();
    text.push_str(&err.join().unwrap_or_default());
    if status.is_none() {
        text.push_str(&format!("\n(killed: still running after {timeout:?})"));
    }
    Outcome {
        status,
        text,
        elapsed,
    }
}

fn failed(start: Instant, text: String) -> Outcome {
    Outcome {
        status: None,
        text,
        elapsed: start.elapsed(),
    }
}

/// SIGTERM first, so that mpirun takes its ranks down with it; SIGKILL if it lingers.
fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
