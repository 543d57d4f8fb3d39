//! A checkpoint made of several files (weights, config, trainer state) replaced as one, durably.
//!
//! Next to a checkpoint folder `<dir>` live, for a moment, two siblings:
//!
//! * `<dir>.tmp-<pid>`: the new checkpoint being written by process `<pid>`;
//! * `<dir>.old`: the previous checkpoint, between the two renames of a save.
//!
//! A save writes every file into the temporary folder, fsyncs each file and folder in it, then
//! swaps it in by two renames (`<dir>` → `<dir>.old`, `<dir>.tmp-<pid>` → `<dir>`), fsyncing the
//! parent folder after each, and only then deletes the old checkpoint. A crash (or a power cut)
//! at any point leaves either the old checkpoint or the new one complete on disk: between the two
//! renames the old one sits under `<dir>.old`, where [`resolve`] finds it.
//!
//! Leftovers and strangers:
//!
//! * a `<dir>.tmp-<pid>` folder whose process is gone (killed mid-save) is removed by the next
//!   save; one whose process is alive is left alone. Liveness is read from `/proc/<pid>` on
//!   Linux; elsewhere (or without `/proc`) every process counts as alive, so nothing is removed.
//!   Two processes saving to the same `<dir>` at the same time are not supported.
//! * `<dir>` or `<dir>.old` that exists but is not a folder (a regular file, a symbolic link,
//!   anything else) was not made by this module: the save refuses with [`Error::FileOp`] naming
//!   it, before anything is written, and leaves it untouched. Moving it aside would hide the
//!   user's data under a name nobody looks at; deleting it would lose it.
//!
//! Every failure is an [`Error::FileOp`] naming the operation and the path.

use std::fs::File;
use std::path::{Path, PathBuf};

use torchscale_core::{Error, Result};

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        Error::invalid(
            "checkpoint dir",
            format!("`{}` has no folder name", dir.display()),
        )
    })?;
    let mut n = name.to_os_string();
    n.push(suffix);
    Ok(dir.with_file_name(n))
}

/// The folder holding `dir` (`.` for a bare name).
fn parent_of(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether `path` is a real folder (`true`) or absent (`false`); anything else is refused with
/// `op` named, and left as it is.
fn folder_or_absent(path: &Path, op: &str) -> Result<bool> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::file_op("inspect", path, e)),
    };
    let ft = md.file_type();
    if ft.is_dir() {
        return Ok(true);
    }
    let what = if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a folder"
    };
    Err(Error::file_op(
        op,
        path,
        format!(
            "it is {what}, not a checkpoint folder; it was left untouched and nothing was written"
        ),
    ))
}

/// Flushes a folder's entries (names created, renamed or removed) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::file_op("fsync the folder", dir, e))?;
    }
    // Elsewhere a folder cannot be opened to be synced; renames there are as durable as the
    // file system makes them.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Fsyncs every file under `dir`, then every folder (children before parents).
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file_op("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::file_op("list", dir, e))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| Error::file_op("inspect", &path, e))?;
        if ft.is_dir() {
            sync_tree(&path)?;
        } else if ft.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::file_op("fsync", &path, e))?;
        }
    }
    sync_dir(dir)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .map_err(|e| Error::file_op(format!("rename `{}` to", from.display()), to, e))
}

fn remove_folder(path: &Path, what: &str) -> Result<()> {
    std::fs::remove_dir_all(path).map_err(|e| Error::file_op(format!("remove {what}"), path, e))
}

/// Whether process `pid` may still be running (`true` whenever it cannot be told).
fn pid_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        // Without /proc nothing can be told.
        if !Path::new("/proc/self").exists() {
            return true;
        }
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

/// The temporary folders `<dir>.tmp-<pid>` left by processes that are gone: every one whose
/// `<pid>` is not this process and not alive.
fn stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.tmp-");
    let parent = parent_of(dir);
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::file_op("list", parent, e)),
    };
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::file_op("list", parent, e))?;
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Only folders are ours (a file of that name is someone else's).
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if pid != me && is_dir && !pid_alive(pid) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `bytes` to `path`, naming the path on failure. Meant for the `write` callback of
/// [`save_atomic`], which fsyncs the file afterwards.
pub fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::file_op("write", path, e))
}

/// Writes a checkpoint folder atomically and durably: `write` fills a temporary folder, which
/// then replaces `dir` (see the module documentation for the steps and what a crash leaves).
///
/// Before anything is written: `dir` and `<dir>.old` must each be absent or a folder (anything
/// else is refused, untouched), and temporary folders of dead processes are removed. If `write`
/// fails, the temporary folder is removed and `dir` is left as it was; an I/O error from `write`
/// without a path is reported against the temporary folder.
pub fn save_atomic<F>(dir: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let _span = tracing::debug_span!("checkpoint_save", dir = %dir.display()).entered();
    let tmp = sibling(dir, &format!(".tmp-{}", std::process::id()))?;
    let old = sibling(dir, ".old")?;
    let parent = parent_of(dir);
    folder_or_absent(dir, "save a checkpoint folder at")?;
    folder_or_absent(&old, "keep the previous checkpoint at")?;
    std::fs::create_dir_all(parent).map_err(|e| Error::file_op("create the folder", parent, e))?;
    // Cleaning up is not the save's purpose: a leftover that cannot be removed is reported and
    // the save goes on.
    match stale_temporaries(dir) {
        Ok(stale) => {
            for path in stale {
                match remove_folder(&path, "the temporary folder of a dead process") {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed a stale temporary checkpoint folder")
                    }
                    Err(e) => tracing::warn!(error = %e, "stale temporary checkpoint folder left"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot look for stale temporary checkpoint folders"),
    }
    // A leftover of this very process (an earlier failed save, or a dead process with our pid).
    if folder_or_absent(&tmp, "use the temporary folder")? {
        remove_folder(&tmp, "an earlier temporary folder")?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::file_op("create the folder", &tmp, e))?;
    let written = write(&tmp)
        .map_err(|e| match e {
            Error::Io(io) => Error::file_op("write the checkpoint files into", &tmp, io),
            other => other,
        })
        .and_then(|()| sync_tree(&tmp));
    if let Err(e) = written {
        if let Err(cleanup) = remove_folder(&tmp, "the temporary folder of a failed save") {
            tracing::warn!(error = %cleanup, "temporary checkpoint folder left");
        }
        return Err(e);
    }
    // The new folder is complete on disk; now the swap, each rename made durable before the next
    // step, and the previous checkpoint deleted only once the new one is in place.
    if folder_or_absent(dir, "save a checkpoint folder at")? {
        if folder_or_absent(&old, "keep the previous checkpoint at")? {
            // A stale copy: `dir` is complete (a crash happened after the second rename).
            remove_folder(&old, "the stale previous checkpoint")?;
        }
        rename(dir, &old)?;
        sync_dir(parent)?;
    }
    rename(&tmp, dir)?;
    sync_dir(parent)?;
    if folder_or_absent(&old, "keep the previous checkpoint at")? {
        remove_folder(&old, "the previous checkpoint")?;
        sync_dir(parent)?;
    }
    Ok(())
}

/// The folder holding the latest complete checkpoint saved at `dir`: `dir` itself, or
/// `<dir>.old` when a save was interrupted between its two renames.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let old = sibling(dir, ".old")?;
    if old.is_dir() {
        return Ok(old);
    }
    Err(Error::File {
        path: dir.display().to_string(),
        reason: "no checkpoint folder here".into(),
    })
}

#[cfg(test)]
#[path = "checkpoint_dir_tests.rs"]
mod tests;
