//! The atomic checkpoint folder: the swap, failed writes, crashes between renames, leftovers of
//! dead processes and entries that are not folders.

use super::*;

/// `ckpt` (not yet created) inside an empty temporary folder that `TempDir` removes.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ckpt");
    (tmp, d)
}

/// The names in `dir`'s parent, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn write_a(content: &'static str) -> impl FnOnce(&Path) -> Result<()> {
    move |t: &Path| write_file(&t.join("a"), content)
}

#[test]
fn replaces_the_folder() {
    let (_tmp, dir) = scratch();
    save_atomic(&dir, write_a("1")).unwrap();
    save_atomic(&dir, write_a("2")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
    assert_eq!(listing(&dir), vec!["ckpt"]);
}

#[test]
fn a_failed_write_leaves_the_previous_checkpoint() {
    let (_tmp, dir) = scratch();
    save_atomic(&dir, write_a("good")).unwrap();
    let r = save_atomic(&dir, |t| {
        std::fs::write(t.join("a"), "half")?;
        Err(Error::invalid("disk", "full"))
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "good");
    assert_eq!(listing(&dir), vec!["ckpt"]);
}

#[test]
fn write_errors_name_the_path() {
    let (_tmp, dir) = scratch();
    // A file in a folder that does not exist: `write_file` names the file.
    let err = save_atomic(&dir, |t| write_file(&t.join("no/such/a"), "x")).unwrap_err();
    match &err {
        Error::FileOp { op, path, .. } => {
            assert_eq!(op, "write");
            assert!(path.ends_with("a") && path.contains(".tmp-"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    // A plain I/O error from the callback is reported against the temporary folder.
    let err = save_atomic(&dir, |t| Ok(std::fs::write(t.join("no/a"), "x")?)).unwrap_err();
    match &err {
        Error::FileOp { op, path, .. } => {
            assert_eq!(op, "write the checkpoint files into");
            assert!(path.contains("ckpt.tmp-"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
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

#[test]
fn a_save_after_a_crash_replaces_the_old_folder() {
    // Between the renames: only `<dir>.old` holds a checkpoint.
    let (_tmp, dir) = scratch();
    save_atomic(&dir, write_a("1")).unwrap();
    let old = sibling(&dir, ".old").unwrap();
    std::fs::rename(&dir, &old).unwrap();
    save_atomic(&dir, write_a("2")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
    assert_eq!(listing(&dir), vec!["ckpt"]);
    // After the second rename, before the deletion: a stale `<dir>.old` next to `<dir>`.
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("a"), "stale").unwrap();
    save_atomic(&dir, write_a("3")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "3");
    assert_eq!(listing(&dir), vec!["ckpt"]);
}

#[test]
fn saving_onto_a_regular_file_refuses_and_leaves_it_untouched() {
    let (_tmp, dir) = scratch();
    let bytes = b"not a checkpoint\x00\xff".to_vec();
    std::fs::write(&dir, &bytes).unwrap();
    let mut called = false;
    let err = save_atomic(&dir, |t| {
        called = true;
        write_file(&t.join("a"), "x")
    })
    .unwrap_err();
    match &err {
        Error::FileOp { path, reason, .. } => {
            assert_eq!(Path::new(path), dir);
            assert!(reason.contains("regular file"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!called, "nothing may be written");
    assert_eq!(std::fs::read(&dir).unwrap(), bytes);
    assert_eq!(listing(&dir), vec!["ckpt"]);
}

#[test]
fn an_old_entry_that_is_a_file_is_refused_before_writing() {
    let (_tmp, dir) = scratch();
    save_atomic(&dir, write_a("1")).unwrap();
    let old = sibling(&dir, ".old").unwrap();
    std::fs::write(&old, "someone's notes").unwrap();
    let mut called = false;
    let err = save_atomic(&dir, |t| {
        called = true;
        write_file(&t.join("a"), "2")
    })
    .unwrap_err();
    match &err {
        Error::FileOp { path, .. } => assert_eq!(Path::new(path), old),
        other => panic!("{other:?}"),
    }
    assert!(!called, "nothing may be written");
    assert_eq!(std::fs::read_to_string(&old).unwrap(), "someone's notes");
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
    assert_eq!(listing(&dir), vec!["ckpt", "ckpt.old"]);
    // Once it is moved away, saving works again.
    std::fs::remove_file(&old).unwrap();
    save_atomic(&dir, write_a("2")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
}

#[cfg(unix)]
#[test]
fn a_symbolic_link_is_refused_untouched() {
    let (tmp, dir) = scratch();
    let target = tmp.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, &dir).unwrap();
    let err = save_atomic(&dir, write_a("1")).unwrap_err();
    assert!(
        matches!(&err, Error::FileOp { reason, .. } if reason.contains("symbolic link")),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(&dir)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(listing(&dir), vec!["ckpt", "elsewhere"]);
}

/// The pid of a process that has exited.
#[cfg(target_os = "linux")]
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    assert!(!pid_alive(pid));
    pid
}

#[cfg(target_os = "linux")]
#[test]
fn temporaries_of_dead_processes_are_removed_live_ones_kept() {
    let (_tmp, dir) = scratch();
    let dead = sibling(&dir, &format!(".tmp-{}", dead_pid())).unwrap();
    std::fs::create_dir(&dead).unwrap();
    std::fs::write(dead.join("model.safetensors"), vec![7u8; 4096]).unwrap();
    // pid 1 is alive in every pid namespace; a name that is not a pid is not ours.
    let live = sibling(&dir, ".tmp-1").unwrap();
    std::fs::create_dir(&live).unwrap();
    let odd = sibling(&dir, ".tmp-backup").unwrap();
    std::fs::create_dir(&odd).unwrap();
    // A file named like a dead temporary is someone else's.
    let file = sibling(&dir, &format!(".tmp-{}", dead_pid())).unwrap();
    std::fs::write(&file, "x").unwrap();
    // Another checkpoint's temporaries are not this one's.
    let other = dir.with_file_name(format!("other.tmp-{}", dead_pid()));
    std::fs::create_dir(&other).unwrap();

    save_atomic(&dir, write_a("1")).unwrap();
    assert!(!dead.exists(), "the dead process's folder stays");
    assert!(live.is_dir() && odd.is_dir() && file.is_file() && other.is_dir());
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
}

#[test]
fn a_leftover_of_this_process_is_replaced() {
    let (_tmp, dir) = scratch();
    let mine = sibling(&dir, &format!(".tmp-{}", std::process::id())).unwrap();
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("junk"), "old").unwrap();
    save_atomic(&dir, write_a("1")).unwrap();
    assert!(!dir.join("junk").exists());
    assert_eq!(listing(&dir), vec!["ckpt"]);
}

#[test]
fn nested_folders_are_written_and_synced() {
    let (_tmp, dir) = scratch();
    save_atomic(&dir, |t| {
        std::fs::create_dir(t.join("sub"))?;
        write_file(&t.join("sub/b"), "2")?;
        write_file(&t.join("a"), "1")
    })
    .unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
    // A bare relative name works too (its parent is the current folder).
    assert_eq!(parent_of(Path::new("ckpt")), Path::new("."));
}
