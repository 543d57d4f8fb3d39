//! Paths as the user should read them: relative to the current folder when under it, else under
//! `~` when in the home folder, so that output names no machine-specific prefix.

use std::path::{Path, PathBuf};

/// The workspace root (the parent of xtask/).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map_or_else(|| here.to_path_buf(), Path::to_path_buf)
}

/// `path` for display: relative to `cwd` or as `~/…` under `home`, whichever of the two holds it
/// more closely (a venv in `~/.cache` reads better as `~/…` than as `../../.cache/…`); else
/// unchanged.
pub fn shown_from(path: &Path, cwd: Option<&Path>, home: Option<&Path>) -> String {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // `a/b/../c` would defeat the prefix test; resolve it when the path exists.
    let path = canon(path);
    let cwd = cwd.map(canon);
    let home = home.map(canon);
    let depth = |base: &Option<PathBuf>| {
        base.as_ref()
            .filter(|b| path.starts_with(b))
            .map(|b| b.components().count())
    };
    match (depth(&cwd), depth(&home)) {
        (Some(c), h) if h.is_none_or(|h| c >= h) => {
            let rel = path.strip_prefix(cwd.as_deref().unwrap()).unwrap_or(&path);
            if rel.as_os_str().is_empty() {
                ".".into()
            } else {
                rel.display().to_string()
            }
        }
        (_, Some(_)) => {
            let rel = path.strip_prefix(home.as_deref().unwrap()).unwrap_or(&path);
            Path::new("~").join(rel).display().to_string()
        }
        _ => path.display().to_string(),
    }
}

/// [`shown_from`] with the process's current folder and `$HOME`.
pub fn shown(path: &Path) -> String {
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    shown_from(path, cwd.as_deref(), home.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_to_cwd_then_home() {
        let (cwd, home) = (Path::new("/w/repo"), Path::new("/home/u"));
        let s = |p: &str| shown_from(Path::new(p), Some(cwd), Some(home));
        assert_eq!(s("/w/repo/target/x"), "target/x");
        assert_eq!(s("/w/repo"), ".");
        assert_eq!(s("/home/u/.cache/v/bin/python"), "~/.cache/v/bin/python");
        assert_eq!(s("/opt/python"), "/opt/python");
        assert_eq!(s("rel/path"), "rel/path");
        // The closer of the two wins.
        let inner_home = Path::new("/w/repo/target/home");
        let s = |p: &str| shown_from(Path::new(p), Some(cwd), Some(inner_home));
        assert_eq!(s("/w/repo/target/home/.cache/x"), "~/.cache/x");
        assert_eq!(s("/w/repo/src"), "src");
    }
}
