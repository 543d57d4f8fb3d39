//! A checkpoint made of several files (weights, config, trainer state) replaced as one.
//!
//! The files are written into a fresh sibling folder, which then takes the place of the old one by
//! two renames. A crash at any point leaves either the old checkpoint or the new one complete:
//! between the two renames the old one sits under `<dir>.old`, where [`resolve`] finds it.

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

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes a checkpoint folder atomically: `write` fills a temporary folder, which then replaces
/// `dir`. If `write` fails, the temporary folder is removed and `dir` is left as it was.
pub fn save_atomic<F>(dir: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let _span = tracing::debug_span!("checkpoint_save", dir = %dir.display()).entered();
    let tmp = sibling(dir, &format!(".tmp-{}", std::process::id()))?;
    let old = sibling(dir, ".old")?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
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
mod tests {
    use super::*;

    /// `ckpt` (not yet created) inside an empty temporary folder that `TempDir` removes.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("ckpt");
        (tmp, d)
    }

    #[test]
    fn replaces_the_folder() {
        let (_tmp, dir) = scratch();
        save_atomic(&dir, |t| Ok(std::fs::write(t.join("a"), "1")?)).unwrap();
        save_atomic(&dir, |t| Ok(std::fs::write(t.join("a"), "2")?)).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
        assert!(!sibling(&dir, ".old").unwrap().exists());
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint() {
        let (_tmp, dir) = scratch();
        save_atomic(&dir, |t| Ok(std::fs::write(t.join("a"), "good")?)).unwrap();
        let r = save_atomic(&dir, |t| {
            std::fs::write(t.join("a"), "half")?;
            Err(Error::invalid("disk", "full"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "good");
        let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("ckpt")]);
    }

    #[test]
    fn resolve_finds_the_old_folder_after_a_crash_between_renames() {
        let (_tmp, dir) = scratch();
        let old = sibling(&dir, ".old").unwrap();
        std::fs::create_dir_all(&old).unwrap();
        assert_eq!(resolve(&dir).unwrap(), old);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(resolve(&dir).unwrap(), dir);
        assert!(resolve(&dir.with_file_name("none")).is_err());
    }
}
