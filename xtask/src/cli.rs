//! Shared pieces of the command lines: value parsers, and parsing one command's flags from a
//! slice (what tests and the library entry points use; `main` parses the whole line with clap).

use anyhow::Result;
use clap::Parser;

/// A positive count (`--layers 0` is a usage error, named by clap).
pub fn count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be positive".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a count")),
    }
}

/// A finite number >= 0 (learning rates, clipping thresholds).
pub fn non_negative(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a finite number >= 0".into()),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// Parses the flags that follow `command` on the command line, as clap would in `cargo xtask`.
pub fn parse_flags<P: Parser>(command: &str, args: &[String]) -> Result<P> {
    let argv = std::iter::once(command.to_string()).chain(args.iter().cloned());
    Ok(P::try_parse_from(argv)?)
}
