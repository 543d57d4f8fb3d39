//! `cargo xtask fuzz`: seeded property and mutation tests of everything a user hands the
//! library from outside — config JSON, safetensors files, checkpoint folders. Every case must end
//! in `Ok` or a typed `Err`; a panic, an abort (an allocation that fails), a hang or a broken
//! promise (a step from a finite model that leaves a non-finite parameter, a save that does not
//! load back) fails the run and names the input.
//!
//! Three targets, taken in turn (case `i` goes to target `i mod 3`):
//!
//! * `config` ([`configs`]): Decoder, Encoder and EncoderDecoder configs, built and run;
//! * `file` ([`files`]): `model.safetensors` and `trainer.safetensors` of real checkpoints, loaded
//!   and trained from;
//! * `folder` ([`folders`]): checkpoint folders, loaded and saved onto.
//!
//! Case `i` of seed `s` is drawn from `(s, i)` alone (proptest's generators on a ChaCha stream),
//! so a run is reproducible and any case replays alone: `cargo xtask fuzz --seed s --case i`.
//!
//! The cases run in a child process (this binary again) under an address-space limit
//! (`RLIMIT_AS`, `--memory-limit` MiB above what the child holds when it starts): an allocation
//! that fails aborts the child, and the parent reports the case that was running, as it does
//! for a crash or a case that runs past `--case-timeout`.

pub mod base;
pub mod configs;
pub mod files;
pub mod folders;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use torchscale_core::Error;

use base::{Env, Verdict, Violation};

/// What a case feeds the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Config JSON, built into models.
    Config,
    /// Safetensors files of a checkpoint.
    File,
    /// Checkpoint folders.
    Folder,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Config => "config",
            Target::File => "file",
            Target::Folder => "folder",
        }
    }
}

/// The command line of `cargo xtask fuzz`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fuzz",
    about = "Seeded mutation tests of configs, safetensors files and checkpoint folders: \
             Ok or a typed error, never a panic, an abort or a hang",
    after_help = "Without --cases or --seconds the run lasts 60 s. A failing case is printed \
                  with its input and the command that replays it alone."
)]
pub struct FuzzArgs {
    /// Cases to run, taken by the targets in turn
    #[arg(long, value_name = "N")]
    pub cases: Option<u64>,
    /// Start no case after this many seconds (with --cases: whichever comes first)
    #[arg(long, value_name = "S")]
    pub seconds: Option<f64>,
    /// Seed of the run: case i is drawn from (seed, i) alone
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Run case I alone (a replay of a failure)
    #[arg(long, value_name = "I")]
    pub case: Option<u64>,
    /// Targets, taken in turn [default: config,file,folder]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_enum)]
    pub targets: Option<Vec<Target>>,
    /// Address space the cases may add to the child process, in MiB (0: no limit)
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub memory_limit: u64,
    /// Seconds one case may run before it counts as hung
    #[arg(long, value_name = "S", default_value_t = 120)]
    pub case_timeout: u64,
    /// Run the cases in this process: no memory limit, no hang watch (for a debugger)
    #[arg(long)]
    pub in_process: bool,
    /// Print every case with its verdict
    #[arg(long)]
    pub verbose: bool,
    /// Internal: make case I fail as KIND (`panic`, `abort`: a failed allocation, `hang`), to
    /// test the reports: `KIND@I`
    #[arg(long, hide = true, value_name = "KIND@I", value_parser = fault_arg)]
    pub inject: Option<(Fault, u64)>,
    /// Internal: run the cases, writing progress to FILE (what the parent starts)
    #[arg(long, hide = true, value_name = "FILE")]
    pub child: Option<PathBuf>,
}

impl FuzzArgs {
    fn targets(&self) -> Vec<Target> {
        match &self.targets {
            Some(t) if !t.is_empty() => t.clone(),
            _ => vec![Target::Config, Target::File, Target::Folder],
        }
    }

    fn targets_arg(&self) -> String {
        let t: Vec<&str> = self.targets().iter().map(|t| t.name()).collect();
        t.join(",")
    }

    /// The command that replays case `i` alone.
    fn replay(&self, i: u64) -> String {
        format!(
            "cargo xtask fuzz --seed {} --case {i} --targets {}",
            self.seed,
            self.targets_arg()
        )
    }
}

/// Runs `cargo xtask fuzz`: success iff no case failed.
pub fn main(args: &FuzzArgs) -> Result<ExitCode> {
    if let Some(s) = args.seconds {
        if !(s.is_finite() && s >= 0.0) {
            bail!("--seconds must be a finite number >= 0, got {s}");
        }
    }
    if let Some(progress) = &args.child {
        if args.memory_limit > 0 {
            limit_address_space(args.memory_limit)?;
        }
        return run_cases(args, Some(progress));
    }
    if args.in_process {
        return run_cases(args, None);
    }
    parent(args)
}

/// Starts the child, watches its progress, and reports a case that killed or hung it.
fn parent(args: &FuzzArgs) -> Result<ExitCode> {
    let progress = tempfile::NamedTempFile::new().context("create the progress file")?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["fuzz", "--seed", &args.seed.to_string()])
        .args(["--targets", &args.targets_arg()])
        .args(["--memory-limit", &args.memory_limit.to_string()]);
    if let Some(n) = args.cases {
        cmd.args(["--cases", &n.to_string()]);
    }
    if let Some(s) = args.seconds {
        cmd.args(["--seconds", &s.to_string()]);
    }
    if let Some(i) = args.case {
        cmd.args(["--case", &i.to_string()]);
    }
    if args.verbose {
        cmd.arg("--verbose");
    }
    if let Some((kind, i)) = args.inject {
        cmd.args(["--inject", &format!("{}@{i}", kind.name())]);
    }
    // The library's warnings (steps skipped on NaN losses, which many cases cause) would drown
    // the report; RUST_LOG set by the caller wins.
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "error");
    }
    cmd.arg("--child")
        .arg(progress.path())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("start the fuzz child process")?;
    let timeout = Duration::from_secs(args.case_timeout.max(1));
    let (mut seen, mut since) = (0u64, Instant::now());
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        let len = std::fs::metadata(progress.path()).map_or(0, |m| m.len());
        if len != seen {
            (seen, since) = (len, Instant::now());
        } else if since.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    match status {
        Some(s) if s.success() => return Ok(ExitCode::SUCCESS),
        // The child found failures and printed them.
        Some(s) if s.code() == Some(1) => return Ok(ExitCode::FAILURE),
        _ => {}
    }
    let why = match status {
        None => format!(
            "ran past --case-timeout ({} s) and was stopped",
            timeout.as_secs()
        ),
        Some(s) => format!(
            "{} (under an address-space limit of +{} MiB: an allocation that failed aborts)",
            died(s),
            args.memory_limit
        ),
    };
    match last_case(progress.path()) {
        Some((i, target, input)) => {
            println!("\nFAILED case {i} [{target}]: the child process {why}");
            println!("  input: {input}");
            println!("  replay: {}", args.replay(i));
        }
        None => println!("\nFAILED: the child process {why} before its first case (setup)"),
    }
    Ok(ExitCode::FAILURE)
}

fn died(s: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            let name = match sig {
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            return format!("was killed by signal {sig}{name}");
        }
    }
    format!("exited with {s}")
}

/// The last case the child started, from its progress file: index, target, input.
fn last_case(path: &Path) -> Option<(u64, String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut last = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("case ") {
            let (i, target) = rest.split_once(' ')?;
            last = Some((
                i.parse().ok()?,
                target.to_string(),
                "(not drawn yet)".to_string(),
            ));
        } else if let (Some(input), Some(l)) = (line.strip_prefix("input "), last.as_mut()) {
            l.2 = input.to_string();
        }
    }
    last
}

/// Lowers the soft `RLIMIT_AS` to the address space held now plus `extra_mib`.
#[cfg(target_os = "linux")]
fn limit_address_space(extra_mib: u64) -> Result<()> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .context("parse /proc/self/statm")?;
    // SAFETY: sysconf reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let want = pages
        .saturating_mul(page)
        .saturating_add(extra_mib.saturating_mul(1 << 20));
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write and read the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_AS, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = want.min(lim.rlim_max);
        if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn limit_address_space(_extra_mib: u64) -> Result<()> {
    eprintln!("fuzz: no address-space limit on this system (Linux only)");
    Ok(())
}

/// A failure `--inject` makes happen in a case, to test how it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The case panics.
    Panic,
    /// An allocation fails: the process aborts.
    Abort,
    /// The case never returns.
    Hang,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Panic => "panic",
            Fault::Abort => "abort",
            Fault::Hang => "hang",
        }
    }

    fn happen(self) -> ! {
        match self {
            Fault::Panic => panic!("injected panic"),
            Fault::Abort => {
                std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u8; 1 << 20]>())
            }
            Fault::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
}

fn fault_arg(s: &str) -> std::result::Result<(Fault, u64), String> {
    let (kind, i) = s.split_once('@').ok_or("expected KIND@I")?;
    let kind = match kind {
        "panic" => Fault::Panic,
        "abort" => Fault::Abort,
        "hang" => Fault::Hang,
        other => return Err(format!("unknown fault `{other}` (panic, abort, hang)")),
    };
    let i = i
        .parse()
        .map_err(|_| format!("`{i}` is not a case index"))?;
    Ok((kind, i))
}

/// A drawn case.
enum Input {
    Config(configs::ConfigCase),
    File(files::FileCase),
    Folder(folders::FolderCase),
}

/// The ChaCha seed of case `i` of run `seed`.
fn case_seed(seed: u64, i: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&i.to_le_bytes());
    s[16..].copy_from_slice(b"torchscale-fuzz!");
    s
}

fn draw<S: Strategy>(strategy: S, seed: u64, i: u64) -> S::Value {
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &case_seed(seed, i));
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    strategy
        .new_tree(&mut runner)
        .expect("the generators never reject")
        .current()
}

fn draw_case(env: &Env, target: Target, seed: u64, i: u64) -> (Input, String) {
    match target {
        Target::Config => {
            let c = draw(configs::case(), seed, i);
            let d = c.to_string();
            (Input::Config(c), d)
        }
        Target::File => {
            let c = draw(files::case(), seed, i);
            let d = files::describe(env, &c);
            (Input::File(c), d)
        }
        Target::Folder => {
            let c = draw(folders::case(), seed, i);
            let d = folders::describe(env, &c);
            (Input::Folder(c), d)
        }
    }
}

fn run_input(env: &Env, i: u64, input: &Input) -> std::result::Result<Verdict, Violation> {
    match input {
        Input::Config(c) => Ok(configs::run(c)),
        Input::File(c) => files::run(env, i, c),
        Input::Folder(c) => folders::run(env, i, c),
    }
}

/// The variant of an error as `Debug` names it (`Config`, `MemoryBudget`, ...), for the summary.
fn variant(e: &Error) -> String {
    let dbg = format!("{e:?}");
    dbg.split([' ', '(', '{']).next().unwrap_or("").to_string()
}

/// The message of the last panic (the hook keeps it; the default hook's output is not wanted
/// for panics that are caught and reported).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn take_panic() -> String {
    LAST_PANIC
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_else(|| "(no message)".into())
}

#[derive(Default)]
struct Tally {
    cases: u64,
    used: u64,
    refused: std::collections::BTreeMap<String, u64>,
}

struct Failure {
    index: u64,
    target: Target,
    input: String,
    what: String,
}

/// One line per case in the progress file, flushed before the case runs.
struct Progress(Option<std::fs::File>);

impl Progress {
    fn line(&mut self, s: &str) {
        if let Some(f) = &mut self.0 {
            let one_line = s.replace('\n', "\\n");
            let _ = writeln!(f, "{one_line}");
            let _ = f.flush();
        }
    }
}

fn run_cases(args: &FuzzArgs, progress: Option<&PathBuf>) -> Result<ExitCode> {
    let mut progress = Progress(match progress {
        Some(p) => Some(std::fs::File::create(p).context("open the progress file")?),
        None => None,
    });
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.to_string());
    }));
    let setup = Instant::now();
    let env = match catch_unwind(Env::new) {
        Ok(Ok(env)) => env,
        Ok(Err(e)) => bail!("fuzz setup (the base checkpoints): {e}"),
        Err(_) => bail!("fuzz setup panicked: {}", take_panic()),
    };
    let setup = setup.elapsed();
    let targets = args.targets();
    let (range, seconds) = match (args.case, args.cases, args.seconds) {
        (Some(i), _, _) => (i..i + 1, None),
        (None, Some(n), s) => (0..n, s),
        (None, None, s) => (0..u64::MAX, Some(s.unwrap_or(60.0))),
    };
    let start = Instant::now();
    let deadline = seconds.map(|s| start + Duration::from_secs_f64(s));
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    let mut failures = Vec::new();
    let mut stopped_early = None;
    for i in range.clone() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stopped_early = Some(i);
            break;
        }
        let t = (i % targets.len() as u64) as usize;
        let target = targets[t];
        progress.line(&format!("case {i} {}", target.name()));
        let drawn = catch_unwind(AssertUnwindSafe(|| draw_case(&env, target, args.seed, i)));
        let (input, desc) = match drawn {
            Ok(x) => x,
            Err(_) => {
                failures.push(Failure {
                    index: i,
                    target,
                    input: "(the generator panicked)".into(),
                    what: format!("panic: {}", take_panic()),
                });
                continue;
            }
        };
        progress.line(&format!("input {desc}"));
        let verdict = catch_unwind(AssertUnwindSafe(|| match args.inject {
            Some((fault, at)) if at == i => fault.happen(),
            _ => run_input(&env, i, &input),
        }));
        let _ = base::clear(&env.scratch.join(format!("case-{i}")));
        let tally = &mut tallies[t];
        tally.cases += 1;
        let shown = match verdict {
            Ok(Ok(Ok(()))) => {
                tally.used += 1;
                "ok".to_string()
            }
            Ok(Ok(Err(e))) => {
                *tally.refused.entry(variant(&e)).or_default() += 1;
                format!("refused: {e}")
            }
            Ok(Err(Violation(what))) => {
                failures.push(Failure {
                    index: i,
                    target,
                    input: desc.clone(),
                    what: what.clone(),
                });
                format!("VIOLATION: {what}")
            }
            Err(_) => {
                let what = format!("panic: {}", take_panic());
                failures.push(Failure {
                    index: i,
                    target,
                    input: desc.clone(),
                    what: what.clone(),
                });
                what
            }
        };
        if args.verbose {
            println!("case {i} [{}] {desc}\n  -> {shown}", target.name());
        }
    }
    let ran: u64 = tallies.iter().map(|t| t.cases).sum();
    let limit = if args.child.is_some() && args.memory_limit > 0 {
        format!("address space limited to +{} MiB", args.memory_limit)
    } else {
        "no memory limit".to_string()
    };
    println!(
        "fuzz: seed {}, {ran} cases in {:.1} s (setup {:.1} s), {limit}",
        args.seed,
        start.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
    for (target, t) in targets.iter().zip(&tallies) {
        let refused: Vec<String> = t.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "  {:<6} {} cases: {} used, {} refused ({})",
            target.name(),
            t.cases,
            t.used,
            t.refused.values().sum::<u64>(),
            refused.join(", ")
        );
    }
    if let Some(i) = stopped_early {
        println!("  stopped by the time limit before case {i}");
    }
    for f in &failures {
        println!(
            "\nFAILED case {} [{}]: {}\n  input: {}\n  replay: {}",
            f.index,
            f.target.name(),
            f.what,
            f.input,
            args.replay(f.index)
        );
    }
    println!("fuzz: {} failures", failures.len());
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
