//! The table runner of the catalogue tests (`bad_configs`, `bad_checkpoints`,
//! `bad_runtime_inputs`, `training_faults`): each case has a name, its input in words, and what
//! must happen — a typed error of a given variant whose message holds given words (the field,
//! the path, the argument), or success (the case's own assertions then hold). Every case runs,
//! even after another fails; a panic is a failure of its case; the test fails at the end listing
//! every case that did not behave.
//!
//! [`check_isolated`] runs each case in a child process (this test binary again, filtered to the
//! test and the case) whose address space is limited: a case that would allocate what no machine
//! has aborts its child only, and is reported by name with the child's last words.
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;

use torchscale_core::Error;

/// What a case must give.
pub enum Expect {
    /// An error of this variant (its name, as `Debug` prints it) whose message contains each
    /// of the words.
    Err(&'static str, &'static [&'static str]),
    /// Success.
    Ok,
}

/// One row of a table.
pub struct Case {
    /// Short, unique in its table.
    pub name: &'static str,
    /// The bad input, in words.
    pub input: String,
    /// What must happen.
    pub expect: Expect,
    run: Box<dyn FnOnce() -> Result<(), Error>>,
}

/// A case that must fail with an `variant` error whose message holds every word of `words`.
pub fn refused(
    name: &'static str,
    input: impl Into<String>,
    variant: &'static str,
    words: &'static [&'static str],
    run: impl FnOnce() -> Result<(), Error> + 'static,
) -> Case {
    Case {
        name,
        input: input.into(),
        expect: Expect::Err(variant, words),
        run: Box::new(run),
    }
}

/// A case that must succeed (and whose own assertions must hold).
pub fn accepted(
    name: &'static str,
    input: impl Into<String>,
    run: impl FnOnce() -> Result<(), Error> + 'static,
) -> Case {
    Case {
        name,
        input: input.into(),
        expect: Expect::Ok,
        run: Box::new(run),
    }
}

/// The variant of `e` as `Debug` names it (`Config`, `MemoryBudget`, `Candle`, ...).
pub fn variant(e: &Error) -> String {
    let dbg = format!("{e:?}");
    dbg.split([' ', '(', '{']).next().unwrap_or("").to_string()
}

/// `msg` cut to its first 600 characters (a candle error may carry a backtrace).
fn short(msg: String) -> String {
    match msg.char_indices().nth(600) {
        Some((i, _)) => format!("{} [...]", &msg[..i]),
        None => msg,
    }
}

/// Runs one case: `Ok` (with the error's message, if it was refused) when it behaved, else what
/// it did instead.
fn run_one(case: Case) -> Result<String, String> {
    run_case(case).map(short).map_err(short)
}

fn run_case(case: Case) -> Result<String, String> {
    let Case {
        name: _,
        input: _,
        expect,
        run,
    } = case;
    let got = match catch_unwind(AssertUnwindSafe(run)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!("panicked: {msg}"));
        }
    };
    match (expect, got) {
        (Expect::Ok, Ok(())) => Ok("succeeded".into()),
        (Expect::Ok, Err(e)) => Err(format!("expected success, got {} error: {e}", variant(&e))),
        (Expect::Err(v, _), Ok(())) => Err(format!("expected a {v} error, got success")),
        (Expect::Err(v, words), Err(e)) => {
            let msg = e.to_string();
            let missing: Vec<&str> = words.iter().copied().filter(|w| !msg.contains(w)).collect();
            if variant(&e) != v {
                Err(format!("expected a {v} error, got {}: {msg}", variant(&e)))
            } else if !missing.is_empty() {
                Err(format!("the message lacks {missing:?}: {msg}"))
            } else {
                Ok(msg)
            }
        }
    }
}

fn report(group: &str, total: usize, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{group}: {} of {total} cases did not behave:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs every case of the table in this process.
pub fn check(group: &str, cases: Vec<Case>) {
    let total = cases.len();
    let mut failures = Vec::new();
    for case in cases {
        let (name, input) = (case.name, case.input.clone());
        match run_one(case) {
            Ok(msg) => println!("{group}: {name}: ok: {msg}"),
            Err(why) => failures.push(format!("- {name} ({input}): {why}")),
        }
    }
    report(group, total, failures);
}

const CASE_VAR: &str = "TORCHSCALE_CATALOGUE_CASE";
const MARK: &str = "catalogue-case-result: ";

/// Address space a child may add to what it holds at start: far more than any case needs
/// once sizes are checked, far less than what the unchecked sizes would allocate.
pub const CHILD_MEMORY_LIMIT: u64 = 4 << 30;

/// Runs each case of the table in its own child process under an address-space limit of
/// [`CHILD_MEMORY_LIMIT`] more than the child holds at start. `test` is the name of the calling
/// test function (the child runs it alone, for one case).
pub fn check_isolated(group: &str, test: &str, cases: Vec<Case>) {
    if let Ok(name) = std::env::var(CASE_VAR) {
        let Some(case) = cases.into_iter().find(|c| c.name == name) else {
            println!("{MARK}no case named {name}");
            return;
        };
        limit_address_space(CHILD_MEMORY_LIMIT);
        let line = match run_one(case) {
            Ok(msg) => format!("ok: {msg}"),
            Err(why) => format!("failed: {why}"),
        };
        println!("{MARK}{}", line.replace('\n', " / "));
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let total = cases.len();
    let mut failures = Vec::new();
    for case in &cases {
        let out = Command::new(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CASE_VAR, case.name)
            .output()
            .expect("start the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The harness prints `test NAME ... ` on the same line first.
        let line = stdout
            .lines()
            .find_map(|l| l.split_once(MARK).map(|(_, verdict)| verdict));
        let why = match line {
            Some(ok) if ok.starts_with("ok: ") => {
                println!("{group}: {}: {ok} (own process)", case.name);
                continue;
            }
            Some(other) => other.to_string(),
            None => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
                format!(
                    "its process ended without a verdict ({}), last words: {}",
                    out.status,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                )
            }
        };
        failures.push(format!("- {} ({}): {why}", case.name, case.input));
    }
    report(group, total, failures);
}

/// Lowers the soft `RLIMIT_AS` of this process to what it holds now plus `extra` bytes.
fn limit_address_space(extra: u64) {
    #[cfg(target_os = "linux")]
    {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
        let pages: u64 = statm
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("parse /proc/self/statm");
        // SAFETY: sysconf reads a constant; getrlimit and setrlimit read and write the struct.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as u64;
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut lim), 0);
            lim.rlim_cur = (pages * page).saturating_add(extra).min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0, "setrlimit");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = extra;
}
