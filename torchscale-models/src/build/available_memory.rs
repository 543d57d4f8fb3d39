//! How much memory this process may still take: the default memory budget of a build.

/// The budget when the system says nothing (not Linux, no `/proc`): 16 GiB. Set
/// [`BuildOptions::memory_budget`](super::BuildOptions::memory_budget) to go beyond it.
pub const FALLBACK_BUDGET: u64 = 16 << 30;

/// Bytes this process can still allocate, as the system reports it: the least of Linux's
/// `MemAvailable` (`/proc/meminfo`), what the cgroup (v2) limit leaves (`memory.max` minus
/// `memory.current`, a container's real limit, which `MemAvailable` does not see) and what the
/// address-space limit leaves (`ulimit -v`, `RLIMIT_AS`, minus `VmSize`). When none of them can
/// be read, [`FALLBACK_BUDGET`].
///
/// It is a figure of the moment: memory other processes free or take later is not foreseen.
pub fn available_memory() -> u64 {
    let figures = [meminfo_available(), cgroup_left(), address_space_left()];
    figures
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(FALLBACK_BUDGET)
}

/// [`available_memory`] read at most once per [`RecentAvailableMemory::MAX_AGE`]: reading it
/// costs about 0.1 ms (four small files), which a check before every training step of a small
/// model should not pay.
#[derive(Debug, Default)]
pub(crate) struct RecentAvailableMemory {
    last: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl RecentAvailableMemory {
    /// How old a figure may be.
    pub(crate) const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

    /// The figure, read again when the last one is older than [`Self::MAX_AGE`].
    pub(crate) fn get(&self) -> u64 {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some((at, bytes)) if at.elapsed() < Self::MAX_AGE => bytes,
            _ => {
                let bytes = available_memory();
                *last = Some((std::time::Instant::now(), bytes));
                bytes
            }
        }
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn meminfo_available() -> Option<u64> {
    kib_field(&read("/proc/meminfo")?, "MemAvailable:")
}

/// The value of `field` in a `/proc` listing whose lines read `Field:   1234 kB`, in bytes.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    let mut words = line[field.len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// What the process's cgroup (v2) still allows: `memory.max - memory.current`; None when
/// unlimited or unreadable.
fn cgroup_left() -> Option<u64> {
    let own = read("/proc/self/cgroup")
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_default();
    let dirs = [format!("/sys/fs/cgroup{own}"), "/sys/fs/cgroup".to_string()];
    dirs.iter().find_map(|dir| {
        let max = parse_limit(&read(&format!("{dir}/memory.max"))?)?;
        let current: u64 = read(&format!("{dir}/memory.current"))?
            .trim()
            .parse()
            .ok()?;
        Some(max.saturating_sub(current))
    })
}

/// A limit file's value: a number of bytes, or None for `max` / `unlimited`.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The soft address-space limit minus the address space in use, when a limit is set.
fn address_space_left() -> Option<u64> {
    let limit = address_space_limit(&read("/proc/self/limits")?)?;
    let used = kib_field(&read("/proc/self/status")?, "VmSize:").unwrap_or(0);
    Some(limit.saturating_sub(used))
}

/// The soft `Max address space` of a `/proc/self/limits` listing; None when unlimited.
fn address_space_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    parse_limit(
        line["Max address space".len()..]
            .split_whitespace()
            .next()?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_listings_parse() {
        let meminfo = "MemTotal:       24683584 kB\nMemFree:        11963888 kB\n\
                       MemAvailable:   22167428 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable:"), Some(22167428 * 1024));
        assert_eq!(kib_field(meminfo, "SwapTotal:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max stack size            8388608              unlimited            bytes\n\
                      Max address space         8000000000           unlimited            bytes\n";
        assert_eq!(address_space_limit(limits), Some(8_000_000_000));
        let unlimited = limits.replace("8000000000", "unlimited ");
        assert_eq!(address_space_limit(&unlimited), None);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
    }

    #[test]
    fn the_figure_is_positive() {
        // Whatever the machine, some memory is left for the test itself.
        assert!(available_memory() > 0);
    }
}
